"""NAFNet super-blocks: every candidate block of one position in one module.

``SharedBlock`` (default; Single-Path-NAS / FBNetV2 style, about one NAF block of the largest
candidates): one weight set at the largest kernel K and expansions E, F;

- depthwise conv: one K×K kernel whose centre k×k holds kernel k (``mix_kernel``);
- expansion e: conv1's outputs are two gate banks (x1 = first half, x2 = second half) and e uses
  the first e·c/2 channels of each; after the gate one soft channel mask (``mask_channels``)
  selects them (the FFN likewise with conv4/conv5);
- norm: parallel light branches Σ_n p_n·norm_n(x); attention: x·(p_sca·att(x) + p_none);
- keep: p_keep·block(x) + p_skip·x.

``DartsBlock`` (classic DARTS all-paths mixing, for comparison): separate weights per spatial
path (kernel, dw_expand, attention) and per FFN expansion, every path computed and mixed by
Π_d p_d(path's value). Memory grows with the number of candidates.

``extract_state(choice)`` gives the state dict of ``NAFBlock(c, **choice)``.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ernas.families.nafnet.model import ChannelAttention, SimpleGate, make_norm
from ernas.nn.mixed import (BranchMix, SuperBlock, centre_crop_kernel, channel_masks, index_of,
                            keep_or_skip, kernel_masks, mask_channels, mix_kernel)


def _norm(kinds, c: int) -> nn.Module:
    if len(kinds) > 1:
        return BranchMix({k: make_norm(k, c) for k in kinds})
    return make_norm(kinds[0], c)


class _NAFSuper(SuperBlock):
    """What both super-blocks share: norm mixing, β/γ, keep mixing."""

    def __init__(self, c: int, cands: dict):
        super().__init__(cands)
        self.c = c
        self.norm1 = _norm(self.cands["norm"], c)
        self.norm2 = _norm(self.cands["norm"], c)
        self.sg = SimpleGate()
        self.beta = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.gamma = nn.Parameter(torch.zeros((1, c, 1, 1)))

    def _norm(self, norm, x):
        return norm.mix(x, self.p["norm"]) if isinstance(norm, BranchMix) else norm(x)

    def forward(self, inp):
        y = inp + self.spatial(self._norm(self.norm1, inp)) * self.beta
        out = y + self.ffn(self._norm(self.norm2, y)) * self.gamma
        return keep_or_skip(out, inp, self.mixed("keep"), self.cands["keep"])

    def _common_state(self, choice: dict) -> dict:
        state = {"beta": self.beta, "gamma": self.gamma}
        for name in ("norm1", "norm2"):
            norm = getattr(self, name)
            branch = norm[choice["norm"]] if isinstance(norm, BranchMix) else norm
            state.update({f"{name}.{k}": v for k, v in branch.state_dict().items()})
        return state


class SharedBlock(_NAFSuper):
    """Weight-sharing super-block (see the module docstring)."""

    def __init__(self, c: int, cands: dict):
        super().__init__(c, cands)
        K, E, Fx = max(cands["kernel"]), max(cands["dw_expand"]), max(cands["ffn_expand"])
        self.K, self.E, self.F = K, E, Fx
        dw, ffn = c * E, c * Fx
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, K, padding=K // 2, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = ChannelAttention(dw // 2) if "sca" in cands["attention"] else nn.Identity()
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.register_buffer("kernel_masks", kernel_masks(cands["kernel"], K), persistent=False)
        self.register_buffer("dw_masks", channel_masks([e * c // 2 for e in cands["dw_expand"]],
                                                       dw // 2), persistent=False)
        self.register_buffer("ffn_masks", channel_masks([e * c // 2 for e in cands["ffn_expand"]],
                                                        ffn // 2), persistent=False)

    def spatial(self, x):
        x = self.conv1(x)
        w = mix_kernel(self.conv2.weight, self.mixed("kernel"), self.kernel_masks)
        x = F.conv2d(x, w, self.conv2.bias, padding=self.K // 2, groups=self.conv2.groups)
        x = mask_channels(self.sg(x), self.mixed("dw_expand"), self.dw_masks)
        pa = self.mixed("attention")
        if pa is not None:
            att = self.cands["attention"]
            x = x * (pa[index_of(att, "sca")] * self.sca[1](self.sca[0](x))
                     + pa[index_of(att, "none")])
        else:
            x = self.sca(x)  # ChannelAttention or Identity
        return self.conv3(x)

    def ffn(self, x):
        return self.conv5(mask_channels(self.sg(self.conv4(x)), self.mixed("ffn_expand"),
                                        self.ffn_masks))

    def extract_state(self, choice: dict) -> dict:
        """Kernel centre crop, the first e·c/2 channels of both gate banks, the chosen norm."""
        c, k = self.c, choice["kernel"]
        half, h = c * self.E // 2, c * choice["dw_expand"] // 2
        banks = torch.cat([torch.arange(h), half + torch.arange(h)])
        fhalf, fh = c * self.F // 2, c * choice["ffn_expand"] // 2
        fbanks = torch.cat([torch.arange(fh), fhalf + torch.arange(fh)])
        state = self._common_state(choice)
        state.update({
            "conv1.weight": self.conv1.weight[banks], "conv1.bias": self.conv1.bias[banks],
            "conv2.weight": centre_crop_kernel(self.conv2.weight[banks], k),
            "conv2.bias": self.conv2.bias[banks],
            "conv3.weight": self.conv3.weight[:, :h], "conv3.bias": self.conv3.bias,
            "conv4.weight": self.conv4.weight[fbanks], "conv4.bias": self.conv4.bias[fbanks],
            "conv5.weight": self.conv5.weight[:, :fh], "conv5.bias": self.conv5.bias,
        })
        if choice["attention"] == "sca":
            state["sca.1.weight"] = self.sca[1].weight[:h, :h]
            state["sca.1.bias"] = self.sca[1].bias[:h]
        return state


class SpatialPath(nn.Module):
    """One fixed spatial branch: conv3(att(SG(dwconv_k(conv1(x))))) (official child names)."""

    def __init__(self, c: int, kernel: int, dw_expand: int, attention: str):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, kernel, padding=kernel // 2, groups=dw)
        self.sca = ChannelAttention(dw // 2) if attention == "sca" else nn.Identity()
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sg = SimpleGate()

    def forward(self, x):
        return self.conv3(self.sca(self.sg(self.conv2(self.conv1(x)))))


class FFNPath(nn.Module):
    """One fixed FFN branch: conv5(SG(conv4(x)))."""

    def __init__(self, c: int, ffn_expand: int):
        super().__init__()
        self.conv4 = nn.Conv2d(c, c * ffn_expand, 1)
        self.conv5 = nn.Conv2d(c * ffn_expand // 2, c, 1)
        self.sg = SimpleGate()

    def forward(self, x):
        return self.conv5(self.sg(self.conv4(x)))


_SPATIAL = ("kernel", "dw_expand", "attention")


def _path_name(values: dict) -> str:
    return "_".join(f"{d}{v}" for d, v in values.items())


class DartsBlock(_NAFSuper):
    """All-paths super-block (see the module docstring)."""

    def __init__(self, c: int, cands: dict):
        super().__init__(c, cands)
        self.spatial_paths = nn.ModuleDict()
        for vals in itertools.product(*(cands[d] for d in _SPATIAL)):
            v = dict(zip(_SPATIAL, vals))
            self.spatial_paths[_path_name(v)] = SpatialPath(c, **v)
        self.ffn_paths = nn.ModuleDict({_path_name({"ffn_expand": e}): FFNPath(c, e)
                                        for e in cands["ffn_expand"]})

    def _weight(self, values: dict):
        w = 1.0
        for d, v in values.items():
            p = self.mixed(d)
            if p is not None:
                w = w * p[index_of(self.cands[d], v)]
        return w

    def spatial(self, x):
        out = 0
        for vals in itertools.product(*(self.cands[d] for d in _SPATIAL)):
            v = dict(zip(_SPATIAL, vals))
            out = out + self._weight(v) * self.spatial_paths[_path_name(v)](x)
        return out

    def ffn(self, x):
        paths = ({"ffn_expand": e} for e in self.cands["ffn_expand"])
        return sum(self._weight(v) * self.ffn_paths[_path_name(v)](x) for v in paths)

    def extract_state(self, choice: dict) -> dict:
        state = self._common_state(choice)
        state.update(self.spatial_paths[_path_name({d: choice[d] for d in _SPATIAL})].state_dict())
        state.update(self.ffn_paths[_path_name({"ffn_expand": choice["ffn_expand"]})].state_dict())
        return state


SUPER_BLOCKS = {"shared": SharedBlock, "darts": DartsBlock}
