"""The end of a search: derive the architecture, extract it with inherited weights, recalibrate
BatchNorm statistics, judge supernet and extracted network on the validation batches, and write
``arch.yaml``, ``inherited.pt``, the plots and ``summary.json``."""
from __future__ import annotations

import copy
import hashlib
import json
import logging

import torch

from ernas import distributed as D
from ernas.batches import Batch
from ernas.io import atomic_torch_save, atomic_write_json
from ernas.nn.batchnorm import batchnorms, recalibrate_bn
from ernas.search.budget import changes, derive_within
from ernas.search.config import SearchConfig
from ernas.search.state import SearchRun

log = logging.getLogger(__name__)


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


def _derive(run: SearchRun, val_batch: Batch):
    """(derived, argmax): the argmax of α, and the network ``search.derive`` picks."""
    derived = argmax = run.net.derive(name=f"{run.space.name}_searched")
    if run.cfg.derive == "budget":
        derived = derive_within(run.net, run.expected, run.target_ms, argmax, val_batch,
                                run.cfg.eval_batches, run.device, run.task)
    return derived, argmax


def _recalibrated(run: SearchRun, derived, train_batch: Batch):
    """(supernet, inherited, batches): the supernet (a recalibrated copy when it has BatchNorm:
    the checkpoint keeps the search's own statistics) and the extracted network, both
    recalibrated on the same training batches, and how many batches that took."""
    inherited = run.net.extract(derived)
    supernet = run.net
    if batchnorms(run.net):
        supernet = copy.deepcopy(run.net)
        recalibrate_bn(supernet, calibration_batches(train_batch, run.cfg, run.device))
    calibrated = recalibrate_bn(inherited, calibration_batches(train_batch, run.cfg, run.device))
    return supernet, inherited, calibrated


def _size(run: SearchRun, inherited, input_shape) -> dict:
    """Parameters and MACs of the extracted network and of the baseline."""
    from ernas import build_model
    from ernas.complexity import count_macs, count_params

    shape = tuple(input_shape or run.expected.input_shape)
    base_model = build_model(run.baseline)
    return {"params": count_params(inherited), "baseline_params": count_params(base_model),
            "macs": count_macs(inherited, shape), "baseline_macs": count_macs(base_model, shape),
            "input_shape": list(shape)}


def _latency_activity(rows: list[dict]) -> dict:
    """How often the latency term acted (non-zero) in the logged α steps: 0 for a hinge whose
    target the expected latency never exceeded, i.e. a search the latency term did not shape;
    and the largest expected latency of those steps."""
    acted = [r["latency"] != 0 for r in rows if r["alpha_updated"]]
    return {"latency_active_fraction": float(sum(acted) / len(acted)) if acted else 0.0,
            "max_expected_ms": max((r["expected_ms"] for r in rows if r["alpha_updated"]),
                                   default=None)}


DECISIVE = 0.95      # α counts as decided once its decisiveness (mean max probability) is this
MISSED_TARGET = 0.15  # a band search whose derived network is further than this from T warns


def decisive_step(rows: list[dict], level: float = DECISIVE) -> int | None:
    """The first logged α step at which α's decisiveness reached ``level`` (None: never). From
    there on softmax passes little gradient, so neither term moves α much."""
    return next((int(r["step"]) for r in rows if r["alpha_updated"]
                 and r["decisiveness"] >= level), None)


def missed_target(form: str, predicted_ms: float, target_ms: float | None,
                  decided_at: int | None, steps: int) -> str | None:
    """The warning for a band search that derived a network more than ``MISSED_TARGET`` away
    from its target (the band pulls E[LAT] to T from both sides), or None."""
    if form != "band" or not target_ms or abs(predicted_ms / target_ms - 1) <= MISSED_TARGET:
        return None
    when = (f"α was decided (decisiveness >= {DECISIVE}) at step {decided_at} of {steps}, after "
            f"which softmax passes the latency term little gradient" if decided_at is not None
            else "α never became decisive")
    return (f"search: the derived network is predicted at {predicted_ms / target_ms:.2f} of the "
            f"target {target_ms:.3g} ms although the band term pulls towards it; {when}. A smaller "
            f"search.entropy_max, a longer search.entropy_ramp or a smaller search.lr_alpha keeps "
            f"α movable for longer.")


def finish(run: SearchRun, train_batch: Batch, val_batch: Batch, input_shape) -> dict:
    """Derive, extract and judge: both the supernet (a copy) and the extracted network get their
    BatchNorm statistics recalibrated on the same training batches (``recalibrate_bn``) before
    their validation metric, so ``discretisation_gap`` = supernet − inherited compares like with
    like; ``inherited.pt`` holds the recalibrated statistics."""
    out, cfg, task, m = run.out, run.cfg, run.task, run.task.metric
    derived, argmax = _derive(run, val_batch)
    per_rank = D.all_gather_object(derived.to_dict())
    arch_path = out / "arch.yaml"
    supernet, inherited, calibrated = _recalibrated(run, derived, train_batch)
    if D.is_main():
        derived.save(arch_path)
        atomic_torch_save(inherited.state_dict(), out / "inherited.pt")
    summary = {
        "arch_name": derived.name, "arch_path": str(arch_path),
        "inherited_weights": str(out / "inherited.pt"),
        "predicted_latency_ms": run.expected.of_arch(derived),
        "baseline_latency_ms": run.baseline_ms, "baseline_name": run.baseline.name,
        "target_ms": run.target_ms, "derive": cfg.derive,
        "argmax_predicted_ms": run.expected.of_arch(argmax),
        "derive_changes": changes(run.space, argmax, derived),
        **_size(run, inherited, input_shape), "task": task.name, "metric": m,
        f"supernet_val_{m}": val_metric(supernet, val_batch, cfg.eval_batches, run.device, task),
        f"inherited_val_{m}": val_metric(inherited.to(run.device), val_batch,
                                         cfg.eval_batches, run.device, task),
        "bn_calibration_batches": calibrated,
        "decisiveness": run.net.decisiveness(), "entropy": run.net.entropy(),
        "search_seconds": run.elapsed, "steps": run.step, "mode": cfg.mode,
        "world_size": D.world_size(), "ranks_agree": all(a == per_rank[0] for a in per_rank),
        "arch_digest": hashlib.sha256(json.dumps(per_rank[D.rank()], sort_keys=True,
                                                 default=str).encode()).hexdigest()[:16],
        "space": run.space.name, "config": cfg.to_dict(),
    }
    summary["discretisation_gap"] = summary[f"supernet_val_{m}"] - summary[f"inherited_val_{m}"]
    summary.update(_latency_activity(run.log_rows), decisive_step=decisive_step(run.log_rows))
    warning = missed_target(cfg.latency_form, summary["predicted_latency_ms"], run.target_ms,
                            summary["decisive_step"], cfg.steps)
    if warning and D.is_main():
        log.warning(warning)
    if summary["baseline_latency_ms"]:
        summary["speedup"] = summary["baseline_latency_ms"] / summary["predicted_latency_ms"]
    if D.is_main():
        _write_outputs(run, summary)
    return summary


def _write_outputs(run: SearchRun, summary: dict) -> None:
    from ernas.plots import plot_probs, plot_search_curves

    plot_probs(run.alpha_rows, run.out / "probs.png")
    plot_search_curves(run.log_rows, run.out / "curves.png", run.task.metric,
                       run.task.metric_label)
    atomic_write_json(run.out / "summary.json", summary)
    log.info("search: derived %s, predicted %.4g ms; outputs in %s", summary["arch_name"],
             summary["predicted_latency_ms"], run.out)
