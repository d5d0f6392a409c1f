"""U-Net family: the classic segmentation U-Net with searchable double-conv blocks.

Geometry: ``in_channels``, ``num_classes``, ``width`` (channels of level 0; level l has
width·2^l), ``enc_blk_nums`` (blocks per encoder level, L levels), ``middle_blk_num``,
``dec_blk_nums`` (per decoder level, deepest first) and ``up`` (transpose | bilinear). One block
per level is the classic U-Net; extra blocks (index >= 1) map c -> c and may be skipped.

Decisions per block, cheapest first: ``conv`` (dwsep | standard), ``kernel`` (3 | 5),
``width_mult`` (0.25 | 0.5 | 0.75 | 1.0: internal channels round(width_mult·c_out), channel
pruning that keeps the block's input and output shape), ``attention`` (none | se), ``norm``
(none | batchnorm; folded away by ``fuse()``, so it costs nothing deployed) and ``keep`` (extra
blocks only). Modules: ``model`` (the network), ``super`` (its super-block), ``keys`` (op keys
and builders).
"""
from __future__ import annotations

from torch import nn

from ernas.errors import ErnasError
from ernas.family import Family, register_family
from ernas.families.unet import keys
from ernas.families.unet.model import UNet, block_channels, make_block
from ernas.families.unet.super import SuperConvBlock

DECISIONS = {  # cheapest first
    "conv": ("dwsep", "standard"),
    "kernel": (3, 5),
    "width_mult": (0.25, 0.5, 0.75, 1.0),
    "attention": ("none", "se"),
    "norm": ("none", "batchnorm"),
    "keep": (False, True),
}
REFERENCE = {"conv": "standard", "kernel": 3, "width_mult": 1.0, "attention": "none",
             "norm": "batchnorm", "keep": True}
UP_MODES = ("transpose", "bilinear")


def _validate_geometry(g: dict, source: str) -> None:
    def bad(field, msg):
        raise ErnasError(f"{source}: geometry field {field!r} {msg}.")

    for f in ("in_channels", "num_classes", "width", "middle_blk_num"):
        if type(g[f]) is not int or g[f] < 1:
            bad(f, f"must be a positive integer, got {g[f]!r}")
    for f in ("enc_blk_nums", "dec_blk_nums"):
        v = g[f]
        if not isinstance(v, list) or not v or any(type(n) is not int or n < 1 for n in v):
            bad(f, f"must be a non-empty list of positive integers (every level needs its first "
                   f"block, which changes channels), got {v!r}")
    if len(g["enc_blk_nums"]) != len(g["dec_blk_nums"]):
        bad("dec_blk_nums", f"must have as many levels as enc_blk_nums "
                            f"({len(g['enc_blk_nums'])}), got {len(g['dec_blk_nums'])}")
    if g["up"] not in UP_MODES:
        bad("up", f"must be one of {', '.join(UP_MODES)}, got {g['up']!r}")


def _positions(g: dict) -> list[str]:
    enc = [f"encoders.{i}.{j}" for i, n in enumerate(g["enc_blk_nums"]) for j in range(n)]
    mid = [f"middle.{j}" for j in range(g["middle_blk_num"])]
    dec = [f"decoders.{k}.{j}" for k, n in enumerate(g["dec_blk_nums"]) for j in range(n)]
    return enc + mid + dec


class UNetFamily(Family):
    """The U-Net family (see the module docstring)."""

    name = "unet"
    decisions = DECISIONS
    reference = REFERENCE
    geometry_defaults = {"in_channels": 1, "num_classes": 2, "width": 64,
                         "enc_blk_nums": [1, 1, 1, 1], "middle_blk_num": 1,
                         "dec_blk_nums": [1, 1, 1, 1], "up": "transpose"}
    ops = keys.OPS

    def validate_geometry(self, geometry, source):
        _validate_geometry(geometry, source)

    def positions(self, geometry):
        return _positions(geometry)

    def inactive(self, choice):
        return not choice.get("keep", True)

    def io_channels(self, geometry):
        return geometry["in_channels"], geometry["num_classes"]

    def build(self, arch, block=None):
        return UNet(arch, block)

    def make_block(self, geometry, position, choice):
        return make_block(geometry, position, choice)

    def super_block(self, geometry, position, candidates, mode="shared"):
        if not any(candidates["keep"]):  # always skipped: nothing to mix
            return make_block(geometry, position, {"keep": False})
        return SuperConvBlock(position, *block_channels(geometry, position), candidates)

    def fixed_keys(self, geometry, input_shape, granularity):
        return keys.fixed_op_keys(geometry, input_shape, granularity)

    def position_keys(self, geometry, position, choice, input_shape, granularity):
        return keys.block_op_keys(geometry, position, choice, input_shape, granularity)

    def feature_modules(self, model: nn.Module):
        return list(model.encoders) + list(model.decoders)

    def feature_channels(self, arch):
        g = arch.geometry
        levels = len(g["enc_blk_nums"])
        return ([g["width"] * 2 ** i for i in range(levels)]
                + [g["width"] * 2 ** (levels - 1 - k) for k in range(levels)])


FAMILY = register_family(UNetFamily())
