"""Is a bench run's training-seed disagreement in the training or in the validation? Every
finished training of the run's ranked networks (the searched and random networks of each
target) is re-validated from its final weights (``last.pt``) four ways:

- ``as_trained``: BatchNorm running statistics as training left them, whole validation images
  (what the run's own validation did);
- ``precise_bn``: BatchNorm statistics averaged over ``--bn-batches`` training batches after the
  last step (``ernas.train_loop.judged``: the recipe's ``bn_calibration_batches``);
- ``tiles``: whole images through stitched tiles of the training crop
  (``ernas.train_loop.validate`` with ``val_tile`` = ``crop``);
- ``precise_bn_tiles``: both.

For each way and target: Kendall τ_b of training seed a's figures against seed b's (95%
bootstrap interval over networks; ``supernet_ranking.agreement``), Spearman ρ, the mean absolute
seed-to-seed difference and the mean figure. A way whose τ is clearly higher than
``as_trained``'s says the seeds disagreed in how they were judged, not in what they learnt.
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
    """The four figures (module docstring) of the training in ``run_dir`` at its last step."""
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
    return {way: validate(precise if bn else model, val_set, "cpu", task,
                          cfg.crop if tiles else None) for way, (bn, tiles) in WAYS.items()}


def score_run(run: Path, bn_batches: int) -> pd.DataFrame:
    """One row per (target, network, seed, way) over the run's finished trainings."""
    from ernas.bench.jobs import load_plan

    if not (run / "plan.json").is_file():
        raise RankingInputError(f"{run}: no plan.json here; give the folder of an ernas-bench "
                                f"run (runs/bench/<date>_<time>).")
    plan = load_plan(run)
    rows = []
    for i in range(len(plan["targets"])):
        for name in _ranked(plan, i):
            prefix = f"train_{name}_seed"
            for job_id, job in plan["jobs"].items():
                run_dir = Path(job["run_dir"])
                if not (job_id.startswith(prefix) and (run_dir / "summary.json").is_file()):
                    continue
                log.info("%s: re-validating its final weights", job_id)
                for way, v in final_weights_figures(run_dir, bn_batches).items():
                    rows.append({"target": i, "network": name,
                                 "arm": plan["networks"][name]["arm"],
                                 "seed": int(job_id[len(prefix):]), "way": way, "value": v})
    if not rows:
        raise RankingInputError(f"{run}: none of its searched or random networks has a "
                                f"finished training; run ernas-bench resume={run} until=train "
                                f"first.")
    return pd.DataFrame(rows)


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
    args = p.parse_args(argv)
    if args.boots < 100 or args.bn_batches < 1:
        p.error("--boots must be >= 100 and --bn-batches >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from ernas.io import atomic_write_text

    torch.set_num_threads(1)
    try:
        scores = score_run(args.run, args.bn_batches)
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
