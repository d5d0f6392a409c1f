"""Keyed randomness for datasets: every random draw depends on (seed, epoch, index, draw) only.

A training sample draws from ``numpy.random.default_rng([seed, epoch, index, draw])`` (``draw``
counts this dataset object's ``__getitem__`` calls, so a second pass gives fresh crops); an
evaluation sample uses no randomness beyond ``(seed, index)``. Two datasets built with the same
seed and read in the same order give identical samples, whatever else the program does with
torch or numpy RNGs. With ``DataLoader(num_workers > 0)`` each worker starts from a copy of the
dataset, so call ``set_epoch(epoch)`` at the start of every epoch (as with
``DistributedSampler``).
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from ernas.errors import ErnasError


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ErnasError(f"seed={seed!r} is not valid: use a non-negative integer such as 0.")
    return int(seed)


def check_crop(crop) -> int | None:
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, np.integer))
                             or crop < 1):
        raise ErnasError(f"crop={crop!r} is not valid: use a positive integer patch size "
                         f"(e.g. 128) or None for whole images.")
    return None if crop is None else int(crop)


def check_length(length, n: int) -> int:
    if length is None:
        return n
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ErnasError(f"length={length!r} is not valid: use a positive number of samples "
                         f"per epoch, or None for one sample per image.")
    return int(length)


class KeyedDataset(Dataset):
    """Shared bookkeeping: length, seed, epoch and the per-sample RNG key (see the module
    docstring). Item ``i`` uses source ``i % n``, so ``length`` may exceed ``n``."""

    def __init__(self, n: int, crop, train: bool, length, seed: int):
        if n == 0:
            raise ErnasError("The dataset got no images. Pass at least one image (check the "
                             "folder or split you loaded).")
        self.crop = check_crop(crop)
        self.train = bool(train)
        self.length = check_length(length, n)
        self.seed = check_seed(seed)
        self.epoch = 0
        self._draw = 0

    def set_epoch(self, epoch: int) -> None:
        """Mix the epoch into training randomness (needed with DataLoader workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _index(self, index: int) -> int:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for dataset of length {self.length}")
        return int(index)

    def _train_rng(self, index: int) -> np.random.Generator:
        self._draw += 1
        return np.random.default_rng([self.seed, self.epoch, index, self._draw])
