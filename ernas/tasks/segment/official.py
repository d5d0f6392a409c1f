"""Pascal VOC and Cityscapes readers (lazy file pairs) and the held-out validation split.

* :func:`voc_files` -- Pascal VOC: ``ROOT/JPEGImages/<stem>.jpg``,
  ``ROOT/SegmentationClass/<stem>.png`` (palette PNGs whose indices are the 21 class ids, 255 =
  object border, kept as ignore) and ``ROOT/ImageSets/Segmentation/<split>.txt`` (one stem a line).
* :func:`cityscapes_files` -- Cityscapes: ``ROOT/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``
  with ``ROOT/gtFine/<split>/<city>/<id>_gtFine_labelIds.png``; label ids become the 19 standard
  train ids (:data:`CITYSCAPES_TRAIN_IDS`), every other id becomes 255.

* :func:`sbd_files` -- the Semantic Boundaries Dataset (SBD, Hariharan et al. 2011), extra
  training data for VOC: ``SBD_ROOT/dataset/img/<id>.jpg``, ``SBD_ROOT/dataset/cls/<id>.mat`` (a
  MATLAB struct ``GTcls`` whose ``Segmentation`` field is the H x W map of the 21 VOC class ids)
  and ``SBD_ROOT/dataset/{train,val}.txt``; its ids are VOC image ids.

All return :class:`~ernas.tasks.segment.data.PairFiles` after checking that every listed file
exists; pixels are decoded only when a dataset item is read (``*_samples`` read them all now).

Neither set has public test labels, so the task uses the official ``val`` split as its test set
only, and carves its validation set (model selection, α steps) from the official ``train`` split
with :func:`carve_validation`: a fixed fraction drawn by a seeded permutation of the sorted
names, so no file is in two splits. SBD images join the training split only
(:func:`add_extra_training`): those in VOC's official val (the test set) or in the carved
validation are left out (SBD's own train/val lists ignore VOC's split), and those already in VOC
train are taken once, with VOC's mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ernas.data.images import read_image
from ernas.errors import ErnasError
from ernas.tasks.segment.data import (IGNORE_INDEX, PairFiles, Sample, _check_mask_size,
                                      _check_mask_values, _check_max_side, _check_split,
                                      _downscale_pair, _existing_dir, _show)

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


# --------------------------------------------------------------------------- SBD

SBD_SPLIT_LISTS = ("train", "val")
_SBD_LAYOUT = ("The SBD layout (the benchmark_RELEASE folder of the Semantic Boundaries Dataset) "
               "is SBD_ROOT/dataset/img/<id>.jpg, SBD_ROOT/dataset/cls/<id>.mat (MATLAB struct "
               "GTcls with field Segmentation) and SBD_ROOT/dataset/train.txt and val.txt; set "
               "task.sbd_root to the folder that holds dataset/ (or to dataset/ itself), or to "
               "null to train on VOC alone.")


def read_sbd_mask(path) -> np.ndarray:
    """The class map of an SBD ``cls/<id>.mat`` file, ``GTcls.Segmentation``, as int64 H x W."""
    from scipy.io import loadmat

    try:
        mask = np.asarray(loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
                          .Segmentation)
    except Exception as exc:  # any decoder failure or missing field is a bad file for the user
        raise ErnasError(f"Could not read the SBD class map of {path} ({type(exc).__name__}: "
                         f"{exc}): an SBD cls/<id>.mat file holds a MATLAB struct GTcls whose "
                         f"Segmentation field is the H x W class-id map. Restore the file from "
                         f"the SBD release, or remove its id from train.txt/val.txt.") from None
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ErnasError(f"GTcls.Segmentation in {path} is a {mask.dtype} array of shape "
                         f"{mask.shape}, not an H x W map of integer class ids. Restore the file "
                         f"from the SBD release.")
    return mask.astype(np.int64)


@dataclass(frozen=True)
class SbdPairFiles(PairFiles):
    """An SBD image and its ``.mat`` class map, read and checked by :meth:`load`."""

    def load(self) -> Sample:
        image, mask = read_image(self.image, self.color), read_sbd_mask(self.mask)
        _check_mask_size(image.shape, mask.shape, str(self.image), f"{self.mask} ")
        _check_mask_values(mask, self.num_classes, str(self.mask))
        return (self.name, *_downscale_pair(image, mask, self.max_side))


def _sbd_dataset_dir(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ErnasError(f"task.sbd_root={str(root)!r} is not an existing folder (relative paths "
                         f"are resolved from {Path.cwd()}). {_SBD_LAYOUT}")
    for folder in (root / "dataset", root):
        if (folder / "img").is_dir() and (folder / "cls").is_dir():
            return folder
    raise ErnasError(f"task.sbd_root={str(root)!r} holds neither dataset/img and dataset/cls nor "
                     f"img and cls. {_SBD_LAYOUT}")


def sbd_files(root, max_side: int | None = None) -> list[SbdPairFiles]:
    """Every SBD image listed in ``train.txt`` then ``val.txt`` (each id once), files checked to
    exist, not read."""
    _check_max_side(max_side)
    folder = _sbd_dataset_dir(root)
    ids: dict[str, None] = {}
    for split in SBD_SPLIT_LISTS:
        listing = folder / f"{split}.txt"
        if not listing.is_file():
            raise ErnasError(f"task.sbd_root: the SBD split list {listing} does not exist. "
                             f"{_SBD_LAYOUT}")
        ids.update(dict.fromkeys(line.strip() for line in listing.read_text().splitlines()
                                 if line.strip()))
    if not ids:
        raise ErnasError(f"task.sbd_root: the SBD split lists in {folder} name no image. "
                         f"{_SBD_LAYOUT}")
    pairs = [SbdPairFiles(i, folder / "img" / f"{i}.jpg", folder / "cls" / f"{i}.mat",
                          len(VOC_CLASSES), True, max_side) for i in ids]
    for role in ("image", "mask"):
        missing = [getattr(p, role) for p in pairs if not getattr(p, role).is_file()]
        if missing:
            raise ErnasError(f"task.sbd_root: {len(missing)} {role} files of ids listed in "
                             f"{folder}/train.txt or val.txt are missing: {_show(missing)}. "
                             f"Restore them from the SBD release or remove their ids from the "
                             f"lists. {_SBD_LAYOUT}")
    return pairs


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


def add_extra_training(train: list[PairFiles], extra: list[PairFiles], excluded: set[str]
                       ) -> tuple[list[PairFiles], dict[str, int]]:
    """``train`` followed by the ``extra`` pairs whose name is neither in ``excluded`` (the
    validation and test names) nor in ``train`` (taken once: the official pair wins), and the
    counts: ``official_train``, ``extra_listed``, ``extra_added``, ``extra_in_val_or_test``,
    ``extra_in_train``."""
    have = {p.name for p in train}
    held_out = [p for p in extra if p.name in excluded]
    twice = [p for p in extra if p.name not in excluded and p.name in have]
    added = [p for p in extra if p.name not in excluded and p.name not in have]
    return train + added, {"official_train": len(train), "extra_listed": len(extra),
                           "extra_added": len(added), "extra_in_val_or_test": len(held_out),
                           "extra_in_train": len(twice)}
