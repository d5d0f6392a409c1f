"""Embedded real segmentation data: brain tissue in axial slices of the MNI152 template.

Source: the ICBM 2009a symmetric MNI152 template that the ``nilearn`` wheel ships as data files,
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (197 x 233 x 189
voxels of 1 mm, RAS, uint8 0..255; the T1 is skull-stripped, ``gm``/``wm`` are tissue probability
maps scaled to 0..255). They are read with ``nibabel``; nothing is downloaded and ``nilearn`` is
never imported.

* Input: the T1 slice divided by 255 (1 channel, [0, 1]).
* Labels, from the probability maps after the in-plane downsampling (block means):
  ``label = argmax([max(255 - gm - wm, 0), gm, wm])``, ties going to the lower class, i.e.
  0 background/other (outside the brain, CSF), 1 grey matter, 2 white matter.
* Slices: axial (fixed z), shown with anterior at the top, cropped in-plane to the box x 18..177,
  y 22..213 (192 x 160 pixels; the brain spans x 27..169, y 28..207), then downsampled by block
  means with ``downsample`` 1, 2 (default: 96 x 80 slices), 4 or 8.
* Split (voxel z indices; MNI z in mm = index - 72): interleaved contiguous slabs, 6 slices
  apart from any slab of another split (adjacent slices are near copies), so every split spans
  the brain from the cerebellum to the vertex: train z 14..33, 54..73, 96..115 (60 slices), val
  40..47, 122..129 (16), test 80..89, 136..146 (21). Slices outside 14..146 have grey + white
  matter on under 5 % of the slice (almost no brain) and are not used.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from ernas.errors import ErnasError

BRAIN_CLASSES = ("background", "grey_matter", "white_matter")
BRAIN_SLABS = {"train": (range(14, 34), range(54, 74), range(96, 116)),
               "val": (range(40, 48), range(122, 130)),
               "test": (range(80, 90), range(136, 147))}
BRAIN_DOWNSAMPLES = (1, 2, 4, 8)

_CROP_X, _CROP_Y = slice(18, 178), slice(22, 214)
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_INSTALL = "Install them with: pip install nilearn nibabel"


def _template_path(kind: str) -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ErnasError(f"The brain segmentation data comes from the MNI152 template shipped "
                         f"with the nilearn package, which is not installed. {_INSTALL}.")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / _FILE.format(kind)
    if not path.is_file():
        raise ErnasError(f"The MNI152 template file {path} is missing from the installed nilearn "
                         f"package. Reinstall it: pip install --force-reinstall nilearn nibabel.")
    return path


@functools.lru_cache(maxsize=None)
def _volume(kind: str) -> np.ndarray:
    """One template volume as float32 (Y, X, Z): anterior first, cropped in-plane."""
    try:
        import nibabel
    except ImportError:
        raise ErnasError(f"Reading the brain segmentation data needs nibabel, which is not "
                         f"installed. {_INSTALL}.") from None
    path = _template_path(kind)
    try:
        data = np.asarray(nibabel.load(path).dataobj, dtype=np.float32)
    except Exception as exc:
        raise ErnasError(f"Could not read the MNI152 template file {path}: {type(exc).__name__}: "
                         f"{exc}. Reinstall nilearn: pip install --force-reinstall nilearn.") \
            from None
    return np.ascontiguousarray(np.rot90(data[_CROP_X, _CROP_Y], axes=(0, 1)))


def _block_mean(vol: np.ndarray, factor: int) -> np.ndarray:
    h, w, z = vol.shape
    return vol.reshape(h // factor, factor, w // factor, factor, z).mean(axis=(1, 3))


@functools.lru_cache(maxsize=len(BRAIN_DOWNSAMPLES))
def _labelled(downsample: int) -> tuple[np.ndarray, np.ndarray]:
    """(T1 in [0, 1], labels) volumes of shape (H, W, Z) at ``downsample``; read-only."""
    t1, gm, wm = (_block_mean(_volume(kind), downsample) for kind in ("t1", "gm", "wm"))
    labels = np.argmax(np.stack([np.maximum(255.0 - gm - wm, 0.0), gm, wm]), axis=0)
    t1 = np.clip(t1 / 255.0, 0.0, 1.0).astype(np.float32)
    labels = labels.astype(np.int64)
    for arr in (t1, labels):
        arr.setflags(write=False)
    return t1, labels


def _check_downsample(downsample) -> int:
    if isinstance(downsample, bool) or downsample not in BRAIN_DOWNSAMPLES:
        raise ErnasError(f"downsample={downsample!r} is not valid for the brain data: use one of "
                         f"{', '.join(map(str, BRAIN_DOWNSAMPLES))} (slices of 192x160 pixels "
                         f"divided by it; 2 is the default).")
    return int(downsample)


def brain_slices(split: str, downsample: int = 2) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, image H x W x 1, labels H x W)]`` for the slices of ``split``; names ``z014``."""
    if split not in BRAIN_SLABS:
        raise ErnasError(f"Unknown brain data split {split!r}; use one of "
                         f"{', '.join(repr(s) for s in BRAIN_SLABS)}.")
    t1, labels = _labelled(_check_downsample(downsample))
    return [(f"z{z:03d}", t1[:, :, z, None].copy(), labels[:, :, z].copy())
            for slab in BRAIN_SLABS[split] for z in slab]
