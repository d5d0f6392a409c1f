"""The Task contract: what is learned and how it is judged (denoising, segmentation, a user's own).

A task is one module (or package) defining a :class:`Task` subclass, a dataclass whose fields are
the task's settings (the ``task`` config group: ``experiments/task/<name>.yaml``), and exposing
the class as ``TASK``. It gives

- ``dataset(split, crop, seed, random)``: a torch Dataset of items ``{"input", "target",
  "name"}`` for ``split`` in train | val | test; ``random=True`` draws random crops and
  augmentations keyed by (seed, step, index), else whole images (centre ``crop`` when given);
- ``loss(pred, target)``: the training loss (lower is better); ``distill_loss(pred,
  teacher_pred)``: the output-distillation term; ``loss_log_scale``: s when the loss is
  s·ln(e) of a positive error e (the multiplicative latency factor r^β on e then adds s·β·ln r),
  None when the loss itself is positive (it is multiplied by r^β; ``ernas.search.objective``);
- ``evaluator()``: a streaming :class:`Evaluator` (``update(pred, target, name)`` per item or
  batch, ``compute()`` -> named metrics, one of them ``metric``, the task's headline, higher is
  better; ``rows()`` -> per-item rows for per_image.csv);
- ``eval_sets(seed)``: the labelled evaluation sets it reports (σ sweep for denoising), the
  first of ``headline_set`` being the one headline figures come from;
- ``calibration_inputs(hw, n, seed)``: real network inputs for int8 calibration;
- ``check_arch(arch)``: the model's input/output channels fit the data.

Tasks are found by name (:func:`get_task`): ``ernas.tasks.<name>``, then the entry-point group
``ernas.tasks``. Search, retrain, evaluate and export receive the task object and never name a
task's metrics or data themselves.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any

import numpy as np
import torch

from ernas.errors import ErnasError


class Evaluator(abc.ABC):
    """Streaming evaluation of one model over one set."""

    @abc.abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor, name: str | None = None) -> None:
        """Add a batch (N x ...) of predictions and targets."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """Named metrics over everything seen so far."""

    def rows(self) -> list[dict]:
        """Per-item metric rows (``{"name", <metric>: value}``), when the task has them."""
        return []


@dataclasses.dataclass
class Task(abc.ABC):
    """Base class of a task (see the module docstring). Subclasses are dataclasses whose fields
    are the task's config; ``__post_init__`` validates them."""

    name = ""
    metric = ""                  # headline metric, a key of Evaluator.compute(), higher is better
    metric_label = ""            # axis label, e.g. "PSNR (dB)"
    metrics = ()                 # every key compute() returns, headline first
    loss_log_scale = None        # s when loss = s·ln(positive error), None when loss > 0

    @abc.abstractmethod
    def dataset(self, split: str, crop: int | None = None, seed: int = 0,
                random: bool = False) -> torch.utils.data.Dataset: ...

    @abc.abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def distill_loss(self, pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def evaluator(self) -> Evaluator: ...

    @abc.abstractmethod
    def eval_sets(self, seed: int = 0) -> dict[str, torch.utils.data.Dataset]: ...

    @abc.abstractmethod
    def eval_labels(self) -> list[str]:
        """Labels of ``eval_sets`` (without loading them)."""

    @property
    def headline_set(self) -> str:
        """Label of the evaluation set the headline figure comes from (default: the first)."""
        return self.eval_labels()[0]

    @abc.abstractmethod
    def check_arch(self, arch) -> None:
        """ErnasError when the architecture's channels do not fit this task's data."""

    def calibration_inputs(self, hw, n: int = 16, seed: int = 0) -> list[np.ndarray]:
        """``n`` real inputs (1 x C x h x w float32) for int8 calibration: random crops of the
        training split."""
        ds = self.dataset("train", min(hw), seed, random=True)
        out = []
        for i in range(n):
            x = ds[i % len(ds)]["input"]
            out.append(np.ascontiguousarray(fit_crop(x, hw)[None].numpy(), dtype=np.float32))
        return out

    def batch_metric(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        """The headline metric of one batch (for logs)."""
        e = self.evaluator()
        e.update(pred.detach().float().cpu(), target.detach().cpu())
        return float(e.compute()[self.metric])

    def describe(self) -> str:
        """One line for reports: the data and the metric conventions."""
        return self.name

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


def fit_crop(x: torch.Tensor, hw) -> torch.Tensor:
    """Centre crop of a C x H x W tensor to hw, padded first (reflect, or replicate when the
    padding exceeds the size) where it is smaller."""
    h, w = (int(v) for v in hw)
    ph, pw = max(0, h - x.shape[-2]), max(0, w - x.shape[-1])
    if ph or pw:
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
        x = torch.nn.functional.pad(x[None].float(), (pw // 2, pw - pw // 2, ph // 2,
                                                      ph - ph // 2), mode=mode)[0]
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="ernas.tasks")}


def task_class(name: str, where: str = "task") -> type[Task]:
    """The Task subclass called ``name``: ``ernas.tasks.<name>`` or an ``ernas.tasks`` entry
    point."""
    cls = None
    if isinstance(name, str) and name.isidentifier():
        try:
            cls = getattr(importlib.import_module(f"ernas.tasks.{name}"), "TASK", None)
        except ModuleNotFoundError as e:
            if not (e.name and f"ernas.tasks.{name}".startswith(e.name)):
                raise
    if cls is None and name in _entry_points():
        obj = _entry_points()[name].load()
        cls = getattr(obj, "TASK", obj)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        known = sorted({"denoise", "segment"} | set(_entry_points()))
        raise ErnasError(f"{where}: field 'name' is {name!r}, which is not a known task; use one "
                         f"of {', '.join(known)} (task=<name>), or install a package that "
                         f"registers it under the entry-point group 'ernas.tasks'.")
    return cls


def make_task(cfg: dict[str, Any] | None, where: str = "task") -> Task:
    """A task from its config mapping ``{name: ..., <field>: value, ...}``; unknown fields and
    bad values are ErnasErrors naming the field."""
    cfg = dict(cfg or {"name": "denoise"})
    name = cfg.pop("name", None)
    cls = task_class(name, where)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ErnasError(f"{where}: unknown field(s) {unknown} for task {name!r}; its fields are "
                         f"{', '.join(sorted(fields))}.")
    try:
        return cls(**cfg)
    except TypeError as e:
        raise ErnasError(f"{where}: bad settings for task {name!r} ({e}).") from None
