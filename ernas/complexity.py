"""Model size: parameters and multiply-accumulates (MACs), one convention for every family.

MACs: multiply-accumulates of ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` (bias adds
not counted), plus whatever a module reports through an ``extra_macs(inputs, output) -> int``
method. Normalisation, pooling, additions and activations count 0: their cost is left to the
latency table, which is the point of hardware-aware search.
"""
from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen; buffers such as BN statistics excluded).
    A parameter shared between modules is counted once."""
    return sum(p.numel() for p in model.parameters())


def _builtin_macs(module: nn.Module, inputs: tuple, output) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 256, 256)) -> int:
    """Multiply-accumulates of one forward pass on a zeros input of ``input_shape``.

    Counted with forward hooks on a real pass (``torch.no_grad``, model temporarily in eval
    mode, so BatchNorm statistics are untouched):

    - ``nn.Conv2d``: ``N·Cout·Hout·Wout · (Cin/groups)·kh·kw`` (depthwise and 1x1 by the same rule);
    - ``nn.ConvTranspose2d``: ``N·Cin·Hin·Win · (Cout/groups)·kh·kw``;
    - ``nn.Linear``: ``(output elements) · in_features``;
    - any module with a method ``extra_macs(self, inputs: tuple, output) -> int``: its result
      (e.g. SimpleGate's one multiply per output element, channel attention's rescale product);
      its own convs are still counted by the conv rule.

    The built-in rules apply to leaf modules only, so nothing is counted twice; a module called
    several times is counted every time. Bias adds, normalisation (LayerNorm, BatchNorm),
    pooling, additions and activations count 0 MACs: their cost is left to the latency table.
    """
    counts = []

    def hook(module, inputs, output):
        n = 0
        if not any(True for _ in module.children()):
            n += _builtin_macs(module, inputs, output)
        extra = getattr(module, "extra_macs", None)
        if callable(extra):
            n += int(extra(inputs, output))
        counts.append(n)

    param = next(model.parameters(), None)
    x = torch.zeros(tuple(input_shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(sum(counts))


def model_size_report(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 256, 256)) -> dict:
    """``{"params": int, "macs": int, "gmacs": float}`` (MACs as in :func:`count_macs`)."""
    macs = count_macs(model, input_shape)
    return {"params": count_params(model), "macs": macs, "gmacs": macs / 1e9}
