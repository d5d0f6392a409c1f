"""A plain, fixed NAFNet written independently of ernas (no choices, no shared code), following
the official architecture's module layout, so tests can check that ernas' configurable family
reproduces the official parameter names, shapes and outputs. It stands in for the official
code, which cannot be downloaded here."""
import torch
import torch.nn.functional as F
from torch import nn


class RefLayerNorm2d(nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.register_parameter("weight", nn.Parameter(torch.ones(c)))
        self.register_parameter("bias", nn.Parameter(torch.zeros(c)))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return self.weight[None, :, None, None] * (x - mu) / (var + self.eps).sqrt() \
            + self.bias[None, :, None, None]


class RefBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = 2 * c
        self.conv1 = nn.Conv2d(c, d, 1)
        self.conv2 = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.conv4 = nn.Conv2d(c, d, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.norm1, self.norm2 = RefLayerNorm2d(c), RefLayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp):
        x = self.conv2(self.conv1(self.norm1(inp)))
        a, b = x.chunk(2, 1)
        x = a * b
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        a, b = self.conv4(self.norm2(y)).chunk(2, 1)
        return y + self.conv5(a * b) * self.gamma


class RefNAFNet(nn.Module):
    def __init__(self, img_channel=3, width=16, middle_blk_num=1, enc_blk_nums=(), dec_blk_nums=()):
        super().__init__()
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.ups, self.downs = nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[RefBlock(c) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, 2))
            c *= 2
        self.middle_blks = nn.Sequential(*[RefBlock(c) for _ in range(middle_blk_num)])
        for n in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[RefBlock(c) for _ in range(n)]))
        self.m = 2 ** len(self.encoders)

    def forward(self, inp):
        _, _, h, w = inp.shape
        x0 = F.pad(inp, (0, (self.m - w % self.m) % self.m, 0, (self.m - h % self.m) % self.m))
        x = self.intro(x0)
        encs = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x)
            encs.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for dec, up, skip in zip(self.decoders, self.ups, encs[::-1]):
            x = dec(up(x) + skip)
        return (self.ending(x) + x0)[:, :, :h, :w]
