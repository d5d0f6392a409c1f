"""Segmentation through the real CLIs (subprocesses): the U-Net family on the embedded brain data.

Fast: search -> retrain -> evaluate -> export on a small U-Net space (width 4, two levels, one
skippable block) at 32x32 with a synthetic latency table (made-up numbers, passed with
trust_table). Slow: ernas-profile and its validation on the shipped tiny space, and
``ernas-demo task=segment`` on tiny settings. Composition: the U-Net experiments (brain, VOC,
Cityscapes) and the demo's segment preset resolve to valid settings."""
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import ernas
from ernas.cli.demo import stage_overrides
from ernas.latency.factory import make_backend
from ernas.latency.ops import parse_key
from ernas.latency.resolve import required_metadata
from ernas.latency.table import LatencyTable
from ernas.paths import EXPERIMENTS, SEARCH_SPACES
from ernas.task import make_task

SHAPE = [1, 1, 32, 32]
SMALL = """family: unet
name: unet_small
geometry: {in_channels: 1, num_classes: 3, width: 4, enc_blk_nums: [1, 2], middle_blk_num: 1,
           dec_blk_nums: [1, 1]}
blocks:
  all: {conv: [dwsep, standard], width_mult: [0.5, 1.0]}
  encoders.1.1: {keep: [true, false]}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # no spinning threads on a busy 2-core machine
FAST_MEASURE = ["latency.backend.threads=1", "latency.measure.rounds=2",
                "latency.measure.per_round=1", "latency.measure.warmup=1",
                "latency.measure.min_seconds=0"]


def _cli(tmp_path, command, run, *args):
    task = [] if command == "profile" else ["task=segment"]  # profiling knows no task
    r = subprocess.run([sys.executable, "-m", f"ernas.cli.{command}", *task,
                        "progress=false", f"hydra.run.dir={tmp_path / run}", *args],
                       capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _synthetic_table(space, path):
    """Made-up latencies (not measured) for every key of ``space``, with this machine's request
    metadata so the CLIs accept it with trust_table."""
    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        cfg = compose("search", overrides=["latency.backend.threads=1"])
    meta = required_metadata(make_backend(dict(cfg.latency.backend)), SHAPE, "block")
    table = LatencyTable(metadata={**meta, "note": "synthetic test numbers"})
    for key in space.op_keys(SHAPE, "block"):
        k = parse_key(key)
        ms = 1e-5 * k.shape[1] * k.shape[2] * k.shape[3]
        if k.op == "unet_block":
            a = k.attr
            ms *= int(a["k"]) ** 2 * int(a["mid"]) * (2 if a["conv"] == "standard" else 0.3)
        table.add(key, [ms])
    table.save(path)
    return path


def test_search_retrain_evaluate_export_on_brain_slices(tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL)
    space = ernas.load_space(tmp_path / "small.yaml")
    table = _synthetic_table(space, tmp_path / "synthetic.csv")
    lat = [f"latency.table={table}", "latency.trust_table=true", *FAST_MEASURE]
    shape = "input_shape=[1,1,32,32]"
    r = _cli(tmp_path, "search", "search", f"space={tmp_path / 'small.yaml'}", shape, *lat,
             "search.steps=6", "search.warmup_steps=2", "search.batch_size=2", "search.crop=32",
             "search.log_every=2", "search.checkpoint_every=3", "search.device=cpu",
             "search.bn_calibration_batches=2", "search.eval_batches=1")
    s = json.loads((tmp_path / "search/summary.json").read_text())
    arch = ernas.load_arch(tmp_path / "search/arch.yaml")
    assert space.contains(arch)
    assert s["metric"] == "miou" and 0 <= s["supernet_val_miou"] <= 1
    assert "predicted latency" in r.stdout

    _cli(tmp_path, "retrain", "retrain", f"arch={tmp_path / 'search'}", "steps=4", "batch_size=2",
         "crop=32", "val_crop=null", "val_every=2", "threads=1")
    assert (tmp_path / "retrain/best.pt").is_file()

    r = _cli(tmp_path, "evaluate", "evaluate", f"checkpoint={tmp_path / 'retrain'}", shape,
             "threads=1", "memory_runs=0", *lat)
    ev = json.loads((tmp_path / "evaluate/summary.json").read_text())
    assert ev["metric"] == "miou" and 0 <= ev["miou"] <= 1 and ev["metric_set"] == "test"
    assert [m["name"] for m in ev["models"]] == [arch.name, "reference"]
    assert ev["predicted_ms"] > 0 and ev["measured_ms"] > 0
    assert {"miou_test", "pixel_accuracy_test", "mean_dice_test"} <= set(ev["columns"])

    r = _cli(tmp_path, "export", "export", f"checkpoint={tmp_path / 'retrain'}", shape,
             "calibration.inputs=2", "qat.steps=2", "qat.batch_size=2", "qat.crop=32",
             *FAST_MEASURE)
    ex = json.loads((tmp_path / "export/summary.json").read_text())
    assert ex["max_abs_diff"] < 1e-4 and ex["parity_ok"] and ex["batchnorm_nodes"] == 0
    for kind in ("fp32", "int8", "qat"):
        assert 0 <= ex[f"miou_{kind}"] <= 1 and ex[f"{kind}_ms"] > 0
    assert ex["skipped_block_nodes"] == 0
    assert "max |onnxruntime - torch|" in r.stdout


@pytest.mark.slow
def test_profile_and_validate_the_tiny_space(tmp_path):
    fast = ["space=unet_tiny", "input_shape=[1,1,32,32]", *FAST_MEASURE,
            "latency.recheck_rounds=2", f"output={tmp_path / 'table.csv'}"]
    _cli(tmp_path, "profile", "profile", *fast)
    table = LatencyTable.load(tmp_path / "table.csv")
    space = ernas.load_space(SEARCH_SPACES / "unet_tiny.yaml")
    assert set(space.op_keys(SHAPE, "block")) <= set(table.keys())
    r = _cli(tmp_path, "profile", "validate", *fast, "mode=validate", "validate.n=3")
    v = json.loads((tmp_path / "validate/summary.json").read_text())
    assert v["n"] == 6 and v["mape"] >= 0  # 3 samples + smallest, largest, reference
    assert "MAPE" in r.stdout


@pytest.mark.slow
def test_demo_segment_prints_the_comparison(tmp_path):
    def stage(name, overrides):
        return f"stages.{name}=[" + ",".join(f"'{o}'" for o in overrides) + "]"

    lat = [f"latency.cache_dir={tmp_path / 'cache'}", *FAST_MEASURE, "latency.recheck_rounds=2"]
    r = subprocess.run([
        sys.executable, "-m", "ernas.cli.demo", "task=segment", "search_steps=4",
        "retrain_steps=4", f"hydra.run.dir={tmp_path / 'demo'}",
        stage("search", ["space=unet_tiny", "input_shape=[1,1,32,32]", "search.batch_size=2",
                         "search.crop=32", "search.warmup_steps=2", "progress=false", *lat]),
        stage("retrain", ["crop=32", "batch_size=2", "val_every=2", "threads=1",
                          "progress=false"]),
        stage("evaluate", ["threads=1", "progress=false", "memory_runs=0", *lat]),
        stage("export", ["calibration.inputs=2", "qat.steps=2", "qat.batch_size=2",
                         "qat.crop=32", "progress=false", "memory_runs=0", *FAST_MEASURE]),
    ], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((tmp_path / "demo/summary.json").read_text())
    assert [m["name"] for m in s["models"]] == ["derived", "baseline"]
    assert s["metric"] == "miou" and s["export"]["max_abs_diff"] < 1e-4
    for stage_dir in ("evaluate", "export"):  # evaluation and export follow the search's shape
        assert json.loads((tmp_path / "demo" / stage_dir / "summary.json").read_text()
                          )["input_shape"] == SHAPE
    assert "| derived |" in r.stdout and "| qat |" in r.stdout


@pytest.mark.parametrize("experiment, space, shape, data", [
    ("unet_seg", "unet_demo", [1, 1, 96, 80], "synthseg_brain"),
    ("unet_voc", "unet_voc", [1, 3, 512, 512], "voc"),
    ("unet_cityscapes", "unet_cityscapes", [1, 3, 512, 1024], "cityscapes"),
    ("hrnet_seg_os2", "hrnet_demo_os2", [1, 1, 96, 80], "synthseg_brain"),
])
def test_experiments_compose_to_matching_space_task_and_shape(experiment, space, shape, data):
    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        cfg = compose("search", overrides=[f"experiment={experiment}", "task.root=/data"])
    assert cfg.space == space and list(cfg.input_shape) == shape and cfg.task.data == data
    task = make_task(dict(cfg.task))
    sp = ernas.load_space(SEARCH_SPACES / f"{space}.yaml")
    if data not in ("voc", "cityscapes"):  # these read (and check) the user's files first
        task.check_arch(sp.reference())  # input channels and classes fit the data
    assert sp.geometry["num_classes"] == len(task.classes)
    assert sp.spec.io_channels(sp.geometry)[0] == shape[1]
    assert cfg.search.crop <= min(shape[2:])


def test_demo_segment_preset_uses_the_unet_experiment():
    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        seg = compose("demo", overrides=["task=segment"])
        den = compose("demo")
    assert seg.experiment == "unet_seg" and seg.search_steps < den.search_steps == 600
    assert seg.task.data == "synthseg_brain"  # a benchmark that can rank networks
    assert den.experiment is None and den.retrain_steps == 600
    st = stage_overrides(seg)
    assert "val_crop=null" in st["retrain"] and "qat.steps=100" in st["export"]
    assert stage_overrides(den) == {k: [] for k in ("search", "retrain", "evaluate", "export")}
