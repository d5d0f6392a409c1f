"""Family ``tinyfam``: a residual conv net written against the public Family contract only.

Layout (module paths are the block positions)::

    stem        3x3 conv in_channels -> width
    blocks.i    i < num_blocks: y = x + relu(conv_k(x)), width -> width, skippable
    head        3x3 conv width -> in_channels
    output      input + head(...)   (global residual)

Decisions, cheapest first: ``kernel`` (3 | 5) and ``keep`` (false | true). The super-block holds
one 5x5 weight and mixes kernels with centre masks (``mix_kernel``) and keep-vs-identity with
``keep_or_skip``; ``extract_state`` cuts the centre k x k taps. Op keys: generic ``conv2d`` and
``add`` for the fixed parts, the family's own ``tiny_res`` (registered through ``Family.ops``)
for a block.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernas.errors import ErnasError
from ernas.family import Family
from ernas.keys import op_key
from ernas.nn.mixed import SuperBlock, centre_crop_kernel, keep_or_skip, kernel_masks, mix_kernel


class ResBlock(nn.Module):
    """y = x + relu(conv_k(x))."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class SuperRes(SuperBlock):
    """Every ResBlock candidate of one position: one K x K weight (K the largest kernel)."""

    def __init__(self, channels: int, candidates: dict):
        super().__init__(candidates)
        self.K = max(self.cands["kernel"])
        self.weight = nn.Parameter(torch.empty(channels, channels, self.K, self.K))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("masks", kernel_masks(self.cands["kernel"], self.K),
                             persistent=False)

    def forward(self, x):
        w = mix_kernel(self.weight, self.mixed("kernel"), self.masks)
        y = x + F.relu(F.conv2d(x, w, self.bias, padding=self.K // 2))
        return keep_or_skip(y, x, self.mixed("keep"), self.cands["keep"])

    def extract_state(self, choice):
        return {"conv.weight": centre_crop_kernel(self.weight, choice["kernel"]),
                "conv.bias": self.bias}


def positions(g: dict) -> list[str]:
    return [f"blocks.{i}" for i in range(g["num_blocks"])]


def make_block(g: dict, position: str, choice: dict) -> nn.Module:
    if not choice.get("keep", True):
        return nn.Identity()
    return ResBlock(g["width"], choice["kernel"])


class TinyNet(nn.Module):
    def __init__(self, arch, block=None):
        super().__init__()
        g = arch.geometry
        make = block or (lambda position, value: make_block(g, position, value))
        self.stem = nn.Conv2d(g["in_channels"], g["width"], 3, padding=1)
        self.blocks = nn.Sequential(*[make(p, arch.values[p]) for p in positions(g)])
        self.head = nn.Conv2d(g["width"], g["in_channels"], 3, padding=1)

    def forward(self, x):
        return x + self.head(self.blocks(self.stem(x)))


class TinyFamily(Family):
    name = "tinyfam"
    decisions = {"kernel": (3, 5), "keep": (False, True)}
    reference = {"kernel": 3, "keep": True}
    geometry_defaults = {"in_channels": 3, "width": 16, "num_blocks": 2}
    ops = {"tiny_res": lambda a, shape: ResBlock(shape[1], int(a["k"]))}

    def validate_geometry(self, geometry, source):
        for f in self.geometry_defaults:
            v = geometry[f]
            if type(v) is not int or v < 1:
                raise ErnasError(f"{source}: geometry field {f!r} must be a positive integer, "
                                 f"got {v!r}.")

    def positions(self, geometry):
        return positions(geometry)

    def inactive(self, choice):
        return not choice.get("keep", True)

    def io_channels(self, geometry):
        return geometry["in_channels"], geometry["in_channels"]

    def build(self, arch, block=None):
        return TinyNet(arch, block)

    def make_block(self, geometry, position, choice):
        return make_block(geometry, position, choice)

    def super_block(self, geometry, position, candidates, mode="shared"):
        if not any(candidates["keep"]):  # always skipped: nothing to mix
            return nn.Identity()
        return SuperRes(geometry["width"], candidates)

    def fixed_keys(self, geometry, input_shape, granularity):
        n, _, h, w = (int(s) for s in input_shape)
        c, width = geometry["in_channels"], geometry["width"]
        return [op_key("conv2d", (n, c, h, w), k=3, cout=width),
                op_key("conv2d", (n, width, h, w), k=3, cout=c),
                op_key("add", (n, c, h, w))]

    def position_keys(self, geometry, position, choice, input_shape, granularity):
        if self.inactive(choice):
            return []
        n, _, h, w = (int(s) for s in input_shape)
        return [op_key("tiny_res", (n, geometry["width"], h, w), k=choice["kernel"])]


FAMILY = TinyFamily()
