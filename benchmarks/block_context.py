"""Benchmark: does a block cost in a network what its isolated key costs in the table?

For each position given and each single-decision variant of the reference block there, time
the reference network with that variant and with the block skipped, all interleaved in one
session (the table's protocol and statistic), and compare the in-network cost

    c_net = m(network with the variant) − m(network with the block skipped)

with the table's cost of the same change, ``c_key = Σ(variant) − Σ(skipped)`` (key sums), and
with ``c_now``: the same block keys timed alone now, in the same interleaved pass. A ratio
``c_key / c_net`` below 1 means the table's key is cheaper than the block is in the network
(which no per-network line can fix when it differs between choices); ``c_now`` tells whether
the key itself reads differently today (``c_key / c_now``) or the block costs more in the
network than alone (``c_now / c_net``). Timings are only meaningful on a quiet machine.

    python benchmarks/block_context.py --table runs/fidelity/tables/<table>.csv --threads 1
"""
from __future__ import annotations

import argparse
import copy

import torch

VARIANTS = ({}, {"norm": "none"}, {"norm": "batchnorm"}, {"attention": "none"},
            {"dw_expand": 1}, {"ffn_expand": 1}, {"kernel": 7})


def variant(ref, pos: str, change: dict):
    """``ref`` with ``change`` applied to the block at ``pos``, named after it."""
    a = copy.deepcopy(ref)
    a.values[pos] = {**a.values[pos], **change}
    a.name = f"{pos}:{','.join(f'{k}={v}' for k, v in change.items()) or 'reference'}"
    return a


def variants_at(space, positions) -> dict:
    """``{name: arch}``: per position, the reference network with each single-decision variant
    of ``VARIANTS`` the space allows there, and with that block skipped."""
    ref, nets = space.reference(), {}
    for pos in positions:
        ok = [c for c in VARIANTS if all(v in space.choices[pos][d] for d, v in c.items())]
        for change in (*ok, {"keep": False}):
            a = variant(ref, pos, change)
            nets[a.name] = a
    return nets


def block_keys(arch, skipped, shape, gran) -> list[str]:
    """The keys ``arch`` runs beyond those of ``skipped`` (the block that differs)."""
    rest = list(skipped.op_keys(shape, gran))
    extra = []
    for k in arch.op_keys(shape, gran):
        if k in rest:
            rest.remove(k)
        else:
            extra.append(k)
    return extra


def block_costs(names, measured_ms: dict, key_sum: dict) -> list[tuple[str, float, float]]:
    """``(variant, c_net, c_key)`` for every variant in ``names``: its network's measured and
    key-sum latency minus those of the same network with that block skipped."""
    rows = []
    for n in names:
        pos = n.split(":")[0]
        skip = f"{pos}:keep=False"
        if n != skip:
            rows.append((n, measured_ms[n] - measured_ms[skip], key_sum[n] - key_sum[skip]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="nafnet_tiny")
    ap.add_argument("--table", required=True, help="a table of this space, profiled here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--positions", nargs="+", default=["encoders.0.0", "decoders.1.0"])
    args = ap.parse_args()

    from ernas import build_model, inference_model
    from ernas.latency.backends import OnnxRuntimeBackend
    from ernas.latency.measure import MeasureProtocol
    from ernas.latency.ops import build_op
    from ernas.latency.table import LatencyTable
    from ernas.space import find_space

    space, table = find_space(args.space), LatencyTable.load(args.table)
    shape, gran = tuple(table.metadata["input_shape"]), table.metadata.get("granularity", "block")
    nets = variants_at(space, args.positions)
    extra = {n: block_keys(a, nets[f"{n.split(':')[0]}:keep=False"], shape, gran)
             for n, a in nets.items() if not n.endswith("keep=False")}
    backend = OnnxRuntimeBackend(threads=args.threads)
    x = torch.randn(*shape)
    runners = {n: backend.runner(inference_model(build_model(a)), x) for n, a in nets.items()}
    for k in dict.fromkeys(k for ks in extra.values() for k in ks):
        runners[k] = backend.runner(*build_op(k))
    protocol = MeasureProtocol(statistic=table.metadata.get("statistic", "p20"))
    res = {n: r["ms"] for n, r in protocol.measure(runners, progress=False).items()}

    sums = {n: float(table.lookup(a.op_keys(shape, gran)).sum()) for n, a in nets.items()}
    print(f"{args.space} at {list(shape)}, {args.threads} thread(s), table {args.table}, "
          f"session {backend.session_options()}, protocol {protocol.to_dict()}")
    print(f"{'block variant':40s} {'in-network':>10s} {'table key':>9s} {'key now':>8s} "
          f"{'table/in-net':>12s} {'table/now':>9s} {'now/in-net':>10s}  (ms)")
    for n, c_net, c_key in block_costs(nets, res, sums):
        c_now = sum(res[k] for k in extra[n])
        print(f"{n:40s} {c_net:10.3f} {c_key:9.3f} {c_now:8.3f} {c_key / c_net:12.2f} "
              f"{c_key / c_now:9.2f} {c_now / c_net:10.2f}")


if __name__ == "__main__":
    main()
