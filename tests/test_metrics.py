import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from ernas.data import load_bundled
from ernas.errors import ErnasError
from ernas.complexity import count_macs, count_params, model_size_report
from ernas.tasks.denoise.metrics import psnr, ssim


def _img(h=32, w=40, c=3, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, (h, w, c)).astype(np.float64)


def test_psnr_identical_is_inf():
    a = _img()
    assert psnr(a, a) == math.inf


def test_psnr_known_value_numpy_and_torch():
    ref = _img()
    out = ref + 0.01
    assert psnr(out, ref) == pytest.approx(40.0, abs=1e-6)
    t_out = torch.from_numpy(out.transpose(2, 0, 1).copy()).float()
    t_ref = torch.from_numpy(ref.transpose(2, 0, 1).copy()).float()
    assert psnr(t_out, t_ref) == pytest.approx(40.0, abs=1e-3)
    assert psnr(t_out[None], t_ref[None]) == pytest.approx(40.0, abs=1e-3)
    assert psnr(out * 255, ref * 255, data_range=255) == pytest.approx(40.0, abs=1e-6)


def test_psnr_clips_restored_image_only():
    ref = np.full((16, 16, 1), 0.5)
    out = ref.copy()
    out[0, 0, 0] = 7.0  # clipped to 1.0 -> error 0.5 at one pixel
    mse = 0.5 ** 2 / 256
    assert psnr(out, ref) == pytest.approx(10 * math.log10(1 / mse))


def test_psnr_crop_border_hand_computation():
    ref = _img()
    out = ref.copy()
    out[:2] += 0.1  # error only in the top two rows
    out[2:] += 0.01
    inner = ((out - ref)[2:-2, 2:-2] * 255) ** 2
    expected = 10 * math.log10(255 ** 2 / inner.mean())
    assert psnr(out, ref, crop_border=2) == pytest.approx(expected)
    assert psnr(out, ref, crop_border=2) > psnr(out, ref) + 5


def test_psnr_y_channel_hand_computation():
    ref = _img()
    out = np.clip(ref + np.random.default_rng(1).normal(0, 0.05, ref.shape), 0, 1)

    def y(x):
        return 16 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]

    expected = 10 * math.log10(255 ** 2 / np.mean((y(out) - y(ref)) ** 2))
    assert psnr(out, ref, test_y_channel=True) == pytest.approx(expected)
    # BT.601 luma averages independent channel noise, so Y-PSNR is higher than RGB-PSNR
    assert psnr(out, ref, test_y_channel=True) > psnr(out, ref) + 1
    # grey images are used as they are
    g = ref[..., :1]
    assert psnr(g + 0.01, g, test_y_channel=True) == pytest.approx(40.0)


def test_ssim_self_is_one_and_matches_skimage_on_photo():
    ref = load_bundled("chelsea")[:128, :160]
    noisy = np.clip(ref + np.random.default_rng(0).normal(0, 0.1, ref.shape), 0, 1)
    assert ssim(ref, ref) == pytest.approx(1.0)
    expected = structural_similarity(noisy * 255.0, ref * 255.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255, channel_axis=-1)
    value = ssim(noisy, ref)
    assert value == pytest.approx(expected, abs=1e-6) and 0.2 < value < 0.9
    t = torch.from_numpy(noisy.transpose(2, 0, 1).copy())
    r = torch.from_numpy(ref.transpose(2, 0, 1).copy())
    assert ssim(t, r) == pytest.approx(expected, abs=1e-5)
    assert ssim(noisy, ref, test_y_channel=True) > value  # luma averages channel noise
    grey = load_bundled("coins")[:64, :64]
    assert ssim(grey, grey, crop_border=4) == pytest.approx(1.0)


def test_ssim_matches_wang_formula_by_hand():
    """Wang et al. with an 11x11 Gaussian (sigma 1.5) over the 'valid' region, channel mean."""
    from scipy.signal import convolve2d

    ref = load_bundled("chelsea")[:60, :70].astype(np.float64)
    out = np.clip(ref + np.random.default_rng(2).normal(0, 0.08, ref.shape), 0, 1)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g, g) / g.sum() ** 2

    def one(a, b):
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        f = lambda x: convolve2d(x, win, mode="valid")  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        return np.mean((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))

    expected = np.mean([one(out[..., c] * 255, ref[..., c] * 255) for c in range(3)])
    assert ssim(out, ref) == pytest.approx(expected, abs=1e-6)


def test_metric_input_errors():
    with pytest.raises(ErnasError, match="shape"):
        psnr(_img(8, 8), _img(8, 9))
    with pytest.raises(ErnasError, match="crop_border"):
        psnr(_img(8, 8), _img(8, 8), crop_border=4)
    with pytest.raises(ErnasError, match="11x11"):
        ssim(_img(8, 8), _img(8, 8))


# --------------------------------------------------------------------------- model size

class _Gate(nn.Module):
    """SimpleGate-like: one multiply per output element, reported through extra_macs."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * b

    def extra_macs(self, inputs, output):
        return output.numel()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gate = _Gate()
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.gate(self.conv(x)))


def test_macs_conv_depthwise_linear_by_hand():
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    assert count_macs(conv, (2, 3, 32, 32)) == 2 * 16 * 3 * 3 * 3 * 16 * 16
    dw = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
    assert count_macs(dw, (1, 8, 10, 12)) == 8 * 1 * 5 * 5 * 10 * 12
    pw = nn.Conv2d(8, 4, 1)
    assert count_macs(pw, (1, 8, 10, 12)) == 4 * 8 * 10 * 12
    lin = nn.Linear(10, 7)
    assert count_macs(lin, (5, 10)) == 5 * 10 * 7
    up = nn.ConvTranspose2d(6, 4, 2, stride=2)
    assert count_macs(up, (1, 6, 5, 5)) == 6 * 5 * 5 * 4 * 2 * 2


def test_macs_extra_macs_and_nesting():
    block = _Block().train()
    before = block.norm.running_mean.clone()
    macs = count_macs(block, (1, 4, 6, 6))
    conv = 8 * 4 * 3 * 3 * 6 * 6
    gate = 4 * 6 * 6
    assert macs == conv + gate  # BatchNorm counts 0, nothing counted twice
    assert block.training and torch.equal(block.norm.running_mean, before)
    twice = nn.Sequential(block, nn.Conv2d(4, 4, 1))
    assert count_macs(twice, (1, 4, 6, 6)) == conv + gate + 4 * 4 * 6 * 6


def test_count_params_and_report():
    block = _Block()
    expected = sum(p.numel() for p in block.parameters())
    assert count_params(block) == expected == (8 * 4 * 9 + 8) + 2 * 4
    block.conv.weight.requires_grad_(False)
    assert count_params(block) == expected  # frozen parameters still count
    rep = model_size_report(block, (1, 4, 6, 6))
    assert rep == {"params": expected, "macs": 8 * 4 * 9 * 36 + 4 * 36,
                   "gmacs": (8 * 4 * 9 * 36 + 4 * 36) / 1e9}
