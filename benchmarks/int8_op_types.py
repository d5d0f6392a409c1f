"""Benchmark: what runs faster int8-quantised (PTQ, QDQ, U8S8, 7-bit weights) on the onnxruntime
backend: per op type in whole networks, and per conv kind in isolation.

1. Per op type, in the network. Each architecture (default: the nafnet_tiny reference, the demo's
   deployment, the nafnet_ern_small reference and unet_demo_classic), exported to fp32 ONNX with
   BatchNorm folded, is quantised once per quantisable op type T of its graph
   (``ernas.export.ptq.quantize_int8(op_types=[T], conv_rule=None)``), once with every type and
   once with the export default (``calibration`` of experiments/export.yaml); all files are timed
   together with the fp32 one, interleaved in shuffled rounds (``ernas.latency.measure``, p20).
2. Per conv kind, in isolation: one conv (pointwise, depthwise, dense k×k, strided) at shapes of
   these networks, fp32 vs quantised (Q → QLinearConv → DQ, as a quantised conv between float
   neighbours runs), timed interleaved. Each row shows the GEMM depth K = C_in/groups·k_h·k_w and
   C_out, and the verdict of the export default's conv rule (quantise when K ≥ min_depth and
   C_out ≥ min_out): a row where the rule and the measurement disagree by more than the margin is
   flagged.

Speed-up = fp32 ms / int8 ms. On a busy machine the figures move by tens of percent between
runs: decide from a quiet one.

    python benchmarks/int8_op_types.py                                  # 2 threads, as the table
    python benchmarks/int8_op_types.py --archs reference:nafnet_tiny --threads 1 --rounds 20
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from ernas.latency.backends import machine_description
from ernas.latency.factory import make_backend
from ernas.latency.measure import measure_interleaved
from ernas.paths import EXPERIMENTS

ARCHS = {"reference:nafnet_tiny": ("denoise", [1, 3, 256, 256]),
         "reference:nafnet_ern_small": ("denoise", [1, 3, 256, 256]),
         "unet_demo_classic": ("segment", [1, 1, 96, 80])}
# (C_in, C_out, k, stride, groups, H=W) of convs these networks run
CONVS = [(16, 32, 1, 1, 1, 128), (32, 32, 1, 1, 1, 128), (32, 64, 1, 1, 1, 128),
         (64, 64, 1, 1, 1, 64), (128, 128, 1, 1, 1, 32), (32, 32, 3, 1, 32, 128),
         (32, 32, 7, 1, 32, 128), (128, 128, 3, 1, 128, 32), (3, 16, 3, 1, 1, 256),
         (8, 8, 3, 1, 1, 256), (16, 3, 3, 1, 1, 256), (16, 16, 3, 1, 1, 128),
         (64, 64, 3, 1, 1, 64), (16, 32, 2, 2, 1, 128)]


def export_defaults() -> dict:
    return yaml.safe_load((EXPERIMENTS / "export.yaml").read_text())["calibration"]


def quantisable(path) -> list[str]:
    """Op types of an ONNX graph that onnxruntime's static quantiser handles."""
    import onnx
    from onnxruntime.quantization import registry

    known = set(registry.QDQRegistry) | set(registry.QLinearOpsRegistry)
    return sorted({n.op_type for n in onnx.load(str(path)).graph.node} & known)


def network_files(arch_name: str, task_name: str, shape, out: Path, cal: dict) -> dict:
    """fp32, one PTQ file per quantisable op type, every type, the export default."""
    from ernas import build_model
    from ernas.cli.common import resolve_arch
    from ernas.export.ptq import quantize_int8
    from ernas.latency.onnx_export import export_onnx
    from ernas.task import make_task

    task = make_task({"name": task_name})
    torch.manual_seed(0)
    model = build_model(resolve_arch(arch_name)).eval()
    if hasattr(model, "fuse"):
        model.fuse()
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, torch.rand(shape), out / "fp32.onnx")
    sets = {f"[{t}]": ([t], None) for t in quantisable(fp32)}
    sets["every type"] = (None, None)
    sets["export default"] = (cal["op_types"], cal["conv_rule"])
    files = {"fp32": str(fp32)}
    for label, (ops, rule) in sets.items():
        path = out / f"int8_{len(files)}.onnx"
        quantize_int8(fp32, task, path, 8, 0, True, "MinMax", ops, cal["reduce_range"], rule)
        files[label] = str(path)
    return files


def conv_files(out: Path, reduce_range: bool) -> dict:
    """{(kind, fp32|int8): path} for the convs of ``CONVS`` (random weights and inputs)."""
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from ernas.export.ptq import calibration_reader
    from ernas.latency.onnx_export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    rng = np.random.default_rng(0)
    for cin, cout, k, s, g, hw in CONVS:
        kind = (cin, cout, k, s, g, hw)
        f = out / f"conv_{'_'.join(map(str, kind))}.onnx"
        export_onnx(nn.Conv2d(cin, cout, k, s, (k // 2) * (s == 1), groups=g).eval(),
                    torch.rand(1, cin, hw, hw), f)
        q = f.with_name(f.stem + "_int8.onnx")
        inputs = [rng.random((1, cin, hw, hw), dtype=np.float32) for _ in range(2)]
        quantize_static(str(f), str(q), calibration_reader(inputs), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, reduce_range=reduce_range,
                        op_types_to_quantize=["Conv"])
        files[kind, "fp32"], files[kind, "int8"] = str(f), str(q)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=10.0)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import onnxruntime

    from ernas.export.ptq import int8_conv

    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_int8_ops_"))
    backend = make_backend({"name": "onnxruntime", "threads": args.threads})
    cal = export_defaults()
    protocol = dict(rounds=args.rounds, min_seconds=args.min_seconds)
    print(f"int8 vs fp32; machine: {machine_description()}; onnxruntime {onnxruntime.__version__}, "
          f"{args.threads} thread(s); p20 of interleaved rounds ({args.rounds}+ rounds, >= "
          f"{args.min_seconds} s); export default {cal}; output {out}")
    for name in args.archs.split(","):
        task, shape = ARCHS[name]
        files = network_files(name, task, shape, out / name.replace(":", "_"), cal)
        stats = measure_interleaved({k: backend.onnx_runner(p, shape) for k, p in files.items()},
                                    **protocol)
        base = stats["fp32"]["ms"]
        print(f"\n1. {name} {shape}: fp32 {base:.2f} ms (spread {stats['fp32']['spread']:.2f})")
        for label, st in stats.items():
            if label != "fp32":
                print(f"  {label:>16}: {st['ms']:8.2f} ms  speed-up {base / st['ms']:.2f}")
    files = conv_files(out / "convs", cal["reduce_range"])
    stats = measure_interleaved({f"{k}": backend.onnx_runner(p) for k, p in files.items()},
                                **protocol)
    print("\n2. conv kinds (C_in, C_out, k, stride, groups, H=W): K = C_in/groups·k²")
    rule = cal["conv_rule"]
    for kind in dict.fromkeys(k for k, _ in files):
        a, b = stats[f"{(kind, 'fp32')}"]["ms"], stats[f"{(kind, 'int8')}"]["ms"]
        cin, cout, k, _, g, _ = kind
        quantise = int8_conv(cout, cin // g * k * k, rule)
        wrong = (quantise and a / b < 1 - args.margin) or (not quantise and a / b > 1 + args.margin)
        print(f"  {str(kind):>28}: K {cin // g * k * k:4d}, fp32 {a:7.3f} ms, int8 {b:7.3f} ms, "
              f"speed-up {a / b:.2f}; rule: {'int8' if quantise else 'float'}"
              f"{'  <- rule disagrees' if wrong else ''}")


if __name__ == "__main__":
    main()
