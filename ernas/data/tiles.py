"""Deterministic tiles of evaluation images, named so that the image stays recoverable.

A tile of image ``name`` whose top-left pixel is at row ``y``, column ``x`` is named
``name@y_x``; :func:`image_of` maps a tile name (or a whole image's name) back to the image, and
``ernas.data.images.bundled_scene`` maps a bundled image to its scene, so a per-image (or
per-scene) bootstrap can cluster the tiles of one image. The grid is a pure function of the
image size, the tile size and the stride: every run and machine cuts the same tiles.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ernas.errors import ErnasError

TILE_SEPARATOR = "@"


def tile_name(image: str, y: int, x: int) -> str:
    """``image@y_x``: the name of the tile of ``image`` whose top-left pixel is (y, x)."""
    return f"{image}{TILE_SEPARATOR}{int(y)}_{int(x)}"


def image_of(item_name: str) -> str:
    """The image a tile name (``image@y_x``) comes from; a name without a tile suffix is
    returned as it is (a whole image)."""
    image, sep, pos = str(item_name).rpartition(TILE_SEPARATOR)
    if not sep:
        return str(item_name)
    y, underscore, x = pos.partition("_")
    if not (underscore and y.isdigit() and x.isdigit()):
        return str(item_name)
    return image


def _check_positive(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ErnasError(f"{field}={value!r} is not valid: use a positive number of pixels "
                         f"(e.g. 128).")
    return int(value)


def tile_offsets(length: int, size: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` pixels, the grid centred so that the
    margins left over are split evenly (the later margin gets the odd pixel)."""
    count = (length - size) // stride + 1
    start = (length - (size + (count - 1) * stride)) // 2
    return [start + k * stride for k in range(count)]


def image_tiles(name: str, img: np.ndarray, size: int, stride: int | None = None
                ) -> list[tuple[str, np.ndarray]]:
    """``[(name@y_x, tile)]`` for the ``size`` x ``size`` tiles of an H x W (x C) image taken
    every ``stride`` pixels (default ``size``: non-overlapping), row by row.

    An image smaller than one tile is refused rather than silently dropped."""
    size = _check_positive(size, "tile size")
    stride = size if stride is None else _check_positive(stride, "tile stride")
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ErnasError(
            f"Image {name!r} is {h}x{w} pixels, smaller than the {size}x{size} evaluation tiles. "
            f"Use tiles of at most {min(h, w)} pixels, or evaluate whole images (tile: null).")
    return [(tile_name(name, y, x), img[y:y + size, x:x + size])
            for y in tile_offsets(h, size, stride) for x in tile_offsets(w, size, stride)]


def tiled(images: Sequence[tuple[str, np.ndarray]], size: int, stride: int | None = None
          ) -> list[tuple[str, np.ndarray]]:
    """The tiles of every image, image by image (see :func:`image_tiles`)."""
    return [tile for name, img in images for tile in image_tiles(name, img, size, stride)]


def stitched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, hw) -> torch.Tensor:
    """``fn`` applied to a whole 1 x C x H x W input through non-overlapping h x w tiles: the
    input is reflect-padded (replicate where a side is shorter than its padding) at the bottom
    and right to multiples of (h, w), each tile goes through ``fn`` on its own, and the outputs
    are stitched and cropped back to H x W (they may have another channel count, e.g. logits)."""
    h, w = (int(v) for v in hw)
    H, W = x.shape[-2:]
    ph, pw = (-H) % h, (-W) % w
    mode = "reflect" if ph < H and pw < W else "replicate"
    xp = F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x
    rows = [torch.cat([fn(xp[..., top:top + h, left:left + w])
                       for left in range(0, xp.shape[-1], w)], dim=-1)
            for top in range(0, xp.shape[-2], h)]
    return torch.cat(rows, dim=-2)[..., :H, :W]
