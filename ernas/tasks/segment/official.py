"""Pascal VOC and Cityscapes readers (lazy file pairs) and the held-out validation split.

* :func:`voc_files` -- Pascal VOC: ``ROOT/JPEGImages/<stem>.jpg``,
  ``ROOT/SegmentationClass/<stem>.png`` (palette PNGs whose indices are the 21 class ids, 255 =
  object border, kept as ignore) and ``ROOT/ImageSets/Segmentation/<split>.txt`` (one stem a line).
* :func:`cityscapes_files` -- Cityscapes: ``ROOT/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``
  with ``ROOT/gtFine/<split>/<city>/<id>_gtFine_labelIds.png``; label ids become the 19 standard
  train ids (:data:`CITYSCAPES_TRAIN_IDS`), every other id becomes 255.

Both return :class:`~ernas.tasks.segment.data.PairFiles` after checking that every listed file
exists; pixels are decoded only when a dataset item is read (``*_samples`` read them all now).

Neither set has public test labels, so the task uses the official ``val`` split as its test set
only, and carves its validation set (model selection, α steps) from the official ``train`` split
with :func:`carve_validation`: a fixed fraction drawn by a seeded permutation of the sorted
names, so no file is in two splits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ernas.errors import ErnasError
from ernas.tasks.segment.data import (IGNORE_INDEX, PairFiles, Sample, _check_max_side,
                                      _check_split, _existing_dir, _show)

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


# --------------------------------------------------------------------------- Pascal VOC


def voc_files(root, split: str = "train", max_side: int | None = None) -> list[PairFiles]:
    """Pascal VOC file pairs of ``split``, in the order of its split list (files checked to
    exist, not read)."""
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
    return [PairFiles(stem, image, mask, len(VOC_CLASSES), True, max_side)
            for stem, image, mask in zip(stems, images, masks)]


def voc_samples(root, split: str = "train", max_side: int | None = None) -> list[Sample]:
    """Pascal VOC samples of ``split``, every file read and checked now."""
    return [pair.load() for pair in voc_files(root, split, max_side)]


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


def _cityscapes_by_id(folder: Path, suffix: str) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name[:-len(suffix)]}": p
            for p in sorted(folder.glob(f"*/*{suffix}"))}


def cityscapes_files(root, split: str = "train", max_side: int | None = None
                     ) -> list[PairFiles]:
    """Cityscapes fine-annotation file pairs of ``split`` (sorted by city, then id), masks
    decoded to train ids when read. Names are the image ids, e.g. ``aachen_000000_000019``."""
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
    images = _cityscapes_by_id(image_dir, "_leftImg8bit.png")
    masks = _cityscapes_by_id(mask_dir, "_gtFine_labelIds.png")
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
    return [PairFiles(key.split("/")[1], images[key], masks[key], len(CITYSCAPES_CLASSES), True,
                      max_side, cityscapes_train_ids) for key in images]


def cityscapes_samples(root, split: str = "train", max_side: int | None = None) -> list[Sample]:
    """Cityscapes samples of ``split``, every file read and checked now."""
    return [pair.load() for pair in cityscapes_files(root, split, max_side)]


# --------------------------------------------------------------------------- held-out validation


def carve_validation(names: list[str], fraction: float, seed: int) -> set[str]:
    """The names drawn for validation: ``round(fraction * n)`` (at least 1, at most n - 1) of the
    sorted ``names``, by a permutation from ``default_rng([seed, 1])``."""
    if not 0 < fraction < 1:
        raise ErnasError(f"task.val_fraction={fraction!r} must be in (0, 1): the share of the "
                         f"official train split held out for validation, e.g. 0.1.")
    ordered = sorted(set(names))
    if len(ordered) < 2:
        raise ErnasError(f"The official train split holds {len(ordered)} image(s); at least 2 are "
                         f"needed to hold out a validation split from it.")
    n_val = min(max(1, round(fraction * len(ordered))), len(ordered) - 1)
    order = np.random.default_rng([int(seed), 1]).permutation(len(ordered))
    return {ordered[i] for i in order[:n_val]}


def official_split(files_of, root, split: str, max_side, fraction: float, seed: int
                   ) -> list[PairFiles]:
    """The task's ``split`` of an official set: train = official train minus the carved
    validation, val = the carved part, test = official val."""
    if split == "test":
        return files_of(root, "val", max_side)
    train = files_of(root, "train", max_side)
    held = carve_validation([p.name for p in train], fraction, seed)
    return [p for p in train if (p.name in held) == (split == "val")]
