"""Image quality (PSNR, SSIM) following BasicSR, and model size (parameters, MACs).

Quality metrics take the restored image first and the reference second, each as a numpy
H x W x C (or H x W) array or a torch C x H x W / 1 x C x H x W tensor, float in [0, data_range].
Both are scaled to [0, 255] float64. As BasicSR clips the network output to [0, 1] before saving
it, the restored image is clipped to [0, data_range]; the reference is used as given. Unlike
BasicSR's ``tensor2img`` the values are not rounded to uint8.

MAC convention (one number for every model in ernas): multiply-accumulates of ``nn.Conv2d``,
``nn.ConvTranspose2d`` and ``nn.Linear`` (bias adds not counted), plus whatever a module reports
through an ``extra_macs(inputs, output) -> int`` method. Normalisation, pooling, additions and
activations count 0: their cost is left to the latency table, which is the point of
hardware-aware search.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

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


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen; buffers such as BN statistics excluded).
    A parameter shared between modules is counted once."""
    return sum(p.numel() for p in model.parameters())


def _builtin_macs(module: nn.Module, inputs: tuple, output) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.ConvTranspose2d):
        kh, kw = module.kernel_size
        return inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 256, 256)) -> int:
    """Multiply-accumulates of one forward pass on a zeros input of ``input_shape``.

    Counted with forward hooks on a real pass (``torch.no_grad``, model temporarily in eval
    mode, so BatchNorm statistics are untouched):

    - ``nn.Conv2d``: ``N·Cout·Hout·Wout · (Cin/groups)·kh·kw`` (depthwise and 1x1 by the same rule);
    - ``nn.ConvTranspose2d``: ``N·Cin·Hin·Win · (Cout/groups)·kh·kw``;
    - ``nn.Linear``: ``(output elements) · in_features``;
    - any module with a method ``extra_macs(self, inputs: tuple, output) -> int``: its result
      (e.g. SimpleGate's one multiply per output element, channel attention's rescale product);
      its own convs are still counted by the conv rule.

    The built-in rules apply to leaf modules only, so nothing is counted twice; a module called
    several times is counted every time. Bias adds, normalisation (LayerNorm, BatchNorm),
    pooling, additions and activations count 0 MACs: their cost is left to the latency table.
    """
    counts = []

    def hook(module, inputs, output):
        n = 0
        if not any(True for _ in module.children()):
            n += _builtin_macs(module, inputs, output)
        extra = getattr(module, "extra_macs", None)
        if callable(extra):
            n += int(extra(inputs, output))
        counts.append(n)

    param = next(model.parameters(), None)
    x = torch.zeros(tuple(input_shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(sum(counts))


def model_size_report(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 256, 256)) -> dict:
    """``{"params": int, "macs": int, "gmacs": float}`` (MACs as in :func:`count_macs`)."""
    macs = count_macs(model, input_shape)
    return {"params": count_params(model), "macs": macs, "gmacs": macs / 1e9}
