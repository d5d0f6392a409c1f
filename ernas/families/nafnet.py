"""NAFNet family: a U-shaped denoiser of NAF blocks, built from an Arch.

Built from ``official_arch(...)`` the model *is* NAFNet (Chen et al., 2022): the same parameter
names and shapes (``intro, encoders.i.j, downs.i, middle_blks.j, ups.i.0, decoders.i.j,
ending``), so an official state dict loads with ``strict=True``. Other choices per block:
``norm`` (layernorm | batchnorm, folded away by ``fuse()`` | none), ``attention`` (sca | none),
``kernel`` of the depthwise conv, ``dw_expand``, ``ffn_expand`` and ``keep`` (False: identity).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernas.blocks import NAFBlock, UpSample
from ernas.errors import ErnasError
from ernas.latency.ops import op_key
from ernas.space import Arch, FamilySpec, register_family

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
                  img_channel: int = 3, name: str = "nafnet") -> Arch:
    """The Arch of the official NAFNet with this geometry (reference block everywhere)."""
    g = {"img_channel": img_channel, "width": width, "enc_blk_nums": list(enc_blk_nums),
         "middle_blk_num": middle_blk_num, "dec_blk_nums": list(dec_blk_nums)}
    _validate_geometry(g, name)
    return Arch("nafnet", g, {p: dict(REFERENCE) for p in _positions(g)}, name=name)


def level_of(position: str, geometry: dict) -> int:
    """Resolution level of a position: ``encoders.i`` at level i, the middle at the bottom (L) and
    ``decoders.k`` (official order, deepest first) at level L-1-k."""
    group, *rest = position.split(".")
    levels = len(geometry["enc_blk_nums"])
    if group == "middle_blks":
        return levels
    return int(rest[0]) if group == "encoders" else levels - 1 - int(rest[0])


def make_block(c: int, choice: dict) -> nn.Module:
    if not choice.get("keep", True):
        return nn.Identity()
    return NAFBlock(c, choice["norm"], choice["attention"], choice["kernel"],
                    choice["dw_expand"], choice["ffn_expand"])


class NAFNet(nn.Module):
    """NAFNet built from an Arch; pads inputs to a multiple of 2^levels and crops back."""

    def __init__(self, arch: Arch, block_factory=make_block):
        super().__init__()
        g = arch.geometry
        self.arch = arch
        width, levels = g["width"], len(g["enc_blk_nums"])
        self.intro = nn.Conv2d(g["img_channel"], width, 3, padding=1)
        self.ending = nn.Conv2d(width, g["img_channel"], 3, padding=1)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        v = arch.values
        chan = width
        for i, n in enumerate(g["enc_blk_nums"]):
            self.encoders.append(nn.Sequential(
                *[block_factory(chan, v[f"encoders.{i}.{j}"]) for j in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(
            *[block_factory(chan, v[f"middle_blks.{j}"]) for j in range(g["middle_blk_num"])])
        for k, n in enumerate(g["dec_blk_nums"]):  # deepest first, as in the official code
            self.ups.append(UpSample(chan))
            chan //= 2
            self.decoders.append(nn.Sequential(
                *[block_factory(chan, v[f"decoders.{k}.{j}"]) for j in range(n)]))
        self.padder_size = 2 ** levels

    def forward(self, inp):
        h, w = inp.shape[-2:]
        x = self.pad(inp)
        return (self.ending(self._trunk(self.intro(x))) + x)[..., :h, :w]

    def features(self, inp) -> list[torch.Tensor]:
        """Encoder and decoder outputs (for feature distillation), in execution order."""
        feats: list[torch.Tensor] = []
        self._trunk(self.intro(self.pad(inp)), feats)
        return feats

    def _trunk(self, x, feats: list | None = None):
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        if feats is not None:
            feats.extend(skips)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
            if feats is not None:
                feats.append(x)
        return x

    def pad(self, x):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.padder_size, (-w) % self.padder_size
        return F.pad(x, (0, pw, 0, ph)) if ph or pw else x

    def fuse(self) -> "NAFNet":
        """Fold BatchNorm into neighbouring 1x1 convs (inference/export); outputs unchanged."""
        for m in self.modules():
            if isinstance(m, NAFBlock):
                m.fuse()
        return self


# --------------------------------------------------------------------------- op keys

def padded(shape, levels: int) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    m = 2 ** levels
    return n, c, h + (-h) % m, w + (-w) % m


def position_shape(geometry: dict, position: str, input_shape) -> tuple[int, int, int, int]:
    """Input shape (N, C, H, W) of the block at a position for a network input shape."""
    levels = len(geometry["enc_blk_nums"])
    n, _, h, w = padded(input_shape, levels)
    lv = level_of(position, geometry)
    return n, geometry["width"] * 2 ** lv, h // 2 ** lv, w // 2 ** lv


def block_op_keys(shape, choice: dict, granularity: str = "block") -> list[str]:
    """Op keys one block runs, as deployed (BatchNorm folded: free; skipped block: nothing).

    ``granularity='block'`` gives one key for the whole block (captures fusion inside it);
    ``'op'`` lists each op: norms, 1x1 convs, depthwise conv, gates, attention, scaled adds."""
    if not choice.get("keep", True):
        return []
    n, c, h, w = shape
    norm = "layernorm" if choice["norm"] == "layernorm" else "none"
    if granularity == "block":
        return [op_key("nafblock", shape, norm=norm, attention=choice["attention"],
                       kernel=choice["kernel"], dw_expand=choice["dw_expand"],
                       ffn_expand=choice["ffn_expand"])]
    if granularity != "op":
        raise ErnasError(f"granularity must be 'block' or 'op', got {granularity!r}.")
    dw, ffn = c * choice["dw_expand"], c * choice["ffn_expand"]
    ln = [op_key("layernorm2d", shape, impl="reduce")] if norm == "layernorm" else []
    sca = [op_key("sca", (n, dw // 2, h, w))] if choice["attention"] == "sca" else []
    return (ln + [op_key("conv2d", shape, k=1, cout=dw),
                  op_key("dwconv2d", (n, dw, h, w), k=choice["kernel"]),
                  op_key("simplegate", (n, dw, h, w))] + sca
            + [op_key("conv2d", (n, dw // 2, h, w), k=1, cout=c), op_key("scale_add", shape)]
            + ln + [op_key("conv2d", shape, k=1, cout=ffn), op_key("simplegate", (n, ffn, h, w)),
                    op_key("conv2d", (n, ffn // 2, h, w), k=1, cout=c),
                    op_key("scale_add", shape)])


def fixed_op_keys(geometry: dict, input_shape) -> list[str]:
    """Ops outside the block positions: intro/ending convs, downs, ups, skip and global adds."""
    levels = len(geometry["enc_blk_nums"])
    n, ci, h, w = padded(input_shape, levels)
    width = geometry["width"]
    keys = [op_key("conv2d", (n, ci, h, w), k=3, cout=width)]
    for lv in range(levels):
        c, s = width * 2 ** lv, 2 ** lv
        keys.append(op_key("conv2d", (n, c, h // s, w // s), k=2, s=2, cout=2 * c))
    for lv in reversed(range(levels)):
        c, s = width * 2 ** (lv + 1), 2 ** (lv + 1)
        keys += [op_key("upsample", (n, c, h // s, w // s)),
                 op_key("add", (n, c // 2, h * 2 // s, w * 2 // s))]
    keys += [op_key("conv2d", (n, width, h, w), k=3, cout=ci), op_key("add", (n, ci, h, w))]
    return keys


SPEC = register_family(FamilySpec(
    name="nafnet",
    decisions=DECISIONS,
    reference=REFERENCE,
    geometry_defaults={"img_channel": 3, "width": 32, "enc_blk_nums": [2, 2, 4, 8],
                       "middle_blk_num": 12, "dec_blk_nums": [2, 2, 2, 2]},
    validate_geometry=_validate_geometry,
    positions=_positions,
    inactive=lambda choice: not choice.get("keep", True),
    build=lambda arch: NAFNet(arch),
    fixed_op_keys=lambda g, shape, granularity: fixed_op_keys(g, shape),
    block_op_keys=lambda g, pos, choice, shape, granularity: block_op_keys(
        position_shape(g, pos, shape), choice, granularity),
))
