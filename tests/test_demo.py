"""The main job end to end on tiny settings: search → retrain → evaluate → export → table."""
import json
import subprocess
import sys


def _stage(name, overrides):
    return f"stages.{name}=[" + ",".join(f"'{o}'" for o in overrides) + "]"


def test_demo_runs_every_stage_and_prints_the_table(tmp_path):
    small = ["latency.backend.threads=1", "latency.budget.max_repeats=3",
             "latency.budget.min_repeats=2", f"latency.cache_dir={tmp_path / 'cache'}",
             "progress=false"]
    args = [
        sys.executable, "-m", "ernas.cli.demo", "search_steps=6", "retrain_steps=4",
        f"hydra.run.dir={tmp_path / 'demo'}",
        _stage("search", ["input_shape=[1,3,32,32]", "data.crop=16", "data.max_side=128",
                          "search.batch_size=2", "search.warmup_steps=2", *small]),
        _stage("retrain", ["crop=16", "batch_size=2", "val_crop=32", "val_every=2",
                           "max_side=128", "threads=1", "progress=false"]),
        _stage("evaluate", ["input_shape=[1,3,32,32]", "crop=48", "sigmas=[25]", "threads=1",
                            *small]),
        _stage("export", ["input_shape=[1,3,32,32]", "calibration.crops=2", "threads=1",
                          "budget.max_repeats=3", "budget.min_repeats=2", "progress=false"]),
    ]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path / "demo"
    for stage in ("search", "retrain_derived", "retrain_baseline", "evaluate", "export"):
        assert (out / stage / "summary.json").is_file(), stage
    s = json.loads((out / "summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["derived", "NAFNet-baseline"]
    assert s["export"]["max_abs_diff"] < 1e-4
    assert "| derived |" in r.stdout and "lower measured latency" in r.stdout
