"""Task ``denoise``: Gaussian (or real, paired) image denoising, judged by PSNR and SSIM.

Data per split (train | val | test): the split's folder when given (``<split>_dir``: clean images,
noise added on the fly; with ``<split>_noisy_dir`` too: real noisy/clean pairs matched by file
name), else the bundled photos (``ernas.data.images``: a fixed train/val/test split; test photos
are never used for search or retraining). Training and validation photos are downscaled to
``max_side``; test images are used whole, or cut into ``eval_tile`` squares named
``<image>@<y>_<x>`` (``ernas.data.tiles``; ``image_of`` recovers the image).

Noise (KAIR/Restormer test scripts): clean in [0, 1] plus N(0, σ/255), not clipped; training σ is
``sigma`` (a number, [lo, hi] or {choice: [...]}); evaluation sweeps ``eval_sigmas`` with noise
seeded by (seed, image index). Loss: NAFNet's PSNR loss (10/ln 10)·mean_i log(MSE_i + 1e-8) or
L1. Metrics (BasicSR): PSNR and SSIM on [0, 255] after clipping the output to [0, 1]
(``metrics.psnr`` / ``metrics.ssim``), per image, averaged; headline: PSNR at σ=25.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ernas.data.tiles import tiled
from ernas.errors import ErnasError
from ernas.task import Evaluator, Task
from ernas.tasks.denoise.data import (NoisyImageDataset, PairedImageDataset, SigmaSpec,
                                      clean_folder, paired_folders)
from ernas.tasks.denoise.metrics import psnr, ssim

_PSNR_SCALE = 10.0 / math.log(10.0)
SPLITS = ("train", "val", "test")


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NAFNet's PSNR loss: (10/ln 10)·mean_i log(MSE_i + 1e-8), MSE_i over the pixels of image i.

    Equal to −mean_i PSNR_i (dB, data range 1) up to the 1e-8; minimising it maximises PSNR."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return _PSNR_SCALE * torch.log(mse + 1e-8).mean()


def batch_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of 10·log10(1/MSE_i), pred clipped to [0, 1] (data range 1), as
    ``metrics.psnr`` on each image."""
    mse = (pred.detach().float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)
    return float((-10.0 * torch.log10(mse.clamp_min(1e-12))).mean())


LOSSES = {"psnr": psnr_loss, "l1": F.l1_loss}


class DenoiseEvaluator(Evaluator):
    """PSNR and SSIM per image (BasicSR convention), averaged over the images."""

    def __init__(self, crop_border: int = 0, test_y_channel: bool = False):
        self.crop_border, self.test_y_channel = crop_border, test_y_channel
        self._rows: list[dict] = []

    def update(self, pred, target, name=None):
        for i, (p, t) in enumerate(zip(pred, target)):
            self._rows.append({"name": name if len(pred) == 1 else f"{name}[{i}]",
                               "psnr": psnr(p, t, self.crop_border, self.test_y_channel),
                               "ssim": ssim(p, t, self.crop_border, self.test_y_channel)})

    def compute(self):
        if not self._rows:
            raise ErnasError("denoise evaluator: nothing to evaluate (no images were given).")
        return {m: float(np.mean([r[m] for r in self._rows])) for m in ("psnr", "ssim")}

    def rows(self):
        return list(self._rows)


@dataclass
class DenoiseTask(Task):
    """Image denoising (see the module docstring); the fields are the ``task`` config."""

    name = "denoise"
    metric = "psnr"
    metric_label = "PSNR (dB)"
    metrics = ("psnr", "ssim")

    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    train_noisy_dir: str | None = None
    val_noisy_dir: str | None = None
    test_noisy_dir: str | None = None
    color: bool = True
    max_side: int | None = 512
    sigma: Any = 25
    val_sigma: float | None = None
    eval_sigmas: list = field(default_factory=lambda: [15, 25, 50])
    loss_fn: str = "psnr"
    crop_border: int = 0
    test_y_channel: bool = False
    eval_tile: int | None = None

    def __post_init__(self):
        self._sigma = SigmaSpec.parse(self.sigma)
        if self.eval_tile is not None and (isinstance(self.eval_tile, bool) or not isinstance(
                self.eval_tile, int) or self.eval_tile < 11):
            raise ErnasError(f"task.eval_tile={self.eval_tile!r} is not valid: give the side of "
                             f"the square test tiles in pixels (at least 11, for SSIM; e.g. 128)"
                             f" or null to evaluate whole test images.")
        if self.loss_fn not in LOSSES:
            raise ErnasError(f"task.loss_fn={self.loss_fn!r} is not known; use one of "
                             f"{', '.join(LOSSES)}.")
        if not isinstance(self.eval_sigmas, (list, tuple)) or not self.eval_sigmas:
            raise ErnasError(f"task.eval_sigmas={self.eval_sigmas!r} must be a non-empty list of "
                             f"noise levels, e.g. [15, 25, 50].")
        for s in self.eval_sigmas:
            SigmaSpec.parse(s)
        for split in SPLITS:
            if getattr(self, f"{split}_noisy_dir") and not getattr(self, f"{split}_dir"):
                raise ErnasError(f"task.{split}_noisy_dir is set but task.{split}_dir is not: "
                                 f"paired data needs the clean folder too "
                                 f"(task.{split}_dir=<clean images>).")

    # ------------------------------------------------------------------ data
    def _paired(self, split: str) -> bool:
        return bool(getattr(self, f"{split}_noisy_dir"))

    def images(self, split: str, min_size: int | None = None):
        """``[(name, HxWxC)]`` clean images of a split (folder or bundled)."""
        from ernas.data import bundled_images

        folder = getattr(self, f"{split}_dir")
        if folder:
            return clean_folder(folder, self.color, min_size)
        return bundled_images(split, self.color, None if split == "test" else self.max_side)

    def val_sigma_value(self) -> float:
        if self.val_sigma is not None:
            return float(self.val_sigma)
        return self._sigma.values[0] if self._sigma.kind == "fixed" else 25.0

    def dataset(self, split, crop=None, seed=0, random=False):
        if split not in SPLITS:
            raise ErnasError(f"denoise: split {split!r} is not one of {', '.join(SPLITS)}.")
        if self._paired(split):
            pairs = paired_folders(getattr(self, f"{split}_noisy_dir"),
                                   getattr(self, f"{split}_dir"), self.color, crop)
            return PairedImageDataset(pairs, crop, train=random, seed=seed)
        sigma = self._sigma if random else self.val_sigma_value()
        return NoisyImageDataset(self.images(split, crop), crop, sigma, train=random, seed=seed)

    def eval_labels(self):
        if self._paired("test"):
            return ["real"]
        return [f"sigma{float(s):g}" for s in self.eval_sigmas]

    @property
    def headline_set(self):
        labels = self.eval_labels()
        return "sigma25" if "sigma25" in labels else labels[0]

    def eval_sets(self, seed=0):
        if self._paired("test"):
            return {"real": self.dataset("test", None, seed)}
        images = self.images("test")
        if self.eval_tile is not None:
            images = tiled(images, self.eval_tile)
        return {label: NoisyImageDataset(images, None, float(s), train=False, seed=seed)
                for label, s in zip(self.eval_labels(), self.eval_sigmas)}

    def describe(self):
        test = (f"noisy/clean pairs of {self.test_noisy_dir} and {self.test_dir}"
                if self._paired("test") else f"clean images of {self.test_dir}" if self.test_dir
                else "the bundled test photos")
        return (f"{test}; synthetic noise: clean + N(0, σ/255), seeded by (seed, image index), the "
                f"same draw for every σ, not clipped; PSNR (dB) = 10·log10(255²/MSE) and SSIM "
                f"(11x11 Gaussian window, σ 1.5) on [0, 255] after clipping the output to [0, 1], "
                f"crop_border {self.crop_border}, {'Y channel' if self.test_y_channel else 'all channels'}"
                f" (BasicSR); mean over "
                f"{'images' if self.eval_tile is None else f'{self.eval_tile}x{self.eval_tile} tiles'}")

    # ------------------------------------------------------------------ learning and judging
    def loss(self, pred, target):
        return LOSSES[self.loss_fn](pred, target)

    @property
    def loss_log_scale(self):
        """10/ln 10 for the PSNR loss ((10/ln 10)·ln MSE), None for L1 (positive)."""
        return _PSNR_SCALE if self.loss_fn == "psnr" else None

    def distill_loss(self, pred, teacher_pred):
        """Output distillation: mean |y_s − y_t|."""
        return F.l1_loss(pred.float(), teacher_pred.float())

    def evaluator(self):
        return DenoiseEvaluator(self.crop_border, self.test_y_channel)

    def batch_metric(self, pred, target):
        return batch_psnr(pred, target)

    def check_arch(self, arch):
        c = 3 if self.color else 1
        cin, cout = arch.spec.io_channels(arch.geometry)
        if (cin, cout) != (c, c):
            raise ErnasError(f"architecture {arch.name!r} ({arch.source}) takes {cin} and gives "
                             f"{cout} channels, but denoising {'colour' if self.color else 'grey'}"
                             f" images needs {c} in and out; set task.color="
                             f"{'false' if cin == 1 else 'true'} or use an arch of {c} channels.")


TASK = DenoiseTask
