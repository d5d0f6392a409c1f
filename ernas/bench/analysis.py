"""Selection on validation and the protocol's comparisons on test.

Selection reads validation only (each training's best validation figure, which also chose its
checkpoint ``best.pt``), over the seeds every network shares (``train.others_seeds``):

- per target, the searched network is the search seed whose network scores best, and the random
  network the draw that scores best (best-of-N random search);
- the headline network is the selected searched network of the smallest target whose score is
  at least ``(1 − select.headline_drop)`` times the reference's (else the largest target's);
- the scaled front: hand-made networks that beat every faster hand-made one on validation.

Each comparison also carries ``units_ci_*``: the same interval with each network's training
seeds averaged first (test units alone). It judges nothing; beside ``ci_*`` it shows whether the
test set or the training seeds set the interval's width.

Comparisons (``ernas.bench.stats``), at each target: selected searched − selected random,
selected searched − random mean, selected searched − scaled front at its measured latency; and
the headline network − reference, judged as non-inferior when the lower bound is at least
``−bootstrap.noninferiority`` times the reference's test score (``bootstrap.margin=relative``)
or ``−bootstrap.noninferiority`` itself (``absolute``, e.g. 0.01 = one mIoU point).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.bench import stats
from ernas.errors import ErnasError


def _summary(job: dict) -> dict:
    return json.loads((Path(job["run_dir"]) / "summary.json").read_text(encoding="utf-8"))


def validation(plan: dict, seeds) -> dict[str, float]:
    """Per network: the mean over ``seeds`` of its trainings' best validation figure (NaN for a
    network whose training diverged)."""
    out = {}
    for name in plan["networks"]:
        vals = []
        for s in seeds:
            summ = _summary(plan["jobs"][f"train_{name}_seed{s}"])
            v = summ.get(f"best_val_{summ['metric']}")
            vals.append(np.nan if v is None else float(v))
        out[name] = float(np.mean(vals))
    return out


def _best(names: list[str], val: dict[str, float]) -> str:
    finite = [n for n in names if np.isfinite(val[n])]
    return max(finite, key=lambda n: val[n]) if finite else names[0]


def select(plan: dict, val: dict[str, float], headline_drop: float) -> dict:
    """The validation-selected networks (module docstring)."""
    nets = plan["networks"]
    searched, random_ = {}, {}
    for i, _ in enumerate(plan["targets"]):
        searched[i] = _best([n for n, r in nets.items() if r["arm"] == "searched"
                             and r["target"] == i], val)
        random_[i] = _best([n for n, r in nets.items() if r["arm"] == "random"
                            and r["target"] == i], val)
    by_fraction = sorted(range(len(plan["targets"])), key=lambda i: plan["targets"][i]["fraction"])
    floor = (1 - headline_drop) * val["reference"]
    passing = [i for i in by_fraction if val[searched[i]] >= floor]
    headline = searched[passing[0] if passing else by_fraction[-1]]
    return {"searched": searched, "random": random_, "headline": headline,
            "headline_rule": f"smallest target with validation >= {floor:.4f} "
                             f"((1 - {headline_drop}) x reference {val['reference']:.4f})"
                             + ("" if passing else "; none passed: the largest target's"),
            "validation": val}


def scaled_front(plan: dict, val: dict[str, float], measured: dict[str, float]
                 ) -> list[tuple[str, float]]:
    hand = [(n, measured[n], val[n]) for n, r in plan["networks"].items()
            if r["arm"] in ("scaled", "reference") and np.isfinite(val[n])]
    return stats.front(hand)


def unit_scores(per_image: Path, set_name: str, metric: str, model: str | None = None
                ) -> np.ndarray:
    """Per-unit scores of one evaluation (``per_image.csv``; rows of ``model`` when given), units
    in sorted order: the ``unit`` column where the task writes one (the slab of brain slices),
    else the image (tiles named ``<image>@...`` are averaged per image)."""
    rows = pd.read_csv(per_image)
    rows = rows[rows["set"] == set_name]
    if model is not None:
        rows = rows[rows["model"] == model]
    if rows.empty:
        raise ErnasError(f"{per_image} has no rows of set {set_name!r}"
                         + (f" for model {model!r}" if model is not None else "")
                         + "; set evaluate.set to one of the task's evaluation sets.")
    unit = rows["unit"] if "unit" in rows else rows["name"].astype(str).str.split("@").str[0]
    rows = rows.assign(unit=unit.astype(str))
    return rows.groupby("unit")[metric].mean().sort_index().to_numpy(np.float64)


def test_scores(plan: dict, network: str, set_name: str, metric: str) -> dict[int, np.ndarray]:
    """``{training seed: per-unit scores}`` (:func:`unit_scores`) from the network's test
    evaluations."""
    out = {}
    for job_id, job in plan["jobs"].items():
        if job["command"] != "evaluate" or job["overrides"]["name"] != network:
            continue
        seed = int(job_id.rsplit("_seed", 1)[1])
        out[seed] = unit_scores(Path(job["run_dir"]) / "per_image.csv", set_name, metric)
    return out


def comparisons(plan: dict, sel: dict, scores: dict, measured: dict[str, float],
                front_pts: list[tuple[str, float]], boot) -> list[dict]:
    """Every comparison of the protocol with its interval and verdict (module docstring)."""
    n_targets = len(plan["targets"])
    m = 3 * n_targets + 1
    alpha = boot.alpha / m
    rows = []

    def add(what, target, a_name, b_label, a, b, threshold=0.0):
        iv = stats.paired_interval(a, b, alpha, boot.samples, seed=len(rows))
        units = stats.paired_interval(stats.seed_mean(a), stats.seed_mean(b), alpha,
                                      boot.samples, seed=len(rows))
        verdict = iv.verdict if threshold == 0 else (
            "non-inferior" if iv.low >= threshold else "not shown")
        rows.append({"comparison": what, "target": target, "network": a_name, "versus": b_label,
                     "difference": iv.estimate, "ci_low": iv.low, "ci_high": iv.high,
                     "units_ci_low": units.low, "units_ci_high": units.high,
                     "alpha_each": alpha, "threshold": threshold, "verdict": verdict})

    for i in range(n_targets):
        s = sel["searched"][i]
        r = sel["random"][i]
        draws = [n for n, rec in plan["networks"].items() if rec["arm"] == "random"
                 and rec["target"] == i]
        add("searched - random (best of N on validation)", i, s, r, scores[s], scores[r])
        add("searched - random (mean of draws)", i, s, f"mean of {len(draws)} draws", scores[s],
            stats.mean_of([scores[d] for d in draws]))
        f_scores, how = stats.front_at(measured[s], front_pts, scores)
        add("searched - scaled front", i, s, how, scores[s], f_scores)
    h = sel["headline"]
    ref_mean = float(np.mean([v.mean() for v in scores["reference"].values()]))
    scale = ref_mean if boot.margin == "relative" else 1.0
    add("headline - reference (non-inferiority)", None, h, "reference", scores[h],
        scores["reference"], threshold=-boot.noninferiority * scale)
    return rows


def verdict_lines(rows: list[dict], plan: dict, sel: dict, measured: dict[str, float], boot
                  ) -> list[str]:
    """The pre-stated verdicts, as sentences."""
    lines = []
    for what in ("searched - random (best of N on validation)",
                 "searched - random (mean of draws)", "searched - scaled front"):
        vs = [r["verdict"] for r in rows if r["comparison"] == what]
        lines.append(f"{what}: {stats.majority(vs)} over the targets "
                     f"({sum(v == 'above' for v in vs)} above, {sum(v == 'tie' for v in vs)} tie, "
                     f"{sum(v == 'below' for v in vs)} below, "
                     f"{sum(v == 'not scored' for v in vs)} not scored of {len(vs)})")
    ni = next(r for r in rows if r["comparison"].startswith("headline"))
    h = sel["headline"]
    speedup = measured["reference"] / measured[h]
    met = ni["verdict"] == "non-inferior" and speedup >= boot.speedup
    lines.append(f"headline {h}: measured {speedup:.2f}x faster than the reference, test "
                 f"difference {ni['difference']:+.3f} [{ni['ci_low']:+.3f}, {ni['ci_high']:+.3f}]"
                 f" (bound {ni['threshold']:+.3f}): {ni['verdict']}; goal (>= {boot.speedup}x "
                 f"and non-inferior): {'met' if met else 'not met'}")
    return lines
