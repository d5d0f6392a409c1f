"""HRNet-lite op keys (what each position and the fixed parts run, as deployed: BN folded) and
their builders.

Keys (``granularity='block'``; shapes are the op's input, N x C x H x W):

- ``hrnet_conv[cout,k,s]``: a conv and its ReLU of the stem and the transitions;
- ``hrnet_block[block,hidden,k]``: one branch block;
- ``hrnet_down[cout,hops]`` / ``hrnet_up[bias,cout,h,w]``: one fuse path *and* its Add into the
  target branch (``z + path(y)``; measured with z a constant of the target's shape); the head's
  projections of branches 1-3 are ``hrnet_up`` too (1x1 conv without bias, resize, Add);
- ``conv2d[cout,k=1]``: the head's projection of branch 0; ``hrnet_tail[cout,h,w]``: ReLU,
  1x1 conv to the classes and the resize to the input.

Branch b runs at (h_b, w_b) with h_0 = H halved (⌈·/2⌉) once per stride-2 stem conv (twice at
output stride 4, once at 2, never at 1) and h_{b+1} = ⌈h_b/2⌉. A skipped position has no key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernas.errors import ErnasError
from ernas.families.hrnet_lite.blocks import BLOCKS, ConvBN, Down, Up, hidden_channels, resize
from ernas.families.hrnet_lite.model import (FOURTH_PAIRS, branch_channels, fuse_pairs,
                                             stage_branches, stem_strides)
from ernas.keys import op_key


def _half(n: int) -> int:
    return -(-n // 2)


def _stride(n: int, s: int) -> int:
    return _half(n) if s == 2 else n


def branch_shapes(geometry: dict, input_shape) -> list[tuple[int, int, int, int]]:
    """Feature shapes (N, C_b, h_b, w_b) of branches 0..3 for a network input shape."""
    n, _, h, w = input_shape
    for s in stem_strides(geometry):
        h, w = _stride(h, s), _stride(w, s)
    out = []
    for c in branch_channels(geometry):
        out.append((n, c, h, w))
        h, w = _half(h), _half(w)
    return out


def _path_key(shapes, i: int, j: int) -> str:
    """Key of the fuse path into branch i from branch j (with its Add)."""
    if i > j:
        return op_key("hrnet_down", shapes[j], cout=shapes[i][1], hops=i - j)
    return op_key("hrnet_up", shapes[j], bias=1, cout=shapes[i][1], h=shapes[i][2],
                  w=shapes[i][3])


def _head_up_key(geometry: dict, shapes, b: int) -> str:
    return op_key("hrnet_up", shapes[b], bias=0, cout=geometry["head_width"], h=shapes[0][2],
                  w=shapes[0][3])


def block_key(shape, choice: dict) -> str:
    return op_key("hrnet_block", shape, block=choice["block"], k=choice["kernel"],
                  hidden=hidden_channels(choice["block"], shape[1], choice["width"]))


def _check(granularity: str) -> None:
    if granularity != "block":
        raise ErnasError(f"latency.granularity={granularity!r}: family hrnet_lite has op keys "
                         f"per block only; set latency.granularity=block.")


def fixed_op_keys(geometry: dict, input_shape, granularity: str = "block") -> list[str]:
    """Stem, transitions 1-2 and the head over branches 0-2."""
    _check(granularity)
    n, _, h, w = input_shape
    s = branch_shapes(geometry, input_shape)
    stem = geometry["stem_width"]
    at_stem = (n, stem, s[0][2], s[0][3])
    s1, s2 = stem_strides(geometry)
    return [op_key("hrnet_conv", input_shape, cout=stem, k=3, s=s1),
            op_key("hrnet_conv", (n, stem, _stride(h, s1), _stride(w, s1)), cout=stem, k=3,
                   s=s2),
            op_key("hrnet_conv", at_stem, cout=s[0][1], k=3, s=1),
            op_key("hrnet_conv", at_stem, cout=s[1][1], k=3, s=2),
            op_key("hrnet_conv", s[1], cout=s[2][1], k=3, s=2),
            op_key("conv2d", s[0], cout=geometry["head_width"], k=1),
            _head_up_key(geometry, s, 1), _head_up_key(geometry, s, 2),
            op_key("hrnet_tail", (n, geometry["head_width"], s[0][2], s[0][3]),
                   cout=geometry["num_classes"], h=h, w=w)]


def position_op_keys(geometry: dict, position: str, choice: dict, input_shape,
                     granularity: str = "block") -> list[str]:
    """Keys of one position with ``choice`` (none when skipped)."""
    _check(granularity)
    if not choice["keep"]:
        return []
    s = branch_shapes(geometry, input_shape)
    group, *index = position.split(".")
    if group.startswith("fuse"):
        return [_path_key(s, i, j) for i, j in fuse_pairs(stage_branches(int(group[4:])))]
    if group == "fourth_branch":
        modules, blocks = geometry["num_modules"][2], geometry["num_blocks"][2]
        per_module = [block_key(s[3], choice)] * blocks + [_path_key(s, i, j)
                                                           for i, j in FOURTH_PAIRS]
        return ([op_key("hrnet_conv", s[2], cout=s[3][1], k=3, s=2)]
                + per_module * modules + [_head_up_key(geometry, s, 3)])
    return [block_key(s[int(index[1])], choice)]


# --------------------------------------------------------------------------- builders
class _Into(nn.Module):
    """``z + path(x)`` with z a constant of the target's shape (a fuse path and its Add)."""

    def __init__(self, path: nn.Module, target_shape):
        super().__init__()
        self.path = path
        self.register_buffer("z", torch.randn(target_shape))

    def forward(self, x):
        return self.z + self.path(x, self.z)


class _ProjectUp(nn.Module):
    """The head's projection of a lower branch: 1x1 conv without bias, resize."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x, like):
        return resize(self.conv(x), like.shape[-2:])


class _Tail(nn.Module):
    """ReLU, 1x1 conv to the classes, resize to the input size (the head's end)."""

    def __init__(self, cin: int, classes: int, size):
        super().__init__()
        self.cls = nn.Conv2d(cin, classes, 1)
        self.size = size

    def forward(self, x):
        return resize(self.cls(F.relu(x)), self.size)


class _ConvReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, s: int):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2), nn.ReLU())


def _down(a, shape):
    hops, cout = int(a["hops"]), int(a["cout"])
    h, w = shape[2:]
    for _ in range(hops):
        h, w = _half(h), _half(w)
    return _Into(Down(shape[1], cout, hops), (shape[0], cout, h, w)).eval()


def _up(a, shape):
    cout, h, w = int(a["cout"]), int(a["h"]), int(a["w"])
    path = Up(shape[1], cout) if a["bias"] == "1" else _ProjectUp(shape[1], cout)
    return _Into(path, (shape[0], cout, h, w)).eval()


def _fused(module: nn.Module) -> nn.Module:
    for m in list(module.modules()):
        if isinstance(m, ConvBN):
            m.fuse()
    return module


OPS = {
    "hrnet_conv": lambda a, s: _ConvReLU(s[1], int(a["cout"]), int(a["k"]), int(a["s"])),
    "hrnet_block": lambda a, s: _fused(BLOCKS[a["block"]](s[1], int(a["k"]),
                                                          int(a["hidden"])).eval()),
    "hrnet_down": lambda a, s: _fused(_down(a, s)),
    "hrnet_up": lambda a, s: _fused(_up(a, s)),
    "hrnet_tail": lambda a, s: _Tail(s[1], int(a["cout"]), (int(a["h"]), int(a["w"]))),
}
