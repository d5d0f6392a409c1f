"""Power of the denoising test split: the smallest paired PSNR difference it can resolve.

Two networks A and B are compared on the same test images (paired). Their estimated mean PSNR
difference varies for two reasons: which images the test set holds (between-scene SD
``s_image`` of the per-scene paired differences, over ``n`` independent scenes) and which
training seeds the networks got (SD ``s_seed`` of one network's mean test PSNR over training
seeds; A is trained with ``seeds_a`` seeds, B with ``seeds_b``, and each arm's seeds are
averaged). So

    SE = sqrt(s_image² / n + s_seed² / seeds_a + s_seed² / seeds_b)

and a two-sided test at level ``alpha / comparisons`` detects a true difference of

    MDD = (q(1 − alpha / (2·comparisons)) + q(power)) · SE

with probability ``power``; q is the normal quantile, or Student's t with n − 1 degrees of
freedom (the default, and the honest one for a handful of scenes).

``s_seed`` defaults to 0.065 dB: the seed SD of the reference NAFNet's test PSNR at σ 25
measured in earlier runs of this project (on the former test tiles). ``s_image`` comes from a
*proxy* that needs no training: pairs of classical denoisers (TV-Chambolle of two weights,
Gaussian filters of two widths, non-local means of two search windows) on the test split at
σ 25 with the task's own seeded test noise. Each pair's mean difference is of the size the
protocol must resolve (0.1-0.4 dB); the headline uses the largest of their SDs. Trained networks
of one family may differ more evenly across images than these filters do, so the proxy is an
estimate, not a measurement.

    python benchmarks/denoise_power.py                    # the figures in docs/data.md
    python benchmarks/denoise_power.py --s-seed 0.1 --seeds-a 1
    python benchmarks/denoise_power.py --s-image 0.2      # skip the proxy
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict

import numpy as np

PROXIES = {
    "tv_weight_0.08_vs_0.09": ("tv", 0.08, 0.09),
    "gaussian_sigma_1.0_vs_1.2": ("gaussian", 1.0, 1.2),
    "nlmeans_window_5_vs_7": ("nlmeans", 5, 7),
}


def standard_error(s_image: float, n_scenes: int, s_seed: float, seeds_a: int,
                   seeds_b: int) -> float:
    """SE of the mean paired difference over ``n_scenes`` scenes and averaged training seeds."""
    return math.sqrt(s_image ** 2 / n_scenes + s_seed ** 2 / seeds_a + s_seed ** 2 / seeds_b)


def min_detectable_difference(s_image: float, n_scenes: int, s_seed: float = 0.065,
                              seeds_a: int = 3, seeds_b: int = 3, alpha: float = 0.05,
                              power: float = 0.8, comparisons: int = 1,
                              dist: str = "t") -> float:
    """Smallest true paired difference (dB) that a two-sided test at ``alpha/comparisons``
    detects with probability ``power`` (see the module docstring)."""
    from scipy import stats

    if n_scenes < 2:
        raise ValueError(f"n_scenes={n_scenes}: a between-scene SD needs at least 2 scenes")
    q = stats.t(n_scenes - 1).ppf if dist == "t" else stats.norm.ppf
    se = standard_error(s_image, n_scenes, s_seed, seeds_a, seeds_b)
    return float((q(1 - alpha / (2 * comparisons)) + q(power)) * se)


def _denoise(kind: str, param, noisy: np.ndarray, sigma: float) -> np.ndarray:
    if kind == "tv":
        from skimage.restoration import denoise_tv_chambolle
        return denoise_tv_chambolle(noisy, weight=param, channel_axis=-1)
    if kind == "gaussian":
        from scipy.ndimage import gaussian_filter
        return gaussian_filter(noisy, (param, param, 0))
    from skimage.restoration import denoise_nl_means
    return denoise_nl_means(noisy, patch_size=5, patch_distance=param, h=0.8 * sigma / 255,
                            sigma=sigma / 255, fast_mode=True, channel_axis=-1)


def proxy_scene_differences(split: str = "test", sigma: float = 25.0,
                            max_side: int | None = None, proxies=PROXIES
                            ) -> dict[str, dict[str, float]]:
    """``{proxy: {scene: mean PSNR(first) − PSNR(second)}}`` on the colour task's images of
    ``split`` with its seeded evaluation noise (seed 0); the images of one scene are averaged."""
    from ernas.data.images import bundled_images, bundled_scene
    from ernas.tasks.denoise.data import NoisyImageDataset
    from ernas.tasks.denoise.metrics import psnr

    data = NoisyImageDataset(bundled_images(split, True, max_side), None, sigma, train=False,
                             seed=0)
    per_scene: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in proxies}
    for i in range(len(data)):
        item = data[i]
        noisy = item["input"].numpy().transpose(1, 2, 0)
        clean = item["target"].numpy().transpose(1, 2, 0)
        for label, (kind, first, second) in proxies.items():
            diff = (psnr(_denoise(kind, first, noisy, sigma), clean)
                    - psnr(_denoise(kind, second, noisy, sigma), clean))
            per_scene[label][bundled_scene(item["name"])].append(diff)
    return {p: {s: float(np.mean(v)) for s, v in scenes.items()}
            for p, scenes in per_scene.items()}


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a non-negative number of dB")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a probability strictly between 0 "
                                         f"and 1")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s-seed", type=_non_negative, default=0.065,
                    help="training-seed SD of a network's mean test PSNR, dB (default 0.065: "
                         "the reference NAFNet at σ 25, measured earlier)")
    ap.add_argument("--s-image", type=_non_negative, default=None,
                    help="between-scene SD of paired differences, dB (default: the proxy)")
    ap.add_argument("--seeds-a", type=_positive_int, default=3)
    ap.add_argument("--seeds-b", type=_positive_int, default=3)
    ap.add_argument("--alpha", type=_probability, default=0.05)
    ap.add_argument("--power", type=_probability, default=0.8)
    ap.add_argument("--comparisons", type=_positive_int, default=1,
                    help="Bonferroni: test each comparison at alpha / comparisons")
    ap.add_argument("--sigma", type=_non_negative, default=25.0, help="proxy noise level")
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--max-side", type=_positive_int, default=None,
                    help="downscale the images for a quick proxy run (default: whole images)")
    return ap.parse_args(argv)


def _proxy_s_image(a: argparse.Namespace, common: dict) -> float:
    """Print the proxy table (one row per pair of classical denoisers); the largest SD."""
    diffs = proxy_scene_differences(a.split, a.sigma, a.max_side)
    print(f"proxy at σ {a.sigma:g} (classical denoisers, not trained networks):")
    print("| proxy pair | mean diff (dB) | s_image (dB) | MDD normal (dB) | MDD t (dB) |")
    print("|---|---|---|---|---|")
    sds = []
    for label, per_scene in diffs.items():
        d = np.array(list(per_scene.values()))
        sds.append(float(d.std(ddof=1)))
        print(f"| {label} | {d.mean():+.3f} | {sds[-1]:.3f} | "
              f"{min_detectable_difference(sds[-1], dist='normal', **common):.3f} | "
              f"{min_detectable_difference(sds[-1], **common):.3f} |")
    print(f"s_image {max(sds):.3f} dB (the largest proxy SD)")
    return max(sds)


def main(argv=None) -> int:
    a = parse_args(argv)
    from ernas.data.images import bundled_names, bundled_scene

    n = len({bundled_scene(name) for name in bundled_names(a.split)})
    common = dict(n_scenes=n, s_seed=a.s_seed, seeds_a=a.seeds_a, seeds_b=a.seeds_b,
                  alpha=a.alpha, power=a.power, comparisons=a.comparisons)
    print(f"{a.split} split: {len(bundled_names(a.split))} images, {n} independent scenes; "
          f"s_seed {a.s_seed:.3f} dB, seeds {a.seeds_a} vs {a.seeds_b}, alpha {a.alpha:g}"
          f"{f' / {a.comparisons}' if a.comparisons > 1 else ''}, power {a.power:g}")
    s_image = a.s_image
    if s_image is None:
        s_image = _proxy_s_image(a, common)
    else:
        print(f"s_image {s_image:.3f} dB (given)")
    mdd, normal = (min_detectable_difference(s_image, dist=d, **common) for d in ("t", "normal"))
    print(f"smallest resolvable paired PSNR difference: {mdd:.3f} dB "
          f"(t, {n - 1} df; normal: {normal:.3f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
