"""Embedded synthetic segmentation data: textured shapes pasted on real photographs.

Each item is a 96 x 96 RGB image: a random crop of a bundled photo (see :mod:`ernas.data.images`,
downscaled to at most 256 pixels a side) with 2 to 5 shapes pasted on it (fewer when 20 random
placements find no free room). A shape is filled with a crop of a bundled photo blended
half-and-half with a random solid colour, so it shows texture but stands out from the
background. Shapes lie wholly inside the image, at least 2 pixels apart, so every shape is a
connected region (8-connectivity) whose outline is its kind; they cover about 15 % of the pixels.

Classes (:data:`SHAPE_CLASSES`): 0 background, 1 rectangle (rotated, side ratio 0.5..1), 2 circle,
3 triangle (rotated, near equilateral), 4 ellipse (rotated, axis ratio 0.35..0.6).

Sizes (:data:`SHAPES_SPLIT_SIZES`): 256 train, 64 val, 64 test items. Item ``i`` of ``split`` is
drawn from ``numpy.random.default_rng([seed, split_code, i])`` (split codes 0, 1, 2), and uses
only the photos of its own split, so test pixels never appear in training.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import binary_dilation
from skimage.draw import disk, ellipse, polygon

from ernas.data.images import bundled_images
from ernas.data.keyed import check_seed
from ernas.errors import ErnasError

SHAPE_CLASSES = ("background", "rectangle", "circle", "triangle", "ellipse")
SHAPES_SPLIT_SIZES = {"train": 256, "val": 64, "test": 64}
SHAPES_IMAGE_SIZE = 96

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_PHOTO_SIDE = 256
_MIN_SHAPES, _MAX_SHAPES, _PLACEMENT_TRIES, _GAP = 2, 5, 20, 2


@functools.lru_cache(maxsize=len(_SPLIT_CODES))
def _photos(split: str) -> tuple[np.ndarray, ...]:
    return tuple(img for _, img in bundled_images(split, color=True, max_side=_PHOTO_SIDE))


def _crop(photos, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    top = int(rng.integers(photo.shape[0] - h + 1))
    left = int(rng.integers(photo.shape[1] - w + 1))
    return photo[top:top + h, left:left + w]


def _rotated(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, -s], [s, c]]).T


def _footprint(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean size x size mask of one shape of class ``kind``, wholly inside the image."""
    angle = rng.uniform(0, np.pi)
    if kind == 1:  # rectangle: half sides a >= b
        a = rng.uniform(9, 17)
        b = a * rng.uniform(0.5, 1.0)
        points, radius = np.array([[a, b], [-a, b], [-a, -b], [a, -b]]), np.hypot(a, b)
    elif kind == 3:  # triangle: vertices on a circle, 120 degrees +- 10 apart
        radius = rng.uniform(12, 20)
        angles = np.deg2rad([0, 120, 240] + rng.uniform(-10, 10, 3))
        points = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        radius = rng.uniform(8, 15) if kind == 2 else rng.uniform(11, 19)
    centre = rng.uniform(radius + 1, size - radius - 2, 2)
    out = np.zeros((size, size), dtype=bool)
    if kind == 2:
        out[disk(tuple(centre), radius, shape=out.shape)] = True
    elif kind == 4:
        minor = radius * rng.uniform(0.35, 0.6)
        out[ellipse(centre[0], centre[1], radius, minor, shape=out.shape, rotation=angle)] = True
    else:
        corners = _rotated(points, angle) + centre
        out[polygon(corners[:, 0], corners[:, 1], shape=out.shape)] = True
    return out


def _item(photos, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = _crop(photos, rng, size, size).copy()
    mask = np.zeros((size, size), dtype=np.int64)
    for _ in range(int(rng.integers(_MIN_SHAPES, _MAX_SHAPES + 1))):
        taken = binary_dilation(mask > 0, iterations=_GAP)
        for _ in range(_PLACEMENT_TRIES):
            kind = int(rng.integers(1, len(SHAPE_CLASSES)))
            footprint = _footprint(kind, rng, size)
            if not (footprint & taken).any():
                fill = 0.5 * _crop(photos, rng, size, size) + 0.5 * rng.random(3, dtype=np.float32)
                image[footprint] = fill[footprint]
                mask[footprint] = kind
                break
    return image, mask


def shape_samples(split: str, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, image 96 x 96 x 3, mask 96 x 96)]`` for ``split``; names ``shapes_<split>_007``."""
    if split not in SHAPES_SPLIT_SIZES:
        raise ErnasError(f"Unknown shapes data split {split!r}; use one of "
                         f"{', '.join(repr(s) for s in SHAPES_SPLIT_SIZES)}.")
    seed, photos = check_seed(seed), _photos(split)
    out = []
    for i in range(SHAPES_SPLIT_SIZES[split]):
        image, mask = _item(photos, np.random.default_rng([seed, _SPLIT_CODES[split], i]),
                            SHAPES_IMAGE_SIZE)
        out.append((f"shapes_{split}_{i:03d}", image.astype(np.float32), mask))
    return out
