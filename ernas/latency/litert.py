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


def to_tflite(module: nn.Module, x: torch.Tensor) -> tuple[bytes, bool]:
    """``(tflite bytes, channels_last)`` of an eval-mode float32 ``module`` at ``x``'s shape;
    ``channels_last``: the model takes and returns NHWC (both 4-D), else PyTorch's layout."""
    import litert_torch

    with torch.no_grad():
        y = module(x)
    channels_last = x.dim() == 4 and isinstance(y, torch.Tensor) and y.dim() == 4
    with _quiet_converter():
        if channels_last:
            wrapped = litert_torch.to_channel_last_io(module, args=[0], outputs=[0]).eval()
            edge = litert_torch.convert(wrapped, (x.permute(0, 2, 3, 1).contiguous(),))
        else:
            edge = litert_torch.convert(module, (x,))
        return edge.model_content(), channels_last


class TfliteModel:
    """A ``.tflite`` (bytes or path) in a LiteRT interpreter with ``threads`` threads, called on
    NCHW tensors (permuted at the boundary when the model is ``channels_last``)."""

    def __init__(self, tflite, threads: int, channels_last: bool):
        from ai_edge_litert.interpreter import Interpreter

        src = {"model_content": bytes(tflite)} if isinstance(tflite, (bytes, bytearray)) \
            else {"model_path": str(tflite)}
        self.interpreter = Interpreter(**src, num_threads=int(threads))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.channels_last = channels_last

    def feed(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        self.interpreter.set_tensor(self.input, np.ascontiguousarray(x.numpy()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.feed(x)
        self.interpreter.invoke()
        y = torch.from_numpy(self.interpreter.get_tensor(self.output).copy())
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
