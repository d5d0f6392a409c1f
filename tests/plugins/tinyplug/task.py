"""Task ``tinytask``: denoise seeded synthetic smooth RGB images (no files, no downloads).

Each split holds ``images`` images of ``size`` x ``size``: per channel a sum of three random
plane waves, seeded by (data_seed, split, index), scaled to [0, 1]. Input: clean + N(0, sigma²);
target: clean. Training items (``random=True``) draw their crop and noise from torch's global RNG
(which ``ernas.batches.step_batches`` seeds per step); evaluation noise is seeded by (seed, index).
Loss: MSE. Metrics: ``tiny_psnr`` (headline, dB, output clipped to [0, 1]) and ``mse``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ernas.errors import ErnasError
from ernas.task import Evaluator, Task, fit_crop

SPLITS = ("train", "val", "test")


def clean_image(size: int, data_seed: int, split: str, index: int) -> torch.Tensor:
    rng = np.random.default_rng([data_seed, SPLITS.index(split), index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((3, size, size))
    for c in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(-4, 4, 2)
            img[c] += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (fy * yy + fx * xx)
                                                     + rng.uniform(0, 2 * np.pi))
    img -= img.min(axis=(1, 2), keepdims=True)
    img /= img.max(axis=(1, 2), keepdims=True) + 1e-8
    return torch.from_numpy(img.astype(np.float32))


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, images, crop, sigma: float, random: bool, seed: int):
        self.images, self.crop, self.sigma = images, crop, sigma
        self.random, self.seed = random, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        name, clean = self.images[i]
        c = self.crop
        if self.random and c and c <= min(clean.shape[-2:]):
            top = int(torch.randint(clean.shape[-2] - c + 1, (1,)))
            left = int(torch.randint(clean.shape[-1] - c + 1, (1,)))
            clean = clean[:, top:top + c, left:left + c]
        elif c:
            clean = fit_crop(clean, (c, c))
        if self.random:
            noise = torch.randn(clean.shape)
        else:
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(
                1000 * self.seed + i))
        return {"input": clean + self.sigma * noise, "target": clean.clone(), "name": name}


class TinyEvaluator(Evaluator):
    def __init__(self):
        self._rows: list[dict] = []

    def update(self, pred, target, name=None):
        for i, (p, t) in enumerate(zip(pred, target)):
            mse = float((p.float().clamp(0, 1) - t.float()).pow(2).mean())
            self._rows.append({"name": name if len(pred) == 1 else f"{name}[{i}]", "mse": mse,
                               "tiny_psnr": 10 * float(np.log10(1 / max(mse, 1e-12)))})

    def compute(self):
        if not self._rows:
            raise ErnasError("tinytask evaluator: nothing to evaluate.")
        return {m: float(np.mean([r[m] for r in self._rows])) for m in ("tiny_psnr", "mse")}

    def rows(self):
        return list(self._rows)


@dataclass
class TinyTask(Task):
    name = "tinytask"
    metric = "tiny_psnr"
    metric_label = "PSNR (dB)"
    metrics = ("tiny_psnr", "mse")
    loss_log_scale = None  # MSE is positive

    size: int = 48
    images: int = 4
    sigma: float = 0.1
    data_seed: int = 0

    def __post_init__(self):
        if type(self.size) is not int or self.size < 8:
            raise ErnasError(f"task.size={self.size!r} must be an integer >= 8.")
        if type(self.images) is not int or self.images < 1:
            raise ErnasError(f"task.images={self.images!r} must be a positive integer.")
        if not self.sigma >= 0:
            raise ErnasError(f"task.sigma={self.sigma!r} must be >= 0.")

    def _images(self, split):
        return [(f"{split}{i}", clean_image(self.size, self.data_seed, split, i))
                for i in range(self.images)]

    def dataset(self, split, crop=None, seed=0, random=False):
        if split not in SPLITS:
            raise ErnasError(f"tinytask: split {split!r} is not one of {', '.join(SPLITS)}.")
        return TinyDataset(self._images(split), crop, float(self.sigma), random, seed)

    def loss(self, pred, target):
        return F.mse_loss(pred, target)

    def distill_loss(self, pred, teacher_pred):
        return F.l1_loss(pred.float(), teacher_pred.float())

    def evaluator(self):
        return TinyEvaluator()

    def eval_labels(self):
        return ["test"]

    def eval_sets(self, seed=0):
        return {"test": self.dataset("test", None, seed)}

    def check_arch(self, arch):
        cin, cout = arch.spec.io_channels(arch.geometry)
        if (cin, cout) != (3, 3):
            raise ErnasError(f"architecture {arch.name!r} ({arch.source}) maps {cin} -> {cout} "
                             f"channels; tinytask needs 3 -> 3.")

    def describe(self):
        return (f"{self.images} synthetic {self.size}x{self.size} RGB images per split, "
                f"Gaussian noise sigma {self.sigma}; PSNR on [0, 1]")


TASK = TinyTask
