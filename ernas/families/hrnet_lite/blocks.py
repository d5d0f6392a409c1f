"""HRNet-lite building blocks: conv+BN units, the four searchable branch blocks, and the paths a
fuse unit uses to pass features between branches.

Every branch block keeps its input shape (C x H x W) and has ``hidden`` inner channels (the
width multiplier prunes them, ``hidden_channels``):

- ``shuffle`` (ShuffleNetV2 unit, as in Naive Lite-HRNet): split x = [a, b] in halves,
  b' = ReLU(BN(pw(BN(dw_k(ReLU(BN(pw(b)))))))), out = shuffle(cat(a, b')) (2 groups);
- ``separable`` (depthwise-separable residual): out = ReLU(x + BN(pw(BN(dw_k(ReLU(BN(pw(BN(
  dw_k(x)))))))))) with C -> hidden -> C pointwise convs;
- ``inverted`` (MobileNetV2 inverted residual, expansion 4 at width 1):
  out = x + BN(pw(ReLU(BN(dw_k(ReLU(BN(pw(x))))))));
- ``basic`` (HRNet's basic residual block): out = ReLU(x + BN(conv_k(ReLU(BN(conv_k(x)))))).

Weight sharing (``ernas.families.hrnet_lite.super``) runs the same classes at the largest kernel
and hidden width with a :class:`Mix`: kernel centre masks on every k×k weight and one channel mask
just before the last conv (every op between the first conv and that point is per channel, so
the masked network equals the sliced one). ``fuse()`` folds each BN into the conv before it:
W' = a·W, b' = β − a·μ (+ a·b), a = γ/√(σ² + ε).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ernas.nn.mixed import mask_channels, mix_kernel

EXPANSION = {"shuffle": 0.5, "separable": 1, "inverted": 4, "basic": 1}  # hidden at width 1, /C


def hidden_channels(block: str, channels: int, width: float) -> int:
    """Inner channels of a ``block`` with ``channels`` in/out at width multiplier ``width``:
    max(1, round(width · EXPANSION[block] · channels))."""
    return max(1, round(width * EXPANSION[block] * channels))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to ``size`` (h, w) (align_corners=False, as HRNet's segmentation code)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The conv equal to bn(conv(x)) in eval mode (see the module docstring)."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, groups=conv.groups, bias=True).to(conv.weight)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * a.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias + a * (bias - bn.running_mean))
    return fused


@dataclass
class Mix:
    """Probabilities of a super-block's kernel and width decisions, and their masks."""

    kernel_p: torch.Tensor | None
    kernel_masks: torch.Tensor
    width_p: torch.Tensor | None
    width_masks: torch.Tensor

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return mix_kernel(w, self.kernel_p, self.kernel_masks)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return mask_channels(x, self.width_p, self.width_masks)


def masked(x: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    return x if mix is None else mix.mask(x)


class ConvBN(nn.Module):
    """conv (k×k, stride s, padding k//2, no bias) → BN (→ ReLU); ``mix`` mixes its kernel."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x, mix: Mix | None = None):
        if mix is None or self.conv.kernel_size == (1, 1):
            y = self.conv(x)
        else:
            c = self.conv
            y = F.conv2d(x, mix.weight(c.weight), c.bias, c.stride, c.padding, 1, c.groups)
        y = self.bn(y)
        return F.relu(y) if self.relu else y

    def fuse(self) -> "ConvBN":
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv, self.bn = fold_bn(self.conv, self.bn), nn.Identity()
        return self


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit (see the module docstring); ``channels`` must be even."""

    def __init__(self, channels: int, kernel: int, hidden: int):
        super().__init__()
        half = channels // 2
        self.pw1 = ConvBN(half, hidden, 1)
        self.dw = ConvBN(hidden, hidden, kernel, groups=hidden, relu=False)
        self.pw2 = ConvBN(hidden, half, 1)

    def forward(self, x, mix: Mix | None = None):
        a, b = x.chunk(2, dim=1)
        b = self.pw2(masked(self.dw(self.pw1(b), mix), mix))
        return torch.cat([a, b], 1).unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)


class SeparableBlock(nn.Module):
    """Depthwise-separable residual block (see the module docstring)."""

    def __init__(self, channels: int, kernel: int, hidden: int):
        super().__init__()
        self.dw1 = ConvBN(channels, channels, kernel, groups=channels, relu=False)
        self.pw1 = ConvBN(channels, hidden, 1)
        self.dw2 = ConvBN(hidden, hidden, kernel, groups=hidden, relu=False)
        self.pw2 = ConvBN(hidden, channels, 1, relu=False)

    def forward(self, x, mix: Mix | None = None):
        y = self.dw2(self.pw1(self.dw1(x, mix)), mix)
        return F.relu(x + self.pw2(masked(y, mix)))


class InvertedBlock(nn.Module):
    """Inverted residual block with a linear bottleneck (see the module docstring)."""

    def __init__(self, channels: int, kernel: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(channels, hidden, 1)
        self.dw = ConvBN(hidden, hidden, kernel, groups=hidden)
        self.pw2 = ConvBN(hidden, channels, 1, relu=False)

    def forward(self, x, mix: Mix | None = None):
        return x + self.pw2(masked(self.dw(self.pw1(x), mix), mix))


class BasicBlock(nn.Module):
    """HRNet's basic residual block with ``hidden`` channels between its two k×k convs."""

    def __init__(self, channels: int, kernel: int, hidden: int):
        super().__init__()
        self.conv1 = ConvBN(channels, hidden, kernel)
        self.conv2 = ConvBN(hidden, channels, kernel, relu=False)

    def forward(self, x, mix: Mix | None = None):
        return F.relu(x + self.conv2(masked(self.conv1(x, mix), mix), mix))


BLOCKS = {"shuffle": ShuffleBlock, "separable": SeparableBlock, "inverted": InvertedBlock,
          "basic": BasicBlock}


def branch_block(channels: int, choice: dict) -> nn.Module:
    """The discrete block of ``choice`` (block, kernel, width) on a branch of ``channels``."""
    block = choice["block"]
    return BLOCKS[block](channels, choice["kernel"],
                         hidden_channels(block, channels, choice["width"]))


# --------------------------------------------------------------------------- fuse paths
class Down(nn.Module):
    """Branch j to a lower branch i = j + hops: (hops − 1) × [3x3 s2 conv, BN, ReLU] keeping
    C_j channels, then a 3x3 s2 conv to C_i and BN (HRNet's fuse layer)."""

    def __init__(self, cin: int, cout: int, hops: int):
        super().__init__()
        self.convs = nn.Sequential(*[ConvBN(cin, cin, 3, 2) for _ in range(hops - 1)],
                                   ConvBN(cin, cout, 3, 2, relu=False))

    def forward(self, x, like):
        return self.convs(x)


class Up(nn.Module):
    """Branch j to a higher branch i: 1x1 conv to C_i and BN, then a bilinear resize to the size
    of ``like`` (branch i's features)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBN(cin, cout, 1, relu=False)

    def forward(self, x, like):
        return resize(self.conv(x), like.shape[-2:])


def fuse_paths(channels: list[int], pairs) -> nn.ModuleDict:
    """One path per ``(i, j)`` pair, into branch i from branch j, named ``"{i}_{j}"``."""
    return nn.ModuleDict({f"{i}_{j}": Down(channels[j], channels[i], i - j) if i > j
                          else Up(channels[j], channels[i]) for i, j in pairs})


def scaled(weight, x):
    """``weight · x`` (``x`` itself when ``weight`` is None: a discrete network)."""
    return x if weight is None else weight * x


def exchange(paths: nn.ModuleDict, ys: list, into: list, weight=None) -> list:
    """``z_i = into_i + Σ_j weight·path_ij(y_j)`` over the pairs of ``paths``, adding one path at
    a time (one Add per path, as the op keys count them)."""
    zs = list(into)
    for name, path in paths.items():
        i, j = (int(t) for t in name.split("_"))
        zs[i] = zs[i] + scaled(weight, path(ys[j], ys[i]))
    return zs
