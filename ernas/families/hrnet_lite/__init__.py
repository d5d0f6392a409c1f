"""HRNet-lite family: a multi-resolution network for dense prediction, searched per block.

Positions (module paths of ``model.HRNetLite``; see ``model`` for the layout):

- ``stage{s}.{m}.{b}.{j}``: block j of branch b in module m of stage s (s = 2, 3, 4; b < 3).
  Decisions: ``block`` (shuffle | separable | inverted | basic), ``kernel`` (3 | 5 | 7),
  ``width`` (0.25 | 0.5 | 0.75 | 1.0: the multiplier of the block's hidden channels) and ``keep``;
- ``fuse{s}.{m}``: the fuse unit after module m; only ``keep`` applies (a stage module is gone
  when its fuse unit and all its blocks are skipped, which limits the repetitions);
- ``fourth_branch`` (geometries with four stages): ``keep`` says whether the fourth branch exists;
  ``block``, ``kernel``, ``width`` apply to all of its blocks.

Every position's latency depends on its own choice only, so the generic expected-latency model
stays exact: E[LAT] = Σ_fixed t + Σ_s E_s[L_s] with no gating term. (That is why the fourth
stage's existence is one position owning everything the fourth branch adds, instead of a gate
making other positions exist: a gate would need P(gate)·E[L_s] in ``ExpectedLatency`` and the
same rule in ``Arch.op_keys`` and ``SearchSpace.size``.)

Geometry: ``in_channels``, ``num_classes``, ``width`` (C, even), ``stem_width``, ``head_width``,
``num_modules`` ([M2, M3] or [M2, M3, M4]), ``num_blocks`` (per stage, as long) and
``output_stride`` (4, HRNet's; 2 or 1 for small inputs: branch 0 and the head run at 1/2 or at
full resolution, see ``model``). Modules:
``blocks`` (branch blocks, fuse paths), ``model`` (the network), ``super`` (super-blocks),
``keys`` (op keys and builders).
"""
from __future__ import annotations

from torch import nn

from ernas.errors import ErnasError
from ernas.family import Family, register_family
from ernas.families.hrnet_lite import keys
from ernas.families.hrnet_lite.model import (HRNetLite, branch_channels, branch_of, make_block,
                                             stage_branches)
from ernas.families.hrnet_lite.super import BlockSuper, FourthBranchSuper, FuseSuper

DECISIONS = {  # cheapest first
    "block": ("shuffle", "separable", "inverted", "basic"),
    "kernel": (3, 5, 7),
    "width": (0.25, 0.5, 0.75, 1.0),
    "keep": (False, True),
}
REFERENCE = {"block": "basic", "kernel": 3, "width": 1.0, "keep": True}
GEOMETRY = {"in_channels": 3, "num_classes": 19, "width": 18, "stem_width": 64,
            "head_width": 270, "num_modules": [1, 3, 2], "num_blocks": [2, 2, 2],
            "output_stride": 4}
OUTPUT_STRIDES = (1, 2, 4)


def _validate_geometry(g: dict, source: str) -> None:
    def bad(field, msg):
        raise ErnasError(f"{source}: geometry field {field!r} {msg}.")

    for f in ("in_channels", "num_classes", "width", "stem_width", "head_width"):
        if type(g[f]) is not int or g[f] < 1:
            bad(f, f"must be a positive integer, got {g[f]!r}")
    if g["width"] % 2:
        bad("width", f"must be even (the shuffle block splits channels in halves), got "
                     f"{g['width']}")
    for f in ("num_modules", "num_blocks"):
        v = g[f]
        if (not isinstance(v, list) or len(v) not in (2, 3)
                or any(type(n) is not int or n < 1 for n in v)):
            bad(f, f"must list 2 (three stages) or 3 (four stages) positive integers, one per "
                   f"stage from stage 2, got {v!r}")
    if isinstance(g["output_stride"], bool) or g["output_stride"] not in OUTPUT_STRIDES:
        bad("output_stride", f"must be one of {', '.join(map(str, OUTPUT_STRIDES))} (the "
                             f"resolution of branch 0 and the head is 1/output_stride of the "
                             f"input), got {g['output_stride']!r}")
    if len(g["num_blocks"]) != len(g["num_modules"]):
        bad("num_blocks", f"must have one entry per stage, as num_modules "
                          f"({len(g['num_modules'])}), got {g['num_blocks']!r}")


def _positions(g: dict) -> list[str]:
    out = []
    for s, (modules, blocks) in enumerate(zip(g["num_modules"], g["num_blocks"]), start=2):
        if s == 4:
            out.append("fourth_branch")
        for m in range(modules):
            out += [f"stage{s}.{m}.{b}.{j}" for b in range(stage_branches(s))
                    for j in range(blocks)]
            out.append(f"fuse{s}.{m}")
    return out


class HRNetLiteFamily(Family):
    """The HRNet-lite family (see the module docstring)."""

    name = "hrnet_lite"
    decisions = DECISIONS
    reference = REFERENCE
    geometry_defaults = GEOMETRY
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
        return HRNetLite(arch, block)

    def make_block(self, geometry, position, choice):
        return make_block(geometry, position, choice)

    def super_block(self, geometry, position, candidates, mode="shared"):
        if not any(candidates["keep"]):  # always skipped: nothing to mix
            return nn.Identity()
        if position.startswith("fuse"):
            extra = {d: v for d, v in candidates.items() if d != "keep" and len(v) > 1}
            if extra:
                d, v = next(iter(extra.items()))
                raise ErnasError(
                    f"position {position} is a fuse unit: only its keep can be searched, but "
                    f"the space gives it {d}: {list(v)} (a key such as 'all' reaches fuse "
                    f"units too); put block decisions under stage2, stage3, stage4 and "
                    f"fourth_branch instead.")
            return FuseSuper(branch_channels(geometry), stage_branches(int(position[4])),
                             candidates)
        if position == "fourth_branch":
            return FourthBranchSuper(geometry, candidates)
        return BlockSuper(branch_channels(geometry)[branch_of(position)], candidates)

    def fixed_keys(self, geometry, input_shape, granularity):
        return keys.fixed_op_keys(geometry, input_shape, granularity)

    def position_keys(self, geometry, position, choice, input_shape, granularity):
        return keys.position_op_keys(geometry, position, choice, input_shape, granularity)

    def feature_modules(self, model):
        """Branch 0 of the last module of every stage (C channels at 1/output_stride)."""
        return [getattr(model, f"stage{s}")[-1][0] for s in range(2, model.stages + 1)]

    def feature_channels(self, arch):
        return [arch.geometry["width"]] * len(arch.geometry["num_modules"])


FAMILY = register_family(HRNetLiteFamily())
