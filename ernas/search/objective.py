"""The search objective: task loss, latency term and scheduled entropy regulariser.

With E = E[LAT] (ms, ``ExpectedLatency``), a target T (ms) and r = E/T:

    additive:        total = L + λ·r                   + w_H(step)·H
    hinge:           total = L + λ·max(0, r − 1)       + w_H(step)·H
    band:            total = L + λ·|r − 1|             + w_H(step)·H
    multiplicative:  total = L·r^β                     + w_H(step)·H   (L > 0: CE+Dice, L1, MSE)
                     total = L + s·β·ln r              + w_H(step)·H   (L = s·ln e, e > 0)

The multiplicative form (FBNet, MnasNet) multiplies a *positive* loss by r^β, so in log space
ln L + β·ln r: its strength relative to the task term does not depend on the loss's scale. A task
whose loss is a log of a positive error (``Task.loss_log_scale`` = s: NAFNet's PSNR loss
L = (10/ln 10)·ln MSE, i.e. −PSNR in dB) gets the same factor on its error, e·r^β, which is
L + s·β·ln r: halving the latency is worth s·β·ln 2 dB (β = 0.1: 0.30 dB) at every noise level and
PSNR. (Dividing the negative PSNR loss by r^β would make that worth |L|·(1 − 2^−β): ~12 dB at
−25 dB and β = 0.6, and weaker on easier data.) The additive form on a log loss is likewise
offset-free: λ dB per unit of r.

The hinge only caps the latency: below T it is free, so where the task loss does not pull
towards larger networks (a supernet's α rewards skips that its weights have absorbed) the derived
latency is set by the search seed, not by T. The band also pulls an E below T up to it, at the
same λ per unit of r, so the search spends the whole budget: "the best network at T ms". It binds
E, not the derived argmax network, which lands near T (docs/results/search.md).

H = Σ_d H(p_d)/ln K_d (:func:`normalized_entropy`) sums the normalised entropy over the decisions
with K_d > 1 candidates, so the pull w_H·∂H/∂α_d on one decision is the same in a space of 24
decisions as in one of 144 (a mean would dilute it by the number of decisions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ernas.errors import ErnasError


class LatencyLoss:
    """Latency term of E (ms) against ``target_ms`` (module docstring): ``additive``/``hinge``/
    ``band`` return λ·r / λ·max(0, r − 1) / λ·|r − 1|; ``multiplicative`` returns ln r, weighted
    by β in :class:`SearchObjective` (λ is not used)."""

    FORMS = ("additive", "multiplicative", "hinge", "band")

    def __init__(self, form: str = "additive", lam: float = 0.1, target_ms: float = 1.0,
                 beta: float = 0.1):
        if form not in self.FORMS:
            raise ErnasError(f"latency form {form!r} is not known; use one of "
                             f"{', '.join(self.FORMS)}.")
        if not (target_ms and target_ms > 0 and math.isfinite(target_ms)):
            raise ErnasError(f"latency target_ms={target_ms!r} must be a positive number of ms.")
        if lam < 0 or beta < 0:
            raise ErnasError(f"latency weights lam={lam!r} and beta={beta!r} must be "
                             f"non-negative.")
        self.form, self.lam, self.target_ms, self.beta = form, float(lam), float(target_ms), \
            float(beta)

    @property
    def multiplicative(self) -> bool:
        return self.form == "multiplicative"

    def __call__(self, expected_ms: torch.Tensor) -> torch.Tensor:
        r = torch.as_tensor(expected_ms) / self.target_ms
        if self.form == "additive":
            return self.lam * r
        if self.form == "hinge":
            return self.lam * torch.clamp(r - 1.0, min=0.0)
        if self.form == "band":
            return self.lam * torch.abs(r - 1.0)
        return torch.log(r)


def normalized_entropy(probs) -> torch.Tensor:
    """H = Σ_d H(p_d)/ln K_d over decisions with K_d > 1 (H(p) = −Σ p ln p): the number of such
    decisions for uniform distributions, 0 for one-hot ones.

    ``probs``: nested ``{position: {decision: tensor}}`` or an iterable of 1-D tensors."""
    if isinstance(probs, dict):
        probs = [p for dec in probs.values() for p in dec.values()]
    terms = [-(p * p.clamp_min(1e-30).log()).sum() / math.log(p.numel())
             for p in probs if p.numel() > 1]
    return torch.stack(terms).sum() if terms else torch.zeros(())


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


class SearchObjective:
    """total = task' + latency + w_H(step)·H (module docstring). ``task(pred, target)`` is the
    task's training loss (``Task.loss``) and ``log_scale`` its ``Task.loss_log_scale`` (s when
    the loss is s·ln of a positive error, else None: the loss itself must be positive for the
    multiplicative form)."""

    def __init__(self, task, latency: LatencyLoss | None = None,
                 entropy_schedule: EntropySchedule | None = None,
                 log_scale: float | None = None):
        self.task, self.latency, self.log_scale = task, latency, log_scale
        self.entropy_schedule = entropy_schedule or EntropySchedule()

    def __call__(self, pred, target, expected_ms, entropy, step: int):
        """Returns ``(total, parts)``; parts are floats: task, latency (what the latency form
        adds to the task loss, or for a positive loss under the multiplicative form
        L·(r^β − 1)), entropy, entropy_weight, expected_ms, total."""
        task = self.task(pred, target)
        lat = torch.zeros((), dtype=task.dtype, device=task.device)
        if self.latency is not None:
            term = self.latency(expected_ms).to(task)
            if not self.latency.multiplicative:
                lat = term
            elif self.log_scale is not None:
                lat = self.log_scale * self.latency.beta * term
            elif float(task.detach()) > 0:
                lat = task * torch.expm1(self.latency.beta * term)  # L·r^β − L
            else:
                raise ErnasError(f"the multiplicative latency form needs a positive task loss "
                                 f"or a task that declares its loss as s·ln(error) "
                                 f"(Task.loss_log_scale), but the loss is "
                                 f"{float(task.detach()):.4g}; use search.latency_form=additive "
                                 f"or hinge, or a positive loss.")
        w = self.entropy_schedule(step)
        entropy = torch.as_tensor(entropy).to(task)
        total = task + lat + w * entropy if w else task + lat
        parts = {k: float(torch.as_tensor(v).detach()) for k, v in (
            ("task", task), ("latency", lat), ("entropy", entropy), ("entropy_weight", w),
            ("expected_ms", expected_ms), ("total", total))}
        return total, parts
