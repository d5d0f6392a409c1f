"""First-order bi-level search loop (DARTS first-order alternation) with exact resume.

Each step s:
  1. weights w ← AdamW step on the task loss of a training batch (probabilities p(α) detached;
     the latency and entropy terms do not depend on w, and a multiplicative latency factor is
     not applied to the weight loss). With ``weight_keep_rate`` q, the skip decisions of this
     step are hard draws, keep with probability q independent of α
     (``SuperNet.drop_paths``: stochastic depth, so α's lean to skip does not starve a block);
  2. after ``warmup_steps``, every ``alpha_every`` steps: α ← Adam step on the full objective
     task + latency + w_H(s)·H of a validation batch (``SearchObjective``), with the weights
     frozen and BatchNorm normalising with the batch's statistics without updating its running
     ones (``ernas.nn.batchnorm.frozen_bn_stats``: no validation data in the statistics).

Every ``log_every`` steps a row goes to ``log.csv`` at once (and, with ``logger=tensorboard``, to
TensorBoard); checkpoints rewrite it, and a resumed run starts it over from its checkpoint's rows.

At the end the derived arch (argmax of α, or with ``derive=budget`` the network the supernet
scores best within T: ``ernas.search.budget``) is extracted with inherited weights; the extracted
network and a copy of the supernet get their BatchNorm statistics recalibrated on
``bn_calibration_batches`` training batches before their validation metric is reported
(``inherited_val_<metric>``, ``supernet_val_<metric>``, ``discretisation_gap``), and
``inherited.pt`` holds the recalibrated network (``ernas.search.finish``).

Batches are pure functions of (seed, step) (``ernas.batches``), and the checkpoint holds the model,
α, both optimisers, the LR schedule, the log so far and every RNG state
(``ernas.search.state``), so a run killed at any point and resumed gives the same α as an
uninterrupted run (on CPU).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from ernas import distributed as D
from ernas.batches import Batch
from ernas.errors import ErnasError
from ernas.nn.batchnorm import frozen_bn_stats
from ernas.progress import progress as progress_bar
from ernas.search.config import SearchConfig
from ernas.search.finish import calibration_batches, finish, val_metric
from ernas.search.objective import normalized_entropy
from ernas.search.state import SearchRun
from ernas.space import Arch, SearchSpace

__all__ = ["calibration_batches", "frozen", "run_search", "val_metric"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen(params):
    """Weights without ``requires_grad`` for the α step (autograd then saves only what α needs)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _fail(step: int, phase: str, parts: dict, ckpt: Path) -> ErnasError:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
    kept = (f"the last good checkpoint {ckpt} was kept" if ckpt.is_file()
            else "no checkpoint had been written yet")
    return ErnasError(f"search step {step}: the {phase} loss is not finite ({shown}); the run "
                      f"stopped and {kept}. Lower the learning rate (lr_w / lr_alpha), e.g. by "
                      f"10x, or check the data for NaN/inf values.")


def _autocast(run: SearchRun):
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=run.cfg.amp and run.device.type == "cuda")


def _alpha_due(cfg: SearchConfig, step: int) -> bool:
    return step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.alpha_every == 0


def _weight_step(run: SearchRun, train_batch: Batch, step: int):
    """1. one AdamW step of w on the task loss of training batch ``step`` (p(α) detached, skip
    decisions drawn with ``weight_keep_rate``); returns (prediction, target)."""
    net, cfg = run.net, run.cfg
    net.train()
    x, y = (t.to(run.device) for t in train_batch(step))
    with torch.no_grad():
        probs = net.probs()
        if cfg.weight_keep_rate is not None:
            probs = net.drop_paths(probs, cfg.weight_keep_rate)
    with _autocast(run):
        pred = net(x, probs)
    loss = run.objective.task(pred.float(), y)
    if not math.isfinite(D.all_reduce_mean(float(loss.detach()))):  # same on every rank
        run.write_logs()
        raise _fail(step, "weight (task)", {"task": float(loss.detach())}, run.ckpt)
    run.opt_w.zero_grad(set_to_none=True)
    loss.backward()
    D.average_gradients(net.weight_parameters())
    run.opt_w.step()
    run.sched.step()
    return pred, y


def _alpha_step(run: SearchRun, val_batch: Batch, step: int):
    """2. one Adam step of α on the full objective of validation batch ``step``, weights frozen
    and BatchNorm on batch statistics (running statistics untouched); returns (the objective's
    parts, prediction, target)."""
    net = run.net
    vx, vy = (t.to(run.device) for t in val_batch(step))
    alphas = net.arch_parameters()
    with frozen(net.weight_parameters()), frozen_bn_stats(net):
        probs = net.probs()
        with _autocast(run):
            vpred = net(vx, probs)
        total, parts = run.objective(vpred.float(), vy, run.expected(probs),
                                     normalized_entropy(net.probs(sample=False)), step)
        if not math.isfinite(D.all_reduce_mean(parts["total"])):
            run.write_logs()
            raise _fail(step, "architecture", parts, run.ckpt)
        grads = torch.autograd.grad(total, alphas, allow_unused=True)
    for a, g in zip(alphas, grads):
        a.grad = torch.zeros_like(a) if g is None else g
    D.average_gradients(alphas)  # identical α steps on every rank
    run.opt_a.step()
    return parts, vpred.detach(), vy


def _log_step(run: SearchRun, bar, step: int, trained, alpha) -> None:
    """Log step ``step``: the α step's parts and validation-batch metric, or for a weight-only
    step the objective's parts on the training batch; the training batch's metric either way."""
    pred, y = trained
    task = run.task
    train_metric = task.batch_metric(pred, y)
    if alpha is None:
        with torch.no_grad():
            plain = run.net.probs(sample=False)
            _, parts = run.objective(pred.detach().float(), y, run.expected(plain),
                                     normalized_entropy(plain), step)
        val = None
    else:
        parts, vpred, vy = alpha
        val = task.batch_metric(vpred, vy)
    row = run.log(step, parts, train_metric, val, alpha is not None)
    bar.set_postfix(loss=f"{parts['total']:.3f}", **{task.metric: f"{train_metric:.3f}"},
                    lat=f"{row['expected_ms']:.2f}ms", H=f"{row['entropy']:.3f}")


def _train(run: SearchRun, train_batch: Batch, val_batch: Batch, progress: bool,
           stop_after: int | None) -> bool:
    """Steps ``run.step`` .. ``steps`` − 1 with logs and checkpoints; True when ``stop_after``
    ended it early (no final checkpoint then, as if the process had been killed)."""
    cfg = run.cfg
    bar = progress_bar(cfg.steps, "search", run.step, "step", enabled=progress and D.is_main())
    t0 = time.perf_counter()
    while run.step < cfg.steps:
        step = run.step
        trained = _weight_step(run, train_batch, step)
        alpha = _alpha_step(run, val_batch, step) if _alpha_due(cfg, step) else None
        run.step = step + 1
        if step % cfg.log_every == 0 or run.step == cfg.steps:
            _log_step(run, bar, step, trained, alpha)
        bar.update(1)
        if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            run.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            run.save()
            run.write_logs()
        if stop_after is not None and run.step >= stop_after and run.step < cfg.steps:
            bar.close()
            return True
    bar.close()
    run.elapsed += time.perf_counter() - t0
    run.save()
    run.write_logs()
    return False


def run_search(space: SearchSpace, expected_latency, train_batch: Batch, val_batch: Batch,
               cfg: SearchConfig, out_dir, task, resume: bool = False, progress: bool = True,
               baseline_arch: Arch | None = None, input_shape=None,
               stop_after: int | None = None) -> dict:
    """Search ``space`` for ``task`` (an ``ernas.task.Task``: its loss and metric); write logs,
    ``arch.yaml``, plots, checkpoint and ``summary.json`` to ``out_dir`` and return the summary.
    ``stop_after=k`` returns after step k (without final outputs) to simulate an interruption;
    ``resume=True`` continues from ``checkpoint.pt``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(task, "record_splits", lambda _: None)(out)  # which files each split used
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        run = SearchRun(space, expected_latency, cfg, out, baseline_arch or space.reference(),
                        task)
        if resume:
            run.load()
        log.info("search: space %s, task %s, steps %d to %d, target %.4g ms, into %s",
                 space.name, task.name, run.step, cfg.steps, run.target_ms, out)
        run.open_logs()
        try:
            stopped = _train(run, train_batch, val_batch, progress, stop_after)
        finally:
            run.close_logs()
        if stopped:
            return {"stopped_at": run.step, "out_dir": str(out)}
        return finish(run, train_batch, val_batch, input_shape)
    finally:
        torch.use_deterministic_algorithms(det)
