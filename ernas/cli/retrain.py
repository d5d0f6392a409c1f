"""``ernas-retrain``: train a derived architecture (scratch, supernet or pretrained init,
optionally distilled), or continue an interrupted run with ``resume=<run dir>``.

Data-parallel: ``torchrun --nproc_per_node N -m ernas.cli.retrain ...``. Ranks other than 0 get
a throw-away Hydra directory (no ``.hydra``, no log file) and use rank 0's run directory, so only
rank 0 writes there.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ernas import distributed as D
from ernas.cli.common import output_dir, resolve_arch, task_of, user_errors
from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.paths import EXPERIMENTS


def _train_config(cfg: DictConfig):
    from ernas.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = OmegaConf.to_container(cfg, resolve=True)
    return TrainConfig.from_dict({k: v for k, v in values.items() if k in names})


@user_errors
def run(cfg: DictConfig, out: Path | None = None) -> dict | None:
    from ernas.distill import DistillConfig
    from ernas.train import resume, retrain

    if cfg.threads:
        import torch
        torch.set_num_threads(int(cfg.threads))
    info = D.setup(cfg.device)
    out = (out or output_dir()) if info.rank == 0 else None
    out = Path(D.broadcast_object(str(out) if out else None))
    if cfg.resume:
        free = {k: cfg[k] for k in ("num_workers", "log_every", "device")}
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
        summary = retrain(arch, out, task_of(cfg), _train_config(cfg), cfg.init, cfg.source,
                          distill, cfg.progress, cfg.stop_at, cfg.space)
    if summary is not None:
        m = summary["metric"]
        best = summary[f"best_val_{m}"]
        print(f"retrained {summary['arch']} for {summary['steps']}/{summary['target_steps']} "
              f"steps: best val {m} {best if best is None else round(best, 3)} "
              f"(step {summary['best_step']}), {summary['throughput_img_s'] or 0:.1f} img/s; "
              f"outputs in {Path(summary['last']).parent}")
    D.cleanup()
    return summary


@hydra.main(config_path=str(EXPERIMENTS), config_name="retrain", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    run(cfg)


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
