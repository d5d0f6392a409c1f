"""Derivation within a latency budget (``search.derive=budget``): the best network within T ms.

The argmax of α ignores the latency model: a hinge search asked for T ms derives a network some
per cent above T (the latency term binds the expected latency E[LAT], not the argmax). This
module projects the search onto T. Around the argmax A it scores, with the supernet itself, every
block c each searchable position s can hold (perturbation-based selection, as in Wang et al. 2021,
"Rethinking architecture selection in differentiable NAS"):

    v_s(c) = M(A with s → c) − M(A)

where M is the task's metric of the supernet run one-hot on the network, on fixed validation
batches with BatchNorm on batch statistics (as in the α steps). Assuming the effects add up
across positions, the derived network solves the multiple-choice knapsack

    maximise  Σ_s v_s(c_s)     subject to   a·(C + Σ_s L_s(c_s)) + b ≤ T

with L_s the table's latency of the block, C the fixed part and a, b the table's correction
(``ExpectedLatency``). A network above T is cut where that costs least, and one below it is filled
where the supernet says a larger block pays. The programme runs on T cut into ``bins`` steps with
every block's cost rounded up, so its answer is always within T (the start is kept when it fits
and the grid found nothing better).

The scores are only as good as the supernet. Trained with stochastic depth
(``weight_keep_rate`` < 1) it learns to do without any one block, and skipping blocks then scores
*higher* than keeping them (docs/results/search.md), so ``derive=budget`` requires a supernet
trained with every block kept (``weight_keep_rate`` 1) or with the α mixture (null).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ernas import distributed as D
from ernas.errors import ErnasError
from ernas.nn.batchnorm import frozen_bn_stats
from ernas.space import Arch


def _costs(expected, position: str) -> np.ndarray:
    """Raw table cost of every combination at ``position``, in ``SearchSpace.combos`` order."""
    return getattr(expected, "lat_" + position.replace(".", "_")).detach().cpu().double() \
        .flatten().numpy()


def smallest_ms(space, expected) -> float:
    """Predicted latency of the space's fastest network (every position at its cheapest block)."""
    raw = expected.const + sum(float(_costs(expected, p).min()) for p in space.searchable)
    return expected.scale * raw + expected.offset


def check_budget(space, expected, budget_ms: float, what: str) -> None:
    """Refuse a budget that no network of the space meets (ErnasError, before any search)."""
    low = smallest_ms(space, expected)
    if low > budget_ms:
        raise ErnasError(f"{what}: the budget {budget_ms:.2f} ms is below the predicted latency "
                         f"of the fastest network in space {space.name!r} ({low:.2f} ms), so no "
                         f"network can be derived within it. Give a budget (search.target_ms) "
                         f"above {low:.2f} ms, or derive the argmax (search.derive=argmax).")


@torch.no_grad()
def supernet_scorer(net, val_batch, batches: int, device, task):
    """``score(arch)``: the task's metric of ``net`` run one-hot on ``arch`` over the first
    ``batches`` validation batches, BatchNorm on batch statistics (running ones untouched)."""
    data = [tuple(t.to(device) for t in val_batch(i)) for i in range(batches)]

    def score(arch: Arch) -> float:
        was = net.training
        net.train()
        ev = task.evaluator()
        with frozen_bn_stats(net):
            probs = net.onehot(arch)
            for i, (x, y) in enumerate(data):
                ev.update(net(x, probs).float().cpu(), y.cpu(), f"val{i}")
        net.train(was)
        return float(ev.compute()[task.metric])
    return score


def block_values(space, arch: Arch, score) -> dict[str, np.ndarray]:
    """v_s(c) of every combination c at every searchable position s (module docstring); every
    skipped block of a position is one network, scored once."""
    spec, base = space.spec, score(arch)
    values = {}
    for p in space.searchable:
        here, skipped, row = arch.values[p], None, []
        for combo in space.combos(p):
            if combo == here or (spec.inactive(combo) and spec.inactive(here)):
                row.append(0.0)
                continue
            if spec.inactive(combo) and skipped is not None:
                row.append(skipped)
                continue
            v = score(Arch(arch.family, dict(arch.geometry), {**arch.values, p: dict(combo)},
                           name=arch.name)) - base
            skipped = v if spec.inactive(combo) else skipped
            row.append(v)
        values[p] = np.asarray(row, dtype=np.float64)
    return values


def best_within(space, expected, values: dict[str, np.ndarray], start: Arch, budget_ms: float,
                name: str, bins: int = 4000) -> Arch:
    """The knapsack's answer (module docstring): one combination per searchable position,
    maximising the summed ``values``, predicted within ``budget_ms``; the other positions as in
    ``start``."""
    check_budget(space, expected, budget_ms, "search.derive=budget")
    raw = (budget_ms - expected.offset) / expected.scale - expected.const
    step = raw / bins
    best = np.zeros(bins + 1)        # best[b]: highest value with total cost <= b steps
    picks, units = [], []
    for p in space.searchable:
        u = np.ceil(np.maximum(_costs(expected, p), 0.0) / step - 1e-9).astype(np.int64)
        here = space.combos(p).index(start.values[p]) if start.values[p] in space.combos(p) else 0
        new = np.full(bins + 1, -np.inf)
        pick = np.full(bins + 1, -1, dtype=np.int64)
        order = [here] + [k for k in np.argsort(-values[p], kind="stable") if k != here]
        for k in order:  # the start's block first: a tie keeps it
            if u[k] > bins:
                continue
            cand = np.full(bins + 1, -np.inf)
            cand[u[k]:] = best[:bins + 1 - u[k]] + values[p][k]
            better = cand > new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
        units.append(u)
    if not math.isfinite(best[bins]):
        raise ErnasError(f"no network of space {space.name!r} fits {budget_ms:.2f} ms once block "
                         f"costs are rounded to {bins} steps; the budget is within rounding of "
                         f"the fastest network ({smallest_ms(space, expected):.2f} ms). Give a "
                         f"slightly larger budget.")
    chosen = {p: dict(v) for p, v in start.values.items()}
    b = bins
    for p, pick, u in reversed(list(zip(space.searchable, picks, units))):
        k = int(pick[b])
        b -= int(u[k])
        chosen[p] = dict(space.combos(p)[k])
    arch = Arch(space.family, dict(space.geometry), chosen, name=name)
    if expected.of_arch(arch) > budget_ms * (1 + 1e-9):  # pragma: no cover - a bug
        raise RuntimeError(f"best_within: {expected.of_arch(arch)} ms > {budget_ms} ms")
    # the rounding can exclude a start that fits exactly: keep it when it is worth more
    own = sum(float(values[p][space.combos(p).index(start.values[p])])
              for p in space.searchable if start.values[p] in space.combos(p))
    if expected.of_arch(start) <= budget_ms and best[bins] < own:
        return Arch(space.family, dict(space.geometry),
                    {p: dict(v) for p, v in start.values.items()}, name=name)
    return arch


def changes(space, before: Arch, after: Arch) -> list[str]:
    """What differs per searchable position: ``position: skipped``, or ``position.decision:
    old -> new`` for each decision of a block that stays (or becomes) active."""
    out = []
    for p in space.searchable:
        b, a = before.values[p], after.values[p]
        if space.spec.inactive(a):
            out += [] if space.spec.inactive(b) else [f"{p}: skipped"]
        else:
            out += [f"{p}.{d}: {v!r} -> {a[d]!r}" for d, v in b.items() if a[d] != v]
    return out


def derive_within(net, expected, budget_ms: float, argmax: Arch, val_batch, batches: int, device,
                  task) -> Arch:
    """The network ``net`` (a SuperNet) scores best within ``budget_ms`` around its ``argmax``
    (module docstring). Ranks score on their own validation batches, so rank 0's answer is
    everyone's."""
    score = supernet_scorer(net, val_batch, batches, device, task)
    best = best_within(net.space, expected, block_values(net.space, argmax, score), argmax,
                       budget_ms, argmax.name)
    return Arch(best.family, dict(best.geometry), D.broadcast_object(best.values),
                name=argmax.name)
