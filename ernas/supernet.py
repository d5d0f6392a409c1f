"""SuperNet: every architecture of a SearchSpace in one differentiable network, for any family.

Each searchable position s holds one zero-initialised logit vector α_{s,d} per decision d with
K_{s,d} > 1 candidates; its probabilities are

    p_{s,d} = softmax(α_{s,d} / τ)                       (eval, or training without Gumbel)
    p_{s,d} = gumbel_softmax(α_{s,d}, τ)                  (training with ``gumbel=True``)

and a decision with a single candidate is fixed (p = [1]). The network is the family's model
(``Family.build``) with the family's super-block (``Family.super_block``, a
``ernas.nn.mixed.SuperBlock``) at every searchable position and a plain block elsewhere, so
parameter names follow the family's own (``net.encoders.0.0.conv1.weight`` for NAFNet).
``mode`` selects the family's kind of super-block (``shared`` weight sharing; NAFNet also offers
``darts``, classic all-paths mixing, for comparison).

``derive()`` takes the argmax of each decision; ``extract(arch)`` copies the chosen sub-weights
(``SuperBlock.extract_state``) into the discrete ``Family.build(arch)``, which then computes
exactly what the supernet computes with one-hot probabilities on ``arch`` (``set_onehot``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernas.errors import ErnasError
from ernas.nn.mixed import SuperBlock, index_of
from ernas.space import Arch, SearchSpace
from ernas.space_checks import single_geometry_message


def _safe(position: str, decision: str) -> str:
    return f"{position.replace('.', '_')}__{decision}"


class _Candidates(dict):
    """Marks a position's decision -> candidate-tuple mapping for the block factory."""


class SuperNet(nn.Module):
    """Supernet of a SearchSpace with architecture logits α (see the module docstring).

    ``forward(x, probs=None)`` runs with ``probs`` (``probs[position][decision]`` = tensor over the
    candidates, the format of ``ExpectedLatency``) or else ``self.probs()``."""

    def __init__(self, space: SearchSpace, mode: str = "shared", temperature: float = 1.0,
                 gumbel: bool = False):
        super().__init__()
        family = space.spec
        if space.geometries:
            raise ErnasError(single_geometry_message(space, "supernet", "space"))
        if mode not in family.super_modes:
            raise ErnasError(f"SuperNet mode {mode!r} is not available for family "
                             f"{family.name!r}; use one of {', '.join(family.super_modes)} "
                             f"('shared': weight sharing, one network's memory; 'darts': all "
                             f"paths, for comparison).")
        if not temperature > 0:
            raise ErnasError(f"SuperNet temperature={temperature!r} must be positive (e.g. 1.0).")
        self.space, self.mode = space, mode
        self.temperature, self.gumbel = float(temperature), bool(gumbel)
        self.searchable = space.searchable
        g = space.geometry

        def factory(position, value):
            if isinstance(value, _Candidates):
                return family.super_block(g, position, value, mode)
            return family.make_block(g, position, value)

        values = {p: (_Candidates(c) if p in self.searchable else {d: v[0] for d, v in c.items()})
                  for p, c in space.choices.items()}
        self.net = family.build(Arch(space.family, dict(g), values, name=space.name), factory)
        self.register_buffer("_one", torch.ones(1), persistent=False)
        self.alphas = nn.ParameterDict({
            _safe(p, d): nn.Parameter(torch.zeros(len(cands)))
            for p in self.searchable for d, cands in space.choices[p].items() if len(cands) > 1})
        self._onehot: dict | None = None

    # ------------------------------------------------------------------ parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas.values())

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def alpha(self, position: str, decision: str) -> nn.Parameter | None:
        """α of one decision (None when the decision has a single candidate)."""
        key = _safe(position, decision)
        return self.alphas[key] if key in self.alphas else None

    # ------------------------------------------------------------------ probabilities
    def probs(self, sample: bool | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """``probs[position][decision]`` over the space's candidates, for every searchable
        position: the one-hot override of ``set_onehot``, else softmax(α/τ), or
        gumbel_softmax(α, τ) when ``sample`` (default: ``gumbel`` and training)."""
        if self._onehot is not None:
            return self._onehot
        sample = self.gumbel and self.training if sample is None else sample
        one = self._one
        out = {}
        for p in self.searchable:
            out[p] = {}
            for d in self.space.choices[p]:
                a = self.alpha(p, d)
                if a is None:
                    out[p][d] = one
                elif sample:
                    out[p][d] = F.gumbel_softmax(a, tau=self.temperature)
                else:
                    out[p][d] = F.softmax(a / self.temperature, dim=0)
        return out

    def drop_paths(self, probs: dict, keep_rate: float) -> dict:
        """``probs`` with every searched skip decision (``Family.skip_decision``) replaced by a
        hard draw, one-hot on keep with probability ``keep_rate`` and on skip otherwise,
        independently of α (stochastic depth over the searchable blocks); other decisions are
        unchanged. For the weight step: each block's weights are then trained at full scale in a
        network of ``keep_rate``·n blocks on average, however α leans, instead of at scale
        p_keep, which the weights largely absorb (NAFNet's residual scales β, γ), so that p_keep
        is barely identifiable and the α step drifts to skip (DARTS's skip collapse)."""
        d = self.space.spec.skip_decision
        if d is None:
            return probs
        out = {}
        for p, dec in probs.items():
            out[p] = dict(dec)
            cands = self.space.choices[p].get(d, ())
            if len(cands) > 1:
                kept = bool(torch.rand(()) < keep_rate)
                out[p][d] = F.one_hot(torch.tensor(index_of(cands, kept)),
                                      len(cands)).to(dec[d])
        return out

    def onehot(self, arch: Arch) -> dict[str, dict[str, torch.Tensor]]:
        """One-hot probabilities on ``arch`` (which must lie in the space)."""
        self._check_in_space(arch)
        ref = self._one
        return {p: {d: F.one_hot(torch.tensor(index_of(c, arch.values[p][d])), len(c)).to(ref)
                    for d, c in self.space.choices[p].items()} for p in self.searchable}

    def set_onehot(self, arch: Arch | None) -> None:
        """Force one-hot probabilities on ``arch`` for every later forward (None: back to α)."""
        self._onehot = None if arch is None else self.onehot(arch)

    def _check_in_space(self, arch: Arch) -> None:
        if not self.space.contains(arch):
            raise ErnasError(f"architecture {arch.name!r} ({arch.source}) is not in search space "
                             f"{self.space.name!r}: its family, geometry or some decision value is "
                             f"not among the space's candidates.")

    def _plain(self) -> list[torch.Tensor]:
        return [F.softmax(a.detach() / self.temperature, dim=0) for a in self.alphas.values()]

    def decisiveness(self) -> float:
        """Mean over decisions (K > 1) of max_c p(c), p = softmax(α/τ); 1 when nothing is
        searched."""
        ps = self._plain()
        return float(torch.stack([p.max() for p in ps]).mean()) if ps else 1.0

    def entropy(self) -> float:
        """Mean over decisions (K > 1) of H(p)/log K with p = softmax(α/τ): 1 for uniform, 0 for
        one-hot."""
        ps = self._plain()
        if not ps:
            return 0.0
        return float(torch.stack([-(p * p.clamp_min(1e-30).log()).sum() / math.log(len(p))
                                  for p in ps]).mean())

    def derive(self, name: str | None = None) -> Arch:
        """Argmax of each decision (ties: the lower candidate index); fixed decisions as given."""
        values = {}
        for p, ch in self.space.choices.items():
            values[p] = {}
            for d, cands in ch.items():
                a = self.alpha(p, d) if p in self.searchable else None
                if a is None:
                    values[p][d] = cands[0]
                else:
                    v = a.detach().cpu().tolist()
                    values[p][d] = cands[max(range(len(v)), key=lambda i: (v[i], -i))]
        return Arch(self.space.family, dict(self.space.geometry), values,
                    name=name or f"{self.space.name}_derived")

    # ------------------------------------------------------------------ model
    def forward(self, x, probs: dict | None = None):
        probs = self.probs() if probs is None else probs
        blocks = [(self.net.get_submodule(p), p) for p in self.searchable]
        try:
            for block, p in blocks:
                if isinstance(block, SuperBlock):
                    block.p = probs[p]
            return self.net(x)
        finally:
            for block, _ in blocks:
                if isinstance(block, SuperBlock):
                    block.p = None

    def extract(self, arch: Arch) -> nn.Module:
        """The discrete ``Family.build(arch)`` holding the supernet's weights for ``arch`` (same
        parameter names and shapes as a freshly built one; BN running statistics included)."""
        self._check_in_space(arch)
        ref = self._one
        family = self.space.spec
        model = family.build(Arch(arch.family, dict(arch.geometry),
                                  {p: dict(v) for p, v in arch.values.items()},
                                  name=arch.name)).to(device=ref.device)
        target = model.state_dict()
        source = self.net.state_dict()
        prefixes = tuple(p + "." for p in self.searchable)
        state = {k: source[k] for k in target if not k.startswith(prefixes)}
        for p in self.searchable:
            block = self.net.get_submodule(p)
            if isinstance(block, SuperBlock) and not family.inactive(arch.values[p]):
                state.update({f"{p}.{k}": v for k, v in
                              block.extract_state(arch.values[p]).items()})
        missing = set(target) - set(state)
        if missing:  # pragma: no cover - a bug, not a user error
            raise RuntimeError(f"extract: no weights for {sorted(missing)[:5]}")
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model
