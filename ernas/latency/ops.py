"""Op keys: the one vocabulary shared by model code, the profiler and the latency table.

A key names one measurable op instance at one input shape::

    op[attr=value,...]@NxCxHxW:dtype        e.g.  dwconv2d[k=5]@1x64x128x128:float32

Attributes are sorted by name, so equal ops always print the same key. ``build_op(key)`` returns
the module that runs exactly this op (the deployed implementation: BatchNorm already folded) and
an input of the key's shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ernas.blocks import ChannelAttention, LayerNorm2d, NAFBlock, SimpleGate, UpSample
from ernas.errors import ErnasError

_KEY = re.compile(r"^(?P<op>[a-z0-9_]+)(\[(?P<attrs>[^\]]*)\])?@(?P<shape>\d+(x\d+)*):(?P<dtype>\w+)$")


@dataclass(frozen=True)
class OpKey:
    op: str
    attrs: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __str__(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs)
        return f"{self.op}{'[' + attrs + ']' if attrs else ''}@{'x'.join(map(str, self.shape))}:{self.dtype}"

    @property
    def attr(self) -> dict[str, str]:
        return dict(self.attrs)


def op_key(op: str, shape, dtype: str = "float32", **attrs) -> str:
    """Canonical key string for an op with attributes at an input shape."""
    return str(OpKey(op, tuple(sorted((k, str(v)) for k, v in attrs.items())),
                     tuple(int(s) for s in shape), dtype))


def parse_key(key: str) -> OpKey:
    m = _KEY.match(key)
    if not m:
        raise ErnasError(f"op key {key!r} is malformed; keys look like "
                         f"'dwconv2d[k=3]@1x64x128x128:float32'.")
    attrs = tuple(tuple(a.split("=", 1)) for a in m["attrs"].split(",")) if m["attrs"] else ()
    return OpKey(m["op"], attrs, tuple(int(s) for s in m["shape"].split("x")), m["dtype"])


class _ScaleAdd(nn.Module):
    """y = a + x·β (a block's residual branch), measured with two inputs of the same shape."""

    def __init__(self, c):
        super().__init__()
        self.beta = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        return x + x.flip(1) * self.beta


class _Add(nn.Module):
    """A skip addition a + b (measured as x + flip(x) to keep one input)."""

    def forward(self, x):
        return x + x.flip(1)


def _conv(a: dict, c: int) -> nn.Module:
    k, s = int(a["k"]), int(a.get("s", 1))
    return nn.Conv2d(c, int(a["cout"]), k, stride=s, padding=k // 2 if s == 1 else 0,
                     bias=a.get("bias", "1") == "1")


_BUILDERS = {
    "conv2d": _conv,
    "dwconv2d": lambda a, c: nn.Conv2d(c, c, int(a["k"]), padding=int(a["k"]) // 2, groups=c),
    "layernorm2d": lambda a, c: LayerNorm2d(c),
    "simplegate": lambda a, c: SimpleGate(),
    "sca": lambda a, c: ChannelAttention(c),
    "scale_add": lambda a, c: _ScaleAdd(c),
    "add": lambda a, c: _Add(),
    "upsample": lambda a, c: UpSample(c),
    "nafblock": lambda a, c: NAFBlock(c, a["norm"], a["attention"], int(a["kernel"]),
                                      int(a["dw_expand"]), int(a["ffn_expand"])),
}


def build_op(key: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Module and example input for one op key (random but seeded weights, eval mode)."""
    k = parse_key(key)
    if k.op not in _BUILDERS:
        raise ErnasError(f"op key {key!r}: unknown op {k.op!r}; known ops are {', '.join(_BUILDERS)}.")
    torch.manual_seed(seed)
    module = _BUILDERS[k.op](k.attr, k.shape[1])
    for p in module.parameters():  # non-zero β/γ so no branch is optimised away
        if p.dim() == 4 and p.shape[2:] == (1, 1) and p.shape[0] == 1:
            nn.init.uniform_(p, 0.1, 1.0)
    dtype = getattr(torch, k.dtype)
    return module.eval().to(dtype), torch.randn(k.shape, dtype=dtype)
