"""int8 post-training static quantisation of an ONNX file (onnxruntime ``quantize_static``).

QDQ format, symmetric int8 weights (per output channel by default; 7-bit with ``reduce_range``,
see below), asymmetric uint8 activations, calibrated on real inputs of the task
(``Task.calibration_inputs``: random crops of the training split) with MinMax, Entropy or
Percentile ranges. The model is pre-processed (``quant_pre_process``: shape inference and graph
optimisation) first.

What is quantised is what runs faster quantised on the backend (``benchmarks/int8_op_types.py``
measures it; experiments/export.yaml's ``calibration`` holds the decision):

- ``op_types``: only nodes of these ONNX op types (LayerNorm arithmetic, ReduceMean/Sub/Pow/Sqrt/
  Div/Mul/Add, is not among the default's, so it stays float);
- ``conv_rule`` ``{min_depth: K0, min_out: N0}``: a Conv is quantised only when its GEMM is big
  enough, K = C_in/groups·k_h·k_w ≥ K0 and C_out ≥ N0 (:func:`int8_conv`); the others (depthwise
  convs, the 3-channel stem and head, narrow pointwise convs: slower in int8 here) stay float;
- ``reduce_range`` (default on): 7-bit weights, which onnxruntime's U8S8 kernels on x86 CPUs
  without VNNI need to avoid int16 saturation (``ernas.export.qat``).

QAT (``ernas.export.qat``) fake-quantises exactly this coverage, with the same grids.
"""
from __future__ import annotations

from pathlib import Path

from ernas.errors import ErnasError
from ernas.export.onnx import graph_stats, static_hw

METHODS = ("MinMax", "Entropy", "Percentile")
CONV_RULE = {"min_depth": 64, "min_out": 16}


def int8_conv(out_channels: int, depth: int, rule: dict | None = CONV_RULE) -> bool:
    """Whether a conv of C_out = ``out_channels`` and GEMM depth K = ``depth`` (C_in/groups·k_h·
    k_w) is quantised under ``rule`` (None: every conv)."""
    if rule is None:
        return True
    unknown = sorted(set(rule) - set(CONV_RULE))
    if unknown:
        raise ErnasError(f"calibration.conv_rule: unknown field(s) {unknown}; its fields are "
                         f"min_depth and min_out (or conv_rule: null to quantise every conv).")
    return depth >= rule.get("min_depth", 0) and out_channels >= rule.get("min_out", 0)


def float_convs(path, rule: dict | None) -> list[str]:
    """Names of the Conv nodes of an ONNX graph that ``rule`` keeps float (weights read from the
    initialisers; a conv whose weight is not an initialiser is quantised)."""
    import onnx

    g = onnx.load(str(path)).graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    out = []
    for n in g.node:
        w = shapes.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if n.name and w and len(w) == 4 and not int8_conv(w[0], w[1] * w[2] * w[3], rule):
            out.append(n.name)
    return out


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
                  op_types: list[str] | None = None, reduce_range: bool = True,
                  conv_rule: dict | None = CONV_RULE) -> dict:
    """Write the int8 QDQ model of ``onnx_path`` to ``out_path``; return its summary part.
    ``op_types``: quantise only these ONNX op types (None: every type onnxruntime can);
    ``conv_rule``: which convs (module docstring; None: every one)."""
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
    kept_float = float_convs(src, conv_rule)
    quantize_static(str(src), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, calibrate_method),
                    op_types_to_quantize=op_types, reduce_range=reduce_range,
                    nodes_to_exclude=kept_float)
    pre.unlink(missing_ok=True)
    for extra in out_path.parent.glob("augmented_model*.onnx"):
        extra.unlink(missing_ok=True)
    stats = graph_stats(out_path)
    return {"int8_onnx": str(out_path), "calibration_inputs": n_calibration,
            "calibrate_method": calibrate_method, "per_channel": per_channel,
            "reduce_range": reduce_range, "conv_rule": conv_rule,
            "float_convs": len(kept_float),
            "quantized_op_types": op_types or "onnxruntime default",
            "quantize_linear_nodes": stats["op_types"].get("QuantizeLinear", 0),
            "int8_nodes": stats["nodes"]}
