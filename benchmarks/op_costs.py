"""Benchmark: where NAFNet's time goes, per op type, and what each ERN decision removes.

Profiles the op-granularity keys of one architecture (default: the ERN space's reference, i.e.
NAFNet width 32) on a backend, prints each op type's share of the summed latency, then measures
whole networks end to end with LayerNorm removed, channel attention removed, and both, side by
side with the full network (the ERN-Net observation: LayerNorm and attention are the costliest).

    python benchmarks/op_costs.py --space nafnet_ern --input-shape 1,3,256,256
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch

from ernas import build_model
from ernas.latency.factory import make_backend
from ernas.latency.measure import MeasureProtocol, measure_interleaved, paired_ratio
from ernas.latency.ops import build_op, parse_key
from ernas.latency.profile import profile_keys
from ernas.space import find_space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--space", default="nafnet_ern")
    ap.add_argument("--input-shape", default="1,3,256,256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved end-to-end rounds")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.input_shape.split(","))
    backend = make_backend({"name": "onnxruntime", "threads": args.threads})
    space = find_space(args.space)
    ref = space.reference()
    keys = ref.op_keys(shape, "op")
    table = profile_keys(keys, build_op, backend, None, {"input_shape": list(shape),
                         "granularity": "op"}, MeasureProtocol())
    per_type = defaultdict(float)
    for k in keys:
        per_type[parse_key(k).op] += float(table.lookup([k])[0])
    total = sum(per_type.values())
    print(f"{space.name} reference at {shape}, onnxruntime CPU {args.threads} threads "
          f"({backend.metadata()['device']}); per-op sum {total:.1f} ms")
    for op, ms in sorted(per_type.items(), key=lambda kv: -kv[1]):
        print(f"  {op:>12}: {ms:8.2f} ms  {100 * ms / total:5.1f}%")

    variants = {"full": {}, "no layernorm": {"norm": "none"}, "no attention": {"attention": "none"},
                "no layernorm, no attention": {"norm": "none", "attention": "none"}}
    models = {}
    for name, change in variants.items():
        arch = copy.deepcopy(ref)
        for p in arch.positions:
            arch.values[p].update(change)
        torch.manual_seed(0)
        models[name] = build_model(arch).eval().fuse()
    x = torch.randn(shape)
    runners = {name: backend.runner(m, x) for name, m in models.items()}
    stats = measure_interleaved(runners, rounds=args.rounds)  # drift hits every variant alike
    print(f"end to end (p20 of interleaved shuffled rounds; speed-ups paired per round; "
          f"{backend.session_options()}):")
    for name in variants:
        t = stats[name]["ms"]
        speedup = paired_ratio(stats["full"], stats[name])
        print(f"  {name:>27}: {t:8.1f} ms  ({speedup:.2f}x faster than full; pass-to-pass "
              f"spread {100 * stats[name]['spread']:.0f}%)")


if __name__ == "__main__":
    main()
