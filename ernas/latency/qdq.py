"""int8 static quantisation of an ONNX file for onnxruntime (``quantize_static``, QDQ format),
shared by ``ernas-export`` (``model_int8.onnx``, calibrated on task images) and the onnxruntime
latency backend (``dtype: int8`` tables, calibrated on seeded normal inputs).

Symmetric int8 weights (per output channel by default; 7-bit with ``reduce_range``), asymmetric
uint8 activations, q = clamp(round(x/s) + z, 0, 255) with s, z from the calibrated range (MinMax,
Entropy or Percentile). The model is pre-processed (``quant_pre_process``: shape inference and
graph optimisation) first.

What is quantised is what runs faster quantised on the backend (``benchmarks/int8_op_types.py``
measures it; experiments/export.yaml's ``calibration`` holds the decision):

- ``op_types``: only nodes of these ONNX op types (the default ``[Conv]``: LayerNorm arithmetic,
  adds, gates and pooling stay float);
- ``conv_rule`` ``{min_depth: K0, min_out: N0}``: a Conv is quantised only when its GEMM is big
  enough, K = C_in/groups·k_h·k_w ≥ K0 and C_out ≥ N0 (:func:`int8_conv`); the others (depthwise
  convs, the 3-channel stem and head, narrow pointwise convs: slower in int8 here) stay float;
- ``reduce_range`` (default on): 7-bit weights, which onnxruntime's U8S8 kernels on x86 CPUs
  without VNNI need to avoid int16 saturation.

QAT (``ernas.export.qat``) fake-quantises exactly this coverage, with the same grids.
"""
from __future__ import annotations

from pathlib import Path

from ernas.errors import ErnasError

__all__ = ["CONV_RULE", "METHODS", "OP_TYPES", "int8_conv", "quantize_qdq"]

METHODS = ("MinMax", "Entropy", "Percentile")
CONV_RULE = {"min_depth": 64, "min_out": 16}
OP_TYPES = ("Conv",)


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


def float_convs(path, rule: dict | None) -> tuple[list[str], int]:
    """Names of the Conv nodes of an ONNX graph that ``rule`` keeps float, and the number of
    Conv nodes (weights read from the initialisers; a conv whose weight is not an initialiser
    is quantised)."""
    import onnx

    g = onnx.load(str(path)).graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    out, convs = [], 0
    for n in g.node:
        convs += n.op_type == "Conv"
        w = shapes.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if n.name and w and len(w) == 4 and not int8_conv(w[0], w[1] * w[2] * w[3], rule):
            out.append(n.name)
    return out, convs


def calibration_reader(inputs: list):
    """An onnxruntime ``CalibrationDataReader`` over 1 x C x h x w float32 arrays."""
    from onnxruntime.quantization import CalibrationDataReader

    if not inputs:
        raise ErnasError("int8 quantisation: no calibration inputs given (calibration.inputs "
                         "must be >= 1).")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(inputs)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"input": x}

        def rewind(self):
            self._it = iter(inputs)

    return Reader()


def quantize_qdq(onnx_path, out_path, inputs: list, per_channel: bool = True,
                 calibrate_method: str = "MinMax", op_types=OP_TYPES,
                 reduce_range: bool = True, conv_rule: dict | None = CONV_RULE) -> dict:
    """Write the int8 QDQ model of ``onnx_path`` (input named ``input``) to ``out_path``,
    calibrated on ``inputs`` (float32 arrays of the input's shape); ``op_types``: quantise only
    these ONNX op types (None: every type onnxruntime can); ``conv_rule``: which convs (module
    docstring; None: every one). Returns ``{"float_convs": kept float, "convs": all}``."""
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibrate_method not in METHODS:
        raise ErnasError(f"calibration.method={calibrate_method!r} is not known; use one of "
                         f"{', '.join(METHODS)}.")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    pre = out_path.with_name(out_path.stem + "_pre.onnx")
    try:
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        src = pre
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
        src = onnx_path
    kept_float, convs = float_convs(src, conv_rule)
    ort.set_default_logger_severity(3)  # calibration sessions: errors only, as ernas's sessions
    quantize_static(str(src), str(out_path), calibration_reader(inputs),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, calibrate_method),
                    op_types_to_quantize=list(op_types) if op_types else None,
                    reduce_range=reduce_range, nodes_to_exclude=kept_float)
    pre.unlink(missing_ok=True)
    for extra in out_path.parent.glob("augmented_model*.onnx"):
        extra.unlink(missing_ok=True)
    return {"float_convs": len(kept_float), "convs": convs}
