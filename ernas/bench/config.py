"""The protocol's schema (``experiments/bench.yaml``): types here, defaults in the YAML, ranges
and relations in ``__post_init__``; checked once, before anything runs or is written."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from ernas.config import check

LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm", "ray")
STAGES = ("search", "train", "latency")
MARGINS = ("relative", "absolute")


@dataclass
class SearchArm:
    seeds: List[int] = MISSING
    overrides: Dict[str, Any] = MISSING


@dataclass
class Tune:
    """Defaults here too: a protocol stated before tuning existed resumes without it."""
    lams: List[float] = field(default_factory=list)
    seed: int = 100
    tolerance: float = 0.05


@dataclass
class RandomArm:
    draws: int = MISSING
    tolerance: float = MISSING
    seed: int = MISSING
    max_tries: int = MISSING


@dataclass
class Train:
    overrides: Dict[str, Any] = MISSING
    seeds: List[int] = MISSING
    others_seeds: List[int] = MISSING


@dataclass
class Select:
    headline_drop: float = MISSING


@dataclass
class Evaluate:
    set: Optional[str] = MISSING
    seed: int = MISSING


@dataclass
class Bootstrap:
    samples: int = MISSING
    alpha: float = MISSING
    noninferiority: float = MISSING
    margin: str = MISSING
    speedup: float = MISSING


@dataclass
class Protocol:
    task: Any = MISSING
    latency: Any = MISSING
    protocol: str = MISSING
    space: str = MISSING
    input_shape: List[int] = MISSING
    targets: List[float] = MISSING
    search: SearchArm = MISSING
    tune: Tune = field(default_factory=Tune)
    random: RandomArm = MISSING
    reference: Dict[str, Any] = field(default_factory=dict)
    scaled: List[Any] = MISSING
    train: Train = MISSING
    select: Select = MISSING
    evaluate: Evaluate = MISSING
    measure_passes: int = MISSING
    bootstrap: Bootstrap = MISSING
    launcher: str = MISSING
    launcher_settings: Dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = MISSING
    resume: Optional[str] = MISSING
    until: Optional[str] = MISSING
    progress: bool = MISSING

    def __post_init__(self):
        check("bench config", self.problems())

    def problems(self) -> list[str]:
        bad = []
        if not self.protocol.replace("_", "").replace("-", "").isalnum():
            bad.append(f"protocol={self.protocol!r} must be a plain name (letters, digits, _ -)")
        if not self.targets or any(not (math.isfinite(t) and 0 < t <= 1) for t in self.targets):
            bad.append(f"targets={list(self.targets)} must be fractions in (0, 1] of the "
                       f"reference's predicted latency")
        if len(set(self.targets)) != len(self.targets):
            bad.append(f"targets={list(self.targets)} lists a target twice")
        for name, seeds in (("search.seeds", self.search.seeds), ("train.seeds", self.train.seeds),
                            ("train.others_seeds", self.train.others_seeds)):
            if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
                bad.append(f"{name}={list(seeds)} must be distinct non-negative seeds, at least one")
        if not set(self.train.others_seeds) <= set(self.train.seeds):
            bad.append(f"train.others_seeds={list(self.train.others_seeds)} must be a subset of "
                       f"train.seeds={list(self.train.seeds)} (selection reads the shared seeds)")
        bad += _tune_problems(self.tune, self.search)
        if self.random.draws < 1 or self.random.max_tries < self.random.draws:
            bad.append(f"random.draws={self.random.draws} must be >= 1 and <= random.max_tries")
        if not (0 < self.random.tolerance < 1):
            bad.append(f"random.tolerance={self.random.tolerance} must be in (0, 1)")
        if not (0 <= self.select.headline_drop < 1):
            bad.append(f"select.headline_drop={self.select.headline_drop} must be in [0, 1)")
        b = self.bootstrap
        if b.samples < 100 or not (0 < b.alpha < 1) or not (0 <= b.noninferiority < 1) \
                or not (math.isfinite(b.speedup) and b.speedup > 0):
            bad.append(f"bootstrap={{samples: {b.samples}, alpha: {b.alpha}, noninferiority: "
                       f"{b.noninferiority}, speedup: {b.speedup}}} needs samples >= 100, alpha "
                       f"and noninferiority in (0, 1), speedup > 0")
        if b.margin not in MARGINS:
            bad.append(f"bootstrap.margin={b.margin!r} must be one of {', '.join(MARGINS)}")
        if self.until is not None and self.until not in STAGES:
            bad.append(f"until={self.until!r} must be null or one of {', '.join(STAGES)}")
        if self.measure_passes < 1:
            bad.append(f"measure_passes={self.measure_passes} must be >= 1")
        if self.launcher not in LAUNCHERS:
            bad.append(f"launcher={self.launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if self.threads is not None and self.threads < 1:
            bad.append(f"threads={self.threads} must be >= 1 (or null)")
        bad += _scaled_problems(self.scaled)
        if set(self.reference) - {"geometry", "blocks"}:
            bad.append(f"reference={dict(self.reference)!r} may only change geometry and blocks "
                       f"of the space's reference ({{}}: the space's reference itself)")
        return bad


def _tune_problems(tune: Tune, search: SearchArm) -> list[str]:
    if not tune.lams:
        return []
    bad = []
    if any(not (math.isfinite(v) and v >= 0) for v in tune.lams) \
            or len(set(tune.lams)) != len(tune.lams):
        bad.append(f"tune.lams={list(tune.lams)} must be distinct finite λ values >= 0 (or [] to "
                   f"search with the stated search.lam)")
    if tune.seed < 0 or tune.seed in search.seeds:
        bad.append(f"tune.seed={tune.seed} must be a non-negative seed outside search.seeds="
                   f"{list(search.seeds)}: the tuning searches are not arms, so every arm seed "
                   f"searches once at the chosen λ")
    if not (0 < tune.tolerance < 1):
        bad.append(f"tune.tolerance={tune.tolerance} must be in (0, 1)")
    stated = _search_field(search.overrides, "lam")
    if stated is not None:
        bad.append(f"search.overrides sets search.lam={stated} while tune.lams chooses λ on "
                   f"validation; remove one of them")
    if _search_field(search.overrides, "latency_form") == "multiplicative":
        bad.append("tune.lams with search.latency_form=multiplicative: that form has no λ (its "
                   "weight is search.beta); tune an additive, hinge or band search, or set "
                   "tune.lams=[]")
    return bad


def _search_field(overrides, name: str):
    """The value ``search.overrides`` states for ``search.<name>`` (flat or nested), else None."""
    over = dict(overrides)
    return over.get(f"search.{name}", (over.get("search") or {}).get(name))


def _scaled_problems(scaled) -> list[str]:
    bad, names = [], set()
    for i, s in enumerate(scaled):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) \
                or set(s) - {"name", "geometry", "blocks"}:
            bad.append(f"scaled[{i}]={s!r} must be a mapping {{name, geometry, blocks}} (geometry "
                       f"and blocks optional: what differs from the reference)")
            continue
        if not s["name"].replace("_", "").isalnum() or s["name"] in names:
            bad.append(f"scaled[{i}].name={s['name']!r} must be a plain, unique name")
        names.add(s["name"])
    return bad
