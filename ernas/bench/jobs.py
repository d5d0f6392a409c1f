"""Jobs of a protocol: each one API call (search, retrain or evaluate) in its own run directory,
launched as a Hydra multirun through the protocol's launcher plugin (``basic`` and ``joblib``
here; ``submitit_slurm`` or ``ray`` on a cluster, by a config change).

A job whose run directory holds ``summary.json`` is finished and kept; one holding its command's
checkpoint continues from it (``resume=``); one stopped before its first checkpoint starts again.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from ernas.bench.plan import CHECKPOINTS
from ernas.errors import ErnasError

log = logging.getLogger(__name__)
PLAN = "plan.json"


def load_plan(bench: Path) -> dict:
    return json.loads((Path(bench) / PLAN).read_text(encoding="utf-8"))


def finished(job: dict) -> bool:
    return (Path(job["run_dir"]) / "summary.json").is_file()


def run_job(bench: Path, job_id: str) -> dict:
    """Run (or continue, or skip when finished) one job of the plan in ``bench``."""
    from ernas.api import run_command

    job = load_plan(bench)["jobs"].get(job_id)
    if job is None:
        raise ErnasError(f"bench job {job_id!r} is not in {Path(bench) / PLAN}.")
    out = Path(job["run_dir"])
    if finished(job):
        log.info("%s: finished earlier, kept", job_id)
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    ckpt = CHECKPOINTS[job["command"]]
    if ckpt and (out / ckpt).is_file():
        log.info("%s: continuing from %s", job_id, out / ckpt)
        return run_command(job["command"], {"resume": str(out)}, out, job["nodes"]).summary
    if out.exists():  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(out)
    log.info("%s: %s", job_id, job["command"])
    return run_command(job["command"], job["overrides"], out, job["nodes"]).summary


def launch(bench: Path, stage: str, job_ids: list[str], launcher: str,
           launcher_settings: dict) -> None:
    """Run the unfinished ``job_ids`` as one Hydra multirun of ``ernas.bench.jobs`` through
    ``hydra/launcher=<launcher>`` with ``hydra.launcher.<key>=<value>`` for each of
    ``launcher_settings``; a failed job is reported with its log."""
    from ernas.api import as_overrides

    plan = load_plan(bench)
    todo = [j for j in job_ids if not finished(plan["jobs"][j])]
    if not todo:
        return
    log.info("stage %s: %d job(s) through the %s launcher", stage, len(todo), launcher)
    cmd = [sys.executable, "-m", "ernas.bench.jobs", "--multirun",
           f"hydra/launcher={launcher}", f"bench_dir={bench}", "job=" + ",".join(todo),
           *as_overrides({f"hydra.launcher.{k}": v for k, v in launcher_settings.items()})]
    r = subprocess.run(cmd, capture_output=True, text=True)
    failed = [j for j in todo if not finished(plan["jobs"][j])]
    if r.returncode != 0 or failed:
        tail = _cause(r.stderr or r.stdout)
        raise ErnasError(f"ernas-bench: stage {stage}: {len(failed)} job(s) did not finish "
                         f"({', '.join(failed[:6])}); the launcher said: {tail.strip()} -- fix "
                         f"the cause and continue with resume={bench} (finished jobs are kept).")


def _cause(text: str) -> str:
    """The error a failed job raised (its last ``ErnasError``/exception line), else the tail."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln or ln.startswith("error:")]
    return (errors[-1] if errors else "\n".join(lines[-5:]))[-2000:]


def _job_main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_job(Path(cfg.bench_dir), str(cfg.job))


def main() -> None:
    import hydra

    from ernas.paths import EXPERIMENTS

    hydra.main(config_path=str(EXPERIMENTS), config_name="bench_job", version_base="1.3")(
        _job_main)()


if __name__ == "__main__":
    main()
