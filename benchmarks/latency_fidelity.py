"""Benchmark: does a latency table profiled here predict whole networks measured here?

For every (space, threads): profile a fresh table with the measurement protocol (interleaved
shuffled rounds, 20th percentile; consistency re-check; probe baseline), then validate it on N
sampled architectures plus the smallest, largest and reference, measured end to end in
interleaved rounds on the same backend (``--backend onnxruntime`` with its session options, or
``executorch_xnnpack``; ``--dtype int8`` for an int8 table). One row per (space, threads):

- profile_s: wall time to profile the table (export, sessions, rounds, re-check, baseline);
- plain / corrected MAPE: key sums, and the leave-one-out linear correction;
- within ±5% / ±10%, Spearman ρ, Kendall τ (of the plain sums);
- noise: the noise floor (median over networks of the mean pass-to-pass difference);
- speed-up MAPE / within ±10%: predicted speed-ups over the reference against measured ones
  paired per round (drift cancels: the table's own error);
- split-half noise: how much two half-length measurements of one figure disagree (absolute /
  speed-up); errors well above it are the table's;
- anchored ±10%: absolute and speed-up accuracy with the table anchored as ``latency.anchor``
  anchors it (the reference, the smallest and ``--anchor-samples`` sampled networks measured in
  the same pass, ``ernas.latency.validation``), on the others;
- pairs before/after: single-decision pairs listing the cheaper choice >5% slower, before and
  after the re-check (of all pairs);
- the session options (threads, spinning, graph optimisation) and the fingerprint digest.

Tables go to ``OUT/tables`` (``--ship DIR`` also copies them to DIR, e.g. ``latency_tables``),
validation files to ``OUT/validation_<space>_t<threads>``, the rows to ``OUT/latency_fidelity.csv``
and ``.json``. Validation keeps every network's session alive, so its memory grows with ``--n``
and the input size. Timings are only meaningful on a quiet machine.

    python benchmarks/latency_fidelity.py --space nafnet_tiny nafnet_ern --threads 1 2 --n 30
    python benchmarks/latency_fidelity.py --space nafnet_tiny --threads 1 --input 1,3,64,64 --n 4
    python benchmarks/latency_fidelity.py --backend executorch_xnnpack --space unet_demo \
        --input 1,1,96,80 --threads 1 2 --n 30
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from ernas.latency.anchor import ANCHOR_SAMPLES
from ernas.latency.backends import machine_description
from ernas.latency.factory import make_backend
from ernas.latency.fingerprint import describe
from ernas.latency.measure import MeasureProtocol
from ernas.latency.profile import sidecar_path
from ernas.latency.resolve import default_table_path, profile_table
from ernas.latency.validation import validate_table
from ernas.space import find_space


def make(args, threads: int):
    """The backend of ``--backend`` at ``threads`` (onnxruntime: ``--spinning`` and
    ``--graph-optimization``; ``--dtype`` for either)."""
    cfg = {"name": args.backend, "threads": threads, "dtype": args.dtype}
    if args.backend == "onnxruntime":
        cfg.update(spinning=args.spinning, graph_optimization=args.graph_optimization)
    return make_backend(cfg)


def run_one(space_name, threads, shape, args, protocol, out: Path) -> dict:
    space = find_space(space_name)
    backend = make(args, threads)
    path = default_table_path(space, backend, shape, args.granularity, out / "tables")
    if path.exists() and not args.reuse:
        path.unlink()
        sidecar_path(path).unlink(missing_ok=True)
    t0 = time.perf_counter()
    table = profile_table(space, shape, backend, args.granularity, path, protocol,
                          progress=not args.quiet)
    profile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = validate_table(space, table, backend, out / f"validation_{space.name}_t{threads}",
                       n=args.n, seed=args.seed, protocol=protocol, table_path=path,
                       progress=not args.quiet, anchor_samples=args.anchor_samples)
    validate_s = time.perf_counter() - t0
    c, plain, loo = table.metadata["consistency"], s["plain_sum"], s["corrected_loo"]
    opts = backend.session_options()
    if args.ship:
        dest = Path(args.ship) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
        print(f"shipped {dest}")
    return {"space": space.name, "backend": backend.name, "dtype": backend.dtype,
            "threads": threads, "input": "x".join(map(str, shape)),
            "keys": len(table), "networks": s["n"], "profile_s": round(profile_s, 1),
            "validate_s": round(validate_s, 1), "mape_plain": plain["mape"],
            "mape_corrected": loo["mape"], "within_5": plain["within_5pct"],
            "within_10": plain["within_10pct"], "spearman": plain["spearman"],
            "kendall": plain["kendall"], "noise_floor": s["noise_floor"],
            "speedup_mape": s["speedup"]["mape"], "speedup_within_10": s["speedup"]["within_10pct"],
            "speedup_spearman": s["speedup"]["spearman"],
            "speedup_noise_floor": s["speedup"]["noise_floor"],
            "measurement_noise": s["measurement_noise"],
            "speedup_measurement_noise": s["speedup"]["measurement_noise"],
            **_anchored_columns(s["anchored"]), "pairs": c["pairs"],
            "inconsistent_before": c["before"], "inconsistent_after": c["after"],
            "probe_baseline_ratio": table.metadata["probe_baseline"]["ratio"],
            "spinning": opts.get("spinning"), "graph_optimization": opts.get("graph_optimization"),
            "runtime_version": opts["version"], "fingerprint": backend.fingerprint()["digest"],
            "table": str(path)}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _anchored_columns(an: dict | None) -> dict:
    keys = ("anchored_mape", "anchored_within_10", "anchored_speedup_within_10")
    if an is None:
        return dict.fromkeys(keys)
    return dict(zip(keys, (an["mape"], an["within_10pct"], an["speedup"]["within_10pct"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", nargs="+", default=["nafnet_tiny", "nafnet_ern"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--input", default="1,3,256,256", help="N,C,H,W (default 1,3,256,256)")
    ap.add_argument("--n", type=int, default=30, help="sampled networks (+ smallest, largest, "
                                                      "reference)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchor-samples", type=int, default=ANCHOR_SAMPLES,
                    help=f"sampled anchors beside the reference and the smallest (default "
                         f"{ANCHOR_SAMPLES}, as latency.anchor_samples)")
    ap.add_argument("--granularity", default="block", choices=["block", "op"])
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime",
                                                                 "executorch_xnnpack"])
    ap.add_argument("--dtype", default="float32",
                    help="the backend's dtype (executorch_xnnpack: float32 | int8)")
    ap.add_argument("--spinning", action="store_true", help="let onnxruntime threads spin")
    ap.add_argument("--graph-optimization", default="all")
    ap.add_argument("--rounds", type=int, default=MeasureProtocol.rounds)
    ap.add_argument("--per-round", type=int, default=MeasureProtocol.per_round)
    ap.add_argument("--min-seconds", type=float, default=MeasureProtocol.min_seconds)
    ap.add_argument("--out", default=None, help="output folder (default: a new temp folder)")
    ap.add_argument("--ship", default=None, metavar="DIR",
                    help="copy the profiled tables into DIR (e.g. latency_tables)")
    ap.add_argument("--reuse", action="store_true",
                    help="resume/reuse tables already in OUT/tables instead of re-profiling")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()

    shape = [int(s) for s in args.input.split(",")]
    protocol = MeasureProtocol(rounds=args.rounds, per_round=args.per_round,
                               min_seconds=args.min_seconds)
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_fidelity_"))
    out.mkdir(parents=True, exist_ok=True)
    probe = make(args, args.threads[0])
    print(f"latency fidelity; machine: {machine_description()}")
    print(f"fingerprint: {describe(probe.fingerprint())}")
    print(f"protocol: {protocol.to_dict()}; input {shape}; {args.granularity} keys; n={args.n}")
    rows = []
    for space in args.space:
        for threads in args.threads:
            rows.append(run_one(space, threads, shape, args, protocol, out))
            r = rows[-1]
            print(f"{r['space']:>12} {r['backend']} {r['dtype']} t{threads}: profile "
                  f"{r['profile_s']:.0f} s, MAPE plain "
                  f"{100 * r['mape_plain']:.1f}% / corrected {100 * r['mape_corrected']:.1f}%, "
                  f"±5% {100 * r['within_5']:.0f}%, ±10% {100 * r['within_10']:.0f}%, Spearman "
                  f"{r['spearman']:.3f}, Kendall {r['kendall']:.3f}, noise floor "
                  f"{100 * r['noise_floor']:.1f}%, speed-ups (paired) MAPE "
                  f"{100 * r['speedup_mape']:.1f}% / ±10% {100 * r['speedup_within_10']:.0f}% "
                  f"(noise floor {100 * r['speedup_noise_floor']:.1f}%), split-half noise "
                  f"{100 * r['measurement_noise']:.1f}% / "
                  f"{100 * r['speedup_measurement_noise']:.1f}%, anchored ±10% "
                  f"{_pct(r['anchored_within_10'])} / speed-ups "
                  f"{_pct(r['anchored_speedup_within_10'])}, inconsistent pairs "
                  f"{r['inconsistent_before']}->{r['inconsistent_after']}/{r['pairs']} "
                  f"(spinning {r['spinning']})",
                  flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "latency_fidelity.csv", index=False)
    (out / "latency_fidelity.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = ["space", "backend", "dtype", "threads", "profile_s", "mape_plain", "mape_corrected",
            "within_5", "within_10", "spearman", "kendall", "noise_floor", "speedup_mape",
            "speedup_within_10", "speedup_noise_floor", "measurement_noise",
            "anchored_within_10", "anchored_speedup_within_10", "inconsistent_before",
            "inconsistent_after", "spinning"]
    print()
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nwrote {out}/latency_fidelity.csv, latency_fidelity.json, tables/, validation_*/")


if __name__ == "__main__":
    main()
