"""Op keys: the one vocabulary shared by model code, the profiler and the latency table.

A key names one measurable op instance at one input shape::

    op[attr=value,...]@NxCxHxW:dtype        e.g.  dwconv2d[k=5]@1x64x128x128:float32

Attributes are sorted by name, so equal ops always print the same key. ``build_op(key)`` returns
the module that runs exactly this op (the deployed implementation: BatchNorm already folded) and
an input of the key's shape. Generic ops (conv, depthwise conv, adds) live here; each family
registers builders for its own op names (``Family.ops``), so the vocabulary is open. A leaf
module: it imports nothing of ernas but its errors (``ernas.latency.ops.build_op`` also finds
the builders of families not imported yet).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

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


class Add(nn.Module):
    """A two-tensor addition a + b (a skip or residual add), measured as x + B with B a constant
    tensor of the same shape: one Add node reading two full tensors, as in the network."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("other", torch.randn(shape))

    def forward(self, x):
        return x + self.other


class ScaleAdd(nn.Module):
    """A residual add with a per-channel layer scale, a + x·β (Mul then Add), measured with the
    shortcut a a constant tensor of the input's shape."""

    def __init__(self, shape):
        super().__init__()
        self.register_buffer("other", torch.randn(shape))
        self.beta = nn.Parameter(torch.full((1, shape[1], 1, 1), 0.5))

    def forward(self, x):
        return self.other + x * self.beta


def _conv(a: dict, shape) -> nn.Module:
    k, s = int(a["k"]), int(a.get("s", 1))
    return nn.Conv2d(shape[1], int(a["cout"]), k, stride=s, padding=k // 2 if s == 1 else 0,
                     bias=a.get("bias", "1") == "1")


def _dwconv(a: dict, shape) -> nn.Module:
    k, c = int(a["k"]), shape[1]
    return nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=a.get("bias", "1") == "1")


# Generic ops; a family registers builders for its own op names (``Family.ops``). A builder
# takes the key's attributes (dict of strings) and its input shape (N, C, H, W).
_BUILDERS: dict[str, object] = {
    "conv2d": _conv,
    "dwconv2d": _dwconv,
    "add": lambda a, shape: Add(shape),
    "scale_add": lambda a, shape: ScaleAdd(shape),
}
_OWNERS: dict[str, str] = {name: "ernas" for name in _BUILDERS}


def register_ops(builders: dict, owner: str) -> None:
    """Add op builders (``name -> builder(attrs, shape)``) of a family; a name already owned by
    someone else is an error (two families must not give one op key two meanings)."""
    for name, fn in builders.items():
        if _OWNERS.get(name, owner) != owner:
            raise ErnasError(f"op {name!r} of {owner!r} is already registered by "
                             f"{_OWNERS[name]!r}; rename one of them.")
        _BUILDERS[name], _OWNERS[name] = fn, owner


def known_ops() -> list[str]:
    return sorted(_BUILDERS)


def build_registered(key: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Module and example input for one op key of a registered op (random but seeded weights,
    eval mode)."""
    k = parse_key(key)
    if k.op not in _BUILDERS:
        raise ErnasError(f"op key {key!r}: unknown op {k.op!r}; known ops are "
                         f"{', '.join(known_ops())}. A family registers its ops in Family.ops.")
    torch.manual_seed(seed)
    module = _BUILDERS[k.op](k.attr, k.shape)
    for p in module.parameters():  # non-zero layer scales so no branch is optimised away
        if p.dim() == 4 and p.shape[2:] == (1, 1) and p.shape[0] == 1:
            nn.init.uniform_(p, 0.1, 1.0)
    dtype = getattr(torch, k.dtype)
    return module.eval().to(dtype), torch.randn(k.shape, dtype=dtype)
