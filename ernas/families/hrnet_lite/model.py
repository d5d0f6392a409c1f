"""HRNet-lite: a high-resolution network (Wang et al., HRNet) with searchable blocks, built from an
Arch.

Layout (C = ``width``, OS = ``output_stride``, branch b has C·2^b channels at 1/(OS·2^b) of the
input):

- ``stem``: two 3x3 conv-BN-ReLU to ``stem_width`` channels at 1/OS: strides (2, 2) for OS 4
  (HRNet's), (2, 1) for 2 and (1, 1) for 1 (small inputs, where 1/4 caps the accuracy: the head
  of a 96x80 slice would predict 24x20 pixels);
- ``transition1``: branch 0 (3x3 conv) and branch 1 (3x3 stride-2 conv) from the stem;
- ``stage2``: ``num_modules[0]`` modules on 2 branches; ``transition2`` adds branch 2 (3x3
  stride-2 conv of branch 1); ``stage3``: ``num_modules[1]`` modules on 3 branches; with a third
  entry in ``num_modules``, ``stage4``: modules on branches 0-2 plus the fourth branch;
- a module runs ``num_blocks[s]`` blocks per branch (positions ``stage{s}.{m}.{b}.{j}``), then
  its fuse unit (position ``fuse{s}.{m}``): z_i = y_i + Σ_{j≠i} path_ij(y_j), strided 3x3 convs
  down and 1x1 conv + bilinear resize up (HRNet's fuse layer, without the ReLU after the sum, so
  that a fuse unit and the fourth branch add their terms independently);
- ``fourth_branch`` (one position): everything the fourth branch brings — ``transition`` (3x3
  stride-2 conv of branch 2), its blocks in every stage-4 module (one choice of block, kernel and
  width for all of them), its ``exchange`` paths to and from branches 0-2 in every stage-4
  module, and its ``head`` input. Skipping it (keep: false) removes the fourth branch; with the
  stage-4 blocks and fuse units skipped too, the network is a three-stage HRNet. Its latency is
  its own keys only, so E[LAT] stays a sum over positions;
- ``head``: every branch upsampled to branch 0, concatenated, 1x1 conv, BN, ReLU, 1x1 conv to the
  classes, bilinear resize to the input. Computed in the equal, cheaper form
  Σ_b resize(P_b·x_b) (a 1x1 conv of a concatenation is the sum of 1x1 convs of its parts, and
  a 1x1 conv commutes with bilinear resizing, whose weights sum to 1).

Any H, W works without padding: a stride-2 conv gives ⌈h/2⌉, and every upsampling resizes to
the exact size of its target (the input for the head), as HRNet's segmentation code does.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ernas.families.hrnet_lite.blocks import (ConvBN, branch_block, exchange, fold_bn,
                                              fuse_paths, resize, scaled)

FOURTH_PAIRS = [(i, 3) for i in range(3)] + [(3, j) for j in range(3)]


def branch_channels(geometry: dict) -> list[int]:
    """Channels of branches 0..3: width·2^b."""
    return [geometry["width"] * 2 ** b for b in range(4)]


def stem_strides(geometry: dict) -> tuple[int, int]:
    """Strides of the two stem convs for the geometry's ``output_stride``."""
    return {4: (2, 2), 2: (2, 1), 1: (1, 1)}[geometry.get("output_stride", 4)]


def stage_branches(stage: int) -> int:
    """Branches run by the block positions and fuse unit of a stage (2, 3, 3)."""
    return min(stage, 3)


def fuse_pairs(n: int) -> list[tuple[int, int]]:
    """Every (into, from) pair of a fuse unit over n branches."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


class FuseUnit(nn.Module):
    """A stage module's fuse unit over n branches (see the module docstring)."""

    def __init__(self, channels: list[int], n: int):
        super().__init__()
        self.paths = fuse_paths(channels, fuse_pairs(n))

    def forward(self, ys):
        return exchange(self.paths, ys, ys)


def build_fourth_branch(module: nn.Module, geometry: dict, make_block) -> None:
    """Give ``module`` the fourth branch's parts (see the module docstring); ``make_block()``
    makes each of its blocks."""
    c = branch_channels(geometry)
    modules, blocks = geometry["num_modules"][2], geometry["num_blocks"][2]
    module.transition = ConvBN(c[2], c[3], 3, 2)
    module.blocks = nn.ModuleList(nn.Sequential(*[make_block() for _ in range(blocks)])
                                  for _ in range(modules))
    module.exchange = nn.ModuleList(fuse_paths(c, FOURTH_PAIRS) for _ in range(modules))
    module.head = nn.Conv2d(c[3], geometry["head_width"], 1, bias=False)


class FourthBranch(nn.Module):
    """The fourth branch with one block choice (block, kernel, width) for all its blocks."""

    def __init__(self, geometry: dict, choice: dict):
        super().__init__()
        c3 = branch_channels(geometry)[3]
        build_fourth_branch(self, geometry, lambda: branch_block(c3, choice))

    def presence(self):
        """Weight of the branch's terms: None (present) here, p_keep in the super-block."""
        return None


class Head(nn.Module):
    """Segmentation head over branches 0-2 (see the module docstring); ``extra`` is the fourth
    branch's term, already at branch 0's size."""

    def __init__(self, channels: list[int], width: int, classes: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in channels)
        self.bn = nn.BatchNorm2d(width)
        self.cls = nn.Conv2d(width, classes, 1)

    def forward(self, xs, size, extra=None):
        z = self.proj[0](xs[0])
        for proj, x in zip(self.proj[1:], xs[1:]):
            z = z + resize(proj(x), xs[0].shape[-2:])
        if extra is not None:
            z = z + extra
        return resize(self.cls(F.relu(self.bn(z))), size)

    def fuse(self, extra: nn.Conv2d | None = None) -> None:
        """Fold BN into the projections: a·P_b for every branch (``extra`` too), bias in P_0."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn = self.bn
        a = bn.weight / (bn.running_var + bn.eps).sqrt()
        self.proj[0] = fold_bn(self.proj[0], bn)
        for conv in [*self.proj[1:], *([extra] if extra is not None else [])]:
            conv.weight.data.mul_(a.view(-1, 1, 1, 1))
        self.bn = nn.Identity()


def branch_of(position: str) -> int:
    """Branch b of a block position ``stage{s}.{m}.{b}.{j}``."""
    return int(position.split(".")[2])


def make_block(geometry: dict, position: str, choice: dict) -> nn.Module:
    """The module at a position: a branch block, a fuse unit or the fourth branch (an identity
    when ``choice`` skips it)."""
    if not choice["keep"]:
        return nn.Identity()
    c = branch_channels(geometry)
    if position.startswith("fuse"):
        return FuseUnit(c, stage_branches(int(position[4])))
    if position == "fourth_branch":
        return FourthBranch(geometry, choice)
    return branch_block(c[branch_of(position)], choice)


class HRNetLite(nn.Module):
    """HRNet-lite of an Arch (see the module docstring). ``block(position, value)`` makes the
    module at each position (the supernet passes its super-blocks); by default
    ``make_block(geometry, position, value)``."""

    def __init__(self, arch, block=None):
        super().__init__()
        g, v = arch.geometry, arch.values
        self.arch = arch
        make = block or (lambda position, value: make_block(g, position, value))
        c, stem = branch_channels(g), g["stem_width"]
        s1, s2 = stem_strides(g)
        self.stem = nn.Sequential(ConvBN(g["in_channels"], stem, 3, s1), ConvBN(stem, stem, 3, s2))
        self.transition1 = nn.ModuleList([ConvBN(stem, c[0], 3), ConvBN(stem, c[1], 3, 2)])
        self.transition2 = ConvBN(c[1], c[2], 3, 2)
        self.stages = len(g["num_modules"]) + 1
        for s, (modules, blocks) in enumerate(zip(g["num_modules"], g["num_blocks"]), start=2):
            n = stage_branches(s)
            setattr(self, f"stage{s}", nn.ModuleList(
                nn.ModuleList(nn.Sequential(*[make(p, v[p]) for p in
                                              (f"stage{s}.{m}.{b}.{j}" for j in range(blocks))])
                              for b in range(n)) for m in range(modules)))
            setattr(self, f"fuse{s}", nn.ModuleList(make(f"fuse{s}.{m}", v[f"fuse{s}.{m}"])
                                                    for m in range(modules)))
        if self.stages == 4:
            self.fourth_branch = make("fourth_branch", v["fourth_branch"])
        self.head = Head(c[:3], g["head_width"], g["num_classes"])

    def forward(self, x):
        size = x.shape[-2:]
        x = self.stem(x)
        xs = self._stage(2, [self.transition1[0](x), self.transition1[1](x)])
        xs = self._stage(3, xs + [self.transition2(xs[1])])
        extra = None
        if self.stages == 4:
            xs, extra = self._stage4(xs)
        return self.head(xs, size, extra)

    def _stage(self, s: int, xs: list) -> list:
        for module, fuse in zip(getattr(self, f"stage{s}"), getattr(self, f"fuse{s}")):
            xs = fuse([branch(x) for branch, x in zip(module, xs)])
        return xs

    def _stage4(self, xs: list):
        """Stage 4: modules on branches 0-2, plus the fourth branch's terms scaled by its
        presence (1 in a discrete network, p_keep in the supernet)."""
        fourth = self.fourth_branch
        if isinstance(fourth, nn.Identity):
            return self._stage(4, xs), None
        g = fourth.presence()
        x3 = fourth.transition(xs[2])
        for m, (module, fuse) in enumerate(zip(self.stage4, self.fuse4)):
            ys = [branch(x) for branch, x in zip(module, xs)]
            y3 = fourth.blocks[m](x3)
            *xs, x3 = exchange(fourth.exchange[m], ys + [y3], fuse(ys) + [y3], g)
        return xs, scaled(g, resize(fourth.head(x3), xs[0].shape[-2:]))

    def fuse(self) -> "HRNetLite":
        """Fold every BatchNorm into the conv before it (inference/export); outputs unchanged."""
        for m in list(self.modules()):
            if isinstance(m, ConvBN):
                m.fuse()
        fourth = getattr(self, "fourth_branch", None)
        self.head.fuse(fourth.head if isinstance(fourth, FourthBranch) else None)
        return self
