"""Every latency setting, with its default, in one place: ``LatencySettings``.

Built from the ``latency`` config group (``experiments/latency/*.yaml``) by
``LatencySettings.from_config(cfg.latency)`` and passed whole to ``ernas.latency.resolve``.
Construction validates every field (types, ranges, finite numbers) and raises one ErnasError
paragraph naming each bad ``latency.<field>``. The defaults are those of
``experiments/latency/onnxruntime_cpu.yaml`` (a test keeps the two equal).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ernas.errors import ErnasError
from ernas.extras import EXECUTORCH, LITERT
from ernas.latency.measure import MeasureProtocol, plain_mapping

BACKEND_EXTRAS = {"executorch_xnnpack": EXECUTORCH, "litert": LITERT}  # backend -> its extra

__all__ = ["GRANULARITIES", "LatencySettings", "ON_MISMATCH"]

ON_MISMATCH = ("profile", "rescale", "error")
GRANULARITIES = ("block", "op")


def _default_backend() -> dict:
    return {"name": "onnxruntime", "threads": 2, "provider": "CPUExecutionProvider",
            "graph_optimization": "all", "spinning": False, "dtype": "float32"}


@dataclass(frozen=True)
class LatencySettings:
    """How a latency table is found, checked, profiled and calibrated.

    ``backend``: a backend config mapping (``{name: onnxruntime, threads: 2, ...}``) or a built
    ``Backend``; ``table``: ``auto`` (or None) or a path; ``cache_dir``: None for
    ``~/.cache/ernas/latency_tables``; ``measure``: the ``MeasureProtocol`` (a mapping is
    converted). The other fields are described in ``ernas.latency.resolve``,
    ``ernas.latency.consistency`` and ``ernas.latency.anchor``.
    """

    backend: Any = field(default_factory=_default_backend)
    granularity: str = "block"
    table: Any = "auto"
    cache_dir: Any = None
    measure: Any = field(default_factory=MeasureProtocol)
    probe_tolerance: float = 0.25
    on_mismatch: str = "profile"
    trust_table: bool = False
    probe_cache_s: float = 3600.0
    max_inconsistency: float = 2.0
    consistency_tolerance: float = 0.05
    profile_group: int = 64
    recheck_rounds: int = 20
    anchor: bool = True
    anchor_samples: int = 4
    key_threads: Any = None

    def __post_init__(self):
        if not isinstance(self.measure, MeasureProtocol):
            object.__setattr__(self, "measure", MeasureProtocol.from_mapping(self.measure))
        problems = _problems(self)
        if problems:
            raise ErnasError("latency config: " + "; ".join(problems) + ". Fix these values "
                             "(experiments/latency/*.yaml or latency.<field>=... overrides).")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | LatencySettings | None) -> LatencySettings:
        """Settings from a ``latency`` config group (DictConfig or mapping). Fields the group
        does not give (configs of runs made before a field existed) take the defaults above;
        an unknown field is an ErnasError."""
        if isinstance(cfg, LatencySettings):
            return cfg
        data = plain_mapping(cfg, "latency") if cfg is not None else {}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ErnasError(f"latency config: unknown field(s) {', '.join(unknown)}; the fields "
                             f"are {', '.join(names)}. Check the spelling.")
        return cls(**data)

    def replace(self, **changes) -> LatencySettings:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def keys_elsewhere(self) -> bool:
        """Whether the table's keys are timed at another thread count than the networks run."""
        return (self.key_threads is not None and isinstance(self.backend, Mapping)
                and self.key_threads != self.backend.get("threads"))

    def key_settings(self) -> LatencySettings:
        """The settings the table is found, probed and profiled with: ``backend.threads``
        replaced by ``key_threads`` (these settings when it is None or equal)."""
        if not self.keys_elsewhere:
            return self
        return self.replace(backend={**self.backend, "threads": self.key_threads},
                            key_threads=None)


def _number(value, name: str, low: float, allow_inf: bool = False, what: str = "") -> list[str]:
    """Problems of a float setting: a real number (not a bool), finite unless ``allow_inf``,
    at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [f"latency.{name}={value!r} must be a number{what}"]
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or value < low:
        finite = "" if allow_inf else "a finite number "
        return [f"latency.{name}={value!r} must be {finite}>= {low:g}{what}"]
    return []


def _integer(value, name: str, low: int, what: str = "") -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return [f"latency.{name}={value!r} must be an integer >= {low}{what}"]
    return []


def _flag(value, name: str) -> list[str]:
    return [] if isinstance(value, bool) else [f"latency.{name}={value!r} must be true or false"]


def _path_like(value, name: str, extra: str = "") -> list[str]:
    if value is None or isinstance(value, (str, os.PathLike)):
        return []
    return [f"latency.{name}={value!r} must be a path{extra} or null"]


def _problems(s: LatencySettings) -> list[str]:
    """Every invalid field of ``s``, one phrase each."""
    bad = []
    if not (isinstance(s.backend, Mapping) or hasattr(s.backend, "runner")):
        bad.append(f"latency.backend={s.backend!r} must be a mapping such as {{name: "
                   f"onnxruntime, threads: 2}}")
    elif isinstance(s.backend, Mapping) and s.backend.get("name") in BACKEND_EXTRAS \
            and not BACKEND_EXTRAS[s.backend["name"]].available():
        bad.append(BACKEND_EXTRAS[s.backend["name"]].missing(
            f"latency.backend.name={s.backend['name']}"))
    if s.granularity not in GRANULARITIES:
        bad.append(f"latency.granularity={s.granularity!r} must be one of "
                   f"{', '.join(GRANULARITIES)}")
    if s.on_mismatch not in ON_MISMATCH:
        bad.append(f"latency.on_mismatch={s.on_mismatch!r} must be one of "
                   f"{', '.join(ON_MISMATCH)}")
    bad += _path_like(s.table, "table", " (or auto)") + _path_like(s.cache_dir, "cache_dir")
    bad += _number(s.probe_tolerance, "probe_tolerance", 0, what=" (0.25 = ±25%)")
    bad += _number(s.probe_cache_s, "probe_cache_s", 0, what=" seconds (0: always probe)")
    bad += _number(s.max_inconsistency, "max_inconsistency", 1, allow_inf=True,
                   what=" (the largest ratio cheaper/costlier a table may list; inf: no limit)")
    bad += _number(s.consistency_tolerance, "consistency_tolerance", 0)
    bad += _integer(s.profile_group, "profile_group", 1, " (keys measured together)")
    bad += _integer(s.recheck_rounds, "recheck_rounds", 1)
    bad += _integer(s.anchor_samples, "anchor_samples", 0)
    bad += _flag(s.trust_table, "trust_table") + _flag(s.anchor, "anchor")
    return bad + _key_threads_problems(s)


def _key_threads_problems(s: LatencySettings) -> list[str]:
    """``key_threads``: null or an integer >= 1, for a backend mapping with ``threads``, and
    with ``anchor`` on (the anchor line alone carries key sums to the networks' thread count)."""
    if s.key_threads is None:
        return []
    bad = _integer(s.key_threads, "key_threads", 1, " (null: the backend's threads)")
    if not isinstance(s.backend, Mapping) or "threads" not in s.backend \
            or s.backend.get("device", "cpu") != "cpu":
        bad.append(f"latency.key_threads={s.key_threads!r} needs a CPU backend with a threads "
                   f"setting (latency.backend.threads); set latency.key_threads=null")
    elif not bad and s.keys_elsewhere and not s.anchor:
        bad.append(f"latency.key_threads={s.key_threads} with latency.backend.threads="
                   f"{s.backend['threads']} needs latency.anchor=true: key sums timed at "
                   f"{s.key_threads} thread(s) reach {s.backend['threads']} thread(s) only "
                   f"through the line anchored on networks timed at "
                   f"{s.backend['threads']}")
    return bad
