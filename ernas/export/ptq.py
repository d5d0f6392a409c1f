"""int8 post-training static quantisation of an exported ONNX file, calibrated on real inputs
of the task (``Task.calibration_inputs``: random crops of the training split). The quantisation
itself, and what it covers, is ``ernas.latency.qdq`` (shared with the onnxruntime backend's int8
latency tables).
"""
from __future__ import annotations

from pathlib import Path

from ernas.export.onnx import graph_stats, static_hw
from ernas.latency.qdq import CONV_RULE, quantize_qdq


def quantize_int8(onnx_path, task, out_path, n_calibration: int = 16, seed: int = 0,
                  per_channel: bool = True, calibrate_method: str = "MinMax",
                  op_types: list[str] | None = None, reduce_range: bool = True,
                  conv_rule: dict | None = CONV_RULE) -> dict:
    """Write the int8 QDQ model of ``onnx_path`` to ``out_path`` (``ernas.latency.qdq``),
    calibrated on ``n_calibration`` task inputs; return its summary part."""
    out_path = Path(out_path)
    inputs = task.calibration_inputs(static_hw(onnx_path), n_calibration, seed)
    q = quantize_qdq(onnx_path, out_path, inputs, per_channel, calibrate_method, op_types,
                     reduce_range, conv_rule)
    stats = graph_stats(out_path)
    return {"int8_onnx": str(out_path), "calibration_inputs": n_calibration,
            "calibrate_method": calibrate_method, "per_channel": per_channel,
            "reduce_range": reduce_range, "conv_rule": conv_rule,
            "float_convs": q["float_convs"],
            "quantized_op_types": op_types or "onnxruntime default",
            "quantize_linear_nodes": stats["op_types"].get("QuantizeLinear", 0),
            "int8_nodes": stats["nodes"]}
