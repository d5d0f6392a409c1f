"""Paired comparisons with bootstrap intervals over test images and training seeds.

A network's scores are ``S[seed]`` = a vector over the test images (tiles of one image are
averaged first, so the image is the unit). The paired difference of networks A and B is

    Δ = mean_i ( S_A[s_A](i) − S_B[s_B](i) ),

estimated with every seed (mean over seeds of each side). Its interval resamples, B times, the
images with replacement (the same draw for both sides) and one training seed per side
uniformly, and takes the α/2 and 1 − α/2 percentiles of Δ*: a network trained with several seeds
brings its seed spread into every interval it is part of.

A comparison is ``above`` when the lower bound is > 0, ``below`` when the upper bound is < 0,
else a ``tie``. The α of each interval is the protocol's α divided by the number of comparisons
it makes (Bonferroni), so the family-wise error rate is at most α.

The scaled front at latency L: the hand-made networks (scaled variants and the reference) that
no other hand-made network beats on validation at lower measured latency, sorted by measured
latency; its score at L interpolates linearly, image by image, between the two front networks
around L (at the ends: the nearest front network).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Scores = dict  # seed -> np.ndarray over test images (one order for every network)


@dataclass
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``above``/``below`` when the interval excludes 0 on that side, ``tie`` when it holds
        0, ``not scored`` when a side has no finite score (a network that overflowed)."""
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return "not scored"
        return "above" if self.low > 0 else "below" if self.high < 0 else "tie"


def _seed_matrix(scores: Scores) -> np.ndarray:
    return np.stack([np.asarray(scores[s], dtype=np.float64) for s in sorted(scores)])


def paired_interval(a: Scores, b: Scores, alpha: float, samples: int, seed: int = 0
                    ) -> Interval:
    """Δ = A − B with its (1 − alpha) bootstrap interval (module docstring)."""
    A, B = _seed_matrix(a), _seed_matrix(b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"paired scores over {A.shape[1]} and {B.shape[1]} images")
    rng = np.random.default_rng(seed)
    n = A.shape[1]
    idx = rng.integers(0, n, size=(samples, n))
    sa = rng.integers(0, A.shape[0], size=samples)
    sb = rng.integers(0, B.shape[0], size=samples)
    diffs = (A[sa[:, None], idx] - B[sb[:, None], idx]).mean(axis=1)
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return Interval(float(A.mean() - B.mean()), float(low), float(high))


def seed_mean(scores: Scores) -> Scores:
    """One pseudo-seed holding the mean over training seeds, image by image: an interval of
    ``seed_mean(A)`` against ``seed_mean(B)`` resamples the test units alone. It is conditional
    on the trainings that ran (it covers neither another training run nor the mean over seeds);
    beside the judged interval it shows how much of the width the training seeds set."""
    return {0: _seed_matrix(scores).mean(axis=0)}


def mixture(parts: list[tuple[float, Scores]]) -> Scores:
    """Seed-wise weighted sum ``Σ w·S`` of networks over the union of their seeds; a network
    without a given seed enters that seed with its mean over its own seeds (for a network trained
    once: its one training), so ``seed_mean(mixture) = Σ w·seed_mean`` and no seed counts twice."""
    seeds = sorted(set().union(*(set(s) for _, s in parts)))
    means = [seed_mean(s)[0] for _, s in parts]
    return {seed: sum(w * (np.asarray(s[seed], np.float64) if seed in s else m)
                      for (w, s), m in zip(parts, means))
            for seed in seeds}


def mean_of(networks: list[Scores]) -> Scores:
    """The arm mean: image by image, the mean over networks (what the space gives)."""
    return mixture([(1.0 / len(networks), s) for s in networks])


def front(points: list[tuple[str, float, float]]) -> list[tuple[str, float]]:
    """``[(name, measured_ms)]`` of the networks on the front, by latency, from
    ``(name, measured_ms, validation score)``: each is better on validation than every faster
    one."""
    out, best = [], -np.inf
    for name, ms, val in sorted(points, key=lambda p: p[1]):
        if val > best:
            out.append((name, ms))
            best = val
    return out


def front_at(latency: float, front_pts: list[tuple[str, float]], scores: dict[str, Scores]
             ) -> tuple[Scores, str]:
    """The front's scores interpolated at ``latency`` and a phrase saying how."""
    names = [n for n, _ in front_pts]
    lats = [ms for _, ms in front_pts]
    if latency <= lats[0]:
        return scores[names[0]], f"{names[0]} (the fastest hand-made network)"
    if latency >= lats[-1]:
        return scores[names[-1]], f"{names[-1]} (the slowest on the front)"
    k = int(np.searchsorted(lats, latency))
    w = (latency - lats[k - 1]) / (lats[k] - lats[k - 1])
    return (mixture([(1 - w, scores[names[k - 1]]), (w, scores[names[k]])]),
            f"{1 - w:.2f}·{names[k - 1]} + {w:.2f}·{names[k]}")


def majority(verdicts: list[str]) -> str:
    """``above`` when more than half the targets are above, ``below`` likewise, ``not scored``
    likewise, else ``tie``."""
    n = len(verdicts)
    for v in ("above", "below", "not scored"):
        if sum(x == v for x in verdicts) * 2 > n:
            return v
    return "tie"
