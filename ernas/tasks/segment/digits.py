"""Embedded benchmark that needs shape: handwritten digits placed on real photographs.

The 1,797 real handwritten digits of scikit-learn's ``load_digits`` (8 x 8 grey, values 0..16)
are split by sample index: samples 0..1077 train, 1078..1437 val, 1438..1796 test, so no digit
drawing is in two splits. A scene is a 64 x 64 RGB crop of a bundled photo of the same split
(:mod:`ernas.data.images`, at most 256 pixels a side) whose contrast is scaled by a random
factor in [0.3, 1] around a random mean level, with 2 to 4 digits pasted on it:

* a digit is upscaled (bilinear) to a random side of 16 to 24 pixels, its stroke opacity
  ``a`` = the upscaled value / 16, and drawn as ``(1 - a)·scene + a·colour`` with a random RGB
  colour, so a digit's intensity and colour say nothing about its class;
* its label is ``1 + digit`` where ``a > 0.5`` (the stroke), background 0 elsewhere; digits are
  placed at least 2 pixels apart (fewer digits when 20 placements find no room).

Classes (:data:`DIGIT_CLASSES`): 0 background, 1..10 the digits 0..9. Sizes
(:data:`DIGIT_SPLIT_SIZES`): 512 train, 128 val, 128 test scenes. Scene ``i`` of ``split`` draws
from ``numpy.random.default_rng([seed, split_code, i])`` (split codes 0, 1, 2).
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import zoom

from ernas.data.images import bundled_images
from ernas.data.keyed import check_seed
from ernas.errors import ErnasError

DIGIT_CLASSES = ("background", *(f"digit_{d}" for d in range(10)))
DIGIT_SPLIT_SIZES = {"train": 512, "val": 128, "test": 128}
DIGIT_SCENE_SIZE = 64
DIGIT_SAMPLE_RANGES = {"train": range(0, 1078), "val": range(1078, 1438),
                       "test": range(1438, 1797)}

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_MIN_DIGITS, _MAX_DIGITS, _TRIES, _GAP = 2, 4, 20, 2
_MIN_SIDE, _MAX_SIDE = 16, 24


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 in [0, 1], targets N) of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=len(_SPLIT_CODES))
def _photos(split: str) -> tuple[np.ndarray, ...]:
    return tuple(img for _, img in bundled_images(split, color=True, max_side=256))


def _background(photos, rng: np.random.Generator, size: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    top = int(rng.integers(photo.shape[0] - size + 1))
    left = int(rng.integers(photo.shape[1] - size + 1))
    crop = photo[top:top + size, left:left + size]
    level, contrast = rng.uniform(0.2, 0.8), rng.uniform(0.3, 1.0)
    return np.clip(level + contrast * (crop - crop.mean()), 0.0, 1.0)


def _paste_digit(image, mask, taken, glyph: np.ndarray, label: int, rng) -> bool:
    """Draw one digit where it does not touch ``taken``; False when no room was found."""
    side = int(rng.integers(_MIN_SIDE, _MAX_SIDE + 1))
    alpha = np.clip(zoom(glyph, side / glyph.shape[0], order=1), 0.0, 1.0)
    stroke = alpha > 0.5
    size = mask.shape[0]
    for _ in range(_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
        window = (slice(top, top + side), slice(left, left + side))
        if (taken[window] & stroke).any():
            continue
        colour = rng.random(3, dtype=np.float32)
        a = alpha[..., None]
        image[window] = (1 - a) * image[window] + a * colour
        mask[window][stroke] = label
        lo, hi = max(top - _GAP, 0), max(left - _GAP, 0)
        taken[lo:top + side + _GAP, hi:left + side + _GAP] = True
        return True
    return False


def _scene(split: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    glyphs, targets = _digits()
    pool = DIGIT_SAMPLE_RANGES[split]
    image = _background(_photos(split), rng, size).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.int64)
    taken = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(_MIN_DIGITS, _MAX_DIGITS + 1))):
        k = pool[int(rng.integers(len(pool)))]
        _paste_digit(image, mask, taken, glyphs[k], 1 + int(targets[k]), rng)
    return image, mask


def digit_scenes(split: str, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, image 64 x 64 x 3, mask 64 x 64)]`` of ``split``; names ``digits_<split>_007``."""
    if split not in DIGIT_SPLIT_SIZES:
        raise ErnasError(f"Unknown digits data split {split!r}; use one of "
                         f"{', '.join(repr(s) for s in DIGIT_SPLIT_SIZES)}.")
    seed = check_seed(seed)
    out = []
    for i in range(DIGIT_SPLIT_SIZES[split]):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        image, mask = _scene(split, rng, DIGIT_SCENE_SIZE)
        out.append((f"digits_{split}_{i:03d}", image, mask))
    return out
