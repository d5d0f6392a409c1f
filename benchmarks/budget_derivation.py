"""Can a finished search be derived within its latency budget? Two value models, measured.

The argmax of α ignores the latency model: the hinge-0.45 searches of the Pareto headline derived
networks at 0.80-1.04 of their target T, depending on the search seed, and the band form at
0.90-1.10 (it binds the expected latency E[LAT], not the argmax). A projection onto the budget
solves the multiple-choice knapsack

    maximise  Σ_s v_s(c_s)     subject to   a·(C + Σ_s L_s(c_s)) + b ≤ B

over one block c_s (a combination of the position's decisions) per searchable position s, with
L_s the table's latency of the block, C the fixed part and a, b the table's correction
(``ExpectedLatency``), solved exactly on the budget cut into ``bins`` steps with every block's
cost rounded up (so the answer is always within B; the start is kept when it fits and the grid
found nothing better). It is only as good as its values v, and this script compares two:

- ``logp``: v_s(c) = Σ_d log softmax(α_{s,d}/τ)[c_d], the most probable network within B;
- ``supernet``: v_s(c) = M(A with s → c) − M(A), the task metric M of the supernet run one-hot
  around the argmax A on the search's first ``eval_batches`` validation batches, BatchNorm on
  batch statistics (perturbation-based selection, Wang et al. 2021, "Rethinking architecture
  selection in differentiable NAS"), effects assumed to add up across positions.

    python benchmarks/budget_derivation.py runs/p23/search/t0.45 [more search folders]

prints, per search folder, the argmax's and each projection's predicted latency against T and
the decisions each projection changed, and writes nothing. It reads the folder's checkpoint,
summary and latency-table copy, and the benchmark's space and data (``--space``, bundled data).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

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
                         f"network can be derived within it; give a budget above {low:.2f} ms.")


def logp_values(net) -> dict[str, np.ndarray]:
    """v_s(c) = Σ_d log softmax(α_{s,d}/τ)[c_d] at every searchable position, in ``combos``
    order (a decision with one candidate adds 0)."""
    values = {}
    for p in net.space.searchable:
        shape = [len(c) for c in net.space.choices[p].values()]
        v = torch.zeros(shape, dtype=torch.float64)
        for axis, d in enumerate(net.space.choices[p]):
            a = net.alpha(p, d)
            if a is not None:
                view = [1] * len(shape)
                view[axis] = -1
                v = v + torch.log_softmax(a.detach().double() / net.temperature, 0).view(view)
        values[p] = v.flatten().numpy()
    return values


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
    check_budget(space, expected, budget_ms, "budget derivation")
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


def _fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def _load(folder: Path, space_path: str):
    """(space, ExpectedLatency of the folder's table copy, SuperNet with the checkpoint's α and
    weights, summary) of one finished search folder."""
    import json

    from ernas.latency.predict import ExpectedLatency
    from ernas.latency.table import LatencyTable
    from ernas.space import load_space
    from ernas.supernet import SuperNet

    need = [folder / n for n in ("checkpoint.pt", "summary.json", "latency_table.csv")]
    missing = [str(f) for f in need if not f.is_file()]
    if missing:
        _fail(f"budget_derivation: {', '.join(missing)} missing; give the folder of a "
                 f"finished search (it holds checkpoint.pt, summary.json and latency_table.csv).")
    summary = json.loads(need[1].read_text())
    space = load_space(space_path)
    ck = torch.load(need[0], map_location="cpu", weights_only=True)
    net = SuperNet(space, ck["config"]["mode"], ck["config"]["temperature"])
    try:
        net.load_state_dict(ck["model"])
    except RuntimeError:
        _fail(f"budget_derivation: {need[0]} is not a search of space {space_path}; give its "
                 f"space with --space.")
    table = LatencyTable.load(need[2])
    return space, ExpectedLatency(space, table, summary["input_shape"]), net, summary


def main(argv=None) -> None:
    import argparse

    from ernas.batches import step_batches
    from ernas.task import make_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="finished search folders")
    ap.add_argument("--space", default="benchmarks/spaces/nafnet_ern_small_bnfix3.yaml")
    ap.add_argument("--seed", type=int, default=0, help="the searches' top-level seed (data)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = make_task({"name": "denoise"})
    for folder in a.folders:
        space, expected, net, s = _load(folder, a.space)
        c, t = s["config"], s["target_ms"]
        val = step_batches(task.dataset("val", c["crop"], a.seed + 1, random=True),
                           c["batch_size"], a.seed + 1)
        score = supernet_scorer(net, val, c["eval_batches"], torch.device("cpu"), task)
        argmax = net.derive()
        base = score(argmax)
        print(f"{folder}: T {t:.2f} ms; argmax {expected.of_arch(argmax):.2f} ms "
              f"({expected.of_arch(argmax) / t:.3f} T), supernet {task.metric} {base:.3f}")
        for how, values in (("logp", logp_values(net)),
                            ("supernet", block_values(space, argmax, score))):
            got = best_within(space, expected, values, argmax, t, how)
            ms, what = expected.of_arch(got), "; ".join(changes(space, argmax, got))
            print(f"  {how:8s} {ms:.2f} ms ({ms / t:.3f} T), supernet {task.metric} "
                  f"{score(got):.3f}; changed: {what or 'nothing'}")


if __name__ == "__main__":
    main()
