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

At the end the derived arch (argmax of α, or with ``derive=budget`` the network the supernet
scores best within T: ``ernas.search.budget``) is extracted with inherited weights; the extracted
network and a copy of the supernet get their BatchNorm statistics recalibrated on
``bn_calibration_batches`` training batches before their validation metric is reported
(``inherited_val_<metric>``, ``supernet_val_<metric>``, ``discretisation_gap``), and
``inherited.pt`` holds the recalibrated network.

Batches are pure functions of (seed, step) (``ernas.batches``), and the checkpoint holds the model,
α, both optimisers, the LR schedule, the log so far and every RNG state, so a run killed at any
point and resumed gives the same α as an uninterrupted run (on CPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from ernas import distributed as D
from ernas.batches import Batch
from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_json, atomic_write_text
from ernas.nn.batchnorm import batchnorms, frozen_bn_stats, recalibrate_bn
from ernas.search.budget import changes, check_budget, derive_within
from ernas.search.config import RESUME_FREE, SearchConfig
from ernas.search.objective import LatencyLoss, SearchObjective, normalized_entropy
from ernas.space import Arch, SearchSpace
from ernas.supernet import SuperNet


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ErnasError("search config device='cuda' but no CUDA device is available; use "
                         "device='cpu' or 'auto'.")
    return torch.device(name)


def _rng_state() -> dict:
    st = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (st[0], torch.from_numpy(st[1].astype(np.int64)), *map(float, st[2:]))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _choice_str(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class _Run:
    """State of one search run (model, optimisers, logs) and its file outputs."""

    def __init__(self, space, expected_latency, cfg: SearchConfig, out_dir: Path, baseline: Arch,
                 task):
        self.space, self.cfg, self.out, self.task = space, cfg, out_dir, task
        self.device = _device(cfg.device)
        self.expected = expected_latency.to(self.device)
        torch.manual_seed(cfg.seed)
        self.net = SuperNet(space, cfg.mode, cfg.temperature, cfg.gumbel).to(self.device)
        D.sync_parameters(self.net.parameters())  # every rank starts from rank 0's w and α
        self.opt_w = torch.optim.AdamW(self.net.weight_parameters(), lr=cfg.lr_w,
                                       weight_decay=cfg.weight_decay)
        self.opt_a = torch.optim.Adam(self.net.arch_parameters(), lr=cfg.lr_alpha,
                                      betas=(0.5, 0.999))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt_w, T_max=max(1, cfg.steps), eta_min=cfg.lr_min)
        self.baseline = baseline
        self.baseline_ms = (expected_latency.of_arch(baseline) if space.contains(baseline)
                            else None)
        with torch.no_grad():
            target = cfg.target_ms or self.baseline_ms or float(self.expected(
                self.net.probs(False)))
        self.target_ms = float(target)
        if cfg.derive == "budget":  # refused here, before the search, not after it
            check_budget(space, expected_latency, self.target_ms, "search.derive=budget")
        self.objective = SearchObjective(task.loss, LatencyLoss(cfg.latency_form, cfg.lam,
                                                               self.target_ms, cfg.beta),
                                         cfg.entropy_schedule(), task.loss_log_scale)
        self.step = 0
        self.log_rows: list[dict] = []
        self.alpha_rows: list[dict] = []
        self.elapsed = 0.0
        self.ckpt = out_dir / "checkpoint.pt"

    # -------------------------------------------------------------- checkpoint
    def save(self) -> None:
        if not D.is_main():
            return
        bad = [n for n, p in self.net.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ErnasError(f"search step {self.step}: parameters {bad[:3]} are not finite; the "
                             f"checkpoint {self.ckpt} was not overwritten. Lower lr_w/lr_alpha.")
        atomic_torch_save({"model": self.net.state_dict(), "opt_w": self.opt_w.state_dict(),
                           "opt_a": self.opt_a.state_dict(), "sched": self.sched.state_dict(),
                           "step": self.step, "log_rows": self.log_rows,
                           "space": self.space.to_dict(),
                           "alpha_rows": self.alpha_rows, "config": self.cfg.to_dict(),
                           "elapsed": self.elapsed, "rng": _rng_state()}, self.ckpt)

    def load(self) -> None:
        if not self.ckpt.is_file():
            raise ErnasError(f"resume=True but {self.ckpt} does not exist; start the search "
                             f"without resume, or point out_dir at the interrupted run.")
        try:
            ck = torch.load(self.ckpt, map_location=self.device, weights_only=True)
            old = ck["config"]
        except Exception as e:  # noqa: BLE001 - truncated, not a zip, not ours: all one answer
            raise ErnasError(f"{self.ckpt}: cannot read this search checkpoint ({type(e).__name__}"
                             f": {str(e).splitlines()[0][:200] if str(e) else ''}); it is damaged "
                             f"or not a search checkpoint. Start a new search (without resume=), "
                             f"or restore the file from a copy.") from None
        default = SearchConfig().to_dict()  # a field added since: the run had its default
        diff = sorted(k for k, v in self.cfg.to_dict().items()
                      if k not in RESUME_FREE and old.get(k, default[k]) != v)
        if diff:
            raise ErnasError(f"{self.ckpt}: cannot resume with a different configuration; "
                             f"changed field(s): " + ", ".join(f"{k} ({old.get(k)!r} -> "
                             f"{getattr(self.cfg, k)!r})" for k in diff)
                             + ". Use the original values or start a new out_dir.")
        try:
            self.net.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise ErnasError(f"{self.ckpt}: the supernet in this checkpoint does not fit space "
                             f"{self.space.name!r} ({' '.join(str(e).split())[:240]}...); resume "
                             f"with the space the run was started with.") from None
        self.opt_w.load_state_dict(ck["opt_w"])
        self.opt_a.load_state_dict(ck["opt_a"])
        self.sched.load_state_dict(ck["sched"])
        self.step, self.elapsed = ck["step"], ck["elapsed"]
        self.log_rows, self.alpha_rows = ck["log_rows"], ck["alpha_rows"]
        _set_rng_state(ck["rng"])

    # -------------------------------------------------------------- logging
    def log(self, step: int, parts: dict, train_metric: float, alpha_updated: bool) -> None:
        """One row of log.csv (loss parts of the α step, or of the objective on the training
        batch when α was not updated) and the current probabilities for alphas.csv."""
        with torch.no_grad():
            probs = self.net.probs(sample=False)
            expected_ms = float(self.expected(probs))
        self.log_rows.append({"step": step, "alpha_updated": int(alpha_updated),
                              **{k: parts[k] for k in ("total", "task", "latency",
                                                       "entropy_weight")},
                              f"train_{self.task.metric}": train_metric,
                              "expected_ms": expected_ms,
                              "entropy": self.net.entropy(),
                              "decisiveness": self.net.decisiveness(),
                              "lr_w": self.opt_w.param_groups[0]["lr"],
                              "lr_alpha": self.opt_a.param_groups[0]["lr"]})
        for pos, dec in probs.items():
            for d, p in dec.items():
                if p.numel() > 1:
                    for c, v in zip(self.space.choices[pos][d], p.tolist()):
                        self.alpha_rows.append({"step": step, "position": pos, "decision": d,
                                                "choice": _choice_str(c), "probability": v})

    def write_logs(self) -> None:
        if not D.is_main():
            return
        import pandas as pd

        atomic_write_text(self.out / "log.csv", pd.DataFrame(self.log_rows).to_csv(index=False))
        atomic_write_text(self.out / "alphas.csv", pd.DataFrame(
            self.alpha_rows, columns=["step", "position", "decision", "choice",
                                      "probability"]).to_csv(index=False))


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


def run_search(space: SearchSpace, expected_latency, train_batch: Batch, val_batch: Batch,
               cfg: SearchConfig, out_dir, task, resume: bool = False, progress: bool = True,
               baseline_arch: Arch | None = None, input_shape=None,
               stop_after: int | None = None) -> dict:
    """Search ``space`` for ``task`` (an ``ernas.task.Task``: its loss and metric); write logs,
    ``arch.yaml``, plots, checkpoint and ``summary.json`` to ``out_dir`` and return the summary.
    ``stop_after=k`` returns after step k (without final outputs) to simulate an interruption;
    ``resume=True`` continues from ``checkpoint.pt``."""
    from ernas.progress import progress as progress_bar

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(task, "record_splits", lambda _: None)(out)  # which files each split used
    baseline = baseline_arch or space.reference()
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        run = _Run(space, expected_latency, cfg, out, baseline, task)
        if resume:
            run.load()
        net, dev = run.net, run.device
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=cfg.amp and dev.type == "cuda")
        bar = progress_bar(cfg.steps, "search", run.step, "step",
                           enabled=progress and D.is_main())
        t0 = time.perf_counter()
        while run.step < cfg.steps:
            step = run.step
            net.train()
            # 1. weights on a training batch
            x, y = (t.to(dev) for t in train_batch(step))
            with torch.no_grad():
                probs = net.probs()
                if cfg.weight_keep_rate is not None:
                    probs = net.drop_paths(probs, cfg.weight_keep_rate)
            with autocast:
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
            train_metric = task.batch_metric(pred, y)
            parts = None
            # 2. architecture on a validation batch
            if step >= cfg.warmup_steps and (step - cfg.warmup_steps) % cfg.alpha_every == 0:
                vx, vy = (t.to(dev) for t in val_batch(step))
                alphas = net.arch_parameters()
                # no tensors kept for weight gradients; BatchNorm on batch statistics, running
                # statistics untouched (``ernas.nn.batchnorm``)
                with frozen(net.weight_parameters()), frozen_bn_stats(net):
                    probs = net.probs()
                    with autocast:
                        vpred = net(vx, probs)
                    total, parts = run.objective(vpred.float(), vy, run.expected(probs),
                                                 normalized_entropy(net.probs(sample=False)),
                                                 step)
                    if not math.isfinite(D.all_reduce_mean(parts["total"])):
                        run.write_logs()
                        raise _fail(step, "architecture", parts, run.ckpt)
                    grads = torch.autograd.grad(total, alphas, allow_unused=True)
                for a, g in zip(alphas, grads):
                    a.grad = torch.zeros_like(a) if g is None else g
                D.average_gradients(alphas)  # identical α steps on every rank
                run.opt_a.step()
            run.step = step + 1
            if step % cfg.log_every == 0 or run.step == cfg.steps:
                alpha_updated = parts is not None
                if parts is None:  # weight-only step: the objective's parts on the train batch
                    with torch.no_grad():
                        plain = net.probs(sample=False)
                        _, parts = run.objective(pred.detach().float(), y, run.expected(plain),
                                                 normalized_entropy(plain), step)
                run.log(step, parts, train_metric, alpha_updated)
                bar.set_postfix(loss=f"{parts['total']:.3f}",
                                **{task.metric: f"{train_metric:.3f}"},
                                lat=f"{run.log_rows[-1]['expected_ms']:.2f}ms",
                                H=f"{run.log_rows[-1]['entropy']:.3f}")
            bar.update(1)
            if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                run.elapsed += time.perf_counter() - t0
                t0 = time.perf_counter()
                run.save()
                run.write_logs()
            if stop_after is not None and run.step >= stop_after and run.step < cfg.steps:
                bar.close()
                return {"stopped_at": run.step, "out_dir": str(out)}
        bar.close()
        run.elapsed += time.perf_counter() - t0
        run.save()
        run.write_logs()
        return _finish(run, train_batch, val_batch, input_shape)
    finally:
        torch.use_deterministic_algorithms(det)


@torch.no_grad()
def val_metric(net: torch.nn.Module, val_batch: Batch, n: int, device, task) -> float:
    """The task's headline metric of ``net`` (supernet or extracted network) over the first
    ``n`` validation batches, accumulated by one evaluator."""
    net.eval()
    ev = task.evaluator()
    for i in range(n):
        x, y = val_batch(i)
        ev.update(net(x.to(device)).float().cpu(), y, f"val{i}")
    return float(ev.compute()[task.metric])


def calibration_batches(train_batch: Batch, cfg: SearchConfig, device):
    """The inputs of ``cfg.bn_calibration_batches`` training batches (steps after the search's
    last, so batches the weights were not trained on) for BatchNorm recalibration."""
    return (train_batch(cfg.steps + i)[0].to(device) for i in range(cfg.bn_calibration_batches))


def _finish(run: _Run, train_batch: Batch, val_batch: Batch, input_shape) -> dict:
    """Derive, extract and judge: both the supernet (a copy) and the extracted network get their
    BatchNorm statistics recalibrated on the same training batches (``recalibrate_bn``) before
    their validation metric, so ``discretisation_gap`` compares like with like; ``inherited.pt``
    holds the recalibrated statistics."""
    import copy

    from ernas import build_model
    from ernas.complexity import count_macs, count_params
    from ernas.plots import plot_probs, plot_search_curves

    net, out, space, task, cfg = run.net, run.out, run.space, run.task, run.cfg
    m = task.metric
    derived = argmax = net.derive(name=f"{space.name}_searched")
    if cfg.derive == "budget":
        derived = derive_within(net, run.expected, run.target_ms, argmax, val_batch,
                                cfg.eval_batches, run.device, task)
    per_rank = D.all_gather_object(derived.to_dict())
    arch_path = out / "arch.yaml"
    inherited = net.extract(derived)
    supernet = net
    if batchnorms(net):
        supernet = copy.deepcopy(net)  # the checkpoint keeps the search's own statistics
        recalibrate_bn(supernet, calibration_batches(train_batch, cfg, run.device))
    calibrated = recalibrate_bn(inherited, calibration_batches(train_batch, cfg, run.device))
    if D.is_main():
        derived.save(arch_path)
        atomic_torch_save(inherited.state_dict(), out / "inherited.pt")
    shape = tuple(input_shape or run.expected.input_shape)
    base_model = build_model(run.baseline)
    summary = {
        "arch_name": derived.name, "arch_path": str(arch_path),
        "inherited_weights": str(out / "inherited.pt"),
        "predicted_latency_ms": run.expected.of_arch(derived),
        "baseline_latency_ms": run.baseline_ms, "baseline_name": run.baseline.name,
        "target_ms": run.target_ms, "derive": cfg.derive,
        "argmax_predicted_ms": run.expected.of_arch(argmax),
        "derive_changes": changes(space, argmax, derived),
        "params": count_params(inherited), "baseline_params": count_params(base_model),
        "macs": count_macs(inherited, shape), "baseline_macs": count_macs(base_model, shape),
        "input_shape": list(shape),
        "task": task.name, "metric": m,
        f"supernet_val_{m}": val_metric(supernet, val_batch, cfg.eval_batches, run.device, task),
        f"inherited_val_{m}": val_metric(inherited.to(run.device), val_batch,
                                         cfg.eval_batches, run.device, task),
        "bn_calibration_batches": calibrated,
        "decisiveness": net.decisiveness(), "entropy": net.entropy(),
        "search_seconds": run.elapsed, "steps": run.step, "mode": cfg.mode,
        "world_size": D.world_size(), "ranks_agree": all(a == per_rank[0] for a in per_rank),
        "arch_digest": hashlib.sha256(json.dumps(per_rank[D.rank()], sort_keys=True,
                                                 default=str).encode()).hexdigest()[:16],
        "space": space.name, "config": cfg.to_dict(),
    }
    summary["discretisation_gap"] = summary[f"supernet_val_{m}"] - summary[f"inherited_val_{m}"]
    # how often the latency term acted (non-zero) in the logged α steps: 0 for a hinge whose
    # target the expected latency never exceeded, i.e. a search the latency term did not shape
    acted = [r["latency"] != 0 for r in run.log_rows if r["alpha_updated"]]
    summary["latency_active_fraction"] = float(sum(acted) / len(acted)) if acted else 0.0
    summary["max_expected_ms"] = max((r["expected_ms"] for r in run.log_rows
                                      if r["alpha_updated"]), default=None)
    if summary["baseline_latency_ms"]:
        summary["speedup"] = summary["baseline_latency_ms"] / summary["predicted_latency_ms"]
    if D.is_main():
        plot_probs(run.alpha_rows, out / "probs.png")
        plot_search_curves(run.log_rows, out / "curves.png", m, task.metric_label)
        atomic_write_json(out / "summary.json", summary)
    return summary
