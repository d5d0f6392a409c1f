"""Semantic-segmentation data: label masks, user-data readers and a keyed-random torch Dataset.

A sample is ``(name, image, mask)``: ``image`` float32 H x W x C in [0, 1] and ``mask`` int64
H x W holding class ids in ``[0, num_classes)`` or :data:`IGNORE_INDEX` (255: borders, void,
"don't care").
Dataset items are dicts: ``input`` (float32 C x H x W tensor), ``target`` (int64 H x W tensor) and
``name`` (str).

Readers (all of them eager: every file is decoded and checked when the reader is called, so bad
data is reported before training starts; memory is 4 * H * W * C bytes per image, pass
``max_side`` to downscale large sets, image anti-aliased and mask nearest-neighbour):

* :func:`voc_samples` -- Pascal VOC: ``ROOT/JPEGImages/<stem>.jpg``,
  ``ROOT/SegmentationClass/<stem>.png`` (palette PNGs whose indices are the 21 class ids, 255 =
  object border, kept as ignore) and ``ROOT/ImageSets/Segmentation/<split>.txt`` (one stem a line).
* :func:`cityscapes_samples` -- Cityscapes: ``ROOT/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``
  with ``ROOT/gtFine/<split>/<city>/<id>_gtFine_labelIds.png``; label ids become the 19 standard
  train ids (:data:`CITYSCAPES_TRAIN_IDS`), every other id becomes 255.
* :func:`segmentation_folders` -- ``images/`` and ``masks/`` folders matched by file stem; the mask
  holds class ids directly (palette indices or grey values; lossless formats only).

Randomness is keyed, never global, as in the denoising datasets: a training item draws from
``numpy.random.default_rng([seed, epoch, index, draw])`` (``draw`` counts this dataset object's
``__getitem__`` calls, so a second pass gives fresh crops); evaluation items are not random. With
``DataLoader(num_workers > 0)`` call ``dataset.set_epoch(epoch)`` at the start of every epoch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ernas.data.images import IMAGE_EXTENSIONS, read_image
from ernas.data.keyed import KeyedDataset
from ernas.errors import ErnasError

IGNORE_INDEX = 255

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle")

# Cityscapes label id -> train id (index into CITYSCAPES_CLASSES); other ids in 0..33 -> 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_MAX_ID = 33

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


# --------------------------------------------------------------------------- Pascal VOC


def voc_samples(root, split: str = "train", max_side: int | None = None) -> list[Sample]:
    """Pascal VOC segmentation samples of ``split``, in the order of its split list."""
    root, split = _existing_dir(root, "Pascal VOC root"), _check_split(split)
    _check_max_side(max_side)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    layout = ("The Pascal VOC layout is ROOT/JPEGImages/<stem>.jpg, ROOT/SegmentationClass/<stem>"
              ".png and ROOT/ImageSets/Segmentation/<split>.txt; pass the folder that holds them "
              "(e.g. VOCdevkit/VOC2012).")
    if not listing.is_file():
        found = sorted(p.stem for p in listing.parent.glob("*.txt")) if listing.parent.is_dir() \
            else []
        raise ErnasError(f"The Pascal VOC split list {listing} does not exist (split lists found: "
                         f"{_show(found) or 'none'}). {layout}")
    stems = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not stems:
        raise ErnasError(f"The Pascal VOC split list {listing} is empty; it must name one image "
                         f"stem a line. {layout}")
    images = [root / "JPEGImages" / f"{stem}.jpg" for stem in stems]
    masks = [root / "SegmentationClass" / f"{stem}.png" for stem in stems]
    for files, problem in ((images, "masks without an image"), (masks, "images without a mask")):
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise ErnasError(f"{len(missing)} files for stems listed in {listing} are missing "
                             f"({problem}): {_show(missing)}. Restore these files or remove their "
                             f"stems from the split list. {layout}")
    return [_read_pair(stem, image, mask, len(VOC_CLASSES), True, max_side)
            for stem, image, mask in zip(stems, images, masks)]


# --------------------------------------------------------------------------- Cityscapes


def cityscapes_train_ids(label_ids: np.ndarray, source: str = "mask") -> np.ndarray:
    """Map Cityscapes label ids (0..33) to the 19 train ids; ids without a train id become 255."""
    label_ids = np.asarray(label_ids)
    bad = np.unique(label_ids[(label_ids < 0) | (label_ids > _CITYSCAPES_MAX_ID)])
    if bad.size:
        raise ErnasError(
            f"Cityscapes mask {source} holds values {_show(bad)} that are not label ids "
            f"(0..{_CITYSCAPES_MAX_ID}). Use the *_gtFine_labelIds.png files of the official "
            f"release, not colour, instance or train-id images.")
    lut = np.full(_CITYSCAPES_MAX_ID + 1, IGNORE_INDEX, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut[label_ids]


def _cityscapes_files(folder: Path, suffix: str) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name[:-len(suffix)]}": p
            for p in sorted(folder.glob(f"*/*{suffix}"))}


def cityscapes_samples(root, split: str = "train", max_side: int | None = None) -> list[Sample]:
    """Cityscapes fine-annotation samples of ``split`` (sorted by city, then id), masks as train
    ids. Names are the image ids, e.g. ``aachen_000000_000019``."""
    root, split = _existing_dir(root, "Cityscapes root"), _check_split(split)
    _check_max_side(max_side)
    layout = ("The Cityscapes layout is ROOT/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png with "
              "ROOT/gtFine/<split>/<city>/<id>_gtFine_labelIds.png.")
    image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            found = sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) \
                if folder.parent.is_dir() else []
            raise ErnasError(f"The Cityscapes split folder {folder} does not exist (splits found "
                             f"there: {_show(found) or 'none'}). {layout}")
    images = _cityscapes_files(image_dir, "_leftImg8bit.png")
    masks = _cityscapes_files(mask_dir, "_gtFine_labelIds.png")
    if not images:
        raise ErnasError(f"The Cityscapes image folder {image_dir} holds no "
                         f"<city>/<id>_leftImg8bit.png files. {layout}")
    only_images = [images[k] for k in sorted(set(images) - set(masks))]
    only_masks = [masks[k] for k in sorted(set(masks) - set(images))]
    if only_images or only_masks:
        raise ErnasError(
            f"Cityscapes images and masks of split {split!r} do not match. Images without a "
            f"mask: {_show(only_images) or 'none'}. Masks without an image: "
            f"{_show(only_masks) or 'none'}. Add the missing files or remove the unmatched ones. "
            f"{layout}")
    return [_read_pair(key.split("/")[1], images[key], masks[key], len(CITYSCAPES_CLASSES), True,
                       max_side, cityscapes_train_ids) for key in images]


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


def segmentation_folders(images_dir, masks_dir, num_classes: int, color: bool = True,
                         max_side: int | None = None) -> list[Sample]:
    """Images and masks matched by file stem, sorted by stem; masks hold class ids directly."""
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
    return [_read_pair(stem, images[stem], masks[stem], num_classes, color, max_side)
            for stem in sorted(images)]


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
    """Images with class-id masks, ``[(name, H x W x C float32, H x W int)]``.

    Training (``train=True``): a random ``crop`` x ``crop`` window (images smaller than ``crop``
    are first padded at the bottom/right, the image by reflection and the mask with 255) and a
    horizontal flip with probability 1/2; item ``i`` uses sample ``i % len(samples)``, so
    ``length`` can exceed the sample count. Evaluation: the whole image, or its centre ``crop``
    (padded the same way), with no randomness.
    """

    def __init__(self, samples: Sequence[Sample], num_classes: int, crop: int | None = None,
                 train: bool = True, length: int | None = None, seed: int = 0):
        super().__init__(len(samples), crop, train, length, seed)
        self.num_classes = _check_num_classes(num_classes)
        self.samples = [_checked_sample(*sample, self.num_classes) for sample in samples]

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        name, image, mask = self.samples[index % len(self.samples)]
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
