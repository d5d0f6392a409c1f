"""Does a network's latency depend on the session it runs in?

Each network (a retrain run directory: its ``arch.yaml`` and weights) is exported to ONNX once,
then ``--sessions`` inference sessions are opened on that one file with the latency config's
backend and all of them, of all networks, are timed together in interleaved shuffled rounds
(``ernas.latency.measure``). Every session runs the same file on the same input, so a spread
between one network's sessions is the runtime's (memory placement, kernel choice), not the
model's, and not a slow period of the machine (which the interleaving spreads over everything).

Printed per network: each session's statistic, and max/min over its sessions; per session also
the ratio to the network's fastest session. A network whose sessions differ needs several
measurement passes, each with new sessions, before its latency is reported
(``docs/results/session_variance.md``)::

    python benchmarks/session_variance.py runs/retrain/<reference> runs/retrain/<derived> \\
        --sessions 6
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="retrain run directories (arch.yaml + best.pt)")
    ap.add_argument("--sessions", type=int, default=6, help="sessions per network")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="input side (1x3xSIZExSIZE)")
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()

    from ernas import inference_model
    from ernas.checkpoint import load_model
    from ernas.latency.backends import OnnxRuntimeBackend
    from ernas.latency.measure import measure_interleaved
    from ernas.latency.onnx_export import export_onnx
    from ernas.space import load_arch

    backend = OnnxRuntimeBackend(threads=a.threads)
    x = torch.rand(1, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    runners, names = {}, {}
    with tempfile.TemporaryDirectory(prefix="ernas_sessions_") as tmp:
        for i, run in enumerate(map(Path, a.runs)):
            model = inference_model(load_model(load_arch(run / "arch.yaml"), run))
            path = Path(tmp) / f"net{i}.onnx"
            export_onnx(model, x, path, opset=backend.opset)
            names[i] = run.parent.name if run.name.startswith("seed") else run.name
            for s in range(a.sessions):
                runners[(i, s)] = backend.onnx_runner(path, tuple(x.shape))
        stats = measure_interleaved({f"{i}/{s}": r for (i, s), r in runners.items()},
                                    rounds=a.rounds)
    print(f"{backend!r}, input {list(x.shape)}, {a.sessions} sessions per network, one ONNX "
          f"file each, {a.rounds}+ interleaved rounds, statistic p20")
    for i, name in names.items():
        ms = np.array([stats[f"{i}/{s}"]["ms"] for s in range(a.sessions)])
        print(f"{name}: max/min {ms.max() / ms.min():.2f}; sessions (ms, x fastest): " + ", ".join(
            f"{m:.1f} ({m / ms.min():.2f})" for m in ms))


if __name__ == "__main__":
    main()
