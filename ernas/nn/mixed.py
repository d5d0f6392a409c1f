"""Mixing primitives that every family's super-block uses, and the super-block contract.

A super-block holds one position's candidates ``{decision: (value, ...)}`` and, during a forward
pass, the probabilities ``p[decision]`` (a tensor over that decision's candidates, set by the
SuperNet). Decisions with one candidate are fixed (``mixed(decision)`` is None). The primitives:

- kernel centre masks: one K×K weight W holds every smaller kernel k at its centre;
  ``W_mix = W ⊙ Σ_k p_k·M_k`` with M_k = 1 on the centre k×k (Single-Path NAS);
- channel masks: a width w of a layer of W channels uses the first w channels;
  ``x ⊙ m`` with ``m_j = Σ_w p_w·1[j < w]`` (FBNetV2);
- branch mix: parallel light branches ``Σ_b p_b·branch_b(x)``;
- keep-vs-identity: ``p_keep·block(x) + p_skip·x``.

Contract of a super-block (:class:`SuperBlock`): ``forward(x)`` computes the mixture under
``self.p``; ``extract_state(choice)`` returns the state dict of the discrete block
``family.make_block(geometry, position, choice)`` cut from the shared weights, so the extracted
network computes exactly what the supernet computes with one-hot probabilities on that choice.
"""
from __future__ import annotations

import torch
from torch import nn


def index_of(cands, value) -> int:
    """Position of ``value`` among ``cands`` (type-exact, so True is not 1)."""
    for i, c in enumerate(cands):
        if type(c) is type(value) and c == value:
            return i
    raise KeyError(value)


def kernel_masks(kernels, size: int) -> torch.Tensor:
    """Masks (len(kernels) x size x size) with ones on the centre k×k of each kernel k."""
    masks = torch.zeros(len(kernels), size, size)
    for i, k in enumerate(kernels):
        o = (size - k) // 2
        masks[i, o:o + k, o:o + k] = 1
    return masks


def mix_kernel(weight: torch.Tensor, p: torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor:
    """``W ⊙ Σ_k p_k·M_k`` (``W`` unchanged when ``p`` is None)."""
    if p is None:
        return weight
    return weight * torch.tensordot(p.to(weight.dtype), masks.to(weight.dtype), dims=1)


def centre_crop_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The centre k×k taps of a (…, K, K) weight."""
    o = (weight.shape[-1] - k) // 2
    return weight[..., o:o + k, o:o + k]


def channel_masks(widths, size: int) -> torch.Tensor:
    """Masks (len(widths) x size): row i is 1 on the first ``widths[i]`` channels."""
    j = torch.arange(size)
    return torch.stack([(j < int(w)).float() for w in widths])


def mask_channels(x: torch.Tensor, p: torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor:
    """``x ⊙ m`` along dim 1 with ``m = Σ_w p_w·mask_w`` (``x`` unchanged when p is None)."""
    if p is None:
        return x
    m = p.to(masks.dtype) @ masks
    return x * m.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def mix_branches(branches, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ_b p_b·branch_b(x)``."""
    return sum(p[i] * b(x) for i, b in enumerate(branches))


def keep_or_skip(out: torch.Tensor, inp: torch.Tensor, p: torch.Tensor | None,
                 cands) -> torch.Tensor:
    """``p_keep·out + p_skip·inp`` for a ``keep`` decision over (False, True) in any order;
    ``out`` when the decision is fixed (p None)."""
    if p is None:
        return out
    return p[index_of(cands, True)] * out + p[index_of(cands, False)] * inp


class BranchMix(nn.ModuleDict):
    """Parallel branches, one per candidate value, mixed by probability."""

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__(branches)

    def mix(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return mix_branches(list(self.values()), p, x)


class SuperBlock(nn.Module):
    """Base of every super-block: the candidates, the probabilities of the current forward
    pass (``self.p``, set by the SuperNet) and the extraction contract."""

    def __init__(self, candidates: dict[str, tuple]):
        super().__init__()
        self.cands = {d: tuple(v) for d, v in candidates.items()}
        self.p: dict[str, torch.Tensor] | None = None

    def mixed(self, decision: str) -> torch.Tensor | None:
        """Probabilities of a decision with >1 candidates, or None when it is fixed."""
        if len(self.cands[decision]) <= 1:
            return None
        return self.p[decision]

    def extract_state(self, choice: dict) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
