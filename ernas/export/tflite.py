"""LiteRT export (``ernas-export format=tflite``): an fp32 ``model.tflite`` for LiteRT's XNNPACK
CPU path, judged and timed like the ONNX file.

BatchNorm folded (``model.fuse()``), converted with ``litert_torch.convert`` at the input shape
with NHWC input and output (``ernas.latency.litert.to_tflite``: the layout LiteRT's kernels and
Android camera pipelines use); parity ``max_abs_diff = max |y_litert − y_torch|`` on a real test
input, compared in NCHW (``parity_ok``: ≤ 1e-4, the ONNX path's bound). The file is scored with
the task's metrics on whole test images through input-size tiles
(``ernas.export.onnx.run_tiled``) and timed on the LiteRT backend. No int8 file is written here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ernas.export.onnx import deployable, real_input, tiled_quality
from ernas.io import atomic_write_bytes
from ernas.latency.litert import LitertBackend, TfliteModel, to_tflite
from ernas.latency.measure import measure_interleaved

__all__ = ["export_tflite_all", "tflite_quality"]

PARITY_TOL = 1e-4


class _TiledSession:
    """onnxruntime's ``session.run`` shape over a :class:`TfliteModel`, for ``run_tiled``."""

    def __init__(self, model: TfliteModel):
        self.model = model

    def run(self, _names, feeds: dict):
        return [self.model(torch.from_numpy(feeds["input"])).numpy()]


def tflite_quality(model: TfliteModel, task, hw, seed: int = 0) -> dict[str, float]:
    """The task's metrics of a loaded ``.tflite`` on its headline evaluation set, whole images
    through ``hw`` tiles (as ``ernas.export.onnx.onnx_quality``)."""
    return tiled_quality(_TiledSession(model), task, hw, seed)


def export_tflite_all(arch, model, task, out_dir, backend: LitertBackend,
                      measure_cfg: dict | None = None, input_shape=(1, 3, 256, 256),
                      seed: int = 0) -> dict:
    """Export the fp32 ``model.tflite`` of ``model`` into ``out_dir``, check parity, score it on
    the task's test images and time it on ``backend``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, (n, c, h, w) = deployable(arch, model, input_shape)
    x = real_input(task, (h, w))
    tflite, channels_last = to_tflite(model, x)
    path = out / "model.tflite"
    atomic_write_bytes(path, tflite)
    loaded = TfliteModel(path, backend.threads, channels_last)
    with torch.no_grad():
        diff = float((loaded(x) - model(x)).abs().max())
    summary = {"arch": arch.name, "task": task.name, "metric": task.metric, "format": "tflite",
               "tflite": str(path), "input_shape": [1, c, h, w], "channels_last_io": channels_last,
               "max_abs_diff": diff, "parity_ok": diff <= PARITY_TOL, "tflite_bytes": len(tflite),
               "skipped_blocks": [p for p, v in arch.values.items() if arch.spec.inactive(v)]}
    for k, v in tflite_quality(loaded, task, (h, w), seed).items():
        summary[f"{k}_fp32"] = v
    lat = measure_interleaved({"fp32": backend.tflite_runner(path, x, channels_last)},
                              **(measure_cfg or {}))
    summary.update(fp32_ms=lat["fp32"]["ms"], eval_set=task.headline_set, eval_tile=[h, w],
                   latency_backend=backend.metadata(), measure=measure_cfg)
    return summary
