"""Retraining a derived architecture for a task: configuration, start and resume (the training
loop, its checkpoints and logs: ``ernas.train_loop``).

Recipe (NAFNet's, by default): AdamW (lr 1e-3, weight decay 0, betas (0.9, 0.9)), cosine decay
of the learning rate to 1e-7 over ``steps``, the task's loss (``Task.loss``), optional
gradient-norm clipping and distillation (``ernas.distill``). Initialisation: ``ernas.checkpoint``.
Model selection: ``best.pt`` holds the weights with the best validation value of the task's
headline metric (``Task.metric``, higher is better) on the val split. Train/test consistency
at validation (both off by default): ``bn_calibration_batches = n`` validates, and keeps in
``best.pt``, a copy whose BatchNorm statistics are the plain average over the n training batches
after the last step (precise BatchNorm, Wu & Johnson 2021) instead of the running averages of
training; ``val_tile = t`` runs whole validation images through stitched t x t tiles, so
BatchNorm and the global pooling of channel attention see inputs of the size trained on
(``ernas.data.tiles.stitched``). ``last.pt`` always holds the training state as it is.

Batches are pure functions of (seed, rank, step) (``ernas.batches``), and ``last.pt`` holds the
model, optimiser, schedule, adapters, log and the task's config, so a run stopped and resumed
gives bit-identical weights to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ernas import build_model
from ernas import distributed as D
from ernas.batches import StepBatches, data_key
from ernas.checkpoint import init_model
from ernas.config import check, from_mapping
from ernas.distill import DistillConfig
from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.space import Arch, arch_of, space_from_dict
from ernas.task import make_task
from ernas.train_loop import FORMAT, run_training, state_digest, validate

__all__ = ["TrainConfig", "resume", "retrain", "state_digest", "validate"]

@dataclass
class TrainConfig:
    """Retraining hyper-parameters (plain values; saved in ``last.pt`` and the summary)."""

    steps: int = 200
    batch_size: int = 8                 # per rank
    crop: int = 64
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.9)
    eta_min: float = 1e-7
    grad_clip: float | None = None      # max gradient norm; None: no clipping
    val_every: int = 50
    val_crop: int | None = 128          # centre crop of the val images (None: whole images)
    val_tile: int | None = None         # validate through stitched tiles of this side (None: whole)
    bn_calibration_batches: int = 0     # precise BatchNorm for validation (0: as trained)
    num_workers: int = 0
    amp: bool = True                    # autocast on CUDA only (bfloat16, else float16)
    log_every: int = 10
    device: str = "auto"
    logger: str = "csv"                 # csv | tensorboard (CSV plus TensorBoard scalars)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        bad = [f"{f}={getattr(self, f)!r} must be a positive integer"
               for f in ("steps", "batch_size", "crop", "val_every", "log_every")
               if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int)
               or getattr(self, f) < 1]
        if self.val_crop is not None and not (isinstance(self.val_crop, int) and self.val_crop > 0):
            bad.append(f"val_crop={self.val_crop!r} must be a positive integer or null")
        if self.val_tile is not None and (isinstance(self.val_tile, bool) or not isinstance(
                self.val_tile, int) or self.val_tile < 16):
            bad.append(f"val_tile={self.val_tile!r} must be an integer >= 16 (e.g. the training "
                       f"crop) or null")
        if isinstance(self.bn_calibration_batches, bool) or not isinstance(
                self.bn_calibration_batches, int) or self.bn_calibration_batches < 0:
            bad.append(f"bn_calibration_batches={self.bn_calibration_batches!r} must be an "
                       f"integer >= 0 (0: keep the running statistics as trained)")
        if not self.lr > 0:
            bad.append(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0 or self.eta_min < 0:
            bad.append(f"weight_decay={self.weight_decay} and eta_min={self.eta_min} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad.append(f"betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.9]")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad.append(f"grad_clip={self.grad_clip} must be > 0 (or null: no clipping)")
        if self.num_workers < 0:
            bad.append(f"num_workers={self.num_workers} must be >= 0")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad.append(f"device={self.device!r} must be auto, cpu or cuda")
        if self.logger not in ("csv", "tensorboard"):
            bad.append(f"logger={self.logger!r} must be csv or tensorboard")
        check("retrain config", bad)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return from_mapping(cls, data, "retrain config")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# fields that may differ when resuming (they do not change the computation): the one list,
# which ernas-retrain extends with its own `threads`
RESUME_FREE = ("num_workers", "log_every", "device", "logger")


def training_data(task, cfg: TrainConfig, rank: int) -> tuple[StepBatches, object]:
    """This rank's training batches and (rank 0 only, else None) the validation set. Built
    before a run writes its first file, so a data error (a folder, a crop larger than the
    images) refuses the run instead of leaving a half-made run directory."""
    key = data_key(cfg.seed, rank)
    batches = StepBatches(task.dataset("train", cfg.crop, key, random=True), cfg.batch_size, key)
    return batches, task.dataset("val", cfg.val_crop, cfg.seed) if rank == 0 else None


def retrain(arch: Arch, out_dir, task, cfg: TrainConfig | None = None, init: str = "scratch",
            source=None, distill: DistillConfig | None = None, progress: bool = True,
            stop_at: int | None = None, space=None, data: tuple | None = None) -> dict | None:
    """Train ``arch`` on ``task`` into ``out_dir``: arch.yaml, init_report.json, best.pt (best
    validation metric), last.pt, log.csv, curves.png, summary.json (written by rank 0 only).
    ``stop_at=k`` stops after step k as if interrupted (``last.pt`` is written; :func:`resume`
    continues). Under torchrun it trains with DDP. ``data``: :func:`training_data`, when the
    caller built it already (to check the data before it claims a run directory). Returns the
    summary (None on ranks > 0)."""
    cfg = cfg or TrainConfig()
    task.check_arch(arch)
    info = D.setup(cfg.device)
    out = Path(out_dir)
    data = data or training_data(task, cfg, info.rank)
    model, report = init_model(arch, init, source, cfg.seed, space)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        arch.save(out / "arch.yaml")
        atomic_write_json(out / "init_report.json", report)
        getattr(task, "record_splits", lambda _: None)(out)  # which files each split used
    init_info = {"init": init, "source": str(source) if source else None}
    return run_training(arch, out, cfg, task, model, distill, init_info, None, progress, stop_at,
                        info, data)


def resume(run_dir, progress: bool = True, stop_at: int | None = None,
           **overrides) -> dict | None:
    """Continue the run in ``run_dir`` from its ``last.pt`` with the stored architecture, task,
    configuration, initialisation record and teacher (whose checkpoint must still exist). Only
    the fields in ``RESUME_FREE`` may be overridden."""
    out = Path(run_dir)
    path = out / "last.pt"
    if not path.is_file():
        raise ErnasError(f"resume={run_dir}: no last.pt there; pass the directory of an "
                         f"interrupted retrain run.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ErnasError(f"{path}: this checkpoint cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'empty or truncated'}); "
                         f"it was damaged after it was written (ernas writes it atomically). "
                         f"Restore it from a copy, or start the run again in a new directory "
                         f"(best.pt there holds the best weights so far).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ErnasError(f"{path}: not a retrain checkpoint of this ernas (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else None!r}); start "
                         f"the run again in a new directory.")
    bad = sorted(set(overrides) - set(RESUME_FREE))
    if bad:
        raise ErnasError(f"resume: cannot change {bad} of a run; only {list(RESUME_FREE)} may "
                         f"differ. Start a new run to change the rest.")
    cfg = TrainConfig.from_dict({**ckpt["config"], **overrides})
    info = D.setup(cfg.device)
    arch = arch_of(space_from_dict(ckpt["arch"], str(out / "arch.yaml"), ckpt.get("arch_name")))
    task = make_task(ckpt["task"], f"{path}:task")
    distill = None
    if ckpt.get("distill"):
        d = ckpt["distill"]
        t_arch = arch_of(space_from_dict(d["arch"], d.get("arch_source") or "<teacher>"))
        distill = DistillConfig(t_arch, d["checkpoint"], d["w_out"], d["w_feat"])
    state = {k: ckpt[k] for k in ("model", "adapters", "optimizer", "scheduler", "scaler",
                                  "state")}
    return run_training(arch, out, cfg, task, build_model(arch), distill, ckpt["init"], state,
                        progress, stop_at, info, training_data(task, cfg, info.rank))
