"""Official NAFNet weights mapped into a derived architecture (``init=pretrained``).

Same-name tensors of equal shape are copied. Block tensors of another shape are adapted:
expansion reduced by keeping the first channels of each gate half (the output channels of
conv1/conv2/conv4, the matching inputs of conv3/conv5 and SCA); depthwise kernels zero-padded
(3 -> 5/7 keeps the function) or centre-cropped. Everything else stays at its initialisation;
source tensors of skipped blocks are dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _banks(n_src: int, n_dst: int) -> torch.Tensor:
    """Channels of a SimpleGate input kept when it shrinks from n_src to n_dst: the first
    n_dst/2 of each half."""
    h, H = n_dst // 2, n_src // 2
    return torch.cat([torch.arange(h), H + torch.arange(h)])


# per block tensor, what each dimension means: banks (gate halves), first (leading channels),
# centre (kernel taps, zero-padded or centre-cropped) or same (must agree)
_RULES = {
    "conv1.weight": ("banks", "same", "same", "same"), "conv1.bias": ("banks",),
    "conv2.weight": ("banks", "same", "centre", "centre"), "conv2.bias": ("banks",),
    "conv3.weight": ("same", "first", "same", "same"),
    "sca.1.weight": ("first", "first", "same", "same"), "sca.1.bias": ("first",),
    "conv4.weight": ("banks", "same", "same", "same"), "conv4.bias": ("banks",),
    "conv5.weight": ("same", "first", "same", "same"),
}


def _adapt(name: str, src: torch.Tensor, shape) -> tuple[torch.Tensor, str] | None:
    """``src`` fitted to ``shape`` by the rules of a block tensor, or None when impossible."""
    rule = _RULES.get(name)
    if rule is None or src.dim() != len(shape):
        return None
    out, notes = src, []
    for dim, (kind, n_src, n_dst) in enumerate(zip(rule, src.shape, shape)):
        if n_src == n_dst:
            continue
        if kind == "banks" and n_dst < n_src and n_dst % 2 == 0:
            out = out.index_select(dim, _banks(n_src, n_dst))
            notes.append(f"first {n_dst // 2} channels of each gate half")
        elif kind == "first" and n_dst < n_src:
            out = out.narrow(dim, 0, n_dst)
            notes.append(f"first {n_dst} channels")
        elif kind == "centre" and (n_dst - n_src) % 2 == 0:
            d = (n_dst - n_src) // 2
            if d > 0:
                pad = [0, 0] * (out.dim() - dim - 1) + [d, d]
                out = F.pad(out, pad)
                notes.append(f"kernel {n_src}->{n_dst} zero-padded")
            else:
                out = out.narrow(dim, -d, n_dst)
                notes.append(f"kernel {n_src}->{n_dst} centre-cropped")
        else:
            return None
    return out.contiguous(), "; ".join(dict.fromkeys(notes))


def map_pretrained(model: nn.Module, source: dict[str, torch.Tensor]) -> dict:
    """Copy an official NAFNet state dict into ``model`` (a NAFNet of a derived arch) where
    shapes allow, in place; return the report (see the module docstring)."""
    target = model.state_dict()
    arch = getattr(model, "arch", None)
    positions = sorted(arch.values, key=len, reverse=True) if arch is not None else []
    new, copied, adapted, left = {}, [], {}, []
    for key, t in target.items():
        s = source.get(key)
        if s is None:
            left.append(key)
        elif s.shape == t.shape:
            new[key] = s
            copied.append(key)
        else:
            pos = next((p for p in positions if key.startswith(p + ".")), None)
            fit = _adapt(key[len(pos) + 1:], s, tuple(t.shape)) if pos else None
            if fit is None:
                left.append(key)
            else:
                new[key] = fit[0].to(t.dtype)
                adapted[key] = f"{tuple(s.shape)} -> {tuple(t.shape)}: {fit[1]}"
    model.load_state_dict(new, strict=False)
    skipped = [p for p in positions if not arch.values[p].get("keep", True)] if arch else []
    unused = [k for k in source if k not in target]
    return {"copied": copied, "adapted": adapted, "left_at_init": left,
            "dropped_blocks": sorted(p for p in skipped
                                     if any(k.startswith(p + ".") for k in source)),
            "unused_source_keys": unused,
            "counts": {"copied": len(copied), "adapted": len(adapted), "left_at_init": len(left),
                       "unused_source_keys": len(unused)}}
