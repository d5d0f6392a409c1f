"""Denoising datasets: Gaussian noise model, synthetic-noise and paired-folder torch Datasets.

Noise convention (KAIR / Restormer test scripts): ``noisy = clean + N(0, sigma/255)`` with the
clean image in [0, 1] and sigma in 0..255 units; the noisy image is **not** clipped.

Randomness is keyed, never global (``ernas.data.keyed``): a training sample draws from
``numpy.random.default_rng([seed, epoch, index, draw])``, an evaluation sample's noise from
``default_rng([seed, index])``.

Every item is a dict: ``input`` (the noisy image) and ``target`` (the clean one), float32
C x H x W tensors, ``name`` (str) and, for synthetic noise, ``sigma`` (float, 0..255 units).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ernas.data.images import IMAGE_EXTENSIONS, read_image
from ernas.data.keyed import KeyedDataset, check_crop, check_seed
from ernas.errors import ErnasError

ArrayOrTensor = np.ndarray | torch.Tensor

# --------------------------------------------------------------------------- noise model


def _numpy_noise(shape, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _add(clean: ArrayOrTensor, noise: np.ndarray | torch.Tensor, sigma: float) -> ArrayOrTensor:
    if isinstance(clean, torch.Tensor):
        noise = torch.as_tensor(noise, device=clean.device)
        return clean + noise.to(clean.dtype) * (sigma / 255.0)
    return (np.asarray(clean) + noise * np.float32(sigma / 255.0)).astype(
        np.result_type(clean, np.float32), copy=False)


def add_gaussian_noise(clean: ArrayOrTensor, sigma: float,
                       generator: int | np.random.Generator | torch.Generator | None = None
                       ) -> ArrayOrTensor:
    """Return ``clean + N(0, sigma/255)`` (same type and shape as ``clean``), not clipped.

    ``sigma`` is in 0..255 units. ``generator`` may be a seed, a numpy Generator, a
    ``torch.Generator`` (tensors only) or None (fresh OS entropy).
    """
    sigma = _check_sigma_value(sigma, "sigma")
    if isinstance(generator, torch.Generator):
        if not isinstance(clean, torch.Tensor):
            raise ErnasError("add_gaussian_noise: a torch.Generator needs a torch.Tensor image; "
                             "pass a seed or a numpy Generator for numpy arrays.")
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device).to(clean.device)
        return _add(clean, noise, sigma)
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    return _add(clean, _numpy_noise(tuple(clean.shape), rng), sigma)


def test_noise(clean: ArrayOrTensor, sigma: float, seed: int, index: int) -> ArrayOrTensor:
    """Deterministic evaluation noise: ``clean + sigma/255 * z`` with z from
    ``default_rng([seed, index])``; the same (seed, index) gives the same z for every sigma.

    z is drawn in the layout of ``clean`` (the datasets apply it to the C x H x W tensor).
    """
    check_seed(seed)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ErnasError(f"test_noise: index={index!r} must be a non-negative integer "
                         f"(the position of the image in its dataset).")
    sigma = _check_sigma_value(sigma, "sigma")
    z = _numpy_noise(tuple(clean.shape), np.random.default_rng([seed, int(index)]))
    return _add(clean, z, sigma)


test_noise.__test__ = False  # not a pytest test despite its name


def _check_sigma_value(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise ErnasError(
            f"Noise level {where}={value!r} is not valid: sigma is a non-negative number in "
            f"0..255 units (e.g. 15, 25 or 50).")
    return float(value)


@dataclass(frozen=True)
class SigmaSpec:
    """Noise level(s), in 0..255 units: ``fixed`` (one value), ``range`` (uniform in [lo, hi]
    per sample) or ``choice`` (one of a set per sample)."""

    kind: str
    values: tuple[float, ...]

    @classmethod
    def parse(cls, value) -> "SigmaSpec":
        """From a number (fixed), a 2-list ``[lo, hi]`` (range), ``{"choice": [15, 25, 50]}``,
        ``{"range": [lo, hi]}``, ``{"fixed": 25}`` or an existing SigmaSpec."""
        if isinstance(value, SigmaSpec):
            return value
        hint = ("Write sigma as a number (25), a range [lo, hi] such as [0, 55], or a choice "
                "set {choice: [15, 25, 50]}; values are in 0..255 units.")
        if isinstance(value, Mapping):
            if len(value) != 1 or next(iter(value)) not in ("choice", "range", "fixed"):
                raise ErnasError(f"Noise level sigma={dict(value)!r} is not understood. {hint}")
            key, inner = next(iter(value.items()))
            if key == "fixed":
                return cls("fixed", (_check_sigma_value(inner, "sigma.fixed"),))
            if key == "range":
                return cls._range(inner, hint)
            if isinstance(inner, (str, bytes)) or not isinstance(inner, Sequence) or not inner:
                raise ErnasError(f"Noise level sigma.choice={inner!r} must be a non-empty list. "
                                 f"{hint}")
            return cls("choice", tuple(_check_sigma_value(v, "sigma.choice") for v in inner))
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            return cls._range(value, hint)
        try:
            return cls("fixed", (_check_sigma_value(value, "sigma"),))
        except ErnasError:
            raise ErnasError(f"Noise level sigma={value!r} is not understood. {hint}") from None

    @classmethod
    def _range(cls, value, hint) -> "SigmaSpec":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise ErnasError(f"Noise level range sigma={value!r} needs exactly two numbers "
                             f"[lo, hi]. {hint}")
        lo, hi = (_check_sigma_value(v, "sigma range") for v in value)
        if lo > hi:
            raise ErnasError(f"Noise level range sigma=[{lo}, {hi}] has lo > hi; write it as "
                             f"[{hi}, {lo}].")
        return cls("range", (lo, hi))

    def sample(self, rng: np.random.Generator) -> float:
        """One sigma value drawn with ``rng``."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "range":
            return float(rng.uniform(self.values[0], self.values[1]))
        return float(self.values[int(rng.integers(len(self.values)))])

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.values[0]:g}"
        if self.kind == "range":
            return f"[{self.values[0]:g}, {self.values[1]:g}]"
        return "{choice: [" + ", ".join(f"{v:g}" for v in self.values) + "]}"


# --------------------------------------------------------------------------- crops and augments


def _check_fits(name: str, shape, crop: int | None, where: str = "") -> None:
    if crop is not None and (shape[0] < crop or shape[1] < crop):
        raise ErnasError(
            f"Image {name}{where} is {shape[0]}x{shape[1]} pixels, smaller than the crop size "
            f"{crop}. Use a smaller crop (at most {min(shape[0], shape[1])}), a larger max_side, "
            f"or remove the image.")


def _as_hwc(name: str, img) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ErnasError(f"Image {name!r} has shape {arr.shape}; datasets expect H x W x C "
                         f"numpy arrays (as returned by read_image / load_bundled).")
    return arr


def _random_crop_augment(arr: np.ndarray, crop: int | None, rng: np.random.Generator
                         ) -> np.ndarray:
    """Random crop then one of the 8 dihedral transforms (k·90° rotation, optional flip)."""
    if crop is not None:
        top = int(rng.integers(arr.shape[0] - crop + 1))
        left = int(rng.integers(arr.shape[1] - crop + 1))
        arr = arr[top:top + crop, left:left + crop]
    arr = np.rot90(arr, int(rng.integers(4)), axes=(0, 1))
    if rng.integers(2):
        arr = arr[:, ::-1]
    return arr


def _center_crop(arr: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None:
        return arr
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    return arr[top:top + crop, left:left + crop]


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # always a private copy


class NoisyImageDataset(KeyedDataset):
    """Clean images plus synthetic Gaussian noise.

    Training: random ``crop`` x ``crop`` patch, random dihedral transform, fresh sigma and noise
    per sample; item ``i`` uses image ``i % len(images)``, so ``length`` can exceed the image count.
    Evaluation (``train=False``): the whole image (or its centre crop), no augmentation, noise
    from :func:`test_noise` with ``(seed, i)``, so every run sees the same noisy images.
    """

    def __init__(self, images: Sequence[tuple[str, np.ndarray]], crop: int | None = None,
                 sigma=25.0, train: bool = True, length: int | None = None, seed: int = 0):
        super().__init__(len(images), crop, train, length, seed)
        self.images = [(str(name), _as_hwc(name, img)) for name, img in images]
        self.sigma = SigmaSpec.parse(sigma)
        for name, img in self.images:
            _check_fits(name, img.shape, self.crop)

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        name, img = self.images[index % len(self.images)]
        if self.train:
            rng = self._train_rng(index)
            clean = _to_chw(_random_crop_augment(img, self.crop, rng))
            sigma = self.sigma.sample(rng)
            noisy = add_gaussian_noise(clean, sigma, rng)
        else:
            clean = _to_chw(_center_crop(img, self.crop))
            sigma = self.sigma.sample(np.random.default_rng([self.seed, index, 1]))
            noisy = test_noise(clean, sigma, self.seed, index)
        return {"input": noisy, "target": clean, "name": name, "sigma": sigma}


class PairedImageDataset(KeyedDataset):
    """Real noisy/clean pairs ``[(name, noisy, clean)]``; the same crop and dihedral transform
    are applied to both images of a pair. Items have no ``sigma`` key."""

    def __init__(self, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
                 crop: int | None = None, train: bool = True, length: int | None = None,
                 seed: int = 0):
        super().__init__(len(pairs), crop, train, length, seed)
        self.pairs = []
        for name, noisy, clean in pairs:
            noisy, clean = _as_hwc(name, noisy), _as_hwc(name, clean)
            _check_pair_shapes(str(name), noisy.shape, clean.shape)
            _check_fits(name, clean.shape, self.crop)
            self.pairs.append((str(name), np.concatenate([noisy, clean], axis=2)))

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        name, both = self.pairs[index % len(self.pairs)]
        if self.train:
            both = _random_crop_augment(both, self.crop, self._train_rng(index))
        else:
            both = _center_crop(both, self.crop)
        both = _to_chw(both)
        c = both.shape[0] // 2
        return {"input": both[:c], "target": both[c:], "name": name}


def _check_pair_shapes(name: str, noisy_shape, clean_shape, paths: str = "") -> None:
    if tuple(noisy_shape) != tuple(clean_shape):
        raise ErnasError(
            f"Noisy and clean images of pair {name!r}{paths} differ in shape: noisy "
            f"{tuple(noisy_shape)} vs clean {tuple(clean_shape)}. Each noisy image must be "
            f"pixel-aligned with its clean image; fix or remove this pair.")


# --------------------------------------------------------------------------- folders


def _image_files(path, role: str) -> dict[str, Path]:
    folder = Path(path)
    exts = ", ".join(IMAGE_EXTENSIONS)
    if not folder.exists():
        raise ErnasError(f"The {role} folder {folder} does not exist. Check the path (relative "
                         f"paths are resolved from {os.getcwd()}).")
    if not folder.is_dir():
        raise ErnasError(f"The {role} path {folder} is a file, not a folder. Pass the folder "
                         f"that holds the images.")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ErnasError(f"The {role} folder {folder} contains no image files. Accepted "
                         f"extensions: {exts} (case-insensitive; sub-folders are not searched).")
    by_stem: dict[str, Path] = {}
    for p in files:
        if p.stem in by_stem:
            raise ErnasError(f"The {role} folder {folder} holds two images with the name "
                             f"{p.stem!r}: {by_stem[p.stem].name} and {p.name}. Image names "
                             f"(file names without extension) must be unique; remove one.")
        by_stem[p.stem] = p
    return by_stem


def clean_folder(path, color: bool = True, min_size: int | None = None
                 ) -> list[tuple[str, np.ndarray]]:
    """All images of a folder as ``[(stem, HxWxC float32)]``, sorted by file name.

    ``min_size`` (pass your crop) rejects any image with a side shorter than it.
    """
    out = []
    for stem, p in _image_files(path, "image").items():
        img = read_image(p, color)
        _check_fits(str(p), img.shape, check_crop(min_size))
        out.append((stem, img))
    return out


def paired_folders(noisy_dir, clean_dir, color: bool = True, min_size: int | None = None
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Noisy/clean image pairs matched by file stem: ``[(stem, noisy, clean)]`` sorted by stem."""
    noisy, clean = _image_files(noisy_dir, "noisy"), _image_files(clean_dir, "clean")
    only_noisy, only_clean = sorted(set(noisy) - set(clean)), sorted(set(clean) - set(noisy))
    if only_noisy or only_clean:
        def show(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "") \
                if names else "none"
        raise ErnasError(
            f"Noisy folder {noisy_dir} and clean folder {clean_dir} do not match: images are "
            f"paired by file name without extension. Only in noisy: {show(only_noisy)}. Only in "
            f"clean: {show(only_clean)}. Rename or remove the unmatched files.")
    out = []
    for stem in sorted(noisy):
        n_img, c_img = read_image(noisy[stem], color), read_image(clean[stem], color)
        _check_pair_shapes(stem, n_img.shape, c_img.shape, f" ({noisy[stem]}, {clean[stem]})")
        _check_fits(str(clean[stem]), c_img.shape, check_crop(min_size))
        out.append((stem, n_img, c_img))
    return out
