"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", 2022) with searchable blocks.

With the reference choices (layernorm, sca, kernel 3, dw_expand 2, ffn_expand 2) a ``NAFBlock``
has exactly the official parameter names and shapes (``norm1, conv1..conv5, sca.1, norm2, beta,
gamma``) and the network the official module layout (``intro``, ``encoders.i.j``, ``downs.i``,
``middle_blks.j``, ``ups.i``, ``decoders.i.j``, ``ending``), so an official ``.pth`` loads with
``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of NCHW tensors: y = w·(x − μ_c)/√(σ²_c + ε) + b, statistics over C.

    Written with reductions (ReduceMean/Sub/Pow/Sqrt/Div in ONNX), the official NAFNet form."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split channels in halves and multiply: x1 ⊙ x2 (NAFNet's activation)."""

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2

    def extra_macs(self, inputs, output) -> int:
        return output.numel()


class ChannelAttention(nn.Sequential):
    """Simplified channel attention (SCA): x ⊙ W·avgpool(x). Children ``0`` (pool) and ``1``
    (1x1 conv) keep the official names ``sca.1.weight/bias``."""

    def __init__(self, channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1, bias=True))

    def forward(self, x):
        return x * super().forward(x)

    def extra_macs(self, inputs, output) -> int:
        return inputs[0].numel()


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm2d(channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def fold_batchnorm_into_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Fold BN that *precedes* a 1x1 conv: W(a⊙x + b) + c = (W·diag a)x + (W b + c),
    with a = γ/√(var+ε), b = β − a·mean."""
    assert conv.kernel_size == (1, 1) and conv.groups == 1
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias - a * bn.running_mean
    w = conv.weight
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True).to(w.device, w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * a.view(1, -1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(fused.bias)
        fused.bias.copy_(bias + (w.flatten(1) @ b))
    return fused


class NAFBlock(nn.Module):
    """NAFNet block with searchable choices.

    x = inp + β·conv3(SCA(SG(dwconv_k(conv1(norm1(inp))))))
    out = x + γ·conv5(SG(conv4(norm2(x))))
    """

    def __init__(self, c: int, norm: str = "layernorm", attention: str = "sca", kernel: int = 3,
                 dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        self.choice = dict(norm=norm, attention=attention, kernel=kernel, dw_expand=dw_expand,
                           ffn_expand=ffn_expand)
        dw = c * dw_expand
        ffn = c * ffn_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, kernel, padding=kernel // 2, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = ChannelAttention(dw // 2) if attention == "sca" else nn.Identity()
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = make_norm(norm, c)
        self.norm2 = make_norm(norm, c)
        self.beta = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.gamma = nn.Parameter(torch.zeros((1, c, 1, 1)))

    def forward(self, inp):
        x = self.conv3(self.sca(self.sg(self.conv2(self.conv1(self.norm1(inp))))))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + x * self.gamma

    def fuse(self) -> "NAFBlock":
        """Fold BatchNorm into the following 1x1 convs (inference only); no-op otherwise."""
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.conv1 = fold_batchnorm_into_conv(self.norm1, self.conv1)
            self.conv4 = fold_batchnorm_into_conv(self.norm2, self.conv4)
            self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        return self


class UpSample(nn.Sequential):
    """1x1 conv to 2C (no bias) then PixelShuffle(2): C,H,W -> C/2,2H,2W (official ``ups.i``)."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, c * 2, 1, bias=False), nn.PixelShuffle(2))


def level_of(position: str, geometry: dict) -> int:
    """Resolution level of a position: ``encoders.i`` at level i, the middle at the bottom (L) and
    ``decoders.k`` (official order, deepest first) at level L-1-k."""
    group, *rest = position.split(".")
    levels = len(geometry["enc_blk_nums"])
    if group == "middle_blks":
        return levels
    return int(rest[0]) if group == "encoders" else levels - 1 - int(rest[0])


def channels_at(geometry: dict, position: str) -> int:
    """Channels of the blocks at ``position``: width·2^level."""
    return geometry["width"] * 2 ** level_of(position, geometry)


def make_block(c: int, choice: dict) -> nn.Module:
    if not choice.get("keep", True):
        return nn.Identity()
    return NAFBlock(c, choice["norm"], choice["attention"], choice["kernel"],
                    choice["dw_expand"], choice["ffn_expand"])


class NAFNet(nn.Module):
    """NAFNet built from an Arch; pads inputs to a multiple of 2^levels and crops back.

    ``block(position, value)`` makes the block at each position (the supernet passes its
    super-blocks); by default ``make_block(channels, value)``."""

    def __init__(self, arch, block=None):
        super().__init__()
        g = arch.geometry
        self.arch = arch
        width, levels = g["width"], len(g["enc_blk_nums"])
        self.intro = nn.Conv2d(g["img_channel"], width, 3, padding=1)
        self.ending = nn.Conv2d(width, g["img_channel"], 3, padding=1)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        v = arch.values
        make = block or (lambda position, value: make_block(channels_at(g, position), value))
        chan = width
        for i, n in enumerate(g["enc_blk_nums"]):
            self.encoders.append(nn.Sequential(
                *[make(f"encoders.{i}.{j}", v[f"encoders.{i}.{j}"]) for j in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(
            *[make(f"middle_blks.{j}", v[f"middle_blks.{j}"]) for j in range(g["middle_blk_num"])])
        for k, n in enumerate(g["dec_blk_nums"]):  # deepest first, as in the official code
            self.ups.append(UpSample(chan))
            chan //= 2
            self.decoders.append(nn.Sequential(
                *[make(f"decoders.{k}.{j}", v[f"decoders.{k}.{j}"]) for j in range(n)]))
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
