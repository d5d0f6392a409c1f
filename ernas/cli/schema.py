"""The schemas of the command configs (``ernas.config.validated``): field types here, defaults in
``experiments/*.yaml``, ranges and relations in ``__post_init__``. The task's own fields are
checked by its Task dataclass (``ernas.task.make_task``); the latency backend's by
``make_backend``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING

from ernas.config import check
from ernas.latency.settings import LatencySettings


def _shape_problems(shape) -> list[str]:
    if len(shape) != 4 or any(s < 1 for s in shape):
        return [f"input_shape={list(shape)} must be four positive integers [N, C, H, W], e.g. "
                f"[1, 3, 256, 256]"]
    return []


@dataclass
class Latency:
    INF_OK: ClassVar = ("max_inconsistency",)   # inf: no limit (ernas.config.nonfinite_values)
    backend: Dict[str, Any] = MISSING
    granularity: str = MISSING
    table: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING
    measure: Dict[str, Any] = MISSING   # checked by MeasureProtocol
    probe_tolerance: float = MISSING
    on_mismatch: str = MISSING
    trust_table: bool = MISSING
    probe_cache_s: float = MISSING
    max_inconsistency: float = MISSING
    consistency_tolerance: float = MISSING
    profile_group: int = MISSING
    recheck_rounds: int = MISSING
    anchor: bool = MISSING
    anchor_samples: int = MISSING
    key_threads: Optional[int] = None   # a default: runs recorded before it existed resume

    def __post_init__(self):  # one set of latency checks: ernas.latency.settings
        LatencySettings.from_config(dataclasses.asdict(self))


@dataclass
class Teacher:
    arch: Optional[str] = MISSING
    checkpoint: Optional[str] = MISSING
    w_out: float = MISSING
    w_feat: float = MISSING

    def __post_init__(self):
        check("retrain config, teacher", [f"w_{k}={getattr(self, 'w_' + k)} must be >= 0"
                                          for k in ("out", "feat") if getattr(self, "w_" + k) < 0])


@dataclass
class Retrain:
    task: Any = MISSING
    arch: Optional[str] = MISSING
    init: str = MISSING
    source: Optional[str] = MISSING
    space: Optional[str] = MISSING
    teacher: Teacher = MISSING
    steps: int = MISSING
    batch_size: int = MISSING
    crop: int = MISSING
    seed: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    eta_min: float = MISSING
    grad_clip: Optional[float] = MISSING
    val_every: int = MISSING
    val_crop: Optional[int] = MISSING
    val_tile: Optional[int] = MISSING
    bn_calibration_batches: int = MISSING
    num_workers: int = MISSING
    amp: bool = MISSING
    log_every: int = MISSING
    logger: str = MISSING
    device: str = MISSING
    threads: Optional[int] = MISSING
    resume: Optional[str] = MISSING
    stop_at: Optional[int] = MISSING
    progress: bool = MISSING

    def __post_init__(self):
        from ernas.train import TrainConfig

        TrainConfig.from_dict(self.train_fields())  # ranges and relations of the recipe
        bad = []
        if self.init not in ("scratch", "supernet", "pretrained"):
            bad.append(f"init={self.init!r} must be scratch, supernet or pretrained")
        if self.threads is not None and self.threads < 1:
            bad.append(f"threads={self.threads} must be >= 1 (or null)")
        if self.stop_at is not None and self.stop_at < 1:
            bad.append(f"stop_at={self.stop_at} must be >= 1 (or null)")
        check("retrain config", bad)

    def train_fields(self) -> dict:
        from dataclasses import fields

        from ernas.train import TrainConfig

        return {f.name: getattr(self, f.name) for f in fields(TrainConfig)}


@dataclass
class Baseline:
    enabled: bool = MISSING
    arch: Optional[str] = MISSING
    checkpoint: Optional[str] = MISSING
    name: Optional[str] = MISSING


@dataclass
class LatencyGroup:
    """The latency group alone: what ``ernas-export`` (timing its files) reads of its config."""
    latency: Latency = MISSING


@dataclass
class Evaluate:
    task: Any = MISSING
    latency: Latency = MISSING
    arch: Optional[str] = MISSING
    checkpoint: Optional[str] = MISSING
    name: Optional[str] = MISSING
    baseline: Baseline = MISSING
    seed: int = MISSING
    input_shape: List[int] = MISSING
    predict_latency: bool = MISSING
    measure_latency: bool = MISSING
    memory_runs: int = MISSING
    tile: Optional[int] = MISSING
    device: str = MISSING
    threads: Optional[int] = MISSING
    runs: Any = MISSING                 # a list of run dirs, or one glob pattern
    pareto_table: Optional[str] = MISSING
    progress: bool = MISSING

    def __post_init__(self):
        bad = _shape_problems(self.input_shape)
        if self.threads is not None and self.threads < 1:
            bad.append(f"threads={self.threads} must be >= 1 (or null)")
        if not isinstance(self.runs, (list, str)):
            bad.append(f"runs={self.runs!r} must be a list of run directories or a glob pattern")
        if self.memory_runs < 0:
            bad.append(f"memory_runs={self.memory_runs} must be >= 0 (fresh processes measuring "
                       f"each model's peak memory; 0: not measured)")
        if self.tile is not None and self.tile < 16:
            bad.append(f"tile={self.tile} must be >= 16 (the side the network was validated "
                       f"at, e.g. its retraining's val_tile) or null (whole images)")
        check("evaluate config", bad)


@dataclass
class Search:
    task: Any = MISSING
    latency: Latency = MISSING
    space: str = MISSING
    input_shape: List[int] = MISSING
    search: Any = MISSING               # typed by ConfigStore, ranges by SearchConfig
    resume: Optional[str] = MISSING
    seed: int = MISSING
    threads: Optional[int] = MISSING
    progress: bool = MISSING

    def __post_init__(self):
        bad = _shape_problems(self.input_shape)
        if self.threads is not None and self.threads < 1:
            bad.append(f"threads={self.threads} must be >= 1 (or null)")
        check("search config", bad)


@dataclass
class Validate:
    n: int = MISSING
    seed: int = MISSING
    write_corrected: bool = MISSING

    def __post_init__(self):
        check("profile config, validate", [f"validate.n={self.n} must be >= 0 (networks sampled "
                                           f"beside the smallest, largest and reference)"]
              if self.n < 0 else [])


@dataclass
class Profile:
    latency: Latency = MISSING
    space: str = MISSING
    arch: Optional[str] = MISSING
    input_shape: List[int] = MISSING
    mode: str = MISSING
    output: Optional[str] = MISSING
    validate: Validate = MISSING
    progress: bool = MISSING

    def __post_init__(self):
        bad = _shape_problems(self.input_shape)
        if self.mode not in ("profile", "validate"):
            bad.append(f"mode={self.mode!r} must be profile or validate")
        check("profile config", bad)


@dataclass
class Stages:
    search: List[str] = MISSING
    retrain: List[str] = MISSING
    evaluate: List[str] = MISSING
    export: List[str] = MISSING


@dataclass
class Demo:
    task: Any = MISSING
    search_steps: int = MISSING
    retrain_steps: int = MISSING
    seed: int = MISSING
    stages: Stages = MISSING
    experiment: Optional[str] = None      # composed into the search stage (a task's preset)
    presets: Dict[str, Any] = field(default_factory=dict)  # per task: experiment, steps, stages

    def __post_init__(self):
        check("demo config", [f"{f}={getattr(self, f)} must be >= 1"
                              for f in ("search_steps", "retrain_steps") if getattr(self, f) < 1])
