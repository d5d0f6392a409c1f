"""PT2E int8 quantisation for the XNNPACK delegate, shared by the ExecuTorch latency backend
(``dtype: int8`` tables) and ``ernas-export format=executorch`` (``model_int8.pte``).

The quantizer is ExecuTorch's ``XNNPACKQuantizer`` with
``get_symmetric_quantization_config(is_per_channel=True)``: symmetric int8 weights per output
channel, asymmetric int8 activations per tensor (scale s and zero point z from the observed
range, q = clamp(round(x/s) + z, −128, 127)). ``prepare_pt2e`` inserts the observers into
``torch.export.export(model).module()``, the calibration inputs run through it, and
``convert_pt2e`` replaces them with quantize/dequantize pairs that XNNPACK fuses into int8
kernels when the graph is lowered.

ExecuTorch is an optional extra; this module imports it only inside functions.
"""
from __future__ import annotations

import torch

from ernas.errors import ErnasError

__all__ = ["quantize_pt2e", "timing_calibration", "xnnpack_quantizer"]


def xnnpack_quantizer(is_qat: bool = False):
    """The XNNPACK quantizer of the module docstring (``is_qat``: fake-quantised training)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
        is_per_channel=True, is_qat=is_qat))


def quantize_pt2e(model: torch.nn.Module, x: torch.Tensor, calibration: list) -> torch.nn.Module:
    """The converted PT2E int8 model of ``model`` at ``x``'s shape, calibrated on
    ``calibration`` (arrays or tensors of that shape)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise ErnasError("calibration.inputs must be >= 1 for an int8 model (format=executorch "
                         "or an int8 latency table).")
    graph = torch.export.export(model, (x,)).module()
    prepared = prepare_pt2e(graph, xnnpack_quantizer())
    with torch.no_grad():
        for c in calibration:
            prepared(c if isinstance(c, torch.Tensor) else torch.from_numpy(c))
    return convert_pt2e(prepared)


def timing_calibration(x: torch.Tensor, n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """``n`` standard-normal inputs of ``x``'s shape (seeded): a latency table times the int8
    kernels, whose cost does not depend on the observed ranges, so no task data is needed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g, dtype=torch.float32) for _ in range(n)]
