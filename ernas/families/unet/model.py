"""U-Net (Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation",
2015) with searchable double-conv blocks, built from an Arch.

Layout, with L = len(enc_blk_nums) levels and c_l = width·2^l channels at level l::

    encoders.i.j   level i      the first block maps c_{i-1} -> c_i (in_channels at i = 0)
    pool           2x2 max pool after every encoder level
    middle.j       level L      the first block maps c_{L-1} -> c_L
    ups.k          c_{l+1} -> c_l with l = L-1-k: 2x2 transposed conv, stride 2 (``up: transpose``)
                   or bilinear x2 and a 1x1 conv (``up: bilinear``; see ``make_up``)
    decoders.k.j   level L-1-k  input concat(skip, up) of 2·c_l channels; the first block maps
                                2·c_l -> c_l
    head           1x1 conv c_0 -> num_classes (logits)

Every block after the first of its group maps c -> c and may be skipped (``keep: false``). With
the reference choices (standard conv, kernel 3, width_mult 1, no attention, batchnorm) and one
block per level this is the classic U-Net as PyTorch code usually builds it (padded 3x3 convs
without bias, each followed by BatchNorm and ReLU; transposed-conv up): width 64 with 3 input
channels and 3 classes has 31,037,763 parameters. Inputs of any H x W are zero-padded at the
bottom/right to a multiple of 2^L and the logits cropped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernas.errors import ErnasError

GROUPS = ("encoders", "middle", "decoders")


# --------------------------------------------------------------------------- geometry
def parse_position(position: str) -> tuple[str, int | None, int]:
    """``encoders.i.j`` -> ("encoders", i, j); ``middle.j`` -> ("middle", None, j)."""
    group, *rest = position.split(".")
    if group == "middle":
        return group, None, int(rest[0])
    return group, int(rest[0]), int(rest[1])


def level_of(geometry: dict, position: str) -> int:
    """Resolution level: ``encoders.i`` at i, ``middle`` at L, ``decoders.k`` at L-1-k."""
    group, i, _ = parse_position(position)
    levels = len(geometry["enc_blk_nums"])
    if group == "middle":
        return levels
    return i if group == "encoders" else levels - 1 - i


def block_channels(geometry: dict, position: str) -> tuple[int, int]:
    """(input, output) channels of the block at ``position`` (see the module docstring)."""
    group, i, j = parse_position(position)
    lv = level_of(geometry, position)
    c = geometry["width"] * 2 ** lv
    if j > 0:
        return c, c
    if group == "decoders":
        return 2 * c, c
    return (geometry["in_channels"] if lv == 0 else c // 2), c


def is_first(position: str) -> bool:
    """The first block of its group changes channels, so it can never be skipped."""
    return parse_position(position)[2] == 0


def mid_channels(width_mult: float, cout: int) -> int:
    """Internal channels of a block: round(width_mult·c_out), half up, at least 1."""
    return max(1, int(width_mult * cout + 0.5))


# --------------------------------------------------------------------------- layers
class SeparableConv2d(nn.Module):
    """Depthwise k×k conv (no bias: with no nonlinearity before the pointwise conv a bias would
    fold into the pointwise one) then pointwise 1x1 conv c_in -> c_out."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False)
        self.pw = nn.Conv2d(cin, cout, 1, bias=bias)

    def forward(self, x):
        return self.pw(self.dw(x))


def make_conv(kind: str, cin: int, cout: int, kernel: int, bias: bool) -> nn.Module:
    if kind == "dwsep":
        return SeparableConv2d(cin, cout, kernel, bias)
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)


def se_hidden(c: int) -> int:
    """Hidden channels of squeeze-excitation: c/16 (Hu et al.), at least 4."""
    return max(4, c // 16)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (Hu et al., 2018): y·σ(W2·relu(W1·avgpool(y) + b1) + b2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, se_hidden(channels), 1)
        self.fc2 = nn.Conv2d(se_hidden(channels), channels, 1)

    def gate(self, y):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))

    def forward(self, y):
        return y * self.gate(y)

    def extra_macs(self, inputs, output) -> int:
        return inputs[0].numel()  # the rescale product


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Fold BN that *follows* a conv: a⊙(W x + b − μ) + β = (a⊙W) x + a⊙(b − μ) + β, with
    a = γ/√(σ² + ε)."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, groups=conv.groups, bias=True).to(w.device, w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * a.view(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_(a * (b - bn.running_mean) + bn.bias)
    return fused


class ConvBlock(nn.Module):
    """Double convolution with searchable choices:

        y = att(relu(n2(conv2(relu(n1(conv1(x)))))))

    conv_i: ``standard`` k×k conv or ``dwsep`` (depthwise k×k, pointwise 1x1); conv1 maps
    c_in -> mid (= round(width_mult·c_out), channel pruning), conv2 mid -> c_out; n_i: BatchNorm
    after a bias-free conv (``batchnorm``, folded by ``fuse()``) or a conv with bias (``none``);
    att: squeeze-excitation (``se``) or identity."""

    def __init__(self, cin: int, cout: int, conv: str = "standard", kernel: int = 3,
                 mid: int | None = None, attention: str = "none", norm: str = "batchnorm"):
        super().__init__()
        mid = cout if mid is None else mid
        bn = norm == "batchnorm"
        self.conv1 = make_conv(conv, cin, mid, kernel, bias=not bn)
        self.norm1 = nn.BatchNorm2d(mid) if bn else nn.Identity()
        self.conv2 = make_conv(conv, mid, cout, kernel, bias=not bn)
        self.norm2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = nn.ReLU()
        self.att = SqueezeExcite(cout) if attention == "se" else nn.Identity()

    def forward(self, x):
        y = self.act(self.norm1(self.conv1(x)))
        return self.att(self.act(self.norm2(self.conv2(y))))

    def fuse(self) -> "ConvBlock":
        """Fold BatchNorm into the preceding (pointwise) conv, inference only; no-op otherwise."""
        for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
            bn = getattr(self, norm)
            if isinstance(bn, nn.BatchNorm2d):
                c = getattr(self, conv)
                if isinstance(c, SeparableConv2d):
                    c.pw = fold_batchnorm(c.pw, bn)
                else:
                    setattr(self, conv, fold_batchnorm(c, bn))
                setattr(self, norm, nn.Identity())
        return self


def make_up(mode: str, cin: int, cout: int) -> nn.Module:
    """x2 upsampling c_in -> c_out: a 2x2 transposed conv, stride 2 (``transpose``), or bilinear
    x2 and a 1x1 conv (``bilinear``), run as the conv at the low resolution then the upsampling:
    bilinear interpolation B is linear per channel with weights summing to 1, so
    B(W x + b) = W B(x) + b, the same function at a quarter of the MACs."""
    if mode == "bilinear":
        return nn.Sequential(nn.Conv2d(cin, cout, 1),
                             nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.ConvTranspose2d(cin, cout, 2, stride=2)


def make_block(geometry: dict, position: str, choice: dict) -> nn.Module:
    """The discrete block at ``position`` (an identity when skipped)."""
    cin, cout = block_channels(geometry, position)
    if not choice.get("keep", True):
        check_skippable(position, cin, cout)
        return nn.Identity()
    return ConvBlock(cin, cout, choice["conv"], choice["kernel"],
                     mid_channels(choice["width_mult"], cout), choice["attention"], choice["norm"])


def check_skippable(position: str, cin: int, cout: int) -> None:
    if is_first(position):
        group = position.rsplit(".", 1)[0]
        raise ErnasError(
            f"block {position!r} is the first block of {group!r} and maps {cin} -> {cout} "
            f"channels, so it cannot be skipped (keep: false); in the space or arch file allow "
            f"keep: [true, false] only at extra blocks (index >= 1, e.g. {group}.1).")


# --------------------------------------------------------------------------- network
class UNet(nn.Module):
    """U-Net built from an Arch (see the module docstring). ``block(position, value)`` makes
    the block at each position (the supernet passes its super-blocks); default ``make_block``."""

    def __init__(self, arch, block=None):
        super().__init__()
        g = arch.geometry
        self.arch = arch
        width, levels = g["width"], len(g["enc_blk_nums"])
        make = block or (lambda position, value: make_block(g, position, value))
        v = arch.values

        def stage(prefix: str, n: int) -> nn.Sequential:
            return nn.Sequential(*[make(f"{prefix}.{j}", v[f"{prefix}.{j}"]) for j in range(n)])

        self.encoders = nn.ModuleList(stage(f"encoders.{i}", n)
                                      for i, n in enumerate(g["enc_blk_nums"]))
        self.pool = nn.MaxPool2d(2)
        self.middle = stage("middle", g["middle_blk_num"])
        self.ups = nn.ModuleList(make_up(g["up"], width * 2 ** (lv + 1), width * 2 ** lv)
                                 for lv in reversed(range(levels)))
        self.decoders = nn.ModuleList(stage(f"decoders.{k}", n)
                                      for k, n in enumerate(g["dec_blk_nums"]))
        self.head = nn.Conv2d(width, g["num_classes"], 1)
        self.multiple = 2 ** levels

    def forward(self, inp):
        h, w = inp.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        x = F.pad(inp, (0, pw, 0, ph)) if ph or pw else inp
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        y = self.head(x)
        return y[..., :h, :w] if ph or pw else y

    def fuse(self) -> "UNet":
        """Fold BatchNorm into the convs (inference/export); outputs unchanged."""
        for m in self.modules():
            if isinstance(m, ConvBlock):
                m.fuse()
        return self
