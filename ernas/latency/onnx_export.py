"""One ONNX export function for the whole project (profiling, command backends, model export).

Exporter choice (torch 2.13): the TorchScript exporter (``dynamo=False``) still ships, honours the
requested opset exactly (17) and exports a small conv/LayerNorm module in ~20 ms. The torch.export
("dynamo") exporter is the default since torch 2.9, but it only implements opset >= 18 and
down-converts afterwards, which fails for some graphs (e.g. ReduceMean in channel attention stays at
opset 18) and costs ~0.6 s per small module. So ``exporter="auto"`` uses TorchScript and falls back
to dynamo (at opset ``max(opset, 18)``) only where TorchScript is missing or fails.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["EXPORTERS", "export_onnx"]

EXPORTERS = ("auto", "torchscript", "dynamo")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' deprecation warnings and console chatter (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_torchscript(module, example_input, path, opset, dynamic_hw):
    axes = {2: "height", 3: "width"}
    torch.onnx.export(
        module, (example_input,), str(path), dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["output"], do_constant_folding=True,
        dynamic_axes={"input": axes, "output": axes} if dynamic_hw else None,
    )


def _export_dynamo(module, example_input, path, opset, dynamic_hw):
    dyn = None
    if dynamic_hw:
        dim = torch.export.Dim.AUTO
        dyn = ({2: dim, 3: dim},)
    torch.onnx.export(
        module, (example_input,), str(path), dynamo=True, opset_version=max(opset, 18),
        input_names=["input"], output_names=["output"], dynamic_shapes=dyn,
        external_data=False, optimize=True,
    )


def export_onnx(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike,
                opset: int = 17, dynamic_hw: bool = False, exporter: str = "auto") -> Path:
    """Export ``module`` (switched to eval mode) for one input tensor to ``path``.

    The graph input is named ``input`` and the (first) output ``output``; with ``dynamic_hw`` the
    height and width axes (2, 3) are symbolic. ``exporter`` is ``auto`` | ``torchscript`` |
    ``dynamo`` (see the module docstring). Returns ``path``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    order = {"auto": [_export_torchscript, _export_dynamo], "torchscript": [_export_torchscript],
             "dynamo": [_export_dynamo]}[exporter]
    errors = []
    for fn in order:
        try:
            with torch.no_grad(), _quiet():
                fn(module, example_input, path, opset, dynamic_hw)
            return path
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all at the end
            errors.append(f"{fn.__name__[8:]}: {type(e).__name__}: {e}")
    raise RuntimeError(f"ONNX export of {type(module).__name__} for input shape "
                       f"{tuple(example_input.shape)} failed; " + " | ".join(errors)) from None
