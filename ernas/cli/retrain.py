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
from ernas.cli.common import (claim_run_dir, hydra_main, resolve_arch, resumed_config, task_of,
                              user_errors)
from ernas.cli.schema import Retrain
from ernas.config import validated
from ernas.errors import ErnasError
from ernas.io import atomic_write_json


# settings that may differ when a run is resumed (they do not change what is computed)
RESUME_FREE = ("resume", "progress", "num_workers", "log_every", "device", "threads", "stop_at",
               "logger")


def _hydra_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict | None:
    from ernas.distill import DistillConfig
    from ernas.train import TrainConfig, resume, retrain

    params = validated(cfg, Retrain, "retrain config")
    if params.threads:
        import torch
        torch.set_num_threads(params.threads)
    if cfg.resume:
        resumed_config(cfg, "last.pt", RESUME_FREE, f"val_every={cfg.val_every} steps")
    info = D.setup(cfg.device)
    if info.rank == 0:
        out = Path(out or _hydra_dir())
        if cfg.resume:
            claim_run_dir(cfg.resume, resume=True)
        if not (cfg.resume and out.resolve() == Path(cfg.resume).resolve()):
            claim_run_dir(out)
    out = Path(D.broadcast_object(str(out) if out else None))
    if cfg.resume:
        free = {k: cfg[k] for k in ("num_workers", "log_every", "device", "logger")}
        summary = resume(cfg.resume, cfg.progress, cfg.stop_at, **free)
        if summary is not None and Path(cfg.resume).resolve() != out.resolve():
            atomic_write_json(out / "summary.json", {**summary, "resumed_run": str(cfg.resume)})
    else:
        arch = resolve_arch(cfg.arch)
        t = cfg.teacher
        distill = None
        if t.arch or t.checkpoint:
            if not t.checkpoint:
                raise ErnasError("teacher.arch is set but teacher.checkpoint is not; a teacher "
                                 "needs trained weights (teacher.checkpoint=<pt or run dir>).")
            if t.arch:
                t_arch = resolve_arch(t.arch)
            else:  # a retrain run keeps arch.yaml beside its checkpoints
                c = Path(str(t.checkpoint))
                d = c if c.is_dir() else c.parent
                if not (d / "arch.yaml").is_file():
                    raise ErnasError(f"teacher.arch is not set and {d} holds no arch.yaml; pass "
                                     f"teacher.arch=<arch.yaml or shipped name>.")
                t_arch = resolve_arch(d)
            distill = DistillConfig(t_arch, str(t.checkpoint), float(t.w_out), float(t.w_feat))
        summary = retrain(arch, out, task_of(cfg), TrainConfig.from_dict(params.train_fields()),
                          cfg.init, cfg.source, distill, cfg.progress, cfg.stop_at, cfg.space)
    if summary is not None:
        m = summary["metric"]
        best = summary[f"best_val_{m}"]
        print(f"retrained {summary['arch']} for {summary['steps']}/{summary['target_steps']} "
              f"steps: best val {m} {best if best is None else round(best, 3)} "
              f"(step {summary['best_step']}), {summary['throughput_img_s'] or 0:.1f} img/s; "
              f"outputs in {Path(summary['last']).parent}")
    D.cleanup()
    return summary


_main = hydra_main("retrain", run)


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
