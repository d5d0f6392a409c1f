"""LiteRT (TensorFlow Lite) with its XNNPACK CPU delegate as a latency backend (``latency=litert``).

Each model (an op key, a network) is converted the way an Android app ships a PyTorch model for
LiteRT: ``litert_torch.convert(module, (x,))`` → a ``.tflite`` flatbuffer (kept in memory),
loaded with ``ai_edge_litert.interpreter.Interpreter(model_content=..., num_threads=threads)``
and timed as ``interpreter.invoke()`` (perf_counter, fixed input already set) under the
interleaved protocol of ``ernas.latency.measure``, like onnxruntime.

Layout: LiteRT kernels are channels-last. A 4-D model is wrapped with
``litert_torch.to_channel_last_io`` so the ``.tflite`` takes and returns NHWC tensors, as a
whole network does inside: without it every key would carry an NCHW↔NHWC transpose at each end
that a network pays only once. :class:`TfliteModel` converts NCHW tensors at its boundary.

Threads: the interpreter's ``num_threads`` (XNNPACK, LiteRT's default CPU path, is applied when
the interpreter is built and uses that many threads). The fingerprint records the runtime
``ai-edge-litert`` and its version, the converter ``litert-torch`` and its version, and threads.

LiteRT is an optional extra (``pip install "ernas[litert]"``); this module imports it only inside
functions, so the rest of ernas runs without it.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.extras import LITERT
from ernas.latency.backends import Backend
from ernas.latency.fingerprint import fingerprint, host_hardware
from ernas.latency.measure import Runner

__all__ = ["LitertBackend", "TfliteModel", "to_tflite"]


def litert_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"ai-edge-litert": version("ai-edge-litert"), "litert-torch": version("litert-torch")}


@contextmanager
def _quiet_converter():
    """litert_torch prints a progress tree per conversion unless this variable says no."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with warnings.catch_warnings():  # pytree deprecation notices from the export it runs
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def to_tflite(module: nn.Module, x: torch.Tensor,
              calibration: list | None = None) -> tuple[bytes, bool]:
    """``(tflite bytes, channels_last)`` of an eval-mode float32 ``module`` at ``x``'s shape;
    ``channels_last``: the model takes and returns NHWC (both 4-D), else PyTorch's layout.

    ``calibration`` (NCHW arrays or tensors of ``x``'s shape): an int8 model instead, by PT2E
    static quantisation with litert-torch's ``PT2EQuantizer`` (symmetric int8 weights per output
    channel, asymmetric int8 activations per tensor, ranges observed on the calibration inputs);
    the file then takes and returns int8 tensors, q = round(x/s) + z (:class:`TfliteModel`
    converts at its boundary)."""
    import litert_torch

    with torch.no_grad():
        y = module(x)
    channels_last = x.dim() == 4 and isinstance(y, torch.Tensor) and y.dim() == 4
    tensors = [x, *(c if isinstance(c, torch.Tensor) else torch.from_numpy(c)
                    for c in calibration or [])]
    with _quiet_converter():
        if channels_last:
            module = litert_torch.to_channel_last_io(module, args=[0], outputs=[0]).eval()
            tensors = [t.permute(0, 2, 3, 1).contiguous() for t in tensors]
        if calibration is None:
            return litert_torch.convert(module, (tensors[0],)).model_content(), channels_last
        return _int8_tflite(module, tensors[0], tensors[1:]), channels_last


class _ExportedGraphFilter(logging.Filter):
    """Drops litert-torch's "converted in training mode" warning for a PT2E-converted module: a
    ``torch.export`` GraphModule keeps ``training=True`` whatever its graph, and this graph was
    captured from the eval-mode module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "converted in training mode" not in record.getMessage()


def _int8_tflite(module: nn.Module, x: torch.Tensor, calibration: list) -> bytes:
    """The int8 ``.tflite`` of ``module`` (its own layout) by PT2E (see :func:`to_tflite`)."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import (PT2EQuantizer,
                                                      get_symmetric_quantization_config)
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise ErnasError("calibration.inputs must be >= 1 for an int8 .tflite.")
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(module, (x,)).module(), quantizer)
    with torch.no_grad():
        for c in calibration:
            prepared(c)
    converted = convert_pt2e(prepared, fold_quantize=False)
    root, flag = logging.getLogger(), _ExportedGraphFilter()
    root.addFilter(flag)
    try:
        return litert_torch.convert(converted, (x,), quant_config=QuantConfig(
            pt2e_quantizer=quantizer)).model_content()
    finally:
        root.removeFilter(flag)


class TfliteModel:
    """A ``.tflite`` (bytes or path) in a LiteRT interpreter with ``threads`` threads, called on
    NCHW tensors (permuted at the boundary when the model is ``channels_last``)."""

    def __init__(self, tflite, threads: int, channels_last: bool):
        from ai_edge_litert.interpreter import Interpreter

        src = {"model_content": bytes(tflite)} if isinstance(tflite, (bytes, bytearray)) \
            else {"model_path": str(tflite)}
        self.interpreter = Interpreter(**src, num_threads=int(threads))
        self.interpreter.allocate_tensors()
        inp, out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.input, self.output = inp["index"], out["index"]
        # an int8 file's boundary: (dtype, scale s, zero point z), x = s·(q − z)
        self.in_q = (inp["dtype"], *inp["quantization"]) if inp["dtype"] != np.float32 else None
        self.out_q = (out["dtype"], *out["quantization"]) if out["dtype"] != np.float32 else None
        self.channels_last = channels_last

    def feed(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        a = x.numpy()
        if self.in_q:
            dtype, s, z = self.in_q
            info = np.iinfo(dtype)
            a = np.clip(np.round(a / s) + z, info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(a))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.feed(x)
        self.interpreter.invoke()
        a = self.interpreter.get_tensor(self.output).copy()
        if self.out_q:
            _, s, z = self.out_q
            a = (a.astype(np.float32) - z) * np.float32(s)
        y = torch.from_numpy(a)
        return y.permute(0, 3, 1, 2).contiguous() if self.channels_last else y


class LitertBackend(Backend):
    """LiteRT + XNNPACK on this host (module docstring): ``threads`` interpreter threads,
    float32 models."""

    name = "litert"

    def __init__(self, threads: int = 2, dtype: str = "float32"):
        LITERT.require("latency backend litert")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ErnasError(f"litert backend threads={threads!r} must be an integer >= 1.")
        if dtype != "float32":
            raise ErnasError(f"litert backend dtype={dtype!r}: only float32 models are converted "
                             f"here. Set `dtype: float32`.")
        self.threads, self.dtype = int(threads), dtype

    def to_tflite(self, module: nn.Module, example_input: torch.Tensor) -> tuple[bytes, bool]:
        """The ``.tflite`` bytes of ``module`` at ``example_input``'s shape (see
        :func:`to_tflite`)."""
        module, x = self._prepare(module, example_input)
        return to_tflite(module, x)

    def tflite_runner(self, tflite, example_input: torch.Tensor, channels_last: bool) -> Runner:
        """A runner for a ``.tflite`` (bytes or path) taking ``example_input``: each call times
        one ``invoke()`` with the input set once."""
        model = TfliteModel(tflite, self.threads, channels_last)
        model(example_input)  # delegate preparation and weight packing are not timed
        model.feed(example_input)
        invoke = model.interpreter.invoke

        def run() -> float:
            t0 = time.perf_counter()
            invoke()
            return (time.perf_counter() - t0) * 1e3

        run.model = model
        return run

    def runner(self, module, example_input):
        tflite, channels_last = self.to_tflite(module, example_input)
        return self.tflite_runner(tflite, example_input, channels_last)

    def fingerprint(self):
        v = litert_versions()
        return fingerprint(host_hardware(), {
            "runtime": "ai-edge-litert", "version": v["ai-edge-litert"],
            "converter": "litert-torch", "converter_version": v["litert-torch"],
            "provider": "xnnpack", "threads": self.threads})

    def metadata(self):
        meta = super().metadata()
        meta["versions"].update(litert_versions())
        meta.update(provider="xnnpack", threads=self.threads)
        return meta
