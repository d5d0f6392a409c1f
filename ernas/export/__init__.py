"""Deployment: fp32 ONNX with parity (``onnx``), int8 post-training quantisation (``ptq``) and
quantisation-aware fine-tuning exported as QDQ ONNX (``qat``), judged side by side.

:func:`export_all` writes ``model.onnx`` (fp32), ``model_int8.onnx`` (PTQ) and, with QAT steps,
``model_qat.onnx`` (the fine-tuned model's own QDQ graph, its learned ranges included), then
reports for each file the task's metrics on whole test images (``onnx.onnx_quality``) and its
latency, all files timed interleaved in shuffled rounds on the onnxruntime backend; a speed-up
over fp32 is the paired ratio of the rounds (``ernas.latency.measure.paired_ratio``).

:func:`export_executorch_all` (``ernas.export.executorch``, ``format=executorch``) does the same
for ExecuTorch ``.pte`` files (fp32, and int8 through PT2E with the XNNPACK quantizer), timed on
the ExecuTorch backend; it needs the optional extra ``pip install "ernas[executorch]"``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ernas.export.executorch import export_executorch_all
from ernas.export.judge import judge_files
from ernas.export.onnx import export_model, onnx_quality, static_hw
from ernas.export.ptq import quantize_int8
from ernas.export.qat import qat_finetune
from ernas.latency.onnx_export import export_onnx
from ernas.memory import file_memories

__all__ = ["export_all", "export_executorch_all", "export_model", "onnx_quality", "qat_finetune",
           "quantize_int8"]


def export_all(arch, model, task, out_dir, backend, measure_cfg: dict | None = None,
               opset: int = 17, dynamic_hw: bool = False, input_shape=(1, 3, 256, 256),
               int8: bool = True, calibration: dict | None = None, qat: dict | None = None,
               seed: int = 0, progress: bool = False, memory_runs: int = 3) -> dict:
    """Export, quantise and judge (see the module docstring) with the session options and the
    interleaved measurement protocol of the latency ``backend``; returns the summary. Each
    file's peak memory (``peak_mem_mib_<kind>``, ``ernas.memory.file_memories``): median of
    ``memory_runs`` fresh processes (0: not measured)."""
    out = Path(out_dir)
    summary = {"arch": arch.name, "task": task.name, "metric": task.metric,
               **export_model(arch, model, task, out, opset, dynamic_hw, input_shape, backend)}
    files = {"fp32": summary["onnx"]}
    if int8:
        c = calibration or {}
        summary.update(quantize_int8(summary["onnx"], task, out / "model_int8.onnx",
                                     c.get("inputs", 16), seed, c.get("per_channel", True),
                                     c.get("method", "MinMax"), c.get("op_types")))
        files["int8"] = summary["int8_onnx"]
    if qat and qat.get("steps", 0) > 0:
        qmodel = qat_finetune(model, task, qat["steps"], qat.get("batch_size", 8),
                              qat.get("crop", 64), qat.get("lr", 1e-4), seed,
                              qat.get("calibration_batches", 4), progress)
        path = export_onnx(qmodel, torch.zeros(1, *input_shape[1:]), out / "model_qat.onnx",
                           opset=opset)
        summary.update(qat_steps=qat["steps"], qat_onnx=str(path))
        files["qat"] = str(path)
    hw = static_hw(files["fp32"], tuple(input_shape[2:]))
    shape = [1, *input_shape[1:]]
    summary.update(judge_files(
        files, lambda _kind, path: onnx_quality(path, task, hw, seed, backend),
        {k: backend.onnx_runner(p, shape) for k, p in files.items()}, task.metric, measure_cfg))
    summary.update(file_memories(files, backend, shape, memory_runs))
    summary.update(eval_set=task.headline_set, eval_tile=list(hw),
                   latency_backend=backend.metadata(), measure=measure_cfg)
    return summary
