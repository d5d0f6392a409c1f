"""fp32 ONNX export with runtime parity, and quality of an ONNX file on a task's test images.

:func:`export_model`: BatchNorm folded (``model.fuse()`` where the family has it), inactive blocks
are identities and leave no node; ONNX via ``ernas.latency.onnx_export.export_onnx``,
``onnx.checker``, then onnxruntime vs PyTorch on a real test input of the task:
``max_abs_diff = max |y_ort − y_torch|``.

:func:`onnx_quality`: a graph of fixed input size h x w judges whole test images the way it
would be deployed: each image is reflect-padded to a multiple of (h, w), cut into h x w tiles,
every tile run through onnxruntime, the outputs stitched and cropped back, then scored with the
task's evaluator. fp32, int8 and QAT files are judged on the same tiles.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ernas.data.tiles import stitched
from ernas.errors import ErnasError
from ernas.latency.onnx_export import export_onnx
from ernas.task import fit_crop


def graph_stats(path) -> dict:
    """Node count and count per op type of an ONNX file."""
    import onnx

    g = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"nodes": len(g.node), "op_types": dict(sorted(ops.items())),
            "names": [n.name for n in g.node]}


def session(path, backend=None):
    """An onnxruntime session with the latency backend's session options (threads, spinning,
    optimisation level); a default onnxruntime backend when ``backend`` is None or is not an
    onnxruntime backend (e.g. a command backend for a remote device)."""
    from ernas.latency.backends import OnnxRuntimeBackend

    if not isinstance(backend, OnnxRuntimeBackend):
        backend = OnnxRuntimeBackend()
    return backend.session(path)


def real_input(task, hw, seed: int = 0) -> torch.Tensor:
    """A real network input of size hw (1 x C x h x w): the first test item, centre-cropped."""
    ds = task.eval_sets(seed)[task.headline_set]
    return fit_crop(ds[0]["input"], hw)[None].float()


def deployable(arch, model: nn.Module, input_shape) -> tuple[nn.Module, list[int]]:
    """A float32 eval copy of ``model`` on the CPU with BatchNorm folded (``fuse`` where the
    family has it) and ``input_shape`` as ints, refused when its channels do not fit ``arch``."""
    n, c, h, w = (int(s) for s in input_shape)
    cin = arch.spec.io_channels(arch.geometry)[0]
    if c != cin:
        raise ErnasError(f"input_shape {[n, c, h, w]} has {c} channels but architecture "
                         f"{arch.name!r} takes {cin}; set input_shape=[1,{cin},{h},{w}].")
    model = copy.deepcopy(model).cpu().eval().float()
    if hasattr(model, "fuse"):
        model.fuse()
    return model, [n, c, h, w]


def export_model(arch, model: nn.Module, task, out_dir, opset: int = 17,
                 dynamic_hw: bool = False, input_shape=(1, 3, 256, 256), backend=None) -> dict:
    """Export ``model`` (of ``arch``) to ``out_dir/model.onnx``; check it and measure parity on a
    real input. Returns the summary part (``max_abs_diff``, node counts, ...)."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, (n, c, h, w) = deployable(arch, model, input_shape)
    x = real_input(task, (h, w)).repeat(n, 1, 1, 1)
    path = export_onnx(model, x, out / "model.onnx", opset=opset, dynamic_hw=dynamic_hw)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"exported ONNX failed onnx.checker: {e}") from None
    stats = graph_stats(path)
    inactive = [p for p, v in arch.values.items() if arch.spec.inactive(v)]
    inactive_nodes = sum(any(f"/{p}/" in name for p in inactive) for name in stats.pop("names"))
    sess = session(path, backend)
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max())
    summary = {"onnx": str(path), "opset": opset, "dynamic_hw": dynamic_hw,
               "input_shape": [n, c, h, w], "max_abs_diff": diff, "parity_ok": diff <= 1e-4,
               "onnx_bytes": path.stat().st_size, **stats,
               "batchnorm_nodes": stats["op_types"].get("BatchNormalization", 0),
               "skipped_blocks": inactive, "skipped_block_nodes": inactive_nodes}
    if dynamic_hw:
        x2 = real_input(task, (h + 32, w + 64))
        with torch.no_grad():
            ref2 = model(x2).numpy()
        summary["max_abs_diff_other_size"] = float(
            np.abs(sess.run(None, {"input": x2.numpy()})[0] - ref2).max())
        summary["other_size"] = list(x2.shape)
    return summary


def static_hw(path, default=(256, 256)) -> tuple[int, int]:
    """(h, w) of a graph's input, or ``default`` when they are symbolic."""
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    return tuple(hw) if all(hw) else tuple(default)


def run_tiled(sess, x: torch.Tensor, hw) -> torch.Tensor:
    """Output of ``sess`` on a whole 1 x C x H x W input through h x w tiles (see the module
    docstring and ``ernas.data.tiles.stitched``)."""
    return stitched(lambda tile: torch.from_numpy(sess.run(None, {"input": tile.numpy()})[0]),
                    x, hw)


def onnx_quality(path, task, hw, seed: int = 0, backend=None) -> dict[str, float]:
    """The task's metrics of an ONNX file on its headline evaluation set, whole images through
    ``hw`` tiles (see the module docstring)."""
    return tiled_quality(session(path, backend), task, hw, seed)


def tiled_quality(sess, task, hw, seed: int = 0) -> dict[str, float]:
    """The task's metrics of ``sess`` (anything with ``run(None, {name: array})``, as
    ``run_tiled`` uses it) on the task's headline evaluation set, whole images through ``hw``
    tiles."""
    ds = task.eval_sets(seed)[task.headline_set]
    ev = task.evaluator()
    for i in range(len(ds)):
        item = ds[i]
        ev.update(run_tiled(sess, item["input"][None].float(), hw), item["target"][None],
                  item["name"])
    return {k: v for k, v in ev.compute().items() if not isinstance(v, (list, tuple))}
