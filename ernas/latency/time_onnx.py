"""Time an ONNX file with onnxruntime and print one ``latency_ms: X`` line per run.

The local stand-in for a device benchmark tool (what ``CommandBackend`` runs in the
``local_onnx`` preset)::

    python -m ernas.latency.time_onnx MODEL.onnx --repeats 50 --threads 2 --warmup 3

Inputs are seeded random tensors of the model's input shapes; a symbolic dimension becomes 1 for
the batch axis and 64 for every other axis. Needs only onnxruntime and numpy (no torch).

Session options are the project's measurement settings, made in one place (``make_session``,
also used by ``OnnxRuntimeBackend.session``): sequential execution, one inter-op thread,
``threads`` intra-op threads and intra-/inter-op **spinning off** unless ``--spinning``. Spinning
worker threads busy-wait for work; on a shared 2-core machine they fight the other processes and
each other, which made whole networks 1.15-1.57x the sum of their parts at 2 threads here.
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


def make_session(path, threads: int = 2, provider: str = "CPUExecutionProvider",
                 graph_optimization: str = "all", spinning: bool = False):
    """An ``InferenceSession`` with the measurement settings (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[graph_optimization]
    spin = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(str(path), sess_options=so, providers=[provider])


def make_inputs(session, seed: int = 0, first_shape=None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every session input. ``first_shape`` fixes the first input's
    shape; other symbolic dims become 1 on the batch axis and 64 elsewhere."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for n, arg in enumerate(session.get_inputs()):
        shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 64)
                 for i, d in enumerate(arg.shape)]
        if n == 0 and first_shape is not None:
            shape = [int(s) for s in first_shape]
        dtype = NP_TYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has unsupported type {arg.type}")
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
    ap.add_argument("--spinning", action="store_true",
                    help="let idle worker threads spin (default off: see the module docstring)")
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
    sess = make_session(args.model, args.threads, args.provider, args.graph_optimization,
                        args.spinning)
    try:
        feeds = make_inputs(sess, args.seed)
    except ValueError as e:
        print(f"time_onnx: {e}", file=sys.stderr)
        return 2
    for _ in range(args.warmup):
        sess.run(None, feeds)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        print(f"latency_ms: {(time.perf_counter() - t0) * 1e3:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
