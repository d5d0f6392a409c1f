"""NAFNet family: a U-shaped restoration network of NAF blocks, built from an Arch.

Built from ``official_arch(...)`` the model *is* NAFNet (Chen et al., 2022): the same parameter
names and shapes (``intro, encoders.i.j, downs.i, middle_blks.j, ups.i.0, decoders.i.j,
ending``), so an official state dict loads with ``strict=True``. Decisions per block: ``norm``
(layernorm | batchnorm, folded away by ``fuse()`` | none), ``attention`` (sca | none), ``kernel``
of the depthwise conv (3 | 5 | 7), ``dw_expand`` and ``ffn_expand`` (1 | 2) and ``keep``
(False: identity). Modules: ``model`` (the network), ``super`` (its super-blocks), ``keys`` (op
keys and builders), ``pretrained`` (official weight mapping).
"""
from __future__ import annotations

from torch import nn

from ernas.errors import ErnasError
from ernas.family import Family, register_family
from ernas.families.nafnet import keys
from ernas.families.nafnet.model import NAFNet, channels_at, make_block
from ernas.families.nafnet.super import SUPER_BLOCKS
from ernas.space import Arch

DECISIONS = {  # cheapest first
    "norm": ("none", "batchnorm", "layernorm"),
    "attention": ("none", "sca"),
    "kernel": (3, 5, 7),
    "dw_expand": (1, 2),
    "ffn_expand": (1, 2),
    "keep": (False, True),
}
REFERENCE = {"norm": "layernorm", "attention": "sca", "kernel": 3, "dw_expand": 2,
             "ffn_expand": 2, "keep": True}


def _validate_geometry(g: dict, source: str) -> None:
    def bad(field, msg):
        raise ErnasError(f"{source}: geometry field {field!r} {msg}.")

    for f in ("img_channel", "width", "middle_blk_num"):
        if type(g[f]) is not int or g[f] < (0 if f == "middle_blk_num" else 1):
            bad(f, f"must be a {'non-negative' if f == 'middle_blk_num' else 'positive'} integer, "
                   f"got {g[f]!r}")
    if g["width"] % 2:
        bad("width", f"must be even (the gate halves channels), got {g['width']}")
    for f in ("enc_blk_nums", "dec_blk_nums"):
        v = g[f]
        if not isinstance(v, list) or not v or any(type(n) is not int or n < 0 for n in v):
            bad(f, f"must be a non-empty list of non-negative integers, got {v!r}")
    if len(g["enc_blk_nums"]) != len(g["dec_blk_nums"]):
        bad("dec_blk_nums", f"must have as many levels as enc_blk_nums "
                            f"({len(g['enc_blk_nums'])}), got {len(g['dec_blk_nums'])}")


def _positions(g: dict) -> list[str]:
    enc = [f"encoders.{i}.{j}" for i, n in enumerate(g["enc_blk_nums"]) for j in range(n)]
    mid = [f"middle_blks.{j}" for j in range(g["middle_blk_num"])]
    dec = [f"decoders.{i}.{j}" for i, n in enumerate(g["dec_blk_nums"]) for j in range(n)]
    return enc + mid + dec


def official_arch(width: int, enc_blk_nums, middle_blk_num: int, dec_blk_nums,
                  img_channel: int = 3, name: str = "nafnet"):
    """The Arch of the official NAFNet with this geometry (reference block everywhere)."""
    g = {"img_channel": img_channel, "width": width, "enc_blk_nums": list(enc_blk_nums),
         "middle_blk_num": middle_blk_num, "dec_blk_nums": list(dec_blk_nums)}
    _validate_geometry(g, name)
    return Arch("nafnet", g, {p: dict(REFERENCE) for p in _positions(g)}, name=name)


class NAFNetFamily(Family):
    """The NAFNet family (see the module docstring)."""

    name = "nafnet"
    decisions = DECISIONS
    reference = REFERENCE
    geometry_defaults = {"img_channel": 3, "width": 32, "enc_blk_nums": [2, 2, 4, 8],
                         "middle_blk_num": 12, "dec_blk_nums": [2, 2, 2, 2]}
    ops = keys.OPS
    super_modes = tuple(SUPER_BLOCKS)
    skip_decision = "keep"

    def validate_geometry(self, geometry, source):
        _validate_geometry(geometry, source)

    def positions(self, geometry):
        return _positions(geometry)

    def inactive(self, choice):
        return not choice.get("keep", True)

    def io_channels(self, geometry):
        return geometry["img_channel"], geometry["img_channel"]

    def build(self, arch, block=None):
        return NAFNet(arch, block)

    def make_block(self, geometry, position, choice):
        return make_block(channels_at(geometry, position), choice)

    def super_block(self, geometry, position, candidates, mode="shared"):
        if not any(candidates["keep"]):  # always skipped: nothing to mix
            return nn.Identity()
        return SUPER_BLOCKS[mode](channels_at(geometry, position), candidates)

    def fixed_keys(self, geometry, input_shape, granularity):
        return keys.fixed_op_keys(geometry, input_shape, granularity)

    def position_keys(self, geometry, position, choice, input_shape, granularity):
        return keys.block_op_keys(keys.position_shape(geometry, position, input_shape), choice,
                                  granularity)

    def feature_modules(self, model):
        return list(model.encoders) + list(model.decoders)

    def feature_channels(self, arch):
        g = arch.geometry
        levels = len(g["enc_blk_nums"])
        return ([g["width"] * 2 ** i for i in range(levels)]
                + [g["width"] * 2 ** (levels - 1 - k) for k in range(levels)])

    def map_pretrained(self, model, state):
        from ernas.families.nafnet.pretrained import map_pretrained

        return map_pretrained(model, state)


FAMILY = register_family(NAFNetFamily())
