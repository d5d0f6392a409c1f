"""Benchmark: the entropy regulariser on and off, the same search otherwise (same seeds).

Arms (``benchmarks/search_schedule.py``'s runner: ``experiments/search.yaml`` plus overrides, run
in-process, sequentially): ``search.entropy_max=<w>`` for every w of ``--weights`` and
``search.entropy_max=0``, for every seed. The regulariser is w_H·Σ_d H(p_d)/ln K_d, a sum over
decisions, so w is a per-decision weight. Reported per arm: decisiveness (goal ≥ 0.95 with the
regulariser), commit step, predicted latency, supernet and inherited validation metric (BatchNorm
recalibrated), discretisation gap, kept blocks.

    python benchmarks/entropy_ablation.py                               # w = search.yaml's, seed 0
    python benchmarks/entropy_ablation.py --weights 0.05,0.2 --seeds 0,1 -o search.steps=300
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ernas.latency.backends import machine_description
from search_schedule import compose, report, run_arms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", default=None,
                    help="the 'on' arm(s), comma-separated (default: search.yaml's entropy_max)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="Hydra override for every arm (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_entropy_"))
    common = ["search.device=cpu", "progress=false", *args.override]
    ons = args.weights.split(",") if args.weights else \
        [str(compose(common).search.entropy_max)]
    arms = {f"seed{s}_H{w}": [f"seed={s}", f"search.entropy_max={w}"]
            for s in args.seeds.split(",") for w in [*ons, "0"]}
    print(f"entropy ablation; machine: {machine_description()}; torch {torch.__version__}, "
          f"{args.threads} thread(s); output {out}")
    df = run_arms(arms, common, out, args.threads)
    print(report(df))
    for s in args.seeds.split(","):
        off = df[df["arm"] == f"seed{s}_H0"].iloc[0]
        for w in ons:
            on = df[df["arm"] == f"seed{s}_H{w}"].iloc[0]
            print(f"seed {s}: decisiveness with H={w} {on['decisiveness']:.3f} (goal ≥ 0.95: "
                  f"{'MET' if on['decisiveness'] >= 0.95 else 'MISSED'}), without "
                  f"{off['decisiveness']:.3f}; gap {on['gap']:.3f} vs {off['gap']:.3f}")


if __name__ == "__main__":
    main()
