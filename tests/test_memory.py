"""Peak inference memory (``ernas.memory``), measured for real in fresh processes: a wider network
needs more than a narrow one on each runtime, the empty-session baseline is subtracted, exported
files are measured, and ``ernas-evaluate`` reports the column."""
import importlib.util
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from ernas import build_model
from ernas.errors import ErnasError
from ernas.families.nafnet import official_arch
from ernas.latency.backends import OnnxRuntimeBackend, TorchBackend
from ernas.latency.onnx_export import export_onnx
from ernas.memory import file_memories, network_memory, peak_memory

SHAPE = [1, 3, 256, 256]
BLOCKS = dict(enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])


def _net(width: int):
    arch = official_arch(width, name=f"w{width}", **BLOCKS)
    torch.manual_seed(0)
    return arch, build_model(arch)


@pytest.fixture(scope="module")
def ort_pair():
    """Width 4 and width 32 on onnxruntime (1 thread) at 256x256: 8x the activations."""
    backend = OnnxRuntimeBackend(threads=1)
    return {w: network_memory(*_net(w), backend, SHAPE, runs=3) for w in (4, 32)}


def test_a_wider_network_needs_more_memory_on_onnxruntime(ort_pair):
    small, big = ort_pair[4], ort_pair[32]
    assert small.runtime == big.runtime == "onnxruntime" and len(big.runs_mib) == 3
    assert small.mib > 0 and big.mib > 2 * small.mib, (small, big)
    # median and spread of the runs
    assert big.mib == sorted(big.runs_mib)[1]
    assert big.spread == pytest.approx(max(big.runs_mib) - min(big.runs_mib))


def test_the_empty_session_baseline_is_subtracted(ort_pair):
    small = ort_pair[4]
    assert small.method == "clear_refs"  # the high-water mark was reset at the baseline (Linux)
    # the runtime alone (interpreter, numpy, onnxruntime, an empty session) is most of the
    # process; the narrow network's own footprint is well below it
    assert small.baseline_mib > 40 and small.mib < 0.9 * small.baseline_mib
    assert small.peak_mib - small.baseline_mib == pytest.approx(small.mib, abs=0.5)


def test_a_wider_network_needs_more_memory_in_torch_eager():
    backend = TorchBackend(threads=1)
    small, big = (network_memory(*_net(w), backend, SHAPE, runs=1) for w in (4, 32))
    assert small.runtime == "torch" and small.mib > 0 and big.mib > 1.5 * small.mib, (small, big)


def test_exported_files_are_measured_on_their_runtime(tmp_path):
    arch, model = _net(4)
    path = export_onnx(model.eval(), torch.rand(1, 3, 64, 64), tmp_path / "m.onnx")
    got = file_memories({"fp32": str(path)}, OnnxRuntimeBackend(threads=1), [1, 3, 64, 64], 1)
    assert set(got) == {"peak_mem_mib_fp32", "peak_mem_spread_fp32"}
    assert got["peak_mem_mib_fp32"] > 0 and got["peak_mem_spread_fp32"] == 0
    # a backend that does not run .onnx files here measures nothing
    assert file_memories({"fp32": str(path)}, TorchBackend(threads=1), [1, 3, 64, 64], 1) == {}
    with pytest.raises(ErnasError, match="Unknown memory runtime"):
        peak_memory("tflite", path, [1, 3, 64, 64])


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None,
                    reason='optional extra: pip install "ernas[executorch]"')
def test_executorch_pte_files_are_measured(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x = torch.rand(1, 3, 256, 256)   # width 64: 16 MiB per activation, width 4: 1 MiB
    sizes = {}
    for width in (4, 64):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(width, 3, 3, padding=1)).eval()
        lowered = to_edge_transform_and_lower(torch.export.export(net, (x,)),
                                              partitioner=[XnnpackPartitioner()])
        path = tmp_path / f"w{width}.pte"
        path.write_bytes(lowered.to_executorch().buffer)
        sizes[width] = peak_memory("executorch_xnnpack", path, list(x.shape), {"threads": 1},
                                   runs=1)
    assert sizes[4].mib > 0 and sizes[64].mib > 2 * sizes[4].mib, sizes


def _evaluate(tmp_path, *args):
    arch = official_arch(4, name="tiny", **BLOCKS)
    arch.values["decoders.1.0"]["norm"] = "batchnorm"   # not the reference: a baseline row
    arch.save(tmp_path / "tiny.yaml")
    return subprocess.run(
        [sys.executable, "-m", "ernas.cli.evaluate", "threads=1", "progress=false",
         f"arch={tmp_path / 'tiny.yaml'}", "predict_latency=false", "input_shape=[1,3,32,32]",
         "task.max_side=64", "task.eval_sigmas=[25]", "latency.backend.threads=1",
         "latency.measure.rounds=2", "latency.measure.per_round=1",
         "latency.measure.min_seconds=0", f"hydra.run.dir={tmp_path / 'ev'}", *args],
        capture_output=True, text=True, cwd=tmp_path)


def test_cli_evaluate_reports_peak_memory(tmp_path):
    r = _evaluate(tmp_path, "memory_runs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    res = pd.read_csv(tmp_path / "ev" / "results.csv")
    assert list(res["name"]) == ["tiny", "reference"]
    assert res["peak_mem_mib"].gt(0).all() and res["peak_mem_spread"].ge(0).all()
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["peak_mem_mib"] == pytest.approx(res.loc[0, "peak_mem_mib"])
    assert s["memory"].startswith("onnxruntime, threads 1, 2 runs")
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "peak MiB" in report and "high-water mark" in report
    assert "peak memory" in r.stdout


def test_cli_evaluate_refuses_negative_memory_runs(tmp_path):
    r = _evaluate(tmp_path, "memory_runs=-1")
    assert r.returncode == 2 and "memory_runs=-1" in r.stderr
    written = (tmp_path / "ev").glob("*") if (tmp_path / "ev").exists() else []
    assert [p.name for p in written] == []


@pytest.mark.parametrize("value", ["-1", "two"])
def test_cli_export_refuses_a_bad_memory_runs(tmp_path, value):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.export", f"memory_runs={value}",
                        "input_shape=[1,3,32,32]", f"hydra.run.dir={tmp_path / 'ex'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "memory_runs=" in r.stderr and "error:" in r.stderr, r.stderr
    written = (tmp_path / "ex").glob("*") if (tmp_path / "ex").exists() else []
    assert [p.name for p in written] == []
