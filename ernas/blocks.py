"""NAFNet building blocks, each configurable by one position's choices.

With the reference choices (layernorm, sca, kernel 3, dw_expand 2, ffn_expand 2) a ``NAFBlock``
has exactly the official parameter names and shapes: ``norm1, conv1..conv5, sca.1, norm2,
beta, gamma``.
"""
from __future__ import annotations

import torch
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
