"""The search objective: task loss + latency term + scheduled entropy regulariser.

    total = task' + latency_term + w_H(step) · H̄(p)

with ``task' = task`` for the additive and hinge latency forms and ``task' = task·f^{sign(task)}``
(f = (E[LAT]/T)^β) for the multiplicative form. Every term is a torch scalar, differentiable in the
architecture probabilities through E[LAT] (``ExpectedLatency``) and H̄.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernas.errors import ErnasError


class LatencyLoss:
    """Latency term of E = E[LAT] (ms) against a target T (ms), r = E/T:

    - ``additive``:       λ·r
    - ``hinge``:          λ·max(0, r − 1)        (free below the target)
    - ``multiplicative``: the factor f = r^β (FBNet / ProxylessNAS); λ is not used. The factor
      is applied to the task loss by :class:`SearchObjective`.
    """

    FORMS = ("additive", "multiplicative", "hinge")

    def __init__(self, form: str = "additive", lam: float = 0.1, target_ms: float = 1.0,
                 beta: float = 0.6):
        if form not in self.FORMS:
            raise ErnasError(f"latency form {form!r} is not known; use one of "
                             f"{', '.join(self.FORMS)}.")
        if not (target_ms and target_ms > 0 and math.isfinite(target_ms)):
            raise ErnasError(f"latency target_ms={target_ms!r} must be a positive number of ms.")
        if lam < 0:
            raise ErnasError(f"latency weight lam={lam!r} must be non-negative.")
        self.form, self.lam, self.target_ms, self.beta = form, float(lam), float(target_ms), \
            float(beta)

    @property
    def multiplicative(self) -> bool:
        return self.form == "multiplicative"

    def __call__(self, expected_ms: torch.Tensor) -> torch.Tensor:
        """The additive/hinge term, or the multiplicative factor r^β."""
        r = torch.as_tensor(expected_ms) / self.target_ms
        if self.form == "additive":
            return self.lam * r
        if self.form == "hinge":
            return self.lam * torch.clamp(r - 1.0, min=0.0)
        return r.pow(self.beta)


def normalized_entropy(probs) -> torch.Tensor:
    """ERN-Net entropy regulariser H̄ = mean_d H(p_d)/log K_d over decisions with K_d > 1
    (H(p) = −Σ p log p): 1 for uniform distributions, 0 for one-hot ones.

    ``probs``: nested ``{position: {decision: tensor}}`` or an iterable of 1-D tensors."""
    if isinstance(probs, dict):
        probs = [p for dec in probs.values() for p in dec.values()]
    terms = [-(p * p.clamp_min(1e-30).log()).sum() / math.log(p.numel())
             for p in probs if p.numel() > 1]
    return torch.stack(terms).mean() if terms else torch.zeros(())


@dataclass
class EntropySchedule:
    """Entropy weight by step: 0 before ``warmup_steps``; then with t = (step − warmup)/ramp ∈
    [0, 1], ``linear``: max·t, ``cosine``: max·(1 − cos πt)/2; after the ramp, max."""

    max_weight: float = 0.0
    warmup_steps: int = 0
    ramp_steps: int = 0
    shape: str = "linear"

    def __post_init__(self):
        if self.shape not in ("linear", "cosine"):
            raise ErnasError(f"entropy schedule shape {self.shape!r} is not known; use 'linear' "
                             f"or 'cosine'.")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        t = 1.0 if self.ramp_steps <= 0 else min(1.0, (step - self.warmup_steps) / self.ramp_steps)
        if self.shape == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return self.max_weight * t

    weight = __call__


class SearchObjective:
    """total = task' + latency_term + w_H(step)·entropy (see the module docstring);
    ``task(pred, target)`` is the task's training loss (``Task.loss``)."""

    def __init__(self, task, latency: LatencyLoss | None = None,
                 entropy_schedule: EntropySchedule | None = None):
        self.task = task
        self.latency = latency
        self.entropy_schedule = entropy_schedule or EntropySchedule()

    def __call__(self, pred, target, expected_ms, entropy, step: int):
        """Returns ``(total, parts)``; parts are floats: task, latency (term, or factor for the
        multiplicative form), entropy, entropy_weight, expected_ms, total."""
        task = self.task(pred, target)
        total, lat = task, torch.zeros((), dtype=task.dtype, device=task.device)
        if self.latency is not None:
            lat = self.latency(expected_ms).to(task)
            if self.latency.multiplicative:
                total = torch.where(task >= 0, task * lat, task / lat)
            else:
                total = total + lat
        w = self.entropy_schedule(step)
        entropy = torch.as_tensor(entropy).to(task)
        if w:
            total = total + w * entropy
        parts = {k: float(torch.as_tensor(v).detach()) for k, v in (
            ("task", task), ("latency", lat), ("entropy", entropy), ("entropy_weight", w),
            ("expected_ms", expected_ms), ("total", total))}
        return total, parts
