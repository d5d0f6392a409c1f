"""Batches as pure functions of (seed, step), so a killed run resumed later sees the same data.

Every dataset item is ``{"input", "target", "name"}`` (see ``ernas.task``); a batch stacks the
inputs and the targets.
"""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch

from ernas.errors import ErnasError

Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def step_batches(dataset, batch_size: int, seed: int) -> Batch:
    """``batch(step) -> (inputs, targets)``, a pure function of (seed, step).

    Python ``random``, numpy and torch are seeded from (seed, step) inside saved-and-restored RNG
    state, indices are drawn uniformly with replacement and ``dataset[i]["input"/"target"]`` are
    stacked. Keyed ernas datasets (``set_epoch``/draw counter) are re-keyed with epoch = step and
    a zero draw count for the call and restored afterwards, so their crops and noise depend on
    (step, index) only."""
    if batch_size < 1:
        raise ErnasError(f"batch_size={batch_size!r} must be a positive integer.")
    n = len(dataset)

    def batch(step: int):
        key = int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        epoch, draw = getattr(dataset, "epoch", None), getattr(dataset, "_draw", None)
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(key)
                np.random.seed(key)
                torch.manual_seed(key)
                idx = torch.randint(n, (batch_size,)).tolist()
                if epoch is not None and hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(step)
                if draw is not None:
                    dataset._draw = 0
                items = [dataset[i] for i in idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if epoch is not None and hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            if draw is not None:
                dataset._draw = draw
        return (torch.stack([it["input"] for it in items]),
                torch.stack([it["target"] for it in items]))

    return batch


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = the whole batch of that step, ``step_batches(dataset, batch_size, key)``
    (a pure function of key and step), so a DataLoader over steps may use worker processes and
    still give the same batches; the dataset is re-keyed by step (``set_epoch``) per call."""

    def __init__(self, dataset, batch_size: int, key: int):
        self.dataset, self.batch_size, self.key = dataset, batch_size, key
        self._fn = None

    def __len__(self):
        return 2 ** 62

    def __getstate__(self):  # the batch function is rebuilt in each worker
        return {**self.__dict__, "_fn": None}

    def __getitem__(self, step):
        if self._fn is None:
            self._fn = step_batches(self.dataset, self.batch_size, self.key)
        return self._fn(int(step))


def data_key(seed: int, rank: int) -> int:
    """Data seed of a rank: ``seed`` on rank 0 (so one process equals rank 0 of a DDP run)."""
    return int(seed) + 1_000_003 * int(rank)
