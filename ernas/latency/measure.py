"""One way to time things: runners measured in interleaved, shuffled rounds, summarised by a low
percentile.

A **runner** is a zero-argument callable that runs a prepared model once and returns its latency
in ms (``Backend.runner(module, x)``, ``OnnxRuntimeBackend.onnx_runner(path, shape)``). Everything
that turns runners into figures goes through this module: the profiler (op keys), the probe and
validation (whole networks), and evaluation and export (derived vs baseline).

Protocol (``measure_interleaved``): every runner gets ``warmup`` untimed calls, then ``rounds``
rounds; in each round the runners are visited in a freshly shuffled order (seeded by
``(seed, round)``) and each is called ``per_round`` times back to back. A slow period of the
machine therefore lands on all runners alike instead of inflating whichever one was being timed.
Rounds continue past ``rounds`` until the rounds have lasted ``min_seconds`` (at most
``MAX_ROUNDS``): the samples of fast models are spread over a window longer than a short burst
of contention, so one burst cannot shift all of them. Longer slow phases (seconds long and ~1.7x
slower, seen on this VM under other tenants' load) still hit everything measured together
alike, but can differ between measurements made at different times; the probe's tolerance and
the reported noise floor account for that.

Statistic (``DEFAULT_STATISTIC = "p20"``): the 20th percentile of all samples. Contention on a shared machine only ever adds time, so the noise is one-sided; the
median moves with the fraction of samples hit by contention, the minimum falls as samples are
added and rewards rare lucky runs, while a low percentile estimates the uncontended cost and is
stable from ~15 samples on. The same statistic is used for op keys and for whole networks, so a
prediction (a sum of key statistics) and a measurement are comparable. ``min``, ``median``,
``mean`` and ``pNN`` (0 ≤ NN ≤ 100) are accepted too.

Noise floor (``spread``): the statistic is also taken per round (``s_r``), and
``spread = mean_{r≠r'} |s_r − s_r'| / median_r s_r`` — how much one pass over the runners
disagrees with another, on average (it does not grow with the number of rounds, unlike the
range). Prediction errors below it cannot be told apart from single-pass noise; the final
figure, a statistic over all rounds, is steadier than one pass. How much steadier is
``half_gap = |stat(even rounds) − stat(odd rounds)| / ms``: two half-length measurements, made
interleaved in the same session, disagree by this much (for independent halves the full
figure's standard error is ≈ 0.63·half_gap). A prediction error well above it is the table's,
not the measurement's (drift between sessions is not in it: see the probe and validation).

Paired ratio (``paired_ratio``): to compare two runners measured together (a speed-up), the
ratio is taken **per round**, where both were timed within one pass, and summarised by its
median over rounds: ``median_r s_r(a)/s_r(b)``. A slow phase that covers a round scales both
alike and cancels, so the figure follows the models, not when each of their samples fell; the
ratio of the two overall statistics does not have that property. Its noise floor
(``paired_spread``) is the same pass-to-pass spread taken over the per-round ratios, and its
split-half gap (``paired_half_gap``) the relative difference of the median ratio over even and
over odd rounds.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ernas.progress import progress as progress_bar
from ernas.errors import ErnasError

__all__ = ["DEFAULT_STATISTIC", "MeasureProtocol", "Runner", "check_statistic",
           "measure_interleaved", "one_round", "paired_half_gap", "paired_ratio", "paired_spread",
           "pass_spread",
           "plain_mapping", "round_order", "rounds_left", "statistic", "summarize", "warm_up"]

Runner = Callable[[], float]
DEFAULT_STATISTIC = "p20"
MAX_ROUNDS = 1000
_PCT = re.compile(r"^p(\d{1,3}(\.\d+)?)$")


def plain_mapping(cfg: Any, what: str) -> dict:
    """A plain dict from a dict or an OmegaConf DictConfig."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(cfg, Mapping):
        raise ErnasError(f"Expected a mapping for the {what} config, got {type(cfg).__name__}: "
                         f"{cfg!r}. Fix: write it as `field: value, ...`.")
    return dict(cfg)


def _finite_at_least(value, low: float, integer: bool) -> bool:
    """Whether ``value`` is a finite number (an integer when ``integer``; never a bool) >= low."""
    kinds = (int,) if integer else (int, float)
    return (isinstance(value, kinds) and not isinstance(value, bool)
            and math.isfinite(value) and value >= low)


def _from_mapping(cls, cfg, what: str):
    cfg = plain_mapping(cfg, what)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ErnasError(f"Unknown {what} field(s) {unknown}; valid fields are {valid}. Fix the "
                         f"latency `{what}` config.")
    return cls(**cfg)


def check_statistic(stat: str) -> str:
    """``stat`` if it names a statistic (min | median | mean | pNN), else ErnasError."""
    m = _PCT.match(str(stat))
    if stat in ("min", "median", "mean") or (m and 0 <= float(m[1]) <= 100):
        return str(stat)
    raise ErnasError(f"Unknown latency statistic {stat!r}; use min, median, mean or pNN with "
                     f"0 <= NN <= 100 (e.g. p20, the default). Fix the latency `measure."
                     f"statistic` field.")


def statistic(samples, stat: str = DEFAULT_STATISTIC) -> float:
    """The statistic ``stat`` (min | median | mean | pNN, linear interpolation) of ``samples``."""
    s = np.asarray(samples, dtype=np.float64).ravel()
    if stat == "min":
        return float(s.min())
    if stat == "mean":
        return float(s.mean())
    if stat == "median":
        return float(np.median(s))
    return float(np.percentile(s, float(check_statistic(stat)[1:])))


def summarize(rounds: list[list[float]], stat: str = DEFAULT_STATISTIC) -> dict:
    """Figures of one runner from its samples grouped by round (see the module docstring):
    ``ms`` (the statistic of all samples), ``p10``, ``median``, ``p90``, ``mean``, ``n`` and
    ``spread`` (mean pass-to-pass difference of the per-round statistic over its median; 0 for
    one round) and ``round_ms`` (the statistic of each round, for :func:`paired_ratio`)."""
    flat = np.asarray([v for r in rounds for v in r], dtype=np.float64)
    if flat.size == 0 or not np.all(np.isfinite(flat)):
        raise ErnasError(f"Latency samples are empty or not finite ({flat[:5].tolist()}...); the "
                         f"backend produced no usable timing. Check the backend's output.")
    rounds = [r for r in rounds if len(r)]
    per_round = np.array([statistic(r, stat) for r in rounds])
    p10, med, p90 = np.percentile(flat, [10, 50, 90])
    ms = statistic(flat, stat)
    half_gap = 0.0
    if len(rounds) >= 2:
        even, odd = ([v for r in rounds[k::2] for v in r] for k in (0, 1))
        half_gap = abs(statistic(even, stat) - statistic(odd, stat)) / ms if ms > 0 else 0.0
    return {"ms": ms, "p10": float(p10), "median": float(med),
            "p90": float(p90), "mean": float(flat.mean()), "n": int(flat.size),
            "spread": pass_spread(per_round), "half_gap": float(half_gap),
            "round_ms": [float(v) for v in per_round]}


def pass_spread(per_round) -> float:
    """``mean_{r≠r'} |v_r − v_r'| / median_r v_r`` of per-round figures (0 for one round)."""
    v = np.asarray(per_round, dtype=np.float64)
    mid, k = float(np.median(v)), len(v)
    if k < 2 or mid <= 0:
        return 0.0
    return float(np.abs(v[:, None] - v[None, :]).sum() / (k * (k - 1)) / mid)


def paired_ratio(a: dict | list, b: dict | list) -> float:
    """``median_r s_r(a) / s_r(b)`` over the rounds both were timed in (module docstring);
    ``a``/``b``: results of one ``measure_interleaved`` call or their ``round_ms`` lists."""
    return float(np.median(_round_ratios(a, b)))


def paired_spread(a: dict | list, b: dict | list) -> float:
    """The noise floor of :func:`paired_ratio`: :func:`pass_spread` of the per-round ratios
    ``s_r(a)/s_r(b)`` — how much one pass's speed-up disagrees with another's."""
    return pass_spread(_round_ratios(a, b))


def paired_half_gap(a: dict | list, b: dict | list) -> float:
    """``|median(even rounds' ratios) − median(odd rounds' ratios)| / paired_ratio(a, b)``: how
    much two half-length measurements of the speed-up disagree (0 for one round)."""
    r = _round_ratios(a, b)
    if len(r) < 2:
        return 0.0
    return float(abs(np.median(r[0::2]) - np.median(r[1::2])) / np.median(r))


def _round_ratios(a: dict | list, b: dict | list) -> np.ndarray:
    ra = np.asarray(a["round_ms"] if isinstance(a, dict) else a, dtype=np.float64)
    rb = np.asarray(b["round_ms"] if isinstance(b, dict) else b, dtype=np.float64)
    if ra.size == 0 or ra.size != rb.size or not (np.all(ra > 0) and np.all(rb > 0)):
        raise ErnasError(f"paired_ratio needs the per-round figures of two runners measured in "
                         f"the same rounds (got {ra.size} and {rb.size} rounds); measure them "
                         f"together in one measure_interleaved call.")
    return ra / rb


def round_order(names: list[str], seed: int, round_index: int) -> list[str]:
    """The shuffled visiting order of round ``round_index`` (deterministic in seed and round,
    so a resumed run continues with the orders it would have used)."""
    rng = np.random.default_rng([int(seed), int(round_index)])
    return [names[i] for i in rng.permutation(len(names))]


def warm_up(runners: Mapping[str, Runner], warmup: int) -> None:
    """``warmup`` untimed calls of every runner."""
    for run in runners.values():
        for _ in range(warmup):
            run()


def one_round(runners: Mapping[str, Runner], round_index: int, per_round: int,
              seed: int = 0) -> dict[str, list[float]]:
    """Round ``round_index``: ``{name: per_round samples}``, runners visited in shuffled order."""
    out: dict[str, list[float]] = {}
    for name in round_order(list(runners), seed, round_index):
        run = runners[name]
        out[name] = [float(run()) for _ in range(per_round)]
    return out


def rounds_left(done: int, rounds: int, started: float, min_seconds: float) -> bool:
    """Whether another round is due: fewer than ``rounds`` done, or fewer than ``min_seconds``
    elapsed since ``started`` (``time.perf_counter``) and fewer than ``MAX_ROUNDS`` done."""
    return done < rounds or (done < MAX_ROUNDS and time.perf_counter() - started < min_seconds)


def measure_interleaved(runners: Mapping[str, Runner], rounds: int = 10, per_round: int = 3,
                        warmup: int = 2, statistic: str = DEFAULT_STATISTIC, seed: int = 0,
                        min_seconds: float = 2.0, progress: bool = False,
                        desc: str = "measuring") -> dict[str, dict]:
    """Time every runner in interleaved shuffled rounds; ``{name: summarize(...)}``.

    The keyword arguments after ``runners`` up to ``min_seconds`` are ``MeasureProtocol``'s
    fields with its defaults, so a latency config's ``measure`` mapping can be passed as
    ``**measure``. Each result holds ``ms`` (the statistic of all samples: what to report and
    compare), ``p10``, ``median``, ``p90``, ``mean``, ``n`` and ``spread`` (the noise floor).
    """
    check_statistic(statistic)
    if rounds < 1 or per_round < 1 or warmup < 0:
        raise ErnasError(f"measure_interleaved needs rounds >= 1, per_round >= 1 and warmup >= 0; "
                         f"got rounds={rounds}, per_round={per_round}, warmup={warmup}. Fix the "
                         f"latency `measure` config.")
    warm_up(runners, warmup)
    samples: dict[str, list[list[float]]] = {name: [] for name in runners}
    bar = progress_bar(rounds, desc, unit="round", enabled=progress)
    done, started = 0, time.perf_counter()
    while rounds_left(done, rounds, started, min_seconds):
        for name, s in one_round(runners, done, per_round, seed).items():
            samples[name].append(s)
        done += 1
        bar.total = max(bar.total, done)
        bar.update(1)
    bar.close()
    return {name: summarize(s, statistic) for name, s in samples.items()}


@dataclass(frozen=True)
class MeasureProtocol:
    """The measurement protocol shared by profiling, probing, validation and evaluation: the
    fields (and defaults) of ``measure_interleaved``, i.e. a latency config's ``measure``."""

    rounds: int = 10
    per_round: int = 3
    warmup: int = 2
    statistic: str = DEFAULT_STATISTIC
    seed: int = 0
    min_seconds: float = 2.0

    def __post_init__(self):
        check_statistic(self.statistic)
        bad = [f"{f}={getattr(self, f)!r}" for f, lo in (("rounds", 1), ("per_round", 1),
                                                          ("warmup", 0), ("min_seconds", 0))
               if not _finite_at_least(getattr(self, f), lo, integer=f != "min_seconds")]
        if bad:
            raise ErnasError(f"Invalid latency measure protocol: {', '.join(bad)} (rounds and "
                             f"per_round must be integers >= 1, warmup an integer >= 0 and "
                             f"min_seconds a finite number >= 0). Fix the "
                             f"latency `measure` config.")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> MeasureProtocol:
        """Build from a config mapping, with an ErnasError naming unknown fields."""
        return _from_mapping(cls, cfg, "measure")

    def measure(self, runners: Mapping[str, Runner], progress: bool = False,
                desc: str = "measuring", rounds: int | None = None) -> dict[str, dict]:
        """``measure_interleaved`` under this protocol (``rounds`` overrides its rounds)."""
        return measure_interleaved(runners, **{**self.to_dict(), "rounds": rounds or self.rounds},
                                   progress=progress, desc=desc)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
