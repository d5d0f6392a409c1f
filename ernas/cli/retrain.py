"""``ernas-retrain``: train a derived architecture (scratch, supernet or pretrained init,
optionally distilled), or continue an interrupted run with ``resume=<run dir>``.

Data-parallel: ``torchrun --nproc_per_node N -m ernas.cli.retrain ...``. Ranks other than 0 get
a throw-away Hydra directory (no ``.hydra``, no log file) and use rank 0's run directory, so only
rank 0 writes there.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from ernas import distributed as D
from ernas.cli.common import (claim_run_dir, given_keys, hydra_main, log_start, resolve_arch,
                              resumed_config, task_of, user_errors)
from ernas.cli.schema import Retrain
from ernas.config import validated
from ernas.errors import ErnasError
from ernas.io import atomic_write_json


# settings of the command line, not of the run: a resumed run always takes this invocation's
INVOCATION = ("resume", "stop_at", "progress")


def resume_free() -> tuple[str, ...]:
    """The run settings that may differ when a run is resumed (they do not change what is
    computed): the library's list (``ernas.train.RESUME_FREE``) and the CLI's ``threads``. Not
    given on the command line, each keeps the run's value."""
    from ernas.train import RESUME_FREE

    return ("threads", *RESUME_FREE)


def _hydra_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict | None:
    from ernas.train import TrainConfig, retrain, training_data

    if cfg.resume:
        cfg = resumed_config(cfg, "retrain", resume_free(), "val_every", INVOCATION)
    params = validated(cfg, Retrain, "retrain config")
    if params.threads:
        import torch
        torch.set_num_threads(params.threads)
    info = D.setup(cfg.device)
    if cfg.resume:
        summary = _resume(cfg, out, info)
    else:
        arch, distill, task = _new_run_inputs(cfg)
        tcfg = TrainConfig.from_dict(params.train_fields())
        data = training_data(task, tcfg, info.rank)  # a data error refuses before the claim
        if info.rank == 0:
            out = claim_run_dir(out or _hydra_dir())
            log_start("retrain", out, info.device, arch=arch.name, task=task.name,
                      init=cfg.init, steps=tcfg.steps,
                      ranks=info.world_size if info.enabled else None,
                      teacher=distill.arch.name if distill else None)
        out = Path(D.broadcast_object(str(out) if out else None))
        summary = retrain(arch, out, task, tcfg, cfg.init, cfg.source, distill, cfg.progress,
                          cfg.stop_at, cfg.space, data)
    if summary is not None:
        m = summary["metric"]
        best = summary[f"best_val_{m}"]
        print(f"retrained {summary['arch']} for {summary['steps']}/{summary['target_steps']} "
              f"steps: best val {m} {best if best is None else round(best, 3)} "
              f"(step {summary['best_step']}), {summary['throughput_img_s'] or 0:.1f} img/s; "
              f"outputs in {Path(summary['last']).parent}")
    D.cleanup()
    return summary


def _resume(cfg: DictConfig, out, info) -> dict | None:
    """Continue the run in ``cfg.resume`` (its outputs stay there; a separate run directory of
    this command gets a copy of the summary). Free settings go to the run only when given."""
    from ernas.train import RESUME_FREE, resume

    if info.rank == 0:
        out = Path(out or _hydra_dir())
        claim_run_dir(cfg.resume, resume=True)
        if out.resolve() != Path(cfg.resume).resolve():
            claim_run_dir(out)
        log_start("retrain", out, info.device, resuming=cfg.resume,
                  ranks=info.world_size if info.enabled else None)
    out = Path(D.broadcast_object(str(out) if out else None))
    given = given_keys()
    summary = resume(cfg.resume, cfg.progress, cfg.stop_at,
                     **{k: cfg[k] for k in RESUME_FREE if k in given})
    if summary is not None and Path(cfg.resume).resolve() != out.resolve():
        atomic_write_json(out / "summary.json", {**summary, "resumed_run": str(cfg.resume)})
    return summary


def _new_run_inputs(cfg: DictConfig):
    """The architecture, distillation teacher and task of a new run, each checked, before the
    run directory is claimed."""
    from ernas.distill import DistillConfig

    arch = resolve_arch(cfg.arch)
    task = task_of(cfg)
    task.check_arch(arch)
    t = cfg.teacher
    if not (t.arch or t.checkpoint):
        return arch, None, task
    if not t.checkpoint:
        raise ErnasError("teacher.arch is set but teacher.checkpoint is not; a teacher needs "
                         "trained weights (teacher.checkpoint=<pt or run dir>).")
    if t.arch:
        t_arch = resolve_arch(t.arch)
    else:  # a retrain run keeps arch.yaml beside its checkpoints
        c = Path(str(t.checkpoint))
        d = c if c.is_dir() else c.parent
        if not (d / "arch.yaml").is_file():
            raise ErnasError(f"teacher.arch is not set and {d} holds no arch.yaml; pass "
                             f"teacher.arch=<arch.yaml or shipped name>.")
        t_arch = resolve_arch(d)
    return arch, DistillConfig(t_arch, str(t.checkpoint), float(t.w_out), float(t.w_feat)), task


_main = hydra_main("retrain", run, objective=lambda s: s[f"best_val_{s['metric']}"])


def main() -> None:
    """Entry point; on ranks > 0 of a torchrun job Hydra writes into a temporary directory."""
    rank = int(os.environ.get("RANK", "0"))
    scratch = None
    if rank != 0:
        scratch = tempfile.mkdtemp(prefix=f"ernas_rank{rank}_")
        sys.argv = [a for a in sys.argv if not a.startswith("hydra.run.dir=")] + [
            f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=none",
            "hydra/hydra_logging=none"]
    try:
        _main()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
