"""int8 post-training static quantisation of an ONNX file (onnxruntime ``quantize_static``).

QDQ format, symmetric int8 weights (per output channel by default), asymmetric uint8
activations, calibrated on real inputs of the task (``Task.calibration_inputs``: random crops of
the training split) with MinMax, Entropy or Percentile ranges. The model is pre-processed
(``quant_pre_process``: shape inference and graph optimisation) first.
"""
from __future__ import annotations

from pathlib import Path

from ernas.errors import ErnasError
from ernas.export.onnx import graph_stats, static_hw

METHODS = ("MinMax", "Entropy", "Percentile")


def calibration_reader(inputs: list):
    """An onnxruntime ``CalibrationDataReader`` over 1 x C x h x w float32 arrays."""
    from onnxruntime.quantization import CalibrationDataReader

    if not inputs:
        raise ErnasError("quantize_int8: no calibration inputs given.")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(inputs)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"input": x}

        def rewind(self):
            self._it = iter(inputs)

    return Reader()


def quantize_int8(onnx_path, task, out_path, n_calibration: int = 16, seed: int = 0,
                  per_channel: bool = True, calibrate_method: str = "MinMax",
                  op_types: list[str] | None = None) -> dict:
    """Write the int8 QDQ model of ``onnx_path`` to ``out_path``; return its summary part.
    ``op_types``: quantise only these ONNX op types (None: onnxruntime's default set)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibrate_method not in METHODS:
        raise ErnasError(f"calibration.method={calibrate_method!r} is not known; use one of "
                         f"{', '.join(METHODS)}.")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    hw = static_hw(onnx_path)
    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    try:
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        src = onnx_path
    reader = calibration_reader(task.calibration_inputs(hw, n_calibration, seed))
    quantize_static(str(src), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, calibrate_method),
                    op_types_to_quantize=op_types)
    pre.unlink(missing_ok=True)
    for extra in out_path.parent.glob("augmented_model*.onnx"):
        extra.unlink(missing_ok=True)
    stats = graph_stats(out_path)
    return {"int8_onnx": str(out_path), "calibration_inputs": n_calibration,
            "calibrate_method": calibrate_method, "per_channel": per_channel,
            "quantized_op_types": op_types or "onnxruntime default",
            "quantize_linear_nodes": stats["op_types"].get("QuantizeLinear", 0),
            "int8_nodes": stats["nodes"]}
