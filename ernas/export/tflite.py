"""LiteRT export (``ernas-export format=tflite``): an fp32 ``model.tflite`` for LiteRT's XNNPACK
CPU path and, with ``int8=true``, an int8 ``model_int8.tflite``, each judged and timed like the
ONNX files.

BatchNorm folded (``model.fuse()``), converted with ``litert_torch.convert`` at the input shape
with NHWC input and output (``ernas.latency.litert.to_tflite``: the layout LiteRT's kernels and
Android camera pipelines use); parity ``max_abs_diff = max |y_litert − y_torch|`` on a real test
input, compared in NCHW (``parity_ok``: ≤ 1e-4, the ONNX path's bound). int8: PT2E static
quantisation with litert-torch's quantizer, calibrated on ``calibration.inputs`` task inputs
(``Task.calibration_inputs``), int8 tensors at the file's boundary. Each file is scored with the
task's metrics on whole test images through input-size tiles (``ernas.export.onnx.run_tiled``);
the files are timed interleaved on the LiteRT backend, int8 against fp32 as a paired per-round
ratio.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ernas.export.judge import judge_files
from ernas.export.onnx import deployable, real_input, tiled_quality
from ernas.io import atomic_write_bytes
from ernas.latency.litert import LitertBackend, TfliteModel, to_tflite

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
                      seed: int = 0, int8: bool = False,
                      calibration: dict | None = None) -> dict:
    """Export ``model.tflite`` (and ``model_int8.tflite`` with ``int8``) of ``model`` into
    ``out_dir``, check the fp32 parity, score the files on the task's test images and time
    them interleaved on ``backend``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, (n, c, h, w) = deployable(arch, model, input_shape)
    x = real_input(task, (h, w))
    tflite, channels_last = to_tflite(model, x)
    files = {"fp32": _write(out / "model.tflite", tflite)}
    loaded = TfliteModel(files["fp32"], backend.threads, channels_last)
    with torch.no_grad():
        diff = float((loaded(x) - model(x)).abs().max())
    summary = {"arch": arch.name, "task": task.name, "metric": task.metric, "format": "tflite",
               "tflite": str(files["fp32"]), "input_shape": [1, c, h, w],
               "channels_last_io": channels_last, "max_abs_diff": diff,
               "parity_ok": diff <= PARITY_TOL, "tflite_bytes": len(tflite),
               "skipped_blocks": [p for p, v in arch.values.items() if arch.spec.inactive(v)]}
    if int8:
        k = int((calibration or {}).get("inputs", 16))
        q, _ = to_tflite(model, x, task.calibration_inputs((h, w), k, seed))
        files["int8"] = _write(out / "model_int8.tflite", q)
        summary.update(int8_tflite=str(files["int8"]), int8_tflite_bytes=len(q),
                       calibration_inputs=k, quantizer="litert-torch PT2EQuantizer symmetric, "
                                                       "per-channel weights (PT2E)")
    def quality(kind, path):
        model_k = loaded if kind == "fp32" else TfliteModel(path, backend.threads, channels_last)
        return tflite_quality(model_k, task, (h, w), seed)

    summary.update(judge_files(files, quality,
                               {k: backend.tflite_runner(p, x, channels_last)
                                for k, p in files.items()}, task.metric, measure_cfg))
    summary.update(eval_set=task.headline_set, eval_tile=[h, w],
                   latency_backend=backend.metadata(), measure=measure_cfg)
    return summary


def _write(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    return path
