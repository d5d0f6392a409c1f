"""U-Net op keys (what each block and the fixed parts run, as deployed) and their builders.

``granularity='block'``: one key per double-conv block, ``unet_block[att,conv,cout,k,mid]`` at
the block's real input shape N x c_in x H x W: the key holds every decision that changes the
deployed cost (conv type, kernel, internal width ``mid`` = round(width_mult·c_out), attention)
and the output channels. BatchNorm is folded into the convs at deployment, so ``norm`` is not in
the key (a folded conv and a conv with bias are the same op); a skipped block has no key.
``granularity='op'``: per op, each conv with its ReLU (``unet_conv_relu``, which onnxruntime
fuses into one node), the depthwise convs and ``unet_se``.

Fixed keys: the 2x2 max pools, the up-sampling convs, the skip concatenations and the 1x1 head.
An input whose H or W is not a multiple of 2^L is keyed at its padded size; the pad and crop
themselves have no key (the shipped experiments' latency shapes are multiples of 16).
"""
from __future__ import annotations

import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.families.unet.model import (ConvBlock, SqueezeExcite, block_channels, level_of,
                                       make_up, mid_channels)
from ernas.keys import op_key


def padded(shape, levels: int) -> tuple[int, int, int, int]:
    n, c, h, w = (int(s) for s in shape)
    m = 2 ** levels
    return n, c, h + (-h) % m, w + (-w) % m


def position_shape(geometry: dict, position: str, input_shape) -> tuple[int, int, int, int]:
    """Input shape (N, C, H, W) of the block at ``position`` for a network input shape."""
    n, _, h, w = padded(input_shape, len(geometry["enc_blk_nums"]))
    s = 2 ** level_of(geometry, position)
    return n, block_channels(geometry, position)[0], h // s, w // s


def block_op_keys(geometry: dict, position: str, choice: dict, input_shape,
                  granularity: str = "block") -> list[str]:
    """Op keys the block at ``position`` runs with ``choice`` (see the module docstring)."""
    if not choice.get("keep", True):
        return []
    shape = position_shape(geometry, position, input_shape)
    cout = block_channels(geometry, position)[1]
    mid = mid_channels(choice["width_mult"], cout)
    conv, k = choice["conv"], choice["kernel"]
    if granularity == "block":
        return [op_key("unet_block", shape, conv=conv, k=k, mid=mid, cout=cout,
                       att=choice["attention"])]
    if granularity != "op":
        raise ErnasError(f"granularity must be 'block' or 'op', got {granularity!r}.")
    n, cin, h, w = shape
    keys = []
    for c_in, c_out in ((cin, mid), (mid, cout)):
        if conv == "dwsep":
            keys += [op_key("dwconv2d", (n, c_in, h, w), k=k, bias=0),
                     op_key("unet_conv_relu", (n, c_in, h, w), k=1, cout=c_out)]
        else:
            keys.append(op_key("unet_conv_relu", (n, c_in, h, w), k=k, cout=c_out))
    if choice["attention"] == "se":
        keys.append(op_key("unet_se", (n, cout, h, w)))
    return keys


def fixed_op_keys(geometry: dict, input_shape, granularity: str = "block") -> list[str]:
    """Pools, up-sampling convs, skip concatenations and the head (any granularity)."""
    levels = len(geometry["enc_blk_nums"])
    n, _, h, w = padded(input_shape, levels)
    width = geometry["width"]

    def at(lv: int, c: int) -> tuple[int, int, int, int]:
        return n, c, h // 2 ** lv, w // 2 ** lv

    keys = [op_key("unet_pool", at(lv, width * 2 ** lv)) for lv in range(levels)]
    for lv in reversed(range(levels)):
        c = width * 2 ** lv
        keys += [op_key("unet_up", at(lv + 1, 2 * c), mode=geometry["up"], cout=c),
                 op_key("unet_concat", at(lv, c), other=c)]
    keys.append(op_key("conv2d", (n, width, h, w), k=1, cout=geometry["num_classes"]))
    return keys


class Concat(nn.Module):
    """Channel concatenation [x, B] with B a constant tensor of ``other`` channels (the skip
    concatenation: one Concat node reading two tensors, as in the network)."""

    def __init__(self, shape, other: int):
        super().__init__()
        n, _, h, w = shape
        self.register_buffer("other", torch.randn(n, other, h, w))

    def forward(self, x):
        return torch.cat([x, self.other], dim=1)


def _block(a: dict, shape) -> nn.Module:
    return ConvBlock(shape[1], int(a["cout"]), a["conv"], int(a["k"]), int(a["mid"]), a["att"],
                     norm="none")


def _conv_relu(a: dict, shape) -> nn.Module:
    k = int(a["k"])
    return nn.Sequential(nn.Conv2d(shape[1], int(a["cout"]), k, padding=k // 2), nn.ReLU())


OPS = {
    "unet_block": _block,
    "unet_conv_relu": _conv_relu,
    "unet_se": lambda a, s: SqueezeExcite(s[1]),
    "unet_pool": lambda a, s: nn.MaxPool2d(2),
    "unet_up": lambda a, s: make_up(a["mode"], s[1], int(a["cout"])),
    "unet_concat": lambda a, s: Concat(s, int(a["other"])),
}
