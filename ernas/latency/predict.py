"""Latency prediction from a table: exact for one Arch, differentiable in expectation for a space.

For an Arch, the predicted latency is ``a·Σ_k t(k) + b`` over the op keys it runs, where t is
the table's median and (a, b) the table's fitted correction (1, 0 when none is stored).

For a space with independent per-decision probabilities p_{s,d}(·) at each position s, the
expected latency is exact under that distribution:

    E[LAT] = a·( Σ_fixed t + Σ_s Σ_{c ∈ combos(s)} Π_d p_{s,d}(c_d) · L_s(c) ) + b,

where L_s(c) is the summed table latency of position s with choice c (0 for a skipped block).
"""
from __future__ import annotations

import torch

from ernas.space import Arch, SearchSpace


def correction(table) -> tuple[float, float]:
    c = table.metadata.get("correction") or {}
    return float(c.get("scale", 1.0)), float(c.get("offset_ms", 0.0))


def predict_ms(table, arch: Arch, input_shape=None, granularity: str | None = None,
               fill_command: str | None = None) -> float:
    """Predicted latency of one architecture in ms (corrected sum of table medians)."""
    shape = tuple(input_shape or table.metadata["input_shape"])
    keys = arch.op_keys(shape, granularity or table.metadata.get("granularity", "block"))
    a, b = correction(table)
    return a * float(table.lookup(keys, fill_command=fill_command).sum()) + b


class ExpectedLatency(torch.nn.Module):
    """Differentiable E[LAT] in ms for a SearchSpace, given per-decision probabilities.

    ``forward(probs)`` takes ``probs[position][decision]`` = 1-D tensor over that decision's
    candidates (in the space's order) for every searchable position."""

    def __init__(self, space: SearchSpace, table, input_shape=None, granularity: str | None = None,
                 fill_command: str | None = None):
        super().__init__()
        self.space = space
        self.input_shape = tuple(input_shape or table.metadata["input_shape"])
        self.granularity = granularity or table.metadata.get("granularity", "block")
        missing = [k for k in space.op_keys(self.input_shape, self.granularity) if k not in table]
        if missing:
            table.lookup(missing, fill_command=fill_command)  # raises MissingKeysError
        self.scale, self.offset = correction(table)
        const = float(table.lookup(space.fixed_keys(self.input_shape, self.granularity)).sum())
        self.searchable = space.searchable
        for p in space.positions:
            lat = [float(table.lookup(space.position_keys(p, c, self.input_shape,
                                                          self.granularity)).sum())
                   for c in space.combos(p)]
            if p in self.searchable:
                shape = [len(v) for v in space.choices[p].values()]
                self.register_buffer(_buf(p), torch.tensor(lat, dtype=torch.float64).view(shape))
            else:
                const += lat[0]
        self.const = const

    def forward(self, probs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        total = torch.tensor(self.const, dtype=torch.float64)
        for p in self.searchable:
            lat = getattr(self, _buf(p))
            for d in self.space.choices[p]:  # contract one decision axis at a time
                lat = torch.tensordot(probs[p][d].to(lat.dtype), lat, dims=([0], [0]))
            total = total + lat
        return self.scale * total + self.offset

    def of_arch(self, arch: Arch) -> float:
        """Latency of one architecture under the same model (one-hot probabilities)."""
        probs = {p: {d: torch.tensor([float(c == arch.values[p][d] and type(c) is
                                            type(arch.values[p][d])) for c in cands])
                     for d, cands in self.space.choices[p].items()} for p in self.searchable}
        return float(self(probs))


def _buf(position: str) -> str:
    return "lat_" + position.replace(".", "_")
