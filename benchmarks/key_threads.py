"""Benchmark: which table, anchored on the day, predicts networks measured at T threads?

Re-scores a stored validation (``validation.csv`` of ``ernas-profile mode=validate`` or
``benchmarks/latency_fidelity.py``: networks measured end to end at T threads, the anchors in
the same pass) with the key sums of other tables, each anchored as ``latency.anchor`` anchors it
(the line ``m ≈ a·S + b`` through the reference with the anchors' least-squares slope) and scored
on every network but the anchors and their twins (``ernas.latency.validation``). Nothing is
timed: the networks are redrawn from the validation's seeds (``--n``, ``--seed``,
``--anchor-samples``), and the stored key sums of ``--measured-table`` (the table the validation
priced) must be reproduced, or the script refuses. One row per table (the measured one first);
``--out`` writes them as CSV (docs/results/latency_key_threads_executorch_amd.csv holds the
rows of the two commands below). A table timed at 1 thread scored against
networks measured at 2 is what ``latency.key_threads=1`` with ``latency.backend.threads=2`` does.

    T=latency_tables/unet_demo_executorch_xnnpack_AMD-EPYC_1x1x96x80_block
    python benchmarks/key_threads.py --space unet_demo --input 1,1,96,80 \\
        --validation docs/results/latency_validation_executorch_unet_demo_t2.csv \\
        --measured-table ${T}_t2.csv --table ${T}_t1.csv
    T=latency_tables/nafnet_tiny_executorch_xnnpack_AMD-EPYC_1x3x256x256_block
    python benchmarks/key_threads.py --space nafnet_tiny --input 1,3,256,256 \\
        --validation docs/results/latency_validation_executorch_nafnet_tiny_t2.csv \\
        --measured-table ${T}_t2.csv --table ${T}_t1.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.latency.anchor import ANCHOR_SAMPLES
from ernas.latency.table import LatencyTable
from ernas.latency.validation import anchor_rows, anchored_accuracy, validated_networks
from ernas.space import find_space


def key_sums(table: LatencyTable, keys: list) -> np.ndarray:
    """Σ_k t(k) of each network's keys ``keys`` (one list per network) under ``table``."""
    return np.array([float(table.lookup(k).sum()) for k in keys])


def rescore(df: pd.DataFrame, keys: list, table: LatencyTable) -> dict:
    """``anchored_accuracy`` of the validation ``df`` with its key sums taken from ``table``."""
    scored = df.assign(sum_ms=key_sums(table, keys))
    fit, why = anchored_accuracy(scored, *anchor_rows(scored, keys))
    if fit is None:
        raise SystemExit(f"no anchored line for {table.path}: {why}")
    return fit


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", required=True)
    ap.add_argument("--input", required=True, help="e.g. 1,1,96,80")
    ap.add_argument("--validation", required=True, type=Path)
    ap.add_argument("--measured-table", required=True, type=Path,
                    help="the table the validation priced (its sum_ms column)")
    ap.add_argument("--table", nargs="+", required=True, type=Path, help="tables to score")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anchor-samples", type=int, default=ANCHOR_SAMPLES)
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--threads", type=int,
                    help="threads the networks ran at (default: the measured table's)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.input.split(","))
    df = pd.read_csv(args.validation)
    named = dict(validated_networks(find_space(args.space), args.n, args.seed,
                                    args.anchor_samples, shape, args.granularity))
    missing = sorted(set(df["arch"]) - set(named))
    if missing:
        raise SystemExit(f"{args.validation}: networks {missing} are not among the draws of "
                         f"--n {args.n} --seed {args.seed} --anchor-samples {args.anchor_samples}")
    keys = [named[a].op_keys(shape, args.granularity) for a in df["arch"]]
    own = key_sums(LatencyTable.load(args.measured_table), keys)
    if not np.allclose(own, df["sum_ms"], rtol=1e-6):
        raise SystemExit(f"{args.validation}: the redrawn networks do not reproduce its sum_ms "
                         f"under {args.measured_table} (max gap "
                         f"{np.max(np.abs(own - df['sum_ms'])):.3g} ms): another draw or table")
    rows = []
    threads = args.threads or LatencyTable.load(args.measured_table).metadata.get("threads")
    for path in [args.measured_table, *args.table]:
        table = LatencyTable.load(path)
        fit = rescore(df, keys, table)
        rows.append({"space": args.space, "input": "x".join(map(str, shape)),
                     "threads": threads, "key_threads": table.metadata.get("threads"),
                     "table": path.name,
                     "scored_on": fit["scored_on"], "within_10": fit["within_10pct"],
                     "mape": fit["mape"], "spearman": fit["spearman"],
                     "speedup_within_10": fit["speedup"]["within_10pct"],
                     "scale": fit["scale"], "offset_ms": fit["offset_ms"]})
    out = pd.DataFrame(rows)
    print(out.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        out.to_csv(args.out, index=False)
    return out


if __name__ == "__main__":
    main()
