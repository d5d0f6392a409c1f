"""ExecuTorch export (``ernas-export format=executorch``): fp32 and int8 ``.pte`` files for the
XNNPACK delegate, judged and timed like the ONNX files.

- fp32 ``model.pte``: BatchNorm folded (``model.fuse()``), ``torch.export`` at the input shape,
  lowered with the XnnpackPartitioner (``ernas.latency.executorch.lower``); parity
  ``max_abs_diff = max |y_executorch − y_torch|`` on a real test input (``parity_ok``: ≤ 1e-4,
  the ONNX path's bound).
- int8 ``model_int8.pte``: PT2E static quantisation with the XNNPACK quantizer
  (``ernas.latency.pt2e.quantize_pt2e``), calibrated on the task's calibration inputs (random
  crops of its training split, as the ONNX int8 path), exported again and lowered; XNNPACK runs
  the quantised ops.
- QAT ``model_qat.pte`` (``qat.steps`` > 0): PT2E quantisation-aware training, the same
  quantizer with ``is_qat=True`` on the model exported with free batch and spatial sizes
  (``Dim.AUTO``), its observers run on ``qat.calibration_batches`` training batches, then
  fine-tuned ``qat.steps`` steps on the task's loss (``ernas.export.qat.finetune``: fake
  quantisation forward, straight-through gradients), converted, exported at the input shape and
  lowered like the int8 file.

Each file is scored with the task's metrics on whole test images through input-size tiles
(``ernas.export.onnx.run_tiled``) and timed interleaved with the ExecuTorch backend; the int8
speed-up is the paired per-round ratio (``ernas.latency.measure.paired_ratio``). Delegation (what
XNNPACK took and what fell back to portable kernels) is reported per file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ernas.export.judge import judge_files
from ernas.export.onnx import deployable, real_input, tiled_quality
from ernas.io import atomic_write_bytes
from ernas.latency.executorch import ExecutorchBackend, PteMethod, delegation, lower
from ernas.latency.pt2e import quantize_pt2e, xnnpack_quantizer
from ernas.memory import file_memories

__all__ = ["export_executorch_all", "pte_quality", "qat_pt2e"]

log = logging.getLogger(__name__)
PARITY_TOL = 1e-4


def _write_pte(edge, path: Path) -> dict:
    info = delegation(edge)  # before to_executorch, whose memory planning adds alloc nodes
    buf = edge.to_executorch().buffer
    atomic_write_bytes(path, buf)
    return {"bytes": len(buf), "delegation": info}


def qat_pt2e(model: torch.nn.Module, task, qat: dict, seed: int = 0,
             progress: bool = False) -> torch.nn.Module:
    """The PT2E quantisation-aware-trained int8 model of ``model`` (module docstring); ``qat``:
    steps, batch_size, crop, lr, calibration_batches."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    from ernas.export.qat import CALIBRATION_STEP, finetune, training_batches

    batch = training_batches(task, int(qat.get("batch_size", 8)), int(qat.get("crop", 64)), seed)
    auto = torch.export.Dim.AUTO
    graph = torch.export.export(model, (batch(CALIBRATION_STEP)[0],),
                                dynamic_shapes=({0: auto, 2: auto, 3: auto},)).module()
    prepared = prepare_qat_pt2e(graph, xnnpack_quantizer(is_qat=True))
    move_exported_model_to_train(prepared)
    with torch.no_grad():
        for i in range(int(qat.get("calibration_batches", 4))):
            prepared(batch(CALIBRATION_STEP + i)[0])
    finetune(prepared, task, batch, int(qat["steps"]), float(qat.get("lr", 1e-4)), progress)
    move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared)


def pte_quality(path, task, hw, seed: int = 0) -> dict[str, float]:
    """The task's metrics of a ``.pte`` on its headline evaluation set, whole images through
    ``hw`` tiles (as ``ernas.export.onnx.onnx_quality``)."""
    return tiled_quality(PteMethod(path), task, hw, seed)


def _export_fp32(arch, model, task, out: Path, shape) -> tuple[dict, torch.Tensor]:
    n, c, h, w = shape
    x = real_input(task, (h, w))
    with torch.no_grad():
        edge = lower(torch.export.export(model, (x,)))
        ref = model(x)
    path = out / "model.pte"
    info = _write_pte(edge, path)
    diff = float((PteMethod(path)(x) - ref).abs().max())
    inactive = [p for p, v in arch.values.items() if arch.spec.inactive(v)]
    return {"pte": str(path), "format": "executorch", "input_shape": [1, c, h, w],
            "max_abs_diff": diff, "parity_ok": diff <= PARITY_TOL, "pte_bytes": info["bytes"],
            "delegation_fp32": info["delegation"], "skipped_blocks": inactive}, x


def _export_quantized(qmodel, out: Path, x, kind: str) -> dict:
    """Lower the converted PT2E model ``qmodel`` at ``x``'s shape to ``model_<kind>.pte``."""
    with torch.no_grad():
        edge = lower(torch.export.export(qmodel, (x,)))
    path = out / f"model_{kind}.pte"
    info = _write_pte(edge, path)
    return {f"{kind}_pte": str(path), f"{kind}_pte_bytes": info["bytes"],
            f"delegation_{kind}": info["delegation"]}


def export_executorch_all(arch, model, task, out_dir, backend: ExecutorchBackend,
                          measure_cfg: dict | None = None, input_shape=(1, 3, 256, 256),
                          int8: bool = True, calibration: dict | None = None,
                          seed: int = 0, memory_runs: int = 3, qat: dict | None = None,
                          progress: bool = False) -> dict:
    """Export fp32, int8 (``int8``) and QAT (``qat['steps']`` > 0) ``.pte`` files of ``model``
    into ``out_dir``, score them on the task's test images, time them interleaved on ``backend``
    and measure their peak memory (``ernas.memory.file_memories``, ``memory_runs`` fresh
    processes); returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, shape = deployable(arch, model, input_shape)
    summary = {"arch": arch.name, "task": task.name, "metric": task.metric}
    fp32, x = _export_fp32(arch, model, task, out, shape)
    summary.update(fp32)
    files = {"fp32": summary["pte"]}
    hw = tuple(shape[2:])
    if int8:
        n = int((calibration or {}).get("inputs", 16))
        summary.update(_export_quantized(quantize_pt2e(
            model, x, task.calibration_inputs(hw, n, seed)), out, x, "int8"),
            calibration_inputs=n, quantizer="XNNPACKQuantizer symmetric, per-channel weights "
                                            "(PT2E)")
    if qat and qat.get("steps", 0) > 0:
        summary.update(_export_quantized(qat_pt2e(model, task, qat, seed, progress), out, x,
                                         "qat"), qat=dict(qat))
    files.update({k: summary[f"{k}_pte"] for k in ("int8", "qat") if f"{k}_pte" in summary})
    summary.update(judge_files(files, lambda _kind, path: pte_quality(path, task, hw, seed),
                               {k: backend.pte_runner(p, x) for k, p in files.items()},
                               task.metric, measure_cfg))
    summary.update(eval_set=task.headline_set, eval_tile=list(hw),
                   latency_backend=backend.metadata(), measure=measure_cfg)
    summary.update(file_memories(files, backend, [1, *shape[1:]], memory_runs))
    return summary
