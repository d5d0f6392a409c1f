"""U-Net super-block: every candidate double-conv block of one position in one module.

One weight set at the largest kernel K and the largest internal width M = mid(max width_mult):

- **conv type** (standard | dwsep). A depthwise-separable conv is a standard conv whose weight
  factorises, W_sep[o, i] = P[o, i]·D[i] (pointwise P: c_out x c_in, depthwise D: c_in x K x K),
  and convolution is linear in its weight, so mixing the two branches' outputs equals one conv
  with the mixed weight:

      p_std·conv(x, W) + p_sep·pw_P(dw_D(x)) = conv(x, p_std·W + p_sep·P⊗D).

  The super-block therefore runs **one** standard conv per layer (the cost of the standard
  candidate alone) instead of both branches; with a single candidate it runs that candidate's
  own ops. Extraction gives W, or D and P, as they are.
- **kernel** (3 | 5): centre masks, W_mix = W ⊙ Σ_k p_k·M_k, for W and D alike (the mask is
  applied after the weight mix: (p_std·W + p_sep·P⊗D) ⊙ M = p_std·W⊙M + p_sep·P⊗(D⊙M)).
- **width_mult** (channel pruning): conv1 has M outputs; after its norm and ReLU the channel
  mask m_j = Σ_w p_w·1[j < mid(w)] zeroes the pruned channels, so conv2 (and a depthwise conv,
  which has no bias) sees zeros there; extraction keeps the first mid channels of conv1, norm1
  and the inputs of conv2.
- **norm** (batchnorm | none): z = conv(x) without bias, then p_bn·BN(z) + p_none·(z + b), with
  b the bias the ``none`` block's conv carries.
- **attention** (none | se): y·(p_se·σ(SE(y)) + p_none).
- **keep** (extra blocks only): p_keep·block(x) + p_skip·x.

``extract_state(choice)`` returns the state dict of ``ConvBlock`` for ``choice``, so the
extracted network computes what the supernet computes with one-hot probabilities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernas.families.unet.model import SqueezeExcite, check_skippable, mid_channels
from ernas.nn.mixed import (SuperBlock, centre_crop_kernel, channel_masks, index_of,
                            keep_or_skip, kernel_masks, mask_channels)


class MixedConv(nn.Module):
    """One conv layer c_in -> c_out of every candidate type at the largest kernel K (weights
    ``weight`` for standard, ``dw``/``pw`` for dwsep, ``bias`` when a ``none`` norm needs it)."""

    def __init__(self, cin: int, cout: int, types: tuple, kernels: tuple, bias: bool):
        super().__init__()
        self.types, self.K = types, max(kernels)
        K = self.K
        if "standard" in types:
            self.weight = nn.Parameter(torch.empty(cout, cin, K, K))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if "dwsep" in types:
            self.dw = nn.Parameter(torch.empty(cin, 1, K, K))
            self.pw = nn.Parameter(torch.empty(cout, cin, 1, 1))
            nn.init.kaiming_uniform_(self.dw, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.pw, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.register_buffer("kernel_masks", kernel_masks(kernels, K), persistent=False)

    def forward(self, x, p_type: torch.Tensor | None, p_kernel: torch.Tensor | None):
        """The conv without bias under the type and kernel probabilities (None: fixed)."""
        mask = (None if p_kernel is None else
                torch.tensordot(p_kernel.to(x.dtype), self.kernel_masks.to(x.dtype), dims=1))
        pad = self.K // 2
        if p_type is None and self.types == ("dwsep",):
            d = self.dw if mask is None else self.dw * mask
            return F.conv2d(F.conv2d(x, d, padding=pad, groups=x.shape[1]), self.pw)
        if p_type is None:
            w = self.weight
        else:
            sep = self.pw[:, :, 0, 0, None, None] * self.dw[None, :, 0]
            w = (p_type[index_of(self.types, "standard")] * self.weight
                 + p_type[index_of(self.types, "dwsep")] * sep)
        return F.conv2d(x, w if mask is None else w * mask, padding=pad)

    def extract(self, kind: str, kernel: int, bias: bool, out=None, inp=None) -> dict:
        """Weights of ``make_conv(kind, ...)`` with kernel ``kernel`` keeping output channels
        ``[:out]`` and input channels ``[:inp]`` (None: all)."""
        o, i = slice(out), slice(inp)
        if kind == "dwsep":
            state = {"dw.weight": centre_crop_kernel(self.dw[i], kernel),
                     "pw.weight": self.pw[o, i]}
        else:
            state = {"weight": centre_crop_kernel(self.weight[o, i], kernel)}
        if bias:
            state["pw.bias" if kind == "dwsep" else "bias"] = self.bias[o]
        return state


class SuperConvBlock(SuperBlock):
    """Weight-sharing super-block of ``ConvBlock`` (see the module docstring)."""

    def __init__(self, position: str, cin: int, cout: int, cands: dict):
        super().__init__(cands)
        if False in self.cands["keep"]:
            check_skippable(position, cin, cout)
        self.cout = cout
        types, kernels = self.cands["conv"], self.cands["kernel"]
        M = max(mid_channels(w, cout) for w in self.cands["width_mult"])
        bias = "none" in self.cands["norm"]
        self.conv1 = MixedConv(cin, M, types, kernels, bias)
        self.conv2 = MixedConv(M, cout, types, kernels, bias)
        bn = "batchnorm" in self.cands["norm"]
        self.norm1 = nn.BatchNorm2d(M) if bn else nn.Identity()
        self.norm2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.att = SqueezeExcite(cout) if "se" in self.cands["attention"] else nn.Identity()
        self.register_buffer("width_masks", channel_masks(
            [mid_channels(w, cout) for w in self.cands["width_mult"]], M), persistent=False)

    def _norm(self, z, conv: MixedConv, norm: nn.Module):
        p = self.mixed("norm")
        if p is None:
            return norm(z) if self.cands["norm"] == ("batchnorm",) else \
                z + conv.bias.view(1, -1, 1, 1)
        norms = self.cands["norm"]
        return (p[index_of(norms, "batchnorm")] * norm(z)
                + p[index_of(norms, "none")] * (z + conv.bias.view(1, -1, 1, 1)))

    def _conv(self, x, conv: MixedConv, norm: nn.Module):
        z = conv(x, self.mixed("conv"), self.mixed("kernel"))
        return F.relu(self._norm(z, conv, norm))

    def forward(self, x):
        y = mask_channels(self._conv(x, self.conv1, self.norm1), self.mixed("width_mult"),
                          self.width_masks)
        y = self._conv(y, self.conv2, self.norm2)
        pa = self.mixed("attention")
        if pa is not None:
            att = self.cands["attention"]
            y = y * (pa[index_of(att, "se")] * self.att.gate(y) + pa[index_of(att, "none")])
        else:
            y = self.att(y)
        return keep_or_skip(y, x, self.mixed("keep"), self.cands["keep"])

    def extract_state(self, choice: dict) -> dict:
        """conv1's first mid outputs, conv2's first mid inputs, centre k×k taps, the chosen
        type, norm and attention."""
        mid = mid_channels(choice["width_mult"], self.cout)
        kind, k, bias = choice["conv"], choice["kernel"], choice["norm"] == "none"
        state = {}
        for name, conv, norm, sl in (("1", self.conv1, self.norm1, {"out": mid}),
                                     ("2", self.conv2, self.norm2, {"inp": mid})):
            state.update({f"conv{name}.{key}": v
                          for key, v in conv.extract(kind, k, bias, **sl).items()})
            if choice["norm"] == "batchnorm":
                keep = slice(mid) if name == "1" else slice(None)
                state.update({f"norm{name}.{key}": (v if v.dim() == 0 else v[keep])
                              for key, v in norm.state_dict().items()})
        if choice["attention"] == "se":
            state.update({f"att.{key}": v for key, v in self.att.state_dict().items()})
        return state
