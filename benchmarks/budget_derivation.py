"""Can a finished search be derived within its latency budget? Two value models, measured.

The argmax of α ignores the latency model: the hinge-0.45 searches of the Pareto headline derived
networks at 0.80-1.04 of their target T at weight_keep_rate 0.5, depending on the search seed, and the band form at
0.90-1.10 (it binds the expected latency E[LAT], not the argmax). A projection onto the budget
solves the multiple-choice knapsack

    maximise  Σ_s v_s(c_s)     subject to   a·(C + Σ_s L_s(c_s)) + b ≤ B

over one block c_s (a combination of the position's decisions) per searchable position s, with
L_s the table's latency of the block, C the fixed part and a, b the table's correction
(``ExpectedLatency``), solved by ``ernas.search.budget.best_within`` (``search.derive=budget``
uses the second value model below). It is only as good as its values v; this script compares:

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

import sys
from pathlib import Path

import numpy as np
import torch

from ernas.search.budget import best_within, block_values, changes, supernet_scorer


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
