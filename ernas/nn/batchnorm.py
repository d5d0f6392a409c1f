"""BatchNorm running statistics in a weight-sharing search: frozen during α steps, recalibrated
before a derived network is judged.

:func:`frozen_bn_stats`: inside the context every BatchNorm layer in training mode normalises with
the statistics of the batch it sees (the way the weights were trained) and updates nothing: no
``running_mean``/``running_var`` update, no ``num_batches_tracked`` increment. The search loop
runs its α steps (on validation batches) this way, so no validation data leaks into the running
statistics and the α gradient describes the same function the weight step trains. (Normalising
with the running statistics instead would judge α on a network in a mode it was never trained
in: a supernet's running statistics are an average over past α mixtures, and lag the current
one.)

:func:`recalibrate_bn`: the running statistics of a network (an extracted sub-network, whose
inherited statistics describe the supernet's mixture, not its own activations) are replaced by
the plain average over ``n`` calibration batches of the per-batch statistics,

    running_mean = (1/n)·Σ_b μ_b,     running_var = (1/n)·Σ_b σ²_b  (unbiased per batch),

computed with every other module in eval mode (PyTorch's cumulative moving average,
``momentum=None``); ``num_batches_tracked`` is n afterwards.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Batch statistics, no running-statistics update, inside the context (module docstring)."""
    bns = batchnorms(model)
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Replace the BatchNorm running statistics of ``model`` by their plain average over the
    batches in ``inputs`` (module docstring); returns the number of batches used (0 and nothing
    run when the model has no BatchNorm). The model's train/eval mode is restored."""
    bns = batchnorms(model)
    if not bns:
        return 0
    was_training, momenta = model.training, [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    try:
        for x in inputs:
            model(x)
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return n
