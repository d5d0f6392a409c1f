"""The job log tells the run's story: every command's start line (run folder, device, backend),
the latency table chosen and why, progress as whole lines when the output is not a terminal."""
import logging
import subprocess
import sys

from ernas.paths import LATENCY_TABLES
from ernas.progress import StatusLines, progress

# a shipped table used as it is (no profiling, no probe, no anchoring: nothing timed)
TABLE = sorted(LATENCY_TABLES.glob("nafnet_tiny_onnxruntime_*_1x3x256x256_block_t1.csv"))[0]
SEARCH = ["input_shape=[1,3,256,256]", "latency.backend.threads=1", f"latency.table={TABLE}",
          "latency.trust_table=true", "latency.anchor=false", "search.crop=16",
          "task.max_side=128", "search.batch_size=2", "search.warmup_steps=2", "search.steps=4",
          "search.checkpoint_every=4", "search.device=cpu", "progress=true"]
RETRAIN = ["steps=2", "batch_size=2", "crop=32", "val_every=2", "log_every=2", "val_crop=64",
           "task.max_side=256", "threads=1", "progress=true"]


def _run(module, tmp_path, *args):
    """The command with stdout and stderr redirected to pipes (not a terminal)."""
    r = subprocess.run([sys.executable, "-m", f"ernas.cli.{module}", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_search_log_holds_start_line_table_and_progress_lines(tmp_path):
    """search.log used to stay empty (ernas printed, never logged) and a redirected run's
    progress was raw tqdm: carriage-return updates. Fails if the start line, the table's
    reason or the progress line is missing from the log, or a carriage return is written."""
    out = tmp_path / "s"
    r = _run("search", tmp_path, *SEARCH, f"hydra.run.dir={out}")
    log = (out / "search.log").read_text()
    start = [ln for ln in log.splitlines() if "ernas-search: run folder" in ln]
    assert len(start) == 1, log[-3000:]
    assert f"run folder {out};" in start[0] and "device cpu" in start[0]
    assert "latency backend onnxruntime" in start[0] and "(CPUExecutionProvider, 1 thread)" \
        in start[0]
    table = f"][INFO] - latency table {TABLE}: given table used as it is, not probed " \
            f"(latency.trust_table=true)"
    assert table in log and log.index("ernas-search: run folder") < log.index(table)
    assert "search: 4/4 step (" in log  # the progress bar's closing line
    # the console shows the same story, as whole lines, beside the results on stdout
    assert "ernas-search: run folder" in r.stdout and "predicted latency" in r.stdout
    assert "\r" not in r.stderr and "\r" not in r.stdout
    assert "Traceback" not in r.stderr


def test_retrain_log_holds_its_start_line(tmp_path):
    out = tmp_path / "r"
    r = _run("retrain", tmp_path, *RETRAIN, f"hydra.run.dir={out}")
    log = (out / "retrain.log").read_text()
    assert f"ernas-retrain: run folder {out}; device cpu; torch threads 1" in log, log[-2000:]
    assert "init scratch; steps 2" in log and "retrain: 2/2 step (" in log
    assert "\r" not in r.stderr and "\r" not in r.stdout and "retrained " in r.stdout


def test_status_lines_go_to_the_log_one_per_interval(caplog):
    """Elsewhere than a terminal, progress is whole lines through the ``ernas.progress`` logger:
    one per interval (every update here, ``every_s=0``) and one at the end."""
    caplog.set_level(logging.INFO, logger="ernas.progress")
    bar = StatusLines(total=3, desc="steps", unit="step", every_s=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ernas.progress"]
    assert [ln.split(" (")[0] for ln in lines] == ["steps: 1/3 step", "steps: 2/3 step",
                                                  "steps: 3/3 step", "steps: 3/3 step"]
    assert not any("\r" in ln for ln in lines)


def test_progress_is_status_lines_when_stderr_is_not_a_terminal():
    """Under pytest stderr is captured (not a terminal): no tqdm bar."""
    assert not sys.stderr.isatty()
    assert type(progress(5, "x")) is StatusLines
