"""Is a bench run's training-seed disagreement in the training or in the validation? Every
finished training of the run's ranked networks (the searched and random networks of each
target) is re-validated from its final weights (``last.pt``) four ways:

- ``as_trained``: BatchNorm running statistics as training left them, whole validation images
  (the run's own validation, when it used neither setting below);
- ``precise_bn``: BatchNorm statistics averaged over ``--bn-batches`` training batches after the
  last step (``ernas.train_loop.judged``: the recipe's ``bn_calibration_batches``);
- ``tiles``: whole images through stitched tiles of the training crop
  (``ernas.train_loop.validate`` with ``val_tile`` = ``crop``);
- ``precise_bn_tiles``: both.

Beside them ``best_logged``: the training's own best validation figure over its checkpoints
(what a protocol selects on). For each way and target: Kendall τ_b of training seed a's figures
against seed b's (95% bootstrap interval over networks; ``supernet_ranking.agreement``),
Spearman ρ, the mean absolute seed-to-seed difference and the mean figure. A way whose τ is
clearly higher than ``as_trained``'s says the seeds disagreed in how they were judged, not in
what they learnt.
Writes ``validation_scores.csv`` and ``validation_summary.csv`` to ``--out``; the run folder is
only read.

    python benchmarks/validation_agreement.py <bench run> --out <folder>
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from itertools import combinations
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from supernet_ranking import RankingInputError, _ranked, agreement  # noqa: E402

log = logging.getLogger("validation_agreement")
WAYS = {"as_trained": (False, False), "precise_bn": (True, False), "tiles": (False, True),
        "precise_bn_tiles": (True, True)}


def final_weights_figures(run_dir: Path, bn_batches: int) -> dict[str, float]:
    """The training's own best validation figure (``best_logged``: what a protocol selects on)
    and the four figures (module docstring) of its weights at its last step."""
    import json

    import torch

    from ernas import build_model, load_arch
    from ernas.task import make_task
    from ernas.train import TrainConfig, training_data
    from ernas.train_loop import judged, validate

    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    task = make_task(ckpt["task"], f"{run_dir / 'last.pt'}:task")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(load_arch(run_dir / "arch.yaml"))
    model.load_state_dict(ckpt["model"])
    batches, val_set = training_data(task, cfg, 0)
    precise = judged(model, batches, dataclasses.replace(cfg, bn_calibration_batches=bn_batches),
                     "cpu")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    best = summary[f"best_val_{summary['metric']}"]
    return {"best_logged": float("nan") if best is None else float(best),
            **{way: validate(precise if bn else model, val_set, "cpu", task,
                             cfg.crop if tiles else None) for way, (bn, tiles) in WAYS.items()}}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def score_run(run: Path, bn_batches: int, workers: int = 1) -> pd.DataFrame:
    """One row per (target, network, seed, way) over the run's finished trainings, re-validated
    by ``workers`` processes of one thread each."""
    from concurrent.futures import ProcessPoolExecutor

    from ernas.bench.jobs import load_plan

    if not (run / "plan.json").is_file():
        raise RankingInputError(f"{run}: no plan.json here; give the folder of an ernas-bench "
                                f"run (runs/bench/<date>_<time>).")
    plan = load_plan(run)
    trainings = []  # (target, network, seed, run dir)
    for i in range(len(plan["targets"])):
        for name in _ranked(plan, i):
            prefix = f"train_{name}_seed"
            trainings += [(i, name, int(job_id[len(prefix):]), Path(job["run_dir"]))
                          for job_id, job in plan["jobs"].items() if job_id.startswith(prefix)
                          and (Path(job["run_dir"]) / "summary.json").is_file()]
    if not trainings:
        raise RankingInputError(f"{run}: none of its searched or random networks has a "
                                f"finished training; run ernas-bench resume={run} until=train "
                                f"first.")
    log.info("re-validating the final weights of %d trainings", len(trainings))
    with ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
        figures = pool.map(final_weights_figures, [t[3] for t in trainings],
                           [bn_batches] * len(trainings))
        return pd.DataFrame([{"target": i, "network": name, "arm": plan["networks"][name]["arm"],
                              "seed": seed, "way": way, "value": v}
                             for (i, name, seed, _), values in zip(trainings, figures)
                             for way, v in values.items()])


def summarise(scores: pd.DataFrame, boots: int = 2000) -> pd.DataFrame:
    """One row per (target, way, seed pair) over the networks trained with both seeds."""
    rows = []
    for (target, way), g in scores.groupby(["target", "way"], sort=True):
        wide = g.pivot(index="network", columns="seed", values="value")
        for a, b in combinations(sorted(wide.columns), 2):
            pair = wide[[a, b]].dropna()
            rows.append({"target": target, "way": way, "seeds": f"{a}~{b}",
                         **agreement(pair[a], pair[b], boots),
                         "mean_abs_diff": float((pair[a] - pair[b]).abs().mean()),
                         "mean": float(pair.to_numpy().mean())})
    return pd.DataFrame(rows)


def report(summary: pd.DataFrame) -> str:
    lines = ["| target | way | seeds | n | Kendall τ [95% CI] | Spearman ρ | mean |Δ| | mean |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.target} | {r.way} | {r.seeds} | {r.n} | {r.kendall:+.2f} "
                     f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}] | {r.spearman:+.2f} | "
                     f"{r.mean_abs_diff:.3f} | {r.mean:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="an ernas-bench run folder (its trainings finished)")
    p.add_argument("--out", type=Path, required=True, help="folder for the two CSV files")
    p.add_argument("--bn-batches", type=int, default=100,
                   help="training batches that precise BatchNorm averages over")
    p.add_argument("--boots", type=int, default=2000)
    p.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    args = p.parse_args(argv)
    if args.boots < 100 or args.bn_batches < 1 or args.workers < 1:
        p.error("--boots must be >= 100, --bn-batches and --workers >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ernas.io import atomic_write_text

    try:
        scores = score_run(args.run, args.bn_batches, args.workers)
    except RankingInputError as e:
        print(f"validation_agreement: {e}", file=sys.stderr)
        return 2
    summary = summarise(scores, args.boots)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "validation_scores.csv", scores.to_csv(index=False))
    atomic_write_text(args.out / "validation_summary.csv", summary.to_csv(index=False))
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
