"""SuperNet: every architecture of a SearchSpace in one differentiable network.

Each searchable position s holds one zero-initialised logit vector α_{s,d} per decision d with
K_{s,d} > 1 candidates; its probabilities are

    p_{s,d} = softmax(α_{s,d} / τ)                       (eval, or training without Gumbel)
    p_{s,d} = gumbel_softmax(α_{s,d}, τ)                  (training with ``gumbel=True``)

and a decision with a single candidate is fixed (p = [1]). The network is the family's
``NAFNet`` built with a factory that puts a super-block at every searchable position (plain
``NAFBlock``/``Identity`` elsewhere), so parameter names follow the official ones
(``net.encoders.0.0.conv1.weight``, ...).

Two super-blocks:

``shared`` (default; Single-Path-NAS / FBNetV2 style, about one NAFNet of the largest candidates):
  one weight set per position at the largest kernel K and expansions E, F;

  - depthwise conv: one K×K kernel W whose centre k×k holds kernel k, run once as
    W_mix = W ⊙ Σ_k p_k·M_k (M_k = 1 on the centre k×k);
  - expansion e: conv1's outputs are two gate banks (x1 = first half, x2 = second half) and e
    uses the first e·c/2 channels of each; after the gate one soft channel mask
    m_j = Σ_e p_e·1[j < e·c/2] is applied (the FFN likewise with conv4/conv5);
  - norm: parallel light branches, Σ_n p_n·norm_n(x);
  - attention: x·(p_sca·att(x) + p_none);
  - keep: out = p_keep·block(x) + p_skip·x.

``darts`` (classic DARTS all-paths mixing, for comparison): separate weights per candidate path;
the spatial branch has one path per (kernel, dw_expand, attention) combination and the FFN one per
ffn_expand, every path is computed and mixed by Π_d p_d(path's value). Memory grows with the
number of candidates.

``derive()`` takes the argmax of each decision; ``extract(arch)`` copies the chosen sub-weights
into the discrete ``NAFNet(arch)``, which then computes exactly what the supernet computes with
one-hot probabilities on ``arch`` (``set_onehot``).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ernas.blocks import ChannelAttention, SimpleGate, make_norm
from ernas.errors import ErnasError
from ernas.families.nafnet import NAFNet, make_block
from ernas.space import Arch, SearchSpace

MODES = ("shared", "darts")


def _index(cands, value) -> int:
    """Position of ``value`` among ``cands`` (type-exact, so True is not 1)."""
    for i, c in enumerate(cands):
        if type(c) is type(value) and c == value:
            return i
    raise KeyError(value)


def _safe(position: str, decision: str) -> str:
    return f"{position.replace('.', '_')}__{decision}"


class _Candidates(dict):
    """Marks a position's decision -> candidate-tuple mapping for the supernet factory."""


class NormMix(nn.ModuleDict):
    """Parallel normalisation branches mixed by probability: Σ_n p_n·norm_n(x)."""

    def __init__(self, kinds, channels: int):
        super().__init__({k: make_norm(k, channels) for k in kinds})

    def mix(self, x, p):
        return sum(p[i] * branch(x) for i, branch in enumerate(self.values()))


class _SuperBlock(nn.Module):
    """What both super-blocks share: norm and keep mixing, β/γ, reading ``self.p``.

    ``self.p`` (decision -> probability tensor over the position's candidates) is set by the
    SuperNet before each forward."""

    def __init__(self, c: int, cands: dict):
        super().__init__()
        self.c = c
        self.cands = {d: tuple(v) for d, v in cands.items()}
        self.p: dict | None = None
        norms = self.cands["norm"]
        self.norm1 = NormMix(norms, c) if len(norms) > 1 else make_norm(norms[0], c)
        self.norm2 = NormMix(norms, c) if len(norms) > 1 else make_norm(norms[0], c)
        self.sg = SimpleGate()
        self.beta = nn.Parameter(torch.zeros((1, c, 1, 1)))
        self.gamma = nn.Parameter(torch.zeros((1, c, 1, 1)))

    def mixed(self, decision: str):
        """Probabilities of a decision with >1 candidates, or None when it is fixed."""
        return self.p[decision] if len(self.cands[decision]) > 1 else None

    def _norm(self, norm, x):
        return norm.mix(x, self.p["norm"]) if isinstance(norm, NormMix) else norm(x)

    def forward(self, inp):
        y = inp + self.spatial(self._norm(self.norm1, inp)) * self.beta
        out = y + self.ffn(self._norm(self.norm2, y)) * self.gamma
        pk = self.mixed("keep")
        if pk is None:
            return out
        keep = self.cands["keep"]
        return pk[_index(keep, True)] * out + pk[_index(keep, False)] * inp

    def _common_state(self, choice: dict) -> dict:
        state = {"beta": self.beta, "gamma": self.gamma}
        for name in ("norm1", "norm2"):
            norm = getattr(self, name)
            branch = norm[choice["norm"]] if isinstance(norm, NormMix) else norm
            state.update({f"{name}.{k}": v for k, v in branch.state_dict().items()})
        return state


class SharedBlock(_SuperBlock):
    """Weight-sharing super-block (see module docstring); one set of weights at max candidates."""

    def __init__(self, c: int, cands: dict):
        super().__init__(c, cands)
        K, E, Fx = max(cands["kernel"]), max(cands["dw_expand"]), max(cands["ffn_expand"])
        self.K, self.E, self.F = K, E, Fx
        dw, ffn = c * E, c * Fx
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, K, padding=K // 2, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = ChannelAttention(dw // 2) if "sca" in cands["attention"] else nn.Identity()
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        masks = torch.zeros(len(cands["kernel"]), K, K)
        for i, k in enumerate(cands["kernel"]):
            o = (K - k) // 2
            masks[i, o:o + k, o:o + k] = 1
        self.register_buffer("kernel_masks", masks, persistent=False)
        self.register_buffer("dw_masks", self._channel_masks(cands["dw_expand"], dw // 2),
                             persistent=False)
        self.register_buffer("ffn_masks", self._channel_masks(cands["ffn_expand"], ffn // 2),
                             persistent=False)

    def _channel_masks(self, expands, width: int):
        j = torch.arange(width)
        return torch.stack([(j < e * self.c // 2).float() for e in expands])

    def _gate_mask(self, x, decision: str, masks):
        p = self.mixed(decision)
        return x if p is None else x * (p.to(masks.dtype) @ masks).view(1, -1, 1, 1)

    def spatial(self, x):
        x = self.conv1(x)
        pk = self.mixed("kernel")
        w = self.conv2.weight
        if pk is not None:
            w = w * torch.tensordot(pk.to(w.dtype), self.kernel_masks, dims=1)
        x = F.conv2d(x, w, self.conv2.bias, padding=self.K // 2, groups=self.conv2.groups)
        x = self._gate_mask(self.sg(x), "dw_expand", self.dw_masks)
        pa = self.mixed("attention")
        if pa is not None:
            att = self.cands["attention"]
            x = x * (pa[_index(att, "sca")] * self.sca[1](self.sca[0](x)) + pa[_index(att, "none")])
        else:
            x = self.sca(x)  # ChannelAttention or Identity
        return self.conv3(x)

    def ffn(self, x):
        return self.conv5(self._gate_mask(self.sg(self.conv4(x)), "ffn_expand", self.ffn_masks))

    def extract_state(self, choice: dict) -> dict:
        """State dict of ``NAFBlock(c, **choice)`` cut from the shared weights: kernel centre
        crop, the first e·c/2 channels of both gate banks, the chosen norm branch."""
        c, k, o = self.c, choice["kernel"], (self.K - choice["kernel"]) // 2
        half, h = self.c * self.E // 2, c * choice["dw_expand"] // 2
        banks = torch.cat([torch.arange(h), half + torch.arange(h)])
        fhalf, fh = c * self.F // 2, c * choice["ffn_expand"] // 2
        fbanks = torch.cat([torch.arange(fh), fhalf + torch.arange(fh)])
        state = self._common_state(choice)
        state.update({
            "conv1.weight": self.conv1.weight[banks], "conv1.bias": self.conv1.bias[banks],
            "conv2.weight": self.conv2.weight[banks, :, o:o + k, o:o + k],
            "conv2.bias": self.conv2.bias[banks],
            "conv3.weight": self.conv3.weight[:, :h], "conv3.bias": self.conv3.bias,
            "conv4.weight": self.conv4.weight[fbanks], "conv4.bias": self.conv4.bias[fbanks],
            "conv5.weight": self.conv5.weight[:, :fh], "conv5.bias": self.conv5.bias,
        })
        if choice["attention"] == "sca":
            state["sca.1.weight"] = self.sca[1].weight[:h, :h]
            state["sca.1.bias"] = self.sca[1].bias[:h]
        return state


class SpatialPath(nn.Module):
    """One fixed spatial branch: conv3(att(SG(dwconv_k(conv1(x))))) (official child names)."""

    def __init__(self, c: int, kernel: int, dw_expand: int, attention: str):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, kernel, padding=kernel // 2, groups=dw)
        self.sca = ChannelAttention(dw // 2) if attention == "sca" else nn.Identity()
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sg = SimpleGate()

    def forward(self, x):
        return self.conv3(self.sca(self.sg(self.conv2(self.conv1(x)))))


class FFNPath(nn.Module):
    """One fixed FFN branch: conv5(SG(conv4(x)))."""

    def __init__(self, c: int, ffn_expand: int):
        super().__init__()
        self.conv4 = nn.Conv2d(c, c * ffn_expand, 1)
        self.conv5 = nn.Conv2d(c * ffn_expand // 2, c, 1)
        self.sg = SimpleGate()

    def forward(self, x):
        return self.conv5(self.sg(self.conv4(x)))


_SPATIAL = ("kernel", "dw_expand", "attention")


def _path_name(values: dict) -> str:
    return "_".join(f"{d}{v}" for d, v in values.items())


class DartsBlock(_SuperBlock):
    """All-paths super-block: spatial paths for every (kernel, dw_expand, attention), FFN paths
    for every ffn_expand, each with its own weights, mixed by Π_d p_d."""

    def __init__(self, c: int, cands: dict):
        super().__init__(c, cands)
        self.spatial_paths = nn.ModuleDict()
        for vals in itertools.product(*(cands[d] for d in _SPATIAL)):
            v = dict(zip(_SPATIAL, vals))
            self.spatial_paths[_path_name(v)] = SpatialPath(c, **v)
        self.ffn_paths = nn.ModuleDict({_path_name({"ffn_expand": e}): FFNPath(c, e)
                                        for e in cands["ffn_expand"]})

    def _weight(self, values: dict):
        w = 1.0
        for d, v in values.items():
            p = self.mixed(d)
            if p is not None:
                w = w * p[_index(self.cands[d], v)]
        return w

    def spatial(self, x):
        out = 0
        for vals in itertools.product(*(self.cands[d] for d in _SPATIAL)):
            v = dict(zip(_SPATIAL, vals))
            out = out + self._weight(v) * self.spatial_paths[_path_name(v)](x)
        return out

    def ffn(self, x):
        paths = ({"ffn_expand": e} for e in self.cands["ffn_expand"])
        return sum(self._weight(v) * self.ffn_paths[_path_name(v)](x) for v in paths)

    def extract_state(self, choice: dict) -> dict:
        """State dict of ``NAFBlock(c, **choice)`` from the chosen paths' weights."""
        state = self._common_state(choice)
        sp = self.spatial_paths[_path_name({d: choice[d] for d in _SPATIAL})]
        fp = self.ffn_paths[_path_name({"ffn_expand": choice["ffn_expand"]})]
        state.update(sp.state_dict())
        state.update(fp.state_dict())
        return state


class SuperNet(nn.Module):
    """Supernet of a nafnet SearchSpace with architecture logits α (see module docstring).

    ``forward(x, probs=None)`` runs with ``probs`` (``probs[position][decision]`` = tensor over the
    candidates, the format of ``ExpectedLatency``) or else ``self.probs()``."""

    def __init__(self, space: SearchSpace, mode: str = "shared", temperature: float = 1.0,
                 gumbel: bool = False):
        super().__init__()
        if space.family != "nafnet":
            raise ErnasError(f"{space.source}: SuperNet supports the 'nafnet' family only; this "
                             f"space has family {space.family!r}.")
        if mode not in MODES:
            raise ErnasError(f"SuperNet mode {mode!r} is not known; use 'shared' (weight sharing, "
                             f"one network's memory) or 'darts' (all paths, for comparison).")
        if not temperature > 0:
            raise ErnasError(f"SuperNet temperature={temperature!r} must be positive (e.g. 1.0).")
        self.space, self.mode = space, mode
        self.temperature, self.gumbel = float(temperature), bool(gumbel)
        self.searchable = space.searchable
        block_cls = SharedBlock if mode == "shared" else DartsBlock

        def factory(c, value):
            if not isinstance(value, _Candidates):
                return make_block(c, value)
            if not any(value["keep"]):  # always skipped: nothing to mix
                return nn.Identity()
            return block_cls(c, value)

        values = {p: (_Candidates(c) if p in self.searchable else {d: v[0] for d, v in c.items()})
                  for p, c in space.choices.items()}
        self.net = NAFNet(Arch(space.family, dict(space.geometry), values, name=space.name),
                          block_factory=factory)
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
        one = self.net.intro.weight.new_ones(1)
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

    def onehot(self, arch: Arch) -> dict[str, dict[str, torch.Tensor]]:
        """One-hot probabilities on ``arch`` (which must lie in the space)."""
        self._check_in_space(arch)
        ref = self.net.intro.weight
        return {p: {d: F.one_hot(torch.tensor(_index(c, arch.values[p][d])), len(c)).to(ref)
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
                if isinstance(block, _SuperBlock):
                    block.p = probs[p]
            return self.net(x)
        finally:
            for block, _ in blocks:
                if isinstance(block, _SuperBlock):
                    block.p = None

    def extract(self, arch: Arch) -> NAFNet:
        """The discrete ``NAFNet(arch)`` holding the supernet's weights for ``arch`` (same
        parameter names and shapes as a freshly built one; BN running statistics included)."""
        self._check_in_space(arch)
        ref = self.net.intro.weight
        model = NAFNet(Arch(arch.family, dict(arch.geometry), {p: dict(v) for p, v in
                                                               arch.values.items()},
                            name=arch.name)).to(device=ref.device, dtype=ref.dtype)
        target = model.state_dict()
        source = self.net.state_dict()
        prefixes = tuple(p + "." for p in self.searchable)
        state = {k: source[k] for k in target if not k.startswith(prefixes)}
        for p in self.searchable:
            block = self.net.get_submodule(p)
            if isinstance(block, _SuperBlock) and arch.values[p]["keep"]:
                state.update({f"{p}.{k}": v for k, v in
                              block.extract_state(arch.values[p]).items()})
        missing = set(target) - set(state)
        if missing:  # pragma: no cover - a bug, not a user error
            raise RuntimeError(f"extract: no weights for {sorted(missing)[:5]}")
        model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
        return model
