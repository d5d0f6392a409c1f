"""Image quality (PSNR, SSIM) following BasicSR.

Quality metrics take the restored image first and the reference second, each as a numpy
H x W x C (or H x W) array or a torch C x H x W / 1 x C x H x W tensor, float in [0, data_range].
Both are scaled to [0, 255] float64. As BasicSR clips the network output to [0, 1] before saving
it, the restored image is clipped to [0, data_range]; the reference is used as given. Unlike
BasicSR's ``tensor2img`` the values are not rounded to uint8.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ernas.errors import ErnasError

# BasicSR / ITU-R BT.601: Y in [16, 235] from RGB in [0, 1].
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


def _to_hwc(img, what: str) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        arr = img.detach().cpu().double().numpy()
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise ErnasError(f"{what} has batch size {arr.shape[0]}; metrics take one image "
                                 f"(1 x C x H x W). Loop over the batch.")
            arr = arr[0]
        if arr.ndim == 3:
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ErnasError(f"{what} has shape {tuple(np.shape(img))}; expected a numpy H x W x C "
                         f"array or a torch C x H x W tensor.")
    return arr


def _prepare(img, ref, crop_border: int, test_y_channel: bool, data_range: float):
    """Both images as float64 H x W x C in [0, 255], cropped and (optionally) as Y."""
    a, b = _to_hwc(img, "The restored image"), _to_hwc(ref, "The reference image")
    if a.shape != b.shape:
        raise ErnasError(f"Image shapes differ: restored {a.shape} vs reference {b.shape} "
                         f"(H x W x C). Compare images of the same size and channel count.")
    if not data_range > 0:
        raise ErnasError(f"data_range={data_range!r} must be positive (1.0 for [0, 1] images, "
                         f"255 for [0, 255]).")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) \
            or crop_border < 0 or 2 * crop_border >= min(a.shape[:2]):
        raise ErnasError(f"crop_border={crop_border!r} is not valid for a {a.shape[0]}x"
                         f"{a.shape[1]} image: use a non-negative integer smaller than half the "
                         f"shorter side.")
    a = np.clip(a, 0.0, data_range) * (255.0 / data_range)
    b = b * (255.0 / data_range)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel and a.shape[2] == 3:
        a, b = (16.0 + (x / 255.0) @ _Y_WEIGHTS for x in (a, b))
        a, b = a[..., None], b[..., None]
    return a, b


def psnr(img, ref, crop_border: int = 0, test_y_channel: bool = False,
         data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10·log10(255² / MSE)`` on [0, 255] float64 images.

    ``img`` (restored; clipped to [0, data_range]) and ``ref`` (reference) are in
    [0, data_range]. ``crop_border`` pixels are removed from each side; ``test_y_channel``
    compares only the BT.601 luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (RGB in [0, 1])
    of 3-channel images. Identical images give ``float('inf')``.
    (``skimage.metrics.peak_signal_noise_ratio`` with ``data_range=255``.)
    """
    from skimage.metrics import peak_signal_noise_ratio
    a, b = _prepare(img, ref, crop_border, test_y_channel, data_range)
    if np.mean((a - b) ** 2) == 0:
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def ssim(img, ref, crop_border: int = 0, test_y_channel: bool = False,
         data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004) as BasicSR computes it, on [0, 255] float64.

    11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances, the
    5-pixel border of the SSIM map excluded, mean over the map and then over channels:
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)``. Inputs, clipping, ``crop_border`` and
    ``test_y_channel`` as in :func:`psnr`. Images must be at least 11x11 after cropping.
    """
    from skimage.metrics import structural_similarity
    a, b = _prepare(img, ref, crop_border, test_y_channel, data_range)
    if min(a.shape[:2]) < 11:
        raise ErnasError(f"SSIM needs images of at least 11x11 pixels after crop_border; got "
                         f"{a.shape[0]}x{a.shape[1]}. Use a larger image or a smaller crop_border.")
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    if a.shape[2] == 1:
        return float(structural_similarity(a[..., 0], b[..., 0], **kwargs))
    return float(structural_similarity(a, b, channel_axis=-1, **kwargs))
