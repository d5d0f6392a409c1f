"""Real photographs bundled with installed packages, and reading images from user folders.

Nothing here touches the network: every bundled image ships inside scikit-image, scikit-learn
or matplotlib. The split is fixed so that results are comparable between runs and machines.

| kind   | train                                                                     | val            | test                  |
|--------|---------------------------------------------------------------------------|----------------|-----------------------|
| colour | astronaut, rocket, hubble_deep_field, immunohistochemistry, retina, china | coffee, flower | chelsea, grace_hopper |
| grey   | camera, brick, grass, gravel, moon, clock                                 | coins          | page, text            |

Sources: ``skimage.data.<name>`` for the scikit-image names, ``sklearn.datasets.load_sample_image``
for ``china.jpg`` / ``flower.jpg``, ``matplotlib.cbook.get_sample_data('grace_hopper.jpg')``.

Test images are never used for architecture search or retraining: search uses train (weights)
and val (architecture / model selection); test is touched only by final evaluation.

Every loader returns float32 ``H x W x C`` arrays in [0, 1] (C = 3 for colour, 1 for grey).
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np

from ernas.errors import ErnasError

BUNDLED_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "train": ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "china"),
        "val": ("coffee", "flower"),
        "test": ("chelsea", "grace_hopper"),
    },
    "grey": {
        "train": ("camera", "brick", "grass", "gravel", "moon", "clock"),
        "val": ("coins",),
        "test": ("page", "text"),
    },
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_ALL_NAMES = {name: kind for kind, split in BUNDLED_SPLITS.items() for names in split.values()
              for name in names}


def bundled_names(split: str, color: bool = True) -> list[str]:
    """Names of the bundled images in ``split`` ('train', 'val' or 'test'), colour or grey."""
    kind = "color" if color else "grey"
    if split not in BUNDLED_SPLITS[kind]:
        raise ErnasError(
            f"Unknown bundled image split {split!r}. The bundled images are split into "
            f"{', '.join(repr(s) for s in BUNDLED_SPLITS[kind])}; pass one of those.")
    return list(BUNDLED_SPLITS[kind][split])


def _raw_bundled(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    if name == "grace_hopper":
        from matplotlib import cbook
        import skimage.io
        return skimage.io.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    import skimage.data
    return getattr(skimage.data, name)()


def _to_float01(arr: np.ndarray, source: str) -> np.ndarray:
    """Integer or float array -> float32 in [0, 1], HxWxC with the alpha channel dropped."""
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif arr.dtype == bool:
        out = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
    else:
        raise ErnasError(
            f"Image {source} has pixel type {arr.dtype}, which ernas does not read. Save it as "
            f"an 8-bit or 16-bit PNG/TIFF, or a JPEG.")
    if out.ndim == 2:
        out = out[..., None]
    if out.ndim != 3 or out.shape[2] not in (1, 2, 3, 4):
        raise ErnasError(
            f"Image {source} has shape {arr.shape}; expected H x W (grey) or H x W x 3/4 (colour). "
            f"Save it as an ordinary single-frame grey or RGB image.")
    if out.shape[2] in (2, 4):  # grey+alpha or RGBA: drop alpha
        out = out[..., :-1]
    return out


def _convert_color(img: np.ndarray, color: bool) -> np.ndarray:
    """Grey (HxWx1) <-> colour (HxWx3). Colour to grey uses skimage.color.rgb2gray (BT.709 luma)."""
    if color and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if not color and img.shape[2] == 3:
        from skimage.color import rgb2gray
        return rgb2gray(img).astype(np.float32)[..., None]
    return img


def _downscale(img: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(img.shape[:2]) <= max_side:
        return img
    from skimage.transform import rescale
    scale = max_side / max(img.shape[:2])
    out = rescale(img, scale, anti_aliasing=True, channel_axis=-1, preserve_range=True)
    # rounding inside rescale can leave the longer side one pixel over the limit
    out = out[:max_side, :max_side]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _check_max_side(max_side):
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise ErnasError(
            f"max_side={max_side!r} is not valid: give a positive integer (the longest image side "
            f"after downscaling, e.g. 512) or None to keep the original size.")


@functools.lru_cache(maxsize=64)
def _load_cached(name: str, max_side: int | None) -> np.ndarray:
    img = _downscale(_to_float01(np.asarray(_raw_bundled(name)), f"bundled:{name}"), max_side)
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def load_bundled(name: str, max_side: int | None = None) -> np.ndarray:
    """Load one bundled image as a float32 HxWxC array in [0, 1] (a fresh, writable copy).

    Colour images are HxWx3, grey ones HxWx1. With ``max_side`` the image is downscaled
    (``skimage.transform.rescale``, anti-aliased) so that its longer side is <= ``max_side``.
    """
    if name not in _ALL_NAMES:
        raise ErnasError(
            f"Unknown bundled image {name!r}. Bundled colour images: "
            f"{', '.join(n for n, k in _ALL_NAMES.items() if k == 'color')}; grey images: "
            f"{', '.join(n for n, k in _ALL_NAMES.items() if k == 'grey')}.")
    _check_max_side(max_side)
    return _load_cached(name, max_side).copy()


def bundled_images(split: str, color: bool = True,
                   max_side: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``[(name, image)]`` for every bundled image of ``split``, in the documented order."""
    return [(name, load_bundled(name, max_side)) for name in bundled_names(split, color)]


def read_image(path: str | os.PathLike, color: bool) -> np.ndarray:
    """Read an image file as float32 HxWxC in [0, 1] (C = 3 if ``color`` else 1).

    8-bit files are divided by 255, 16-bit files by 65535; alpha is dropped; grey files are
    repeated to three channels when ``color`` is True and colour files become luma otherwise.
    """
    import skimage.io
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # imageio warns while probing plugins on bad files
            warnings.simplefilter("ignore", DeprecationWarning)
            arr = np.asarray(skimage.io.imread(path))
    except Exception as exc:  # any decoder failure is a bad file for the user
        raise ErnasError(
            f"Could not read image file {path}: {type(exc).__name__}: {exc}. Check that it is a "
            f"valid {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} image (re-save it, or remove it "
            f"from the folder).") from None
    return _convert_color(_to_float01(arr, path), color)
