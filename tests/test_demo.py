"""The main job end to end on tiny settings: search → retrain → evaluate → export → table."""
import json
import subprocess
import sys

import pytest


def _stage(name, overrides):
    return f"stages.{name}=[" + ",".join(f"'{o}'" for o in overrides) + "]"


def test_demo_runs_every_stage_and_prints_the_table(tmp_path):
    small = ["latency.backend.threads=1", "latency.measure.rounds=2",
             "latency.measure.per_round=1", "latency.measure.min_seconds=0",
             f"latency.cache_dir={tmp_path / 'cache'}", "progress=false"]
    args = [
        sys.executable, "-m", "ernas.cli.demo", "search_steps=6", "retrain_steps=4",
        f"hydra.run.dir={tmp_path / 'demo'}", "task.max_side=128", "task.eval_sigmas=[25]",
        _stage("search", ["input_shape=[1,3,32,32]", "search.crop=16",
                          "search.batch_size=2", "search.warmup_steps=2", *small]),
        _stage("retrain", ["crop=16", "batch_size=2", "val_crop=32", "val_every=2",
                           "threads=1", "progress=false"]),
        _stage("evaluate", ["input_shape=[1,3,32,32]", "threads=1", "memory_runs=0", *small]),
        _stage("export", ["input_shape=[1,3,32,32]", "calibration.inputs=2", "threads=1",
                          "memory_runs=0", *small]),
    ]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "demo"
    for stage in ("search", "retrain_derived", "retrain_baseline", "evaluate", "export"):
        assert (out / stage / "summary.json").is_file(), stage
    s = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["derived", "baseline"]
    assert s["export"]["max_abs_diff"] < 1e-4
    d, b = s["models"]
    # predictions come from the table the search optimised (its run copy), not a re-resolved one
    found = json.loads((out / "search" / "summary.json").read_text())
    assert d["table"] == b["table"] == str(out / "search" / "latency_table.csv")
    assert d["predicted_ms"] == pytest.approx(found["predicted_latency_ms"])
    assert b["predicted_ms"] == pytest.approx(found["baseline_latency_ms"])
    # the verdict is read off the numbers, whichever way they fall
    # (the measured speed-up is paired per round: between the two ratios of the per-round times)
    sp = s["measured_speedup"]
    word = "lower" if sp >= 1 else "higher"
    assert "| derived |" in r.stdout and f"{max(sp, 1 / sp):.2f}x {word} measured latency" in r.stdout
    # demo.log tells the story (it used to stay empty): the demo's start line, each stage's with
    # its own folder, and the latency table each stage chose, with why
    log = (out / "demo.log").read_text()
    assert f"ernas-demo: run folder {out};" in log
    for stage in ("search", "retrain_derived", "retrain_baseline", "evaluate", "export"):
        assert f"run folder {out / stage};" in log, stage
    assert f"latency table {out / 'search' / 'latency_table.csv'}: given table used as it is" \
        in log
