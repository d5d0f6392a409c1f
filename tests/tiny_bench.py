"""The tiny protocol (``protocol_denoise_tiny``) run end to end once per test session: killed
after its searches, resumed through the joblib launcher to ``until=train``, then to its report.
Shared by the bench tests and the benchmarks that read a bench run (``tests/conftest.py``)."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = [sys.executable, "-m", "ernas.cli.bench", "experiment=protocol_denoise_tiny"]


def digest(paths) -> dict:
    return {str(p): hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths}


def _wait_for(paths, proc, limit_s=600):
    start = time.time()
    while not all(Path(p).is_file() for p in paths):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < limit_s, "searches did not finish in time"
        time.sleep(0.5)


def run_tiny_protocol(tmp: Path, env: dict) -> tuple[Path, dict]:
    """The bench dir and the digests of the searches finished before the kill."""
    out = tmp / "run"
    proc = subprocess.Popen([*BENCH, f"hydra.run.dir={out}"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    searches = [out / "jobs" / f"search_t0_s{k}" / "summary.json" for k in (0, 1)]
    _wait_for(searches, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = digest(p.parent / n for p in searches for n in ("summary.json", "arch.yaml"))
    resume = [sys.executable, "-m", "ernas.cli.bench", f"resume={out}", "launcher=joblib",
              "+launcher_settings.n_jobs=2"]
    r = subprocess.run([*resume, "until=train", f"hydra.run.dir={tmp / 'resume_log'}"], cwd=tmp,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # until=train: every training done, nothing measured or tested yet
    assert (out / "selection.json").is_file() and not (out / "latency.json").exists()
    assert not any(out.glob("jobs/test_*")) and not (out / "summary.json").exists()
    r = subprocess.run([*resume, f"hydra.run.dir={tmp / 'resume_log2'}"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, kept
