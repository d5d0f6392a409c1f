"""The retraining loop (``ernas.train``): one run's student, optimiser, schedule, gradient scaler
and state (``_Training``), its checkpoints (``last.pt`` every validation, ``best.pt`` at the best
validation metric) and its logs (``log.csv`` grown one row per ``log_every`` steps and rewritten
at each checkpoint, so a resumed run starts it over from its checkpoint's rows; optional
TensorBoard scalars)."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ernas import distributed as D
from ernas.batches import StepBatches
from ernas.csvlog import CsvLog
from ernas.data.tiles import stitched
from ernas.distill import DistillConfig, Distiller, Student
from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_json
from ernas.nn.batchnorm import batchnorms, recalibrate_bn
from ernas.progress import progress as progress_bar
from ernas.scalars import Scalars
from ernas.space import Arch

__all__ = ["FORMAT", "improves", "judged", "run_training", "state_digest", "validate"]

log = logging.getLogger(__name__)

FORMAT = "ernas-retrain-v1"


@torch.no_grad()
def validate(net: nn.Module, dataset, device, task, tile: int | None = None) -> float:
    """The task's headline metric of ``net`` over every item of ``dataset`` (one evaluator),
    each item whole or (``tile``) through stitched tile x tile tiles."""
    was = net.training
    net.eval()
    ev = task.evaluator()
    for i in range(len(dataset)):
        item = dataset[i]
        x = item["input"][None].to(device)
        pred = net(x) if tile is None else stitched(net, x, (tile, tile))
        ev.update(pred.float().cpu(), item["target"][None], item["name"])
    net.train(was)
    return float(ev.compute()[task.metric])


def judged(model: nn.Module, batches: StepBatches, cfg, device) -> nn.Module:
    """The network validation judges: ``model`` itself, or with ``cfg.bn_calibration_batches``
    = n a copy whose BatchNorm statistics are averaged over training batches ``cfg.steps`` ..
    ``cfg.steps + n - 1`` (never trained on; ``ernas.nn.batchnorm.recalibrate_bn``)."""
    n = cfg.bn_calibration_batches
    if not n or not batchnorms(model):
        return model
    copy = deepcopy(model)
    recalibrate_bn(copy, (batches[cfg.steps + i][0].to(device) for i in range(n)))
    return copy


def improves(value: float, best: float | None) -> bool:
    """Whether a validation ``value`` replaces ``best`` in ``best.pt``: the first validation
    does; a finite value beats a non-finite best or a lower one; a non-finite value (a network
    that gave NaN/inf on some validation image) never replaces a finite best."""
    if best is None or not np.isfinite(best):
        return best is None or bool(np.isfinite(value))
    return bool(np.isfinite(value)) and value > best


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


LOG_COLUMNS = ["step", "lr", "loss", "task_loss", "out_loss", "feat_loss", "val_{metric}",
               "seconds"]


def _log_file(out: Path, task, enabled: bool) -> CsvLog:
    return CsvLog(out / "log.csv", [c.format(metric=task.metric) for c in LOG_COLUMNS], enabled)


def _write_log(rows: list[dict], out: Path, task) -> None:
    """Rewrite log.csv from ``rows`` and redraw curves.png."""
    from ernas.plots import plot_train_curves

    _log_file(out, task, True).rewrite(rows)
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


class _Training:
    """One retraining run: the student (network plus distillation adapters), AdamW, the cosine
    schedule, the gradient scaler and the state, with its checkpoints and logs."""

    def __init__(self, arch: Arch, out: Path, cfg, task, model: nn.Module,
                 distill: DistillConfig | None, init_info: dict, info: D.DistInfo):
        self.arch, self.out, self.cfg, self.task, self.model = arch, out, cfg, task, model
        self.distill, self.init_info, self.info = distill, init_info, info
        self.main = info.rank == 0
        self.device = device = _device(info, cfg.device)
        self.distiller = Distiller(arch, distill, task).to(device) if distill else None
        self.adapters = self.distiller.adapters if self.distiller is not None else None
        if self.adapters is not None:
            torch.manual_seed(cfg.seed + 1)
            for a in self.adapters:
                if isinstance(a, nn.Conv2d):
                    a.reset_parameters()
        self.student = Student(model, arch.spec, self.adapters).to(device)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=cfg.betas)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.steps,
                                                                eta_min=cfg.eta_min)
        self.use_amp = use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda",
                                           enabled=use_amp and self.amp_dtype == torch.float16)
        self.st = _State()
        self.wrapped = self.student

    def restore(self, ckpt: dict) -> None:
        """The model, adapters, optimiser, schedule, scaler and state of ``last.pt``."""
        self.model.load_state_dict(ckpt["model"])
        if self.adapters is not None:
            self.adapters.load_state_dict(ckpt["adapters"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.st = _State(**ckpt["state"])

    def wrap_ddp(self) -> None:
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = self.device
            self.wrapped = DDP(self.student, device_ids=[dev.index] if dev.type == "cuda" else None)

    def loader(self, batches: StepBatches, stop_at: int | None):
        """Batches of steps ``st.step`` .. the end (``stop_at`` or ``steps``)."""
        end = self.cfg.steps if stop_at is None else min(self.cfg.steps, int(stop_at))
        return torch.utils.data.DataLoader(batches, batch_size=None,
                                           sampler=range(self.st.step, end),
                                           num_workers=self.cfg.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def save_last(self) -> None:
        a, distill = self.adapters, self.distill
        atomic_torch_save({
            "format": FORMAT, "arch": self.arch.to_dict(), "arch_name": self.arch.name,
            "model": self.model.state_dict(), "task": self.task.to_dict(),
            "adapters": a.state_dict() if a is not None else None,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "state": dataclasses.asdict(self.st), "config": self.cfg.to_dict(),
            "init": self.init_info,
            "distill": distill.to_dict() if distill is not None else None}, self.out / "last.pt")

    def _losses(self, x, y):
        """(total, task, distillation output, distillation features) of one batch."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            pred, feats = self.wrapped(x)
        task_l = self.task.loss(pred.float(), y)
        out_l, feat_l = self.distiller.loss(x, pred, feats) if self.distiller is not None else (
            task_l.new_zeros(()), task_l.new_zeros(()))
        return task_l + out_l + feat_l, task_l, out_l, feat_l

    def step(self, x, y) -> float:
        """One optimiser step on the batch (x, y); returns the learning rate it used."""
        st = self.st
        losses = self._losses(x, y)
        if not torch.isfinite(losses[0]):
            kept = (f"{self.out / 'last.pt'} holds the state of step {st.log[-1]['step']}"
                    if (self.out / "last.pt").is_file() and st.log
                    else "no checkpoint was saved yet")
            raise ErnasError(f"retrain step {st.step}: the loss is not finite (task "
                             f"{float(losses[1]):.4g}); lower lr (now "
                             f"{self.sched.get_last_lr()[0]:.3g}) or set grad_clip; {kept}.")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(losses[0]).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = float(self.sched.get_last_lr()[0])
        self.sched.step()
        st.step += 1
        st.images += x.shape[0] * self.info.world_size
        st.window.append([float(t.detach()) for t in losses])
        return lr

    def log_row(self, lr: float, seconds: float) -> dict:
        """The mean losses since the last row, as a new row of ``st.log``."""
        avg = [float(v) for v in np.mean(self.st.window, axis=0)]
        self.st.window.clear()
        row = {"step": self.st.step, "lr": lr, "loss": avg[0], "task_loss": avg[1],
               "out_loss": avg[2], "feat_loss": avg[3], f"val_{self.task.metric}": None,
               "seconds": seconds}
        self.st.log.append(row)
        return row

    def validate(self, val_set, batches: StepBatches) -> float:
        """Validate (rank 0) the judged network (:func:`judged`), keep it in ``best.pt`` when
        best, save ``last.pt`` and the logs."""
        st, m = self.st, self.task.metric
        net = judged(self.model, batches, self.cfg, self.device)
        v = validate(net, val_set, self.device, self.task, self.cfg.val_tile)
        st.log[-1][f"val_{m}"] = st.last_val = v
        if not np.isfinite(v):
            log.warning("retrain step %d: val %s is not finite: the network gave non-finite "
                        "outputs on a validation image; such a checkpoint never replaces a "
                        "finite best.", st.step, m)
        if improves(v, st.best_val):
            st.best_val, st.best_step = v, st.step
            atomic_torch_save({"format": FORMAT, "arch": self.arch.to_dict(),
                               "arch_name": self.arch.name, "model": net.state_dict(),
                               "step": st.step, f"val_{m}": v}, self.out / "best.pt")
        self.save_last()
        _write_log(st.log, self.out, self.task)
        log.info("retrain step %d/%d: val %s %.4f (best %.4f at step %d)", st.step,
                 self.cfg.steps, m, v, st.best_val, st.best_step)
        return v

    def summary(self, size: dict, digests: list[str]) -> dict:
        st, m, cfg, out = self.st, self.task.metric, self.cfg, self.out
        return {
            "arch": self.arch.name, "arch_file": str(out / "arch.yaml"),
            "init": self.init_info.get("init"), "source": self.init_info.get("source"),
            "distill": self.distill is not None, "task": self.task.to_dict(), "metric": m,
            "steps": st.step, "target_steps": cfg.steps, "finished": st.step >= cfg.steps,
            f"best_val_{m}": st.best_val, "best_step": st.best_step,
            f"final_val_{m}": st.last_val, **size,
            "seconds": st.seconds, "images": st.images,
            "throughput_img_s": st.images / st.seconds if st.seconds > 0 else None,
            "world_size": self.info.world_size, "device": str(self.device),
            "weights_identical_across_ranks": len(set(digests)) == 1,
            "best": str(out / "best.pt"), "last": str(out / "last.pt"),
            "config": cfg.to_dict()}


def _size(arch: Arch, model: nn.Module) -> dict:
    """Parameters and MACs of ``model`` at a 256x256 input."""
    from ernas.complexity import count_macs, count_params

    shape = (1, arch.spec.io_channels(arch.geometry)[0], 256, 256)
    return {"params": count_params(model), "macs": count_macs(model, shape),
            "macs_input_shape": list(shape)}


def train_steps(t: _Training, loader, data: tuple, progress: bool) -> None:
    """Train over ``loader``: a log row every ``log_every`` steps (appended to log.csv at
    once), validation and checkpoints every ``val_every`` steps and at the last. ``data``: the
    training batches and the validation set (``ernas.train.training_data``)."""
    st, cfg = t.st, t.cfg
    batches, val_set = data
    bar = progress_bar(cfg.steps, "retrain", initial=st.step, unit="step",
                       enabled=progress and t.main)
    scalars = Scalars(t.out, cfg.logger, enabled=t.main)
    csv_log = _log_file(t.out, t.task, t.main)
    csv_log.rewrite(st.log)  # a resumed run drops the rows logged after its last.pt
    t0 = time.perf_counter()
    for x, y in loader:
        lr = t.step(x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True))
        bar.update(1)
        validate_now = st.step % cfg.val_every == 0 or st.step == cfg.steps
        if not (st.step % cfg.log_every == 0 or validate_now):
            continue
        row = t.log_row(lr, st.seconds + time.perf_counter() - t0)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        scalars.add(st.step, {"train/loss": row["loss"], "train/task_loss": row["task_loss"],
                              "train/distill_out": row["out_loss"],
                              "train/distill_feat": row["feat_loss"], "train/lr": lr})
        if validate_now and t.main:
            st.seconds += time.perf_counter() - t0
            v = t.validate(val_set, batches)
            scalars.add(st.step, {f"val/{t.task.metric}": v})
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{v:.3f}")
            t0 = time.perf_counter()
        else:
            csv_log.append(row)
    bar.close()
    scalars.close()
    st.seconds += time.perf_counter() - t0


def run_training(arch: Arch, out: Path, cfg, task, model: nn.Module,
         distill: DistillConfig | None, init_info: dict, ckpt: dict | None, progress: bool,
         stop_at: int | None, info: D.DistInfo, data: tuple) -> dict | None:
    """The training run shared by ``ernas.train.retrain`` and ``ernas.train.resume`` (``data``:
    from ``ernas.train.training_data``; ``ckpt``: the state of ``last.pt`` to continue from);
    returns the summary on rank 0, else None."""
    t = _Training(arch, out, cfg, task, model, distill, init_info, info)
    if ckpt is not None:
        t.restore(ckpt)
    t.wrap_ddp()
    loader = t.loader(data[0], stop_at)
    size = _size(arch, model)
    train_steps(t, loader, data, progress)
    digests = D.all_gather_object(state_digest(t.student))
    summary = None
    if t.main:
        if t.st.step < cfg.steps:  # stopped early (stop_at): keep a resumable state
            t.save_last()
            _write_log(t.st.log, out, task)
        summary = t.summary(size, digests)
        atomic_write_json(out / "summary.json", summary)
    D.barrier()
    return summary
