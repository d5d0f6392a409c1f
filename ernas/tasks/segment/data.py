"""Semantic-segmentation data: label masks, user-data readers and a keyed-random torch Dataset.

A sample is ``(name, image, mask)``: ``image`` float32 H x W x C in [0, 1] and ``mask`` int64
H x W holding class ids in ``[0, num_classes)`` or :data:`IGNORE_INDEX` (255: borders, void,
"don't care").
Dataset items are dicts: ``input`` (float32 C x H x W tensor), ``target`` (int64 H x W tensor) and
``name`` (str).

Readers: :func:`segmentation_folder_files` (``images/`` and ``masks/`` folders matched by file
stem; the mask holds class ids directly, palette indices or grey values, lossless formats only,
unless ``decode`` maps another encoding, see :mod:`ernas.tasks.segment.masks`) returns
:class:`PairFiles`, lazy pairs decoded when a dataset item is read (per-item reads: memory does
not grow with the set); :func:`segmentation_folders` reads them all now. With ``max_side`` an
image whose longest side exceeds it is downscaled on read (image anti-aliased bilinear, mask
nearest-neighbour). Pascal VOC and Cityscapes: :mod:`ernas.tasks.segment.official`.

Randomness is keyed, never global, as in the denoising datasets: a training item draws from
``numpy.random.default_rng([seed, epoch, index, draw])`` (``draw`` counts this dataset object's
``__getitem__`` calls, so a second pass gives fresh crops); evaluation items are not random. With
``DataLoader(num_workers > 0)`` call ``dataset.set_epoch(epoch)`` at the start of every epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ernas.data.images import IMAGE_EXTENSIONS, read_image
from ernas.data.keyed import KeyedDataset
from ernas.errors import ErnasError

IGNORE_INDEX = 255

_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L")
_LOSSY = (".jpg", ".jpeg")

Sample = tuple[str, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- checks


def _optional_positive_int(value, what: str, example: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise ErnasError(f"{what}={value!r} is not valid: use a positive integer ({example}) or "
                         f"None.")
    return None if value is None else int(value)


def _check_max_side(max_side) -> None:
    _optional_positive_int(max_side, "max_side", "the longest side after downscaling, e.g. 512")


# --------------------------------------------------------------------------- masks


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as int64 H x W class ids.

    Palette ("P") PNGs give their palette indices (the Pascal VOC convention), grey PNGs their
    values; colour images are refused, since their pixels are not class ids.
    """
    from PIL import Image
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            mode, arr = im.mode, np.asarray(im)
    except Exception as exc:  # any decoder failure is a bad file for the user
        raise ErnasError(
            f"Could not read mask file {path}: {type(exc).__name__}: {exc}. Check that it is a "
            f"valid PNG (re-save it, or remove it and its image).") from None
    if mode not in _MASK_MODES:
        raise ErnasError(
            f"Mask file {path} is a {mode} image; a mask holds one class id per pixel. Save it as "
            f"a palette (P) or 8/16-bit greyscale PNG whose pixel values are the class ids.")
    return arr.astype(np.int64)


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or not 1 <= num_classes <= IGNORE_INDEX:
        raise ErnasError(f"num_classes={num_classes!r} is not valid: give the number of classes "
                         f"as an integer from 1 to {IGNORE_INDEX} ({IGNORE_INDEX} is the ignore "
                         f"value), counting the background class.")
    return int(num_classes)


def _check_mask_values(mask: np.ndarray, num_classes: int, source: str) -> None:
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise ErnasError(
            f"Mask {source} holds class values {shown} outside 0..{num_classes - 1}; a mask may "
            f"only hold class ids below num_classes={num_classes} and {IGNORE_INDEX} (ignore). "
            f"Check num_classes, or remap or remove this mask.")


def _check_mask_size(image_shape, mask_shape, image_source: str, mask_source: str = "") -> None:
    if tuple(image_shape[:2]) != tuple(mask_shape):
        raise ErnasError(
            f"Image {image_source} is {image_shape[0]}x{image_shape[1]} pixels (H x W) but its "
            f"mask {mask_source}is {mask_shape[0]}x{mask_shape[1]}. A mask must be pixel-aligned "
            f"with its image; fix or remove this pair.")


def _downscale_pair(image: np.ndarray, mask: np.ndarray, max_side: int | None):
    h, w = mask.shape
    if max_side is None or max(h, w) <= max_side:
        return image, mask
    from skimage.transform import resize
    scale = max_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = resize(image, (nh, nw, image.shape[2]), order=1, anti_aliasing=True,
                   preserve_range=True)
    rows = ((np.arange(nh) + 0.5) * h / nh).astype(np.int64)  # nearest source pixel centres
    cols = ((np.arange(nw) + 0.5) * w / nw).astype(np.int64)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask[np.ix_(rows, cols)]


def _read_pair(name: str, image_path: Path, mask_path: Path, num_classes: int, color: bool,
               max_side: int | None, to_class_ids=None) -> Sample:
    image, mask = read_image(image_path, color), read_mask(mask_path)
    _check_mask_size(image.shape, mask.shape, str(image_path), f"{mask_path} ")
    if to_class_ids is not None:
        mask = to_class_ids(mask, str(mask_path))
    _check_mask_values(mask, num_classes, str(mask_path))
    return (name, *_downscale_pair(image, mask, max_side))


@dataclass(frozen=True)
class PairFiles:
    """An image/mask file pair, read and checked by :meth:`load` (lazy samples); ``decode``
    maps ``(mask values, source)`` to class ids (picklable, for DataLoader workers)."""

    name: str
    image: Path
    mask: Path
    num_classes: int
    color: bool = True
    max_side: int | None = None
    decode: Callable | None = None

    def load(self) -> Sample:
        return _read_pair(self.name, self.image, self.mask, self.num_classes, self.color,
                          self.max_side, self.decode)


def _show(items) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")


def _existing_dir(path, role: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ErnasError(f"The {role} {folder} is not an existing folder. Check the path (relative "
                         f"paths are resolved from {os.getcwd()}).")
    return folder


def _check_split(split) -> str:
    if not isinstance(split, str) or not split or "/" in split or split.startswith("."):
        raise ErnasError(f"split={split!r} is not valid: give a split name such as 'train' or "
                         f"'val'.")
    return split


# --------------------------------------------------------------------------- folder pair


def _image_files(path, role: str) -> dict[str, Path]:
    """``{stem: path}`` of the image files directly inside a folder."""
    folder = _existing_dir(path, f"{role} folder")
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in by_stem:
            raise ErnasError(f"The {role} folder {folder} holds two files named {p.stem!r}: "
                             f"{by_stem[p.stem].name} and {p.name}. Names without extension must "
                             f"be unique; remove one.")
        by_stem[p.stem] = p
    if not by_stem:
        raise ErnasError(f"The {role} folder {folder} contains no image files. Accepted "
                         f"extensions: {', '.join(IMAGE_EXTENSIONS)} (sub-folders are not "
                         f"searched).")
    return by_stem


def segmentation_folder_files(images_dir, masks_dir, num_classes: int, color: bool = True,
                              max_side: int | None = None, decode: Callable | None = None
                              ) -> list[PairFiles]:
    """Image/mask pairs matched by file stem, sorted by stem (files listed, not read)."""
    num_classes = _check_num_classes(num_classes)
    _check_max_side(max_side)
    images, masks = _image_files(images_dir, "image"), _image_files(masks_dir, "mask")
    lossy = [p for p in masks.values() if p.suffix.lower() in _LOSSY]
    if lossy:
        raise ErnasError(f"Masks {_show(lossy)} are JPEG files: JPEG compression changes pixel "
                         f"values, so they no longer are class ids. Save masks as PNG.")
    only_images = [images[s] for s in sorted(set(images) - set(masks))]
    only_masks = [masks[s] for s in sorted(set(masks) - set(images))]
    if only_images or only_masks:
        raise ErnasError(
            f"Image folder {images_dir} and mask folder {masks_dir} do not match: they are paired "
            f"by file name without extension. Images without a mask: "
            f"{_show(only_images) or 'none'}. Masks without an image: {_show(only_masks) or 'none'}"
            f". Rename or remove the unmatched files.")
    return [PairFiles(stem, images[stem], masks[stem], num_classes, color, max_side, decode)
            for stem in sorted(images)]


def segmentation_folders(images_dir, masks_dir, num_classes: int, color: bool = True,
                         max_side: int | None = None, decode: Callable | None = None
                         ) -> list[Sample]:
    """Every pair of :func:`segmentation_folder_files`, read and checked now."""
    return [pair.load() for pair in segmentation_folder_files(images_dir, masks_dir, num_classes,
                                                              color, max_side, decode)]


def scan_masks(pairs: Sequence[PairFiles]) -> None:
    """Read and decode every mask of ``pairs`` (not the images), so a bad or undeclared mask is
    reported before training starts; nothing is kept."""
    for pair in pairs:
        mask = read_mask(pair.mask)
        if pair.decode is not None:
            mask = pair.decode(mask, str(pair.mask))
        _check_mask_values(mask, pair.num_classes, str(pair.mask))


# --------------------------------------------------------------------------- Dataset


def _pad_to(image: np.ndarray, mask: np.ndarray, crop: int | None):
    """Pad at the bottom/right up to ``crop``: reflected image, ignore-valued mask."""
    if crop is None:
        return image, mask
    ph, pw = max(crop - mask.shape[0], 0), max(crop - mask.shape[1], 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, mask


def _checked_sample(name, image, mask, num_classes: int) -> Sample:
    image, mask = np.asarray(image, dtype=np.float32), np.asarray(mask)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ErnasError(f"Image of sample {name!r} has shape {image.shape}; expected an H x W x C "
                         f"array (as returned by read_image).")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ErnasError(f"Mask of sample {name!r} has type {mask.dtype}; masks are integer "
                         f"arrays of class ids (as returned by read_mask).")
    _check_mask_size(image.shape, mask.shape, f"of sample {name!r}")
    _check_mask_values(mask, num_classes, f"of sample {name!r}")
    return str(name), image, mask.astype(np.int64, copy=False)


class SegmentationDataset(KeyedDataset):
    """Images with class-id masks, ``[(name, H x W x C float32, H x W int)]`` or
    :class:`PairFiles` (read when their item is asked for).

    Training (``train=True``): a random ``crop`` x ``crop`` window (images smaller than ``crop``
    are first padded at the bottom/right, the image by reflection and the mask with 255) and a
    horizontal flip with probability 1/2; item ``i`` uses sample ``i % len(samples)``, so
    ``length`` can exceed the sample count. Evaluation: the whole image, or its centre ``crop``
    (padded the same way), with no randomness.
    """

    def __init__(self, samples: Sequence, num_classes: int, crop: int | None = None,
                 train: bool = True, length: int | None = None, seed: int = 0):
        super().__init__(len(samples), crop, train, length, seed)
        self.num_classes = _check_num_classes(num_classes)
        self.samples = [sample if isinstance(sample, PairFiles)
                        else _checked_sample(*sample, self.num_classes) for sample in samples]

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        sample = self.samples[index % len(self.samples)]
        if isinstance(sample, PairFiles):
            sample = _checked_sample(*sample.load(), self.num_classes)
        name, image, mask = sample
        image, mask = _pad_to(image, mask, self.crop)
        flip = False
        if self.train:
            rng = self._train_rng(index)
            if self.crop is not None:
                top, left = (int(rng.integers(n - self.crop + 1)) for n in mask.shape)
            flip = bool(rng.integers(2))
        elif self.crop is not None:
            top, left = ((n - self.crop) // 2 for n in mask.shape)
        if self.crop is not None:
            window = (slice(top, top + self.crop), slice(left, left + self.crop))
            image, mask = image[window], mask[window]
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return {"input": torch.from_numpy(image.transpose(2, 0, 1).copy()),
                "target": torch.from_numpy(mask.copy()), "name": name}
