"""The search configuration: one schema and one set of defaults for ``ernas-search``.

:class:`SearchConfig` is the ``search:`` node of ``experiments/search.yaml``: it is registered
with Hydra's ConfigStore as ``search_schema`` (a config whose ``search`` node is the dataclass),
the first entry of that file's defaults list, so the defaults live here only, and unknown keys
and wrong types are refused when the config is composed. ``ernas-search --cfg job`` prints the
composed values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ernas.config import check, from_mapping
from ernas.search.objective import EntropySchedule


@dataclass
class SearchConfig:
    """Search hyper-parameters (module docstring); saved in the checkpoint and the summary."""

    steps: int = 600
    warmup_steps: int = 150          # weight-only steps before α is trained
    batch_size: int = 4
    crop: int = 64                   # training and α crops (the task's train and val splits)
    lr_w: float = 1e-3               # AdamW, cosine to lr_min over `steps`
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    lr_alpha: float = 3e-2           # Adam, betas (0.5, 0.999)
    alpha_every: int = 1
    temperature: float = 1.0
    gumbel: bool = False
    weight_keep_rate: float | None = 0.5   # weight step: keep each block w.p. q (None: α mix)
    mode: str = "shared"             # shared (weight sharing) | darts (all paths, NAFNet only)
    latency_form: str = "additive"   # additive λ·r | multiplicative r^β | hinge λ·max(0, r−1)
    #                                  | band λ·|r−1|
    lam: float = 0.5                 # additive/hinge/band weight (PSNR loss: dB per unit r)
    target_ms: float | None = None   # T of r = E[LAT]/T; None: the baseline's predicted latency
    beta: float = 0.1                # multiplicative exponent (PSNR loss: s·β·ln r added)
    entropy_max: float = 0.1         # weight of Σ_d H(p_d)/ln K_d (per decision)
    entropy_warmup: int | None = None  # None: warmup_steps
    entropy_ramp: int | None = None    # None: half of the α phase
    entropy_shape: str = "cosine"    # linear | cosine
    derive: str = "argmax"           # argmax of α | budget: the supernet's best network within T
    bn_calibration_batches: int = 16  # training batches for BatchNorm recalibration at the end
    checkpoint_every: int = 100
    log_every: int = 10
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"             # cpu | cuda | auto
    amp: bool = False                # bfloat16 autocast, CUDA only
    logger: str = "csv"              # csv | tensorboard (CSV plus TensorBoard scalars)

    def __post_init__(self):
        ints = ("steps", "batch_size", "crop", "alpha_every", "checkpoint_every", "log_every",
                "eval_batches")
        bad = [f"search.{f}={getattr(self, f)!r} must be a positive integer" for f in ints
               if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int)
               or getattr(self, f) < 1]
        if not bad and not 0 <= self.warmup_steps < self.steps:
            bad.append(f"search.warmup_steps={self.warmup_steps} must be in [0, steps="
                       f"{self.steps}) so that α is trained at all")
        for f in ("lr_w", "lr_alpha", "temperature"):
            if not getattr(self, f) > 0:
                bad.append(f"search.{f}={getattr(self, f)} must be > 0")
        for f in ("lr_min", "weight_decay", "lam", "beta", "entropy_max",
                  "bn_calibration_batches"):
            if getattr(self, f) < 0:
                bad.append(f"search.{f}={getattr(self, f)} must be >= 0")
        if self.weight_keep_rate is not None and not 0 < self.weight_keep_rate <= 1:
            bad.append(f"search.weight_keep_rate={self.weight_keep_rate} must be in (0, 1] (the "
                       f"probability that the weight step keeps a searchable block) or null")
        if self.target_ms is not None and not self.target_ms > 0:
            bad.append(f"search.target_ms={self.target_ms} must be > 0 (or null: the baseline)")
        choices = {"mode": ("shared", "darts"),
                   "latency_form": ("additive", "multiplicative", "hinge", "band"),
                   "entropy_shape": ("linear", "cosine"), "derive": ("argmax", "budget"),
                   "logger": ("csv", "tensorboard")}
        bad += [f"search.{f}={getattr(self, f)!r} must be one of {', '.join(c)}"
                for f, c in choices.items() if getattr(self, f) not in c]
        if self.derive == "budget" and self.weight_keep_rate not in (None, 1, 1.0):
            bad.append(f"search.derive=budget needs a supernet whose weight steps kept every "
                       f"block (search.weight_keep_rate=1.0, or null for the α mixture), not "
                       f"{self.weight_keep_rate}: with stochastic depth the supernet scores a "
                       f"network with blocks skipped higher than the argmax, so the budget "
                       f"derivation would skip blocks (docs/results/search.md)")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad.append(f"search.device={self.device!r} must be auto, cpu or cuda")
        check("search config", bad)

    @classmethod
    def from_dict(cls, data: dict) -> SearchConfig:
        return from_mapping(cls, data, "search config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def entropy_schedule(self) -> EntropySchedule:
        warm = self.warmup_steps if self.entropy_warmup is None else self.entropy_warmup
        ramp = max(0, self.steps - warm) // 2 if self.entropy_ramp is None else self.entropy_ramp
        return EntropySchedule(self.entropy_max, warm, ramp, self.entropy_shape)


def register_schema() -> None:
    """Register :class:`SearchConfig` with Hydra's ConfigStore as ``search_schema`` (a config
    whose ``search`` node is the dataclass), idempotently."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="search_schema", node={"search": SearchConfig})


register_schema()


# fields that may change between a run and its resumption (they do not change what is
# computed: eval_batches and bn_calibration_batches do, through derive=budget and the
# recalibrated weights); the one list, which ernas-search prefixes with `search.`
RESUME_FREE = {"checkpoint_every", "log_every", "device", "logger"}
