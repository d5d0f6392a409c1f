"""Real photographs bundled with installed packages, and reading images from user folders.

Nothing here touches the network: every bundled image ships inside scikit-image, scikit-learn,
matplotlib or PyWavelets. The split is made at the *image* level (the two views of the stereo
motorcycle are one scene and share a split) and is fixed, so results are comparable between
runs and machines; ``docs/data.md`` lists it with sizes and the reasons for every exclusion.

| split | colour                                                   | grey                          |
|-------|----------------------------------------------------------|-------------------------------|
| train | hubble_deep_field, immunohistochemistry, retina, china   | camera, brick, grass, gravel, |
|       |                                                          | moon, clock, cell             |
| val   | chelsea, grace_hopper                                    | page, text, coins             |
| test  | motorcycle_left + motorcycle_right (one scene), coffee,  | ascent, aero                  |
|       | flower, rocket, astronaut                                |                               |

Both tasks use every image of a split: the colour task repeats a grey photo to three equal
channels, the grey task takes the BT.709 luma of a colour one. Test images are never used for
architecture search or retraining: search uses train (weights) and val (architecture / model
selection); test is touched only by final evaluation. The test images are ones that no earlier
tuning of ernas's defaults looked at.

Every loader returns float32 ``H x W x C`` arrays in [0, 1].
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ernas.errors import ErnasError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BundledImage:
    """One bundled photograph: its name, the package that ships it, its native kind
    ('color' or 'grey'), its split and its scene (images of one scene share a split)."""

    name: str
    package: str
    kind: str
    split: str
    scene: str = ""

    @property
    def scene_name(self) -> str:
        return self.scene or self.name


def _img(name, package, kind, split, scene=""):
    return BundledImage(name, package, kind, split, scene)


BUNDLED: tuple[BundledImage, ...] = (
    _img("hubble_deep_field", "scikit-image", "color", "train"),
    _img("immunohistochemistry", "scikit-image", "color", "train"),
    _img("retina", "scikit-image", "color", "train"),
    _img("china", "scikit-learn", "color", "train"),
    _img("camera", "scikit-image", "grey", "train"),
    _img("brick", "scikit-image", "grey", "train"),
    _img("grass", "scikit-image", "grey", "train"),
    _img("gravel", "scikit-image", "grey", "train"),
    _img("moon", "scikit-image", "grey", "train"),
    _img("clock", "scikit-image", "grey", "train"),
    _img("cell", "scikit-image", "grey", "train"),
    _img("chelsea", "scikit-image", "color", "val"),
    _img("grace_hopper", "matplotlib", "color", "val"),
    _img("page", "scikit-image", "grey", "val"),
    _img("text", "scikit-image", "grey", "val"),
    _img("coins", "scikit-image", "grey", "val"),
    _img("motorcycle_left", "scikit-image", "color", "test", "motorcycle"),
    _img("motorcycle_right", "scikit-image", "color", "test", "motorcycle"),
    _img("coffee", "scikit-image", "color", "test"),
    _img("flower", "scikit-learn", "color", "test"),
    _img("rocket", "scikit-image", "color", "test"),
    _img("astronaut", "scikit-image", "color", "test"),
    _img("ascent", "PyWavelets", "grey", "test"),
    _img("aero", "PyWavelets", "grey", "test"),
)

EXCLUDED: dict[str, str] = {
    "skimage.data.horse": "a binary silhouette (two grey levels), not a photograph",
    "skimage.data.phantom": "the synthetic Shepp-Logan phantom (six grey levels)",
    "skimage.data.checkerboard / chessboard": "a synthetic pattern (eight grey levels)",
    "skimage.data.colorwheel (color.png)": "a synthetic colour chart",
    "skimage.data.logo": "a drawn logo with transparency",
    "skimage.data.microaneurysms": "102x102 pixels, smaller than the 128-pixel validation crops "
                                   "(retrain val_crop) and evaluation tiles",
    "skimage.data.lfw_subset": "25x25 face thumbnails",
    "skimage.data multipage.tif, multipage_rgb.tif, no_time_for_that_tiny.gif":
        "tiny test files (at most 25x25 pixels)",
    "skimage.data (kidney, lily, cells3d, eagle, skin, brain, ...)": "not shipped: scikit-image "
        "downloads them on first use, and ernas never touches the network",
    "skimage.data.stereo_motorcycle disparity": "a disparity map, not an image (the two views "
                                                "are bundled as one scene)",
    "pywt.data.camera": "the same pixels as skimage.data.camera (deduplicated)",
    "pywt.data ecg, sst_nino3": "one-dimensional signals",
    "matplotlib sample_data Minduka_Present_Blue_Pack.png, logo2.png": "drawn clip-art and a logo",
    "matplotlib sample_data s1045.ima.gz": "a raw 16-bit MRI slice, not a photograph",
}

BUNDLED_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    kind: {split: tuple(i.name for i in BUNDLED if i.kind == kind and i.split == split)
           for split in SPLITS}
    for kind in ("color", "grey")
}
"""The split by native kind (the colour task uses both kinds; see :func:`bundled_names`)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_BY_NAME = {i.name: i for i in BUNDLED}
_ALL_NAMES = {i.name: i.kind for i in BUNDLED}
PYWAVELETS_REQUIREMENT = "PyWavelets>=1.4"


def bundled_names(split: str, color: bool = True) -> list[str]:
    """Names of the bundled images in ``split`` ('train', 'val' or 'test'), in the documented
    order. Both tasks use every image of a split, so ``color`` changes nothing; it is kept so
    that callers written for the earlier per-kind split still work."""
    del color
    if split not in SPLITS:
        raise ErnasError(
            f"Unknown bundled image split {split!r}. The bundled images are split into "
            f"{', '.join(repr(s) for s in SPLITS)}; pass one of those.")
    return [i.name for i in BUNDLED if i.split == split]


def bundled_info(name: str) -> BundledImage:
    """The catalogue entry of one bundled image (package, native kind, split, scene)."""
    _check_name(name)
    return _BY_NAME[name]


def bundled_scene(name: str) -> str:
    """The scene of a bundled image (the unit of independence: ``motorcycle`` for both stereo
    views); a name that is not bundled (a user's file) is its own scene."""
    return _BY_NAME[name].scene_name if name in _BY_NAME else name


def _raw_bundled(name: str) -> np.ndarray:
    package = _BY_NAME[name].package
    if package == "scikit-learn":
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    if package == "matplotlib":
        from matplotlib import cbook
        import skimage.io
        return skimage.io.imread(cbook.get_sample_data(f"{name}.jpg", asfileobj=False))
    if package == "PyWavelets":
        return _pywavelets_image(name)
    import skimage.data
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skimage.data, name)()


def _pywavelets_image(name: str) -> np.ndarray:
    try:
        import pywt.data
    except ImportError:
        raise ErnasError(
            f"Bundled image {name!r} ships with PyWavelets, which is not installed. Install it "
            f"with: pip install '{PYWAVELETS_REQUIREMENT}' (ernas lists it as a dependency).") \
            from None
    return getattr(pywt.data, name)()


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


@functools.lru_cache(maxsize=128)
def _load_cached(name: str, max_side: int | None) -> np.ndarray:
    img = _downscale(_to_float01(np.asarray(_raw_bundled(name)), f"bundled:{name}"), max_side)
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _check_name(name: str) -> None:
    if name not in _ALL_NAMES:
        raise ErnasError(
            f"Unknown bundled image {name!r}. Bundled colour images: "
            f"{', '.join(n for n, k in _ALL_NAMES.items() if k == 'color')}; grey images: "
            f"{', '.join(n for n, k in _ALL_NAMES.items() if k == 'grey')}.")


def load_bundled(name: str, max_side: int | None = None) -> np.ndarray:
    """Load one bundled image as a float32 HxWxC array in [0, 1] (a fresh, writable copy).

    Colour images are HxWx3, grey ones HxWx1 (as shipped). With ``max_side`` the image is
    downscaled (``skimage.transform.rescale``, anti-aliased) so that its longer side is
    <= ``max_side``.
    """
    _check_name(name)
    _check_max_side(max_side)
    return _load_cached(name, max_side).copy()


def bundled_images(split: str, color: bool = True,
                   max_side: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``[(name, image)]`` for every bundled image of ``split``, in the documented order, as
    HxWx3 when ``color`` (grey photos repeated to three equal channels) else HxWx1 (luma)."""
    return [(name, _convert_color(load_bundled(name, max_side), color))
            for name in bundled_names(split)]


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
