"""The plug-in contract from the outside: a family and a task that live only in this test's files
(``tests/plugins/tinyplug``) are registered through real entry points and run through the real
CLIs, with no edit to ernas.

The package is copied into a temporary ``site`` folder beside a fake installed distribution
(``tinyplug-0.1.dist-info`` with ``entry_points.txt`` for the groups ``ernas.families`` and
``ernas.tasks``), which ``importlib.metadata`` discovers on PYTHONPATH. The task's config group
entry (``task/tinytask.yaml``) comes from a folder added with ``hydra.searchpath``, so
``task=tinytask`` composes like a shipped task (evaluate instead drops the group's default with
``~task +task.name=tinytask``: the task's dataclass defaults, no config file). Then search -> derive -> retrain (supernet
weights) -> evaluate -> export (fp32, int8, QAT) on 32x32 inputs, with a latency table profiled
on the spot from the family's own op builders, and unknown names are refused with exit status 2.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "tests" / "plugins" / "tinyplug"

ENTRY_POINTS = """[ernas.families]
tinyfam = tinyplug.family

[ernas.tasks]
tinytask = tinyplug.task
"""
TASK_YAML = """# Task `tinytask` (tinyplug.task): synthetic smooth RGB images, Gaussian noise.
name: tinytask
size: 48
images: 4
sigma: 0.1
data_seed: 0
"""
SPACE = """family: tinyfam
name: tiny_plugin
geometry: {in_channels: 3, width: 16, num_blocks: 2}
blocks:
  all: {kernel: [3, 5], keep: [false, true]}
  blocks.0: {keep: true}          # one block always runs: the derived net has a real ResBlock
"""
SHAPE = "input_shape=[1,3,32,32]"
FAST_MEASURE = ["latency.backend.threads=1", "latency.measure.rounds=2",
                "latency.measure.per_round=1", "latency.measure.warmup=1",
                "latency.measure.min_seconds=0"]


@pytest.fixture(scope="module")
def plug(tmp_path_factory):
    """``(site folder, hydra config folder, env)``: the installed-looking plug-in."""
    base = tmp_path_factory.mktemp("plugin")
    site = base / "site"
    shutil.copytree(PLUGIN, site / "tinyplug",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = site / "tinyplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    conf = base / "conf"
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "tinytask.yaml").write_text(TASK_YAML)
    env = {**_base_env(), "PYTHONPATH": f"{site}:{ROOT}", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return site, conf, env


def _base_env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture
def inproc(plug, monkeypatch):
    """``ernas`` with the plug-in findable in this process (its site folder on sys.path); the
    family registry, the op builders and the imported plug-in modules are restored after."""
    import ernas
    import ernas.family
    import ernas.keys as ops

    monkeypatch.setattr(ernas.family, "_REGISTRY", dict(ernas.family._REGISTRY))
    monkeypatch.setattr(ops, "_BUILDERS", dict(ops._BUILDERS))
    monkeypatch.setattr(ops, "_OWNERS", dict(ops._OWNERS))
    monkeypatch.syspath_prepend(str(plug[0]))
    yield ernas
    for name in [m for m in sys.modules if m == "tinyplug" or m.startswith("tinyplug.")]:
        del sys.modules[name]


def _cli(plug, cwd, command, run, *args, status=0):
    _, conf, env = plug
    r = subprocess.run([sys.executable, "-m", f"ernas.cli.{command}",
                        f"hydra.searchpath=[file://{conf}]", "progress=false",
                        f"hydra.run.dir={cwd / run}", *args],
                       capture_output=True, text=True, cwd=cwd, env=env)
    assert r.returncode == status, (r.returncode, r.stderr[-4000:])
    return r


def test_plugin_family_and_task_run_every_cli(plug, inproc, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    lat = [f"latency.cache_dir={tmp_path / 'cache'}", "latency.recheck_rounds=2", *FAST_MEASURE]

    # search: the space's family and the task come from the entry points; the latency table is
    # profiled here from the family's keys (generic conv2d/add and its own tiny_res builder)
    r = _cli(plug, tmp_path, "search", "search", "task=tinytask", f"space={tmp_path / 'space.yaml'}",
             SHAPE, *lat, "search.steps=6", "search.warmup_steps=2", "search.batch_size=2",
             "search.crop=32", "search.log_every=2", "search.checkpoint_every=3",
             "search.device=cpu", "search.bn_calibration_batches=1", "search.eval_batches=1")
    run = tmp_path / "search"
    s = json.loads((run / "summary.json").read_text())
    assert s["metric"] == "tiny_psnr" and s["supernet_val_tiny_psnr"] > 0
    assert s["predicted_latency_ms"] > 0 and s["baseline_latency_ms"] > 0
    assert "predicted latency" in r.stdout
    assert (run / "arch.yaml").read_text().startswith("family: tinyfam")
    assert (run / "checkpoint.pt").is_file()
    tables = list((tmp_path / "cache").glob("tiny_plugin_*.csv"))
    assert len(tables) == 1
    rows = tables[0].read_text()
    assert "tiny_res[k=3]@1x16x32x32" in rows and "tiny_res[k=5]@1x16x32x32" in rows

    # retrain from the supernet's weights (SuperNet.extract -> the family's extract_state)
    r = _cli(plug, tmp_path, "retrain", "retrain", "task=tinytask", f"arch={run}",
             "init=supernet", f"source={run}", "steps=4", "batch_size=2", "crop=32",
             "val_crop=32", "val_every=2", "log_every=2", "threads=1")
    rt = tmp_path / "retrain"
    assert (rt / "best.pt").is_file() and (rt / "last.pt").is_file()
    t = json.loads((rt / "summary.json").read_text())
    assert t["metric"] == "tiny_psnr" and t["best_val_tiny_psnr"] > 0 and t["finished"]
    assert t["task"]["name"] == "tinytask" and t["init"] == "supernet"
    init = json.loads((rt / "init_report.json").read_text())
    assert "blocks.0.conv.weight" in init["copied"] and init["left_at_init"] == []
    assert "retrained" in r.stdout

    # evaluate: the task's metric on its eval set, the reference as baseline, latency predicted
    # from the profiled table and measured. The task is given without any config file here:
    # the config group's default is dropped and the task's own dataclass defaults apply
    r = _cli(plug, tmp_path, "evaluate", "evaluate", "~task", "+task.name=tinytask",
             f"checkpoint={rt}", SHAPE, "threads=1", "memory_runs=0", *lat)
    ev = json.loads((tmp_path / "evaluate/summary.json").read_text())
    assert ev["metric"] == "tiny_psnr" and ev["metric_set"] == "test"
    assert ev["tiny_psnr"] > 0 and ev["task"]["name"] == "tinytask"
    assert {"tiny_psnr_test", "mse_test"} <= set(ev["columns"])
    assert ev["predicted_ms"] > 0 and ev["measured_ms"] > 0
    assert ev["models"][-1]["name"] == "reference"

    # export: ONNX parity, int8 (the task's calibration inputs) and QAT (its training data)
    r = _cli(plug, tmp_path, "export", "export", "task=tinytask", f"checkpoint={rt}", SHAPE,
             "calibration.inputs=2", "qat.steps=2", "qat.batch_size=2", "qat.crop=32",
             "memory_runs=0", *FAST_MEASURE)
    ex_dir = tmp_path / "export"
    ex = json.loads((ex_dir / "summary.json").read_text())
    assert (ex_dir / "model.onnx").is_file() and (ex_dir / "model_int8.onnx").is_file()
    assert ex["max_abs_diff"] < 1e-4 and ex["parity_ok"]
    assert ex["metric"] == "tiny_psnr" and ex["task"] == "tinytask"
    for kind in ("fp32", "int8", "qat"):
        assert ex[f"tiny_psnr_{kind}"] > 0 and ex[f"{kind}_ms"] > 0
    assert ex["skipped_block_nodes"] == 0
    assert ex["quantize_linear_nodes"] > 0  # the 16->16 3x3/5x5 block conv is quantised
    assert "max |onnxruntime - torch|" in r.stdout

    # in this process too: the derived arch loads through the entry point and lies in the space,
    # the super-block contract holds and the retrained checkpoint loads
    _check_in_process(inproc, run, rt)


def _check_in_process(ernas, search_dir, retrain_dir):
    from ernas.checkpoint import load_model
    from ernas.supernet import SuperNet

    arch = ernas.load_arch(search_dir / "arch.yaml")
    assert arch.family == "tinyfam" and type(arch.spec).__module__ == "tinyplug.family"
    space = ernas.load_space(search_dir.parent / "space.yaml")
    assert space.contains(arch) and arch.positions == ["blocks.0", "blocks.1"]
    # the SuperBlock contract: the extracted network computes what the supernet computes with
    # one-hot probabilities, for every architecture of the space (kernels and skips)
    torch.manual_seed(0)
    net = SuperNet(space).eval()
    x = torch.rand(1, 3, 20, 20)
    for kernels in ((3, 3), (5, 3), (3, 5), (5, 5)):
        for keep in (True, False):
            values = {"blocks.0": {"kernel": kernels[0], "keep": True},
                      "blocks.1": {"kernel": kernels[1], "keep": keep}}
            a = ernas.Arch("tinyfam", dict(space.geometry), values)
            net.set_onehot(a)
            with torch.no_grad():
                assert torch.allclose(net(x), net.extract(a).eval()(x), atol=1e-5)
    net.set_onehot(None)
    model = load_model(arch, retrain_dir / "best.pt").eval()
    skipped = [isinstance(model.get_submodule(p), torch.nn.Identity) for p in arch.positions]
    assert skipped == [arch.spec.inactive(v) for v in arch.values.values()]
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_unknown_family_and_task_are_user_errors(plug, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.replace("family: tinyfam", "family: nosuchfam"))
    r = _cli(plug, tmp_path, "search", "s1", "task=tinytask", f"space={bad}", status=2)
    text = " ".join(r.stderr.split())
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "'nosuchfam'" in text and "ernas.families" in text
    assert "tinyfam" in text  # the installed plug-in is listed among the known families

    (tmp_path / "space.yaml").write_text(SPACE)
    r = _cli(plug, tmp_path, "search", "s2", "task=tinytask", "task.name=nosuchtask",
             f"space={tmp_path / 'space.yaml'}", status=2)
    text = " ".join(r.stderr.split())
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "'nosuchtask'" in text and "tinytask" in text


def test_the_latency_probe_takes_a_model_without_fuse(inproc):
    import yaml

    from ernas.latency.factory import make_backend
    from ernas.latency.measure import MeasureProtocol
    from ernas.latency.resolve import probe_table
    from ernas.latency.table import LatencyTable
    from ernas.space import space_from_dict

    space = space_from_dict(yaml.safe_load(SPACE), "space")
    from tinyplug.family import TinyNet

    assert not hasattr(TinyNet, "fuse")  # fuse() is optional in the Family contract
    shape = [1, 3, 16, 16]
    table = LatencyTable()
    for key in space.op_keys(shape):
        table.add(key, [0.01])
    rec = probe_table(table, space, make_backend({"name": "onnxruntime", "threads": 1}), shape,
                      "block", MeasureProtocol(rounds=1, per_round=1, warmup=0, min_seconds=0))
    assert rec["measured_ms"] > 0


def test_a_skip_decision_must_be_a_boolean_decision():
    from ernas import ErnasError
    from ernas.families.nafnet import NAFNetFamily
    from ernas.family import _REGISTRY, register_family

    class Bad(NAFNetFamily):
        name = "bad_skip_family"
        ops = {}
        skip_decision = "kernel"  # values 3/5/7: cannot be drawn kept/skipped

    with pytest.raises(ErnasError, match="skip_decision='kernel'"):
        register_family(Bad())
    assert "bad_skip_family" not in _REGISTRY
