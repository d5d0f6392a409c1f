"""Retraining a derived architecture for a task: the training loop, checkpoints and resume.

Recipe (NAFNet's, by default): AdamW (lr 1e-3, weight decay 0, betas (0.9, 0.9)), cosine decay
of the learning rate to 1e-7 over ``steps``, the task's loss (``Task.loss``), optional
gradient-norm clipping and distillation (``ernas.distill``). Initialisation: ``ernas.checkpoint``.
Model selection: ``best.pt`` holds the weights with the best validation value of the task's
headline metric (``Task.metric``, higher is better) on the val split.

Batches are pure functions of (seed, rank, step) (``ernas.batches``), and ``last.pt`` holds the
model, optimiser, schedule, adapters, log and the task's config, so a run stopped and resumed
gives bit-identical weights to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ernas.progress import progress as progress_bar
from ernas import build_model
from ernas import distributed as D
from ernas.batches import StepBatches, data_key
from ernas.checkpoint import init_model
from ernas.config import check, from_mapping
from ernas.distill import DistillConfig, Distiller, Student
from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_json, atomic_write_text
from ernas.scalars import Scalars
from ernas.space import Arch, arch_of, space_from_dict
from ernas.task import make_task

__all__ = ["TrainConfig", "resume", "retrain", "validate"]

FORMAT = "ernas-retrain-v1"


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


@torch.no_grad()
def validate(net: nn.Module, dataset, device, task) -> float:
    """The task's headline metric of ``net`` over every item of ``dataset`` (one evaluator)."""
    was = net.training
    net.eval()
    ev = task.evaluator()
    for i in range(len(dataset)):
        item = dataset[i]
        ev.update(net(item["input"][None].to(device)).float().cpu(), item["target"][None],
                  item["name"])
    net.train(was)
    return float(ev.compute()[task.metric])


def state_digest(module: nn.Module) -> str:
    """SHA-1 of every tensor of the state dict (to compare ranks)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _device(info: D.DistInfo, want: str) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise ErnasError("retrain device='cuda' but no CUDA device is available; use cpu or auto.")
    return torch.device(info.device if want in ("auto", "cuda") else want)


def _write_log(rows: list[dict], out: Path, task) -> None:
    import pandas as pd

    from ernas.plots import plot_train_curves

    cols = ["step", "lr", "loss", "task_loss", "out_loss", "feat_loss", f"val_{task.metric}",
            "seconds"]
    atomic_write_text(out / "log.csv", pd.DataFrame(rows, columns=cols).to_csv(index=False))
    plot_train_curves(rows, out / "curves.png", task.metric, task.metric_label)


@dataclass
class _State:
    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    last_val: float | None = None
    seconds: float = 0.0
    images: int = 0
    log: list = field(default_factory=list)
    window: list = field(default_factory=list)  # losses since the last log row


def training_data(task, cfg: TrainConfig, rank: int) -> tuple[StepBatches, object]:
    """This rank's training batches and (rank 0 only, else None) the validation set. Built
    before a run writes its first file, so a data error (a folder, a crop larger than the
    images) refuses the run instead of leaving a half-made run directory."""
    key = data_key(cfg.seed, rank)
    batches = StepBatches(task.dataset("train", cfg.crop, key, random=True), cfg.batch_size, key)
    return batches, task.dataset("val", cfg.val_crop, cfg.seed) if rank == 0 else None


def _run(arch: Arch, out: Path, cfg: TrainConfig, task, model: nn.Module,
         distill: DistillConfig | None, init_info: dict, ckpt: dict | None, progress: bool,
         stop_at: int | None, info: D.DistInfo, data: tuple) -> dict | None:
    """The training loop shared by :func:`retrain` and :func:`resume` (``data``: from
    :func:`training_data`)."""
    from ernas.complexity import count_macs, count_params

    main = info.rank == 0
    m = task.metric
    device = _device(info, cfg.device)
    distiller = Distiller(arch, distill, task).to(device) if distill is not None else None
    adapters = distiller.adapters if distiller is not None else None
    if adapters is not None:
        torch.manual_seed(cfg.seed + 1)
        for a in adapters:
            if isinstance(a, nn.Conv2d):
                a.reset_parameters()
    student = Student(model, arch.spec, adapters).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.eta_min)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    st = _State()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if adapters is not None:
            adapters.load_state_dict(ckpt["adapters"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        st = _State(**ckpt["state"])
    wrapped = student
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)

    batches, val_set = data
    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(st.step, end),
                                         num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    cin = arch.spec.io_channels(arch.geometry)[0]
    shape = (1, cin, 256, 256)
    size = {"params": count_params(model), "macs": count_macs(model, shape),
            "macs_input_shape": list(shape)}

    def save_last():
        atomic_torch_save({
            "format": FORMAT, "arch": arch.to_dict(), "arch_name": arch.name,
            "model": model.state_dict(), "task": task.to_dict(),
            "adapters": adapters.state_dict() if adapters is not None else None,
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "state": dataclasses.asdict(st), "config": cfg.to_dict(), "init": init_info,
            "distill": distill.to_dict() if distill is not None else None}, out / "last.pt")

    bar = progress_bar(cfg.steps, "retrain", initial=st.step, unit="step",
                       enabled=progress and main)
    scalars = Scalars(out, cfg.logger, enabled=main)
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            pred, feats = wrapped(x)
        task_l = task.loss(pred.float(), y)
        out_l, feat_l = distiller.loss(x, pred, feats) if distiller is not None else (
            task_l.new_zeros(()), task_l.new_zeros(()))
        loss = task_l + out_l + feat_l
        if not torch.isfinite(loss):
            kept = (f"{out / 'last.pt'} holds the state of step {st.log[-1]['step']}"
                    if (out / "last.pt").is_file() and st.log else "no checkpoint was saved yet")
            raise ErnasError(f"retrain step {st.step}: the loss is not finite (task "
                             f"{float(task_l):.4g}); lower lr (now {sched.get_last_lr()[0]:.3g}) "
                             f"or set grad_clip; {kept}.")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        lr = float(sched.get_last_lr()[0])
        sched.step()
        st.step += 1
        st.images += x.shape[0] * info.world_size
        st.window.append([float(t.detach()) for t in (loss, task_l, out_l, feat_l)])
        bar.update(1)
        validate_now = st.step % cfg.val_every == 0 or st.step == cfg.steps
        if st.step % cfg.log_every == 0 or validate_now:
            avg = [float(v) for v in np.mean(st.window, axis=0)]
            st.window.clear()
            st.log.append({"step": st.step, "lr": lr, "loss": avg[0], "task_loss": avg[1],
                           "out_loss": avg[2], "feat_loss": avg[3], f"val_{m}": None,
                           "seconds": st.seconds + time.perf_counter() - t0})
            bar.set_postfix(loss=f"{avg[0]:.3f}")
            scalars.add(st.step, {"train/loss": avg[0], "train/task_loss": avg[1],
                                  "train/distill_out": avg[2], "train/distill_feat": avg[3],
                                  "train/lr": lr})
        if validate_now and main:
            st.seconds += time.perf_counter() - t0
            v = validate(model, val_set, device, task)
            st.log[-1][f"val_{m}"] = st.last_val = v
            scalars.add(st.step, {f"val/{m}": v})
            if st.best_val is None or v > st.best_val:
                st.best_val, st.best_step = v, st.step
                atomic_torch_save({"format": FORMAT, "arch": arch.to_dict(),
                                   "arch_name": arch.name, "model": model.state_dict(),
                                   "step": st.step, f"val_{m}": v}, out / "best.pt")
            save_last()
            _write_log(st.log, out, task)
            bar.set_postfix(loss=f"{st.log[-1]['loss']:.3f}", val=f"{v:.3f}")
            t0 = time.perf_counter()
    bar.close()
    scalars.close()
    st.seconds += time.perf_counter() - t0
    digests = D.all_gather_object(state_digest(student))
    summary = None
    if main:
        if st.step < cfg.steps:  # stopped early (stop_at): keep a resumable state
            save_last()
            _write_log(st.log, out, task)
        summary = {
            "arch": arch.name, "arch_file": str(out / "arch.yaml"), "init": init_info.get("init"),
            "source": init_info.get("source"), "distill": distill is not None,
            "task": task.to_dict(), "metric": m,
            "steps": st.step, "target_steps": cfg.steps, "finished": st.step >= cfg.steps,
            f"best_val_{m}": st.best_val, "best_step": st.best_step,
            f"final_val_{m}": st.last_val, **size,
            "seconds": st.seconds, "images": st.images,
            "throughput_img_s": st.images / st.seconds if st.seconds > 0 else None,
            "world_size": info.world_size, "device": str(device),
            "weights_identical_across_ranks": len(set(digests)) == 1,
            "best": str(out / "best.pt"), "last": str(out / "last.pt"),
            "config": cfg.to_dict()}
        atomic_write_json(out / "summary.json", summary)
    D.barrier()
    return summary


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
    return _run(arch, out, cfg, task, model, distill, init_info, None, progress, stop_at, info,
                data)


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
    return _run(arch, out, cfg, task, build_model(arch), distill, ckpt["init"], state, progress,
                stop_at, info, training_data(task, cfg, info.rank))
