"""Time an ONNX file with onnxruntime and print one ``latency_ms: X`` line per run.

The local stand-in for a device benchmark tool (what ``CommandBackend`` runs in the
``local_onnx`` preset)::

    python -m ernas.latency.time_onnx MODEL.onnx --repeats 50 --threads 2 --warmup 3

Inputs are seeded random tensors of the model's input shapes; a symbolic dimension becomes 1 for
the batch axis and 64 for every other axis. Needs only onnxruntime and numpy (no torch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(double)": np.float64, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
LEVELS = ("all", "extended", "basic", "disable")


def make_inputs(session, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every session input (symbolic dims: batch -> 1, others -> 64)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 64)
                 for i, d in enumerate(arg.shape)]
        dtype = NP_TYPES.get(arg.type)
        if dtype is None:
            raise SystemExit(f"time_onnx: input {arg.name!r} has unsupported type {arg.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ernas.latency.time_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="path of the .onnx file")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--graph-optimization", choices=LEVELS, default="all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    if not Path(args.model).is_file():
        print(f"time_onnx: model file {args.model!r} does not exist", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        print("time_onnx: need --repeats >= 1, --threads >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.provider not in ort.get_available_providers():
        print(f"time_onnx: provider {args.provider!r} not available; available: "
              f"{ort.get_available_providers()}", file=sys.stderr)
        return 2
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[args.graph_optimization]
    sess = ort.InferenceSession(args.model, sess_options=so, providers=[args.provider])
    feeds = make_inputs(sess, args.seed)
    for _ in range(args.warmup):
        sess.run(None, feeds)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        print(f"latency_ms: {(time.perf_counter() - t0) * 1e3:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
