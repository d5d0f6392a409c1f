"""Does the supernet rank the networks of its space as training them does?

For an ``ernas-bench`` run whose trainings finished (``until=train`` or later), each search
job's supernet (``checkpoint.pt``: the weights at the search's last step) scores every searched
and random network of its target that is a point of its space, two ways:

- ``inherited``: the network extracted with the supernet's weights, BatchNorm recalibrated on
  the search's calibration batches (as ``ernas-search`` judges its derived network), scored on
  the validation split as the run's trainings validate (their ``val_crop`` and ``val_tile``,
  noise seed 0);
- ``supernet``: the supernet run one-hot on the network over the search's validation batches
  with BatchNorm on batch statistics: the score ``search.derive=budget`` maximises;
- ``alpha``: log p(a) = Σ_(s,d) log softmax(α_(s,d)/τ)[a_(s,d)], the network's log-probability
  under the search's final architecture distribution (the argmax derivation maximises it).

Beside them, proxies that need no supernet: ``params``, ``macs`` and ``predicted_ms`` (larger
taken as better). The trained figure y of a network is the mean, over the training seeds every
ranked network has, of each training's best validation figure (what the protocol selects on).
Per target, proxy and supernet: Kendall's τ_b and Spearman's ρ between proxy and y over the
networks, a percentile bootstrap interval of τ over networks, and the regret of trusting the
proxy, y_max − y(argmax proxy). The ceiling (proxy ``training_seed``) is the agreement of two
training seeds' figures: retraining itself orders networks only that well.

    python benchmarks/supernet_ranking.py <bench run> --out <folder>

writes ``ranking_scores.csv`` (a row per supernet and network) and ``ranking_summary.csv`` (a
row per target, proxy and supernet) into ``--out``; the run itself is only read.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

log = logging.getLogger("supernet_ranking")
FREE_PROXIES = ("params", "macs", "predicted_ms")
SUPERNET_PROXIES = ("inherited", "supernet", "alpha")


class RankingInputError(ValueError):
    """The run cannot be read as a finished ``ernas-bench`` run (message names the fix)."""


def agreement(proxy, trained, boots: int = 2000, seed: int = 0) -> dict:
    """τ_b, ρ, the bootstrap 95% interval of τ_b (resampling networks) and the regret
    y_max − y(argmax proxy) of ``proxy`` against ``trained`` (1-d arrays, one entry per
    network; NaN entries dropped)."""
    x, y = np.asarray(proxy, float), np.asarray(trained, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"n": int(len(x)), "kendall": np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "spearman": np.nan, "regret": np.nan}
    if len(x) < 3:
        return out
    out["kendall"] = float(stats.kendalltau(x, y).statistic)
    out["spearman"] = float(stats.spearmanr(x, y).statistic)
    out["regret"] = float(y.max() - y[int(np.argmax(x))])
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(boots):
        i = rng.integers(0, len(x), len(x))
        t = stats.kendalltau(x[i], y[i]).statistic
        if np.isfinite(t):
            taus.append(t)
    if taus:
        out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(taus, [2.5, 97.5]))
    return out


def _summary(job: dict) -> dict | None:
    path = Path(job["run_dir"]) / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def trained_figures(plan: dict, names: list[str]) -> tuple[dict[str, dict[int, float]], str]:
    """{network: {seed: best validation figure}} over the seeds every network of ``names`` has
    finished, and the metric's name."""
    per, metric = {}, None
    for name in names:
        per[name] = {}
        for job_id, job in plan["jobs"].items():
            prefix = f"train_{name}_seed"
            s = _summary(job) if job_id.startswith(prefix) else None
            if s is not None:
                metric = s["metric"]
                v = s.get(f"best_val_{metric}")
                per[name][int(job_id[len(prefix):])] = np.nan if v is None else float(v)
    common = set.intersection(*(set(v) for v in per.values())) if per else set()
    if not common:
        raise RankingInputError(
            f"no training seed has finished for every ranked network ({', '.join(names)}); let "
            f"the protocol finish its trainings first (ernas-bench resume=<run> until=train).")
    return {n: {s: v[s] for s in sorted(common)} for n, v in per.items()}, metric


def _search_inputs(job: dict):
    """The search job's space, task, search config and batch functions, composed as it ran."""
    from ernas.api import compose
    from ernas.cli.search import prepare

    return prepare(compose("search", job["overrides"], job["nodes"]))


def _supernet(p: dict, run_dir: Path):
    """The search's supernet at its last step (refused when the search did not finish)."""
    import torch

    from ernas.supernet import SuperNet

    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    scfg = p["scfg"]
    if ck["step"] != scfg.steps or not (run_dir / "summary.json").is_file():
        raise RankingInputError(f"{run_dir}: the search stopped at step {ck['step']} of "
                                f"{scfg.steps}; let it finish (ernas-bench resume=<run>).")
    net = SuperNet(p["space"], scfg.mode, scfg.temperature, scfg.gumbel)
    net.load_state_dict(ck["model"])
    return net


def log_prob(net, arch) -> float:
    """log p(arch) under ``net``'s architecture distribution softmax(α/τ) (module docstring)."""
    import torch

    with torch.no_grad():
        probs, choices = net.probs(sample=False), net.space.choices
        return float(sum(math.log(float(probs[p][d][choices[p][d].index(arch.values[p][d])]))
                         for p in probs for d in probs[p] if len(choices[p][d]) > 1))


def supernet_scores(job: dict, archs: dict, val_crop, val_tile=None
                    ) -> dict[str, dict[str, float]]:
    """{network: {"inherited": ..., "supernet": ..., "alpha": ...}} for the archs of ``archs``
    that are points of the search's space (module docstring); ``val_crop`` and ``val_tile``:
    the run's trainings' (the inherited score validates as they did)."""
    import torch

    from ernas.nn.batchnorm import recalibrate_bn
    from ernas.search.budget import supernet_scorer
    from ernas.search.finish import calibration_batches
    from ernas.train_loop import validate

    p = _search_inputs(job)
    net, task, scfg = _supernet(p, Path(job["run_dir"])), p["task"], p["scfg"]
    device = torch.device("cpu")
    val_set = task.dataset("val", val_crop, 0)
    one_hot = supernet_scorer(net, p["val_batch"], scfg.eval_batches, device, task)
    out = {}
    for name, arch in archs.items():
        if not p["space"].contains(arch):
            continue
        model = net.extract(arch)
        recalibrate_bn(model, calibration_batches(p["train_batch"], scfg, device))
        out[name] = {"inherited": validate(model, val_set, device, task, val_tile),
                     "supernet": one_hot(arch), "alpha": log_prob(net, arch)}
    return out


def free_proxies(archs: dict, predicted: dict, shape) -> dict[str, dict[str, float]]:
    from ernas import build_model
    from ernas.complexity import count_macs, count_params

    out = {}
    for name, arch in archs.items():
        model = build_model(arch)
        out[name] = {"params": count_params(model), "macs": count_macs(model, tuple(shape)),
                     "predicted_ms": predicted[name]}
    return out


def _ranked(plan: dict, target: int) -> list[str]:
    return [n for n, r in plan["networks"].items()
            if r["arm"] in ("searched", "random") and r.get("target") == target]


def score_run(run: Path) -> pd.DataFrame:
    """One row per (target, scorer, network): ``scorer`` is a search job (its supernet's two
    scores) or ``-`` (the free proxies), with the trained figures per seed and their mean."""
    from ernas import load_arch
    from ernas.bench.jobs import load_plan

    if not (run / "plan.json").is_file():
        raise RankingInputError(f"{run}: no plan.json here; give the folder of an ernas-bench "
                                f"run (runs/bench/<date>_<time>).")
    plan = load_plan(run)
    first = {j["command"]: j for j in reversed(list(plan["jobs"].values()))}
    shape = list(first["search"]["overrides"]["input_shape"])
    val_crop = first["retrain"]["overrides"].get("val_crop")
    val_tile = first["retrain"]["overrides"].get("val_tile")
    rows = []
    for i in range(len(plan["targets"])):
        names = _ranked(plan, i)
        trained, metric = trained_figures(plan, names)
        archs = {n: load_arch(plan["networks"][n]["arch"]) for n in names}
        predicted = {n: _summary(plan["jobs"][n.replace("searched_", "search_", 1)])
                     ["predicted_latency_ms"] if n.startswith("searched_")
                     else plan["networks"][n]["predicted_ms"] for n in names}
        scorers = {"-": free_proxies(archs, predicted, shape)}
        for job_id, job in plan["jobs"].items():
            if job["command"] == "search" and job_id.startswith(f"search_t{i}_"):
                log.info("%s: scoring %d networks with its supernet", job_id, len(archs))
                scorers[job_id] = supernet_scores(job, archs, val_crop, val_tile)
        for scorer, scores in scorers.items():
            for name, values in scores.items():
                ys = trained[name]
                rows.append({"target": i, "scorer": scorer, "network": name,
                             "arm": plan["networks"][name]["arm"], **values, "metric": metric,
                             **{f"trained_seed{s}": v for s, v in ys.items()},
                             "trained": float(np.mean(list(ys.values())))})
    return pd.DataFrame(rows)


def summarise(scores: pd.DataFrame, boots: int = 2000) -> pd.DataFrame:
    """One row per (target, proxy, scorer): :func:`agreement` of the proxy with ``trained``;
    proxy ``training_seed`` (scorer ``seed a~b``): seed a's figures against seed b's."""
    rows = []
    seeds = [c for c in scores.columns if c.startswith("trained_seed")]
    for (target, scorer), g in scores.groupby(["target", "scorer"], sort=True):
        proxies = FREE_PROXIES if scorer == "-" else SUPERNET_PROXIES
        for proxy in proxies:
            rows.append({"target": target, "proxy": proxy, "scorer": scorer,
                         **agreement(g[proxy], g["trained"], boots)})
        if scorer == "-":
            for a, b in combinations(seeds, 2):
                rows.append({"target": target, "proxy": "training_seed",
                             "scorer": f"{a[len('trained_seed'):]}~{b[len('trained_seed'):]}",
                             **agreement(g[a], g[b], boots)})
    return pd.DataFrame(rows)


def report(summary: pd.DataFrame, scores: pd.DataFrame) -> str:
    metric = scores["metric"].iloc[0]
    lines = [f"| target | proxy | scorer | n | Kendall τ [95% CI] | Spearman ρ | regret "
             f"({metric}) |", "|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.target} | {r.proxy} | {r.scorer} | {r.n} | {r.kendall:+.2f} "
                     f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}] | {r.spearman:+.2f} | "
                     f"{r.regret:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="an ernas-bench run folder (its trainings finished)")
    p.add_argument("--out", type=Path, required=True, help="folder for the two CSV files")
    p.add_argument("--boots", type=int, default=2000)
    args = p.parse_args(argv)
    if args.boots < 100:
        p.error("--boots must be >= 100")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ernas.io import atomic_write_text

    try:
        scores = score_run(args.run)
    except RankingInputError as e:
        print(f"supernet_ranking: {e}", file=sys.stderr)
        return 2
    summary = summarise(scores, args.boots)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ranking_scores.csv", scores.to_csv(index=False))
    atomic_write_text(args.out / "ranking_summary.csv", summary.to_csv(index=False))
    print(report(summary, scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
