"""Benchmark: is a searched network specialised to the deployment whose table it was searched
on? The 2x2 table of ProxylessNAS: each network on its own deployment and on the other.

Deployments: ``--deployments A B``, each ``RUNTIME[:DTYPE]`` (default ``onnxruntime
executorch_xnnpack``; ``onnxruntime onnxruntime:int8`` asks the same of fp32 against the int8
QDQ deployment). Networks: ``--net LABEL=ARCH``, LABEL the deployment its search's table came
from, ARCH a derived ``arch.yaml``; several seeds per deployment may be given (``--net
onnxruntime=a0.yaml --net onnxruntime=a1.yaml ...``). Latency does not depend on the weights,
so each network is built from its arch (BatchNorm folded, as it ships).

Measurement: on each deployment, every network is timed in interleaved shuffled rounds
(``ernas.latency.measure``), in ``--passes`` passes with new sessions; the samples of both
deployments' runners are collected in the same passes. Figures per deployment R:

- each network's latency (the protocol's statistic per pass, median over passes);
- the specialisation ratio ``s_R = median_r lat_r(others' networks) / lat_r(R's networks)``,
  paired per round (each side the mean over its networks' per-round statistics; rounds of
  all passes), with a
  percentile bootstrap CI over rounds (``--bootstrap`` resamples). ``s_R > 1``: the networks
  searched for R run faster on R than the networks searched for the other deployment; a CI that
  holds 1 is a tie.

Quality (``--quality METRIC``, e.g. ``miou``; ``--set``, default ``test``): each ARCH is then an
``ernas-evaluate`` run directory of the retrained network (its ``arch.yaml`` is timed, its
``per_image.csv`` scored). The quality difference B − A paired per unit (image, or slab for the
brain slices), each side's search seeds as its seed dimension, with the interval of
``ernas.bench.stats.paired_interval`` (units resampled with replacement, one search seed per side
per draw, α = 0.05): a CI that holds 0 is a tie.

Per op family (``--tables A.csv B.csv``, the two deployments' tables of the same space and
shape): the per-key ratio ``t_B(key) / t_A(key)``, median and range per family (the key's op name
and its ``norm``/``att``/``conv`` attributes): which families cost differently on the two.

Writes ``OUT/specialisation.csv`` (one row per deployment and network), ``OUT/specialisation.json``
(the same rows with each runner's per-round statistics, and the ratios)
and, with ``--tables``, ``OUT/op_family_ratios.csv``. Timings are only meaningful on a quiet
machine.

    python benchmarks/specialisation.py --input 1,1,96,80 --threads 1 \\
        --net onnxruntime=ort/arch.yaml --net executorch_xnnpack=et/arch.yaml \\
        --tables ort_table.csv et_table.csv --out OUT
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ernas import build_model, inference_model, load_arch
from ernas.bench.analysis import unit_scores
from ernas.bench.stats import paired_interval
from ernas.keys import parse_key
from ernas.latency.backends import machine_description
from ernas.latency.factory import make_backend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.table import LatencyTable

DEPLOYMENTS = ("onnxruntime", "executorch_xnnpack")
FAMILY_ATTRS = ("norm", "att", "attention", "conv")


def parse_nets(items: list[str], deployments) -> list[tuple[str, str, Path]]:
    """``[(deployment, name, arch path)]`` from ``LABEL=PATH`` items."""
    out = []
    for i, item in enumerate(items):
        label, _, path = item.partition("=")
        if label not in deployments or not path:
            raise SystemExit(f"--net {item!r}: expected LABEL=ARCH with LABEL in {deployments}")
        path = Path(path)
        out.append((label, f"{label}_{i}", path / "arch.yaml" if path.is_dir() else path))
    if {r for r, _, _ in out} != set(deployments):
        raise SystemExit(f"--net: give at least one network per deployment {deployments}")
    return out


def quality(nets, deployments, metric: str, set_name: str, samples: int) -> dict:
    """The paired quality difference B − A over units (module docstring); every network's
    ``ARCH`` must sit in an ``ernas-evaluate`` run directory."""
    scores: dict[str, dict[int, np.ndarray]] = {d: {} for d in deployments}
    per_network = {}
    for label, name, arch in nets:
        run = arch.parent
        if not (run / "per_image.csv").is_file() or not (run / "results.csv").is_file():
            raise SystemExit(f"--quality: {run} is not an ernas-evaluate run directory (no "
                             f"per_image.csv / results.csv); pass each network as "
                             f"LABEL=<evaluate run dir>.")
        model = pd.read_csv(run / "results.csv")["name"].iloc[0]
        s = unit_scores(run / "per_image.csv", set_name, metric, model)
        scores[label][len(scores[label])] = s
        per_network[name] = float(s.mean())
    a, b = deployments
    iv = paired_interval(scores[b], scores[a], alpha=0.05, samples=samples)
    return {"metric": metric, "set": set_name, "per_network": per_network,
            "difference": f"{b} - {a}", "estimate": iv.estimate, "ci_low": iv.low,
            "ci_high": iv.high, "verdict": iv.verdict,
            "units": int(next(iter(scores[a].values())).size)}


def backend_of(deployment: str, threads: int):
    """The latency backend of ``RUNTIME[:DTYPE]``."""
    runtime, _, dtype = deployment.partition(":")
    return make_backend({"name": runtime, "threads": threads, "dtype": dtype or "float32"})


def runners(nets, threads: int, shape, deployments):
    """``{deployment|name: runner}``: every network on every deployment, new sessions."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    out = {}
    for deployment in deployments:
        backend = backend_of(deployment, threads)
        for _, name, path in nets:
            model = inference_model(build_model(load_arch(path)))
            out[f"{deployment}|{name}"] = backend.runner(model, x)
    return out


def specialisation(rounds: dict[str, np.ndarray], nets, runtime: str, samples: int,
                   seed: int) -> dict:
    """``s_R`` on ``runtime`` and its bootstrap CI (module docstring)."""
    own = np.mean([rounds[f"{runtime}|{n}"] for r, n, _ in nets if r == runtime], axis=0)
    other = np.mean([rounds[f"{runtime}|{n}"] for r, n, _ in nets if r != runtime], axis=0)
    ratio = other / own
    rng = np.random.default_rng(seed)
    boot = np.median(ratio[rng.integers(0, len(ratio), (samples, len(ratio)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"runtime": runtime, "ratio": float(np.median(ratio)), "ci_low": float(lo),
            "ci_high": float(hi), "rounds": int(len(ratio))}


def family(key: str) -> str:
    """An op key's family: its op name and the attributes that name a block's kind."""
    k = parse_key(key)
    attrs = [f"{a}={k.attr[a]}" for a in FAMILY_ATTRS if a in k.attr]
    return k.op + (f"[{','.join(attrs)}]" if attrs else "")


def family_ratios(a_path: Path, b_path: Path) -> pd.DataFrame:
    """Per op family: the B / A ratio of the two tables' key latencies."""
    a, b = LatencyTable.load(a_path), LatencyTable.load(b_path)
    keys = sorted(set(a.keys()) & set(b.keys()))
    ratio = pd.Series(b.lookup(keys) / a.lookup(keys), index=keys)
    groups = ratio.groupby([family(k) for k in keys])
    return pd.DataFrame({"keys": groups.size(), "median_ratio": groups.median(),
                         "min_ratio": groups.min(), "max_ratio": groups.max()}).reset_index(
        names="family").sort_values("median_ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--input", required=True, help="N,C,H,W")
    ap.add_argument("--deployments", nargs=2, default=list(DEPLOYMENTS), metavar=("A", "B"),
                    help="RUNTIME[:DTYPE] each (default: onnxruntime executorch_xnnpack)")
    ap.add_argument("--net", action="append", required=True,
                    help="DEPLOYMENT=ARCH (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=MeasureProtocol.rounds)
    ap.add_argument("--per-round", type=int, default=MeasureProtocol.per_round)
    ap.add_argument("--min-seconds", type=float, default=MeasureProtocol.min_seconds)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--tables", nargs=2, default=None, metavar=("A", "B"))
    ap.add_argument("--quality", default=None, metavar="METRIC",
                    help="score each network's ernas-evaluate run (e.g. miou)")
    ap.add_argument("--set", default="test", help="the evaluation set --quality reads")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    deployments = tuple(args.deployments)
    nets = parse_nets(args.net, deployments)
    shape = tuple(int(s) for s in args.input.split(","))
    out = Path(args.out)
    q = quality(nets, deployments, args.quality, args.set, args.bootstrap) \
        if args.quality else None
    out.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list] = {}
    passes: dict[str, list] = {}
    for p in range(args.passes):
        protocol = MeasureProtocol(rounds=args.rounds, per_round=args.per_round,
                                   min_seconds=args.min_seconds, seed=p)
        timed = runners(nets, args.threads, shape, deployments)
        notes = {k: getattr(r, "notes", None) for k, r in timed.items()}
        measured = protocol.measure(timed, progress=False)
        for k, v in measured.items():
            rounds.setdefault(k, []).extend(v["round_ms"])
            passes.setdefault(k, []).append(v["ms"])
        print(f"pass {p + 1}/{args.passes} done", flush=True)
    rounds = {k: np.asarray(v) for k, v in rounds.items()}
    rows = [{"runtime": runtime, "network": n, "searched_for": searched, "arch": str(path),
             "ms": float(np.median(passes[f"{runtime}|{n}"])),
             "quality": q["per_network"][n] if q else None, "notes": notes[f"{runtime}|{n}"],
             "round_ms": rounds[f"{runtime}|{n}"].tolist()}
            for runtime in deployments for searched, n, path in nets]
    table = pd.DataFrame(rows).drop(columns="round_ms")
    table.to_csv(out / "specialisation.csv", index=False)
    spec = [specialisation(rounds, nets, r, args.bootstrap, 0) for r in deployments]
    summary = {"machine": machine_description(), "threads": args.threads, "input": list(shape),
               "passes": args.passes, "networks": rows, "specialisation": spec, "quality": q}
    if args.tables:
        fam = family_ratios(Path(args.tables[0]), Path(args.tables[1]))
        fam.to_csv(out / "op_family_ratios.csv", index=False)
        summary["op_family_ratios"] = fam.to_dict("records")
        print(fam.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    (out / "specialisation.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for s in spec:
        print(f"on {s['runtime']}: others' / own networks = {s['ratio']:.3f} "
              f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}] over {s['rounds']} rounds")
    if q:
        print(f"{q['metric']} on {q['set']}, {q['difference']}: {q['estimate']:.4f} "
              f"[{q['ci_low']:.4f}, {q['ci_high']:.4f}] over {q['units']} units: {q['verdict']}")


if __name__ == "__main__":
    main()
