"""Benchmark: profile a whole search space and validate its table end to end.

Prints the wall time to profile every op key of the space (fresh table), then validates it on
N sampled architectures (plus smallest, largest, reference) measured end to end on the same
backend, for both plain key sums and the leave-one-out linear correction. With ``--ship`` the
table (with its fitted correction) is copied into latency_tables/.

    python benchmarks/latency_tables.py --space nafnet_ern --n 30            # onnxruntime CPU
    python benchmarks/latency_tables.py --space nafnet_ern --backend torch --device cuda
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ernas.space import find_space
from ernas.latency.backends import MeasureBudget, make_backend
from ernas.latency.ops import build_op
from ernas.latency.profile import profile_keys
from ernas.latency.resolve import default_table_path
from ernas.paths import LATENCY_TABLES
from ernas.table_validation import validate_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", default="nafnet_ern")
    ap.add_argument("--input-shape", default="1,3,256,256")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--granularity", default="block", choices=["block", "op"])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--out", default=None, help="folder for the table and validation files")
    ap.add_argument("--ship", action="store_true", help="copy the table into latency_tables/")
    args = ap.parse_args()

    shape = [int(s) for s in args.input_shape.split(",")]
    cfg = {"name": args.backend, "threads": args.threads}
    if args.backend == "torch":
        cfg["device"] = args.device
    backend = make_backend(cfg)
    space = find_space(args.space)
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_bench_"))
    path = default_table_path(space, backend, shape, args.granularity, out)
    keys = space.op_keys(shape, args.granularity)
    t0 = time.perf_counter()
    table = profile_keys(keys, build_op, backend, path, {"space": space.name, "input_shape": shape,
                         "granularity": args.granularity},
                         MeasureBudget(warmup=3, min_repeats=10, max_repeats=100, time_cap_s=1.0))
    profile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = validate_table(space, table, backend, out / "validation", n=args.n, seed=0,
                       budget=MeasureBudget(warmup=2, min_repeats=5, max_repeats=20, time_cap_s=3.0),
                       table_path=path)
    validate_s = time.perf_counter() - t0
    print(json.dumps({"space": space.name, "backend": args.backend, "device": s["device"],
                      "threads": args.threads, "input_shape": shape, "granularity": args.granularity,
                      "keys": len(keys), "profile_seconds": round(profile_s, 1),
                      "validate_seconds": round(validate_s, 1), "table": str(path),
                      "validation_dir": str(out / "validation")}, indent=1))
    for label, m in (("plain key sums", s["plain_sum"]),
                     ("corrected (leave-one-out)", s["corrected_loo"])):
        print(f"{label:>26}: MAPE {100 * m['mape']:5.2f}%  within ±5% {100 * m['within_5pct']:5.1f}%"
              f"  within ±10% {100 * m['within_10pct']:5.1f}%  Spearman {m['spearman']:.3f}"
              f"  Kendall {m['kendall']:.3f}  (n={m['n']})")
    print(f"repeatability (median spread of one network over {s['rounds']} interleaved passes): "
          f"{100 * s['repeatability']:.1f}%")
    print(f"model stored with the table: {s['model']}; measured ≈ "
          f"{s['correction']['scale']:.4f}·sum + {s['correction']['offset_ms']:.3f} ms")
    if args.ship:
        dest = LATENCY_TABLES / path.name
        shutil.copy(path, dest)
        print(f"shipped {dest}")


if __name__ == "__main__":
    main()
