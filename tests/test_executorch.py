"""ExecuTorch + XNNPACK: the latency backend (a real profile through ernas-profile, delegation per
key, threads), the table's text column, ``ernas-export format=executorch`` (fp32 parity, PT2E
int8 scored and timed) and the refusal when the optional extra is not installed."""
import json

import numpy as np
import pytest
import torch

import ernas
from ernas.errors import ErnasError
from ernas.extras import EXECUTORCH
from ernas.latency.executorch import delegation_summary, delegation_text, parse_delegation
from ernas.latency.table import LatencyTable
from ernas.paths import SEARCH_SPACES
from optional_extras import cli, outputs

needs_executorch = pytest.mark.skipif(not EXECUTORCH.available(),
                                      reason='optional extra: pip install "ernas[executorch]"')
FAST = ["latency.measure.rounds=2", "latency.measure.per_round=2",
        "latency.measure.min_seconds=0", "latency.backend.threads=1", "progress=false"]


def test_delegation_column_round_trip(tmp_path):
    """The text column survives save/load and a re-measured row; readers ignore it."""
    t = LatencyTable(metadata={"backend": "executorch_xnnpack"})
    d = {"delegated": 30, "subgraphs": 3, "portable": {"aten_mean_dim": 4,
                                                       "aten_split_with_sizes_copy_default": 2}}
    t.add("a", [1.0, 2.0, 3.0], notes={"delegation": delegation_text(d)})
    t.add("b", [1.0, 1.5], notes={"delegation": delegation_text({"delegated": 1,
                                                                 "portable": {}})})
    t.add_summary("a", {"ms": 5.0, "median": 5.0, "p10": 5.0, "p90": 5.0, "mean": 5.0, "n": 2})
    t.save(tmp_path / "t.csv")
    u = LatencyTable.load(tmp_path / "t.csv")
    assert u.lookup(["a", "b"]).tolist() == [5.0, pytest.approx(1.1)]
    assert parse_delegation(u.get("a")["delegation"]) == {
        "delegated": 30, "portable": d["portable"]}
    s = delegation_summary(u)
    assert s["keys"] == 2 and s["fully_delegated"] == 1 and s["fallback_keys"] == ["a"]
    assert s["portable_ops"]["aten_mean_dim"] == {"keys": 1, "nodes": 4}
    assert delegation_summary(LatencyTable()) is None


@needs_executorch
def test_backend_threads_timing_and_pte():
    from executorch.extension.pybindings import portable_lib as pl

    from ernas.latency.executorch import ExecutorchBackend
    from ernas.latency.factory import make_backend

    b = make_backend({"name": "executorch_xnnpack", "threads": 1})
    fp = b.fingerprint()["runtime"]  # the count the pool reports after resizing it
    assert isinstance(b, ExecutorchBackend) and pl._threadpool_get_thread_count() == 1
    assert fp["runtime"] == "executorch" and fp["threads"] == 1 and fp["version"] == "1.5.1"
    assert make_backend({"name": "executorch_xnnpack", "threads": 2}).fingerprint()[
        "runtime"]["threads"] == 2
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16)
    run = b.runner(conv, x)
    assert pl._threadpool_get_thread_count() == 1  # the runner resets the pool to its threads
    ms = [run() for _ in range(3)]
    assert all(np.isfinite(ms)) and min(ms) > 0
    with torch.no_grad():  # the runner's .pte computes the module
        assert float((run.method(x) - conv(x)).abs().max()) < 1e-4
    assert parse_delegation(run.notes["delegation"]) == {"delegated": 1, "portable": {}}
    for bad in ({"threads": 0}, {"dtype": "float16"}):
        with pytest.raises(ErnasError, match=next(iter(bad))):
            make_backend({"name": "executorch_xnnpack", **bad})


@needs_executorch
def test_profile_cli_on_executorch(tmp_path):
    """The smallest network plus one BatchNorm block (folded: its key says norm=none): channel
    LayerNorm's means fall back to portable kernels, the block without LayerNorm has none."""
    arch = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest()
    arch.values["encoders.1.0"].update(keep=True, norm="batchnorm")
    arch.save(tmp_path / "small.yaml")
    out = tmp_path / "et.csv"
    r = cli("ernas.cli.profile", "latency=executorch_xnnpack", f"arch={tmp_path}/small.yaml",
             "input_shape=[1,3,16,16]", f"output={out}", *FAST, f"hydra.run.dir={tmp_path}/p",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(out)
    keys = set(arch.op_keys((1, 3, 16, 16), "block"))
    assert set(table.keys()) == keys and (table.to_frame()["ms"] > 0).all()
    meta = table.metadata
    assert meta["backend"] == "executorch_xnnpack" and meta["threads"] == 1
    assert meta["fingerprint"]["runtime"] == {"runtime": "executorch", "version": "1.5.1",
                                              "provider": "xnnpack", "threads": 1}
    cells = {k: parse_delegation(table.get(k)["delegation"]) for k in keys}
    assert all(c["delegated"] > 0 for c in cells.values())
    convs = [k for k in keys if k.startswith("conv2d")]
    assert convs and all(not cells[k]["portable"] for k in convs)
    ln = [k for k in keys if "norm=layernorm" in k]
    assert ln and all("aten_mean_dim" in cells[k]["portable"] for k in ln)
    bn = [k for k in keys if k.startswith("nafblock") and "norm=none" in k]
    assert bn and all("aten_mean_dim" not in cells[k]["portable"] for k in bn)
    assert all("alloc" not in c["portable"] for c in cells.values())
    blocks = [k for k in keys if k.startswith("nafblock")]  # SimpleGate's split falls back too
    assert all("aten_split_with_sizes_copy_default" in cells[k]["portable"] for k in blocks)
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["delegation"]["with_fallback"] == len(blocks) == len(ln) + len(bn)
    assert f"delegation: {len(keys) - len(blocks)} of {len(keys)} keys fully delegated" in r.stdout
    assert "aten_mean_dim" in r.stdout


@needs_executorch
def test_int8_table_prices_the_quantised_network_and_serves_only_int8(tmp_path):
    """``latency.backend.dtype=int8``: every key is PT2E-quantised before lowering (its XNNPACK
    subgraph holds the quantize/dequantize nodes as well, so a conv key has more delegated nodes
    than fp32's single convolution); the table says int8, and a float32 request refuses it even
    when trusted."""
    from ernas.latency.resolve import resolve_table
    from ernas.latency.settings import LatencySettings

    space = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    arch = space.smallest()
    arch.save(tmp_path / "small.yaml")
    out = tmp_path / "int8.csv"
    r = cli("ernas.cli.profile", "latency=executorch_xnnpack", "latency.backend.dtype=int8",
             f"arch={tmp_path}/small.yaml", "input_shape=[1,3,16,16]", f"output={out}", *FAST,
             f"hydra.run.dir={tmp_path}/p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(out)
    keys = set(arch.op_keys((1, 3, 16, 16), "block"))
    assert set(table.keys()) == keys and (table.to_frame()["ms"] > 0).all()
    assert table.metadata["dtype"] == "int8"
    cells = {k: parse_delegation(table.get(k)["delegation"]) for k in keys}
    convs = [k for k in keys if k.startswith("conv2d")]
    assert convs and all(cells[k]["delegated"] > 1 and not cells[k]["portable"] for k in convs)
    fp32 = {"name": "executorch_xnnpack", "threads": 1}
    with pytest.raises(ErnasError, match="dtype"):
        resolve_table(space, [1, 3, 16, 16], LatencySettings(
            backend=fp32, table=str(out), trust_table=True, anchor=False))


@needs_executorch
def test_export_executorch_fp32_parity_and_int8(tmp_path):
    """The tiny space's smallest network (one NAF block kept: lowering is the slow part)."""
    ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest().save(tmp_path / "a.yaml")
    r = cli("ernas.cli.export", "format=executorch", f"arch={tmp_path / 'a.yaml'}",
             f"hydra.run.dir={tmp_path / 'ex'}",
             "input_shape=[1,3,32,32]", "threads=1", "calibration.inputs=2",
             "task.eval_sigmas=[25]", "task.max_side=64", "memory_runs=1", "qat.steps=2",
             "qat.batch_size=2", "qat.crop=16", "qat.calibration_batches=1", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert s["format"] == "executorch" and s["parity_ok"] and s["max_abs_diff"] <= 1e-4
    assert s["peak_mem_mib_fp32"] > 0 and s["peak_mem_mib_int8"] > 0
    for f in ("model.pte", "model_int8.pte", "model_qat.pte", "arch.yaml"):
        assert (tmp_path / "ex" / f).is_file(), f
    assert not list((tmp_path / "ex").glob("*.onnx"))
    m = s["metric"]
    assert np.isfinite(s[f"{m}_fp32"]) and np.isfinite(s[f"{m}_int8"])
    assert s[f"{m}_delta_int8"] == pytest.approx(s[f"{m}_int8"] - s[f"{m}_fp32"])
    assert abs(s[f"{m}_delta_int8"]) < 2.0  # quantised, not broken
    assert s["fp32_ms"] > 0 and s["int8_ms"] > 0 and s["int8_speedup"] > 0
    assert s["latency_backend"]["backend"] == "executorch_xnnpack"
    assert s["delegation_int8"]["delegated"] > 0
    assert "aten_convolution_default" not in s["delegation_int8"]["portable"]
    assert "max |executorch - torch|" in r.stdout and "int8" in r.stdout
    # QAT: trained at 16x16 crops, lowered at the 32x32 input, quantised ops on XNNPACK
    assert s["qat"]["steps"] == 2 and np.isfinite(s[f"{m}_qat"]) and abs(s[f"{m}_delta_qat"]) < 2
    assert s["delegation_qat"]["delegated"] > 0 and s["qat_speedup"] > 0
    assert "aten_convolution_default" not in s["delegation_qat"]["portable"]
    assert "; qat " in r.stdout and "qat: " in r.stdout
    assert (tmp_path / "ex" / "model_int8.pte").stat().st_size < \
        (tmp_path / "ex" / "model.pte").stat().st_size  # int8 weights


@needs_executorch
def test_export_refusals_with_executorch_installed(tmp_path):
    r = cli("ernas.cli.export", "format=executorch", "dynamic_hw=true",
             f"hydra.run.dir={tmp_path / 'q'}", cwd=tmp_path)
    assert r.returncode == 2 and "dynamic_hw" in r.stderr and "Traceback" not in r.stderr
    r = cli("ernas.cli.export", "latency=executorch_xnnpack", f"hydra.run.dir={tmp_path / 'o'}",
             cwd=tmp_path)
    assert r.returncode == 2 and "format=executorch" in r.stderr
    assert outputs(tmp_path / "q") == [] and outputs(tmp_path / "o") == []


@pytest.mark.parametrize("module,args", [
    ("ernas.cli.profile", ["latency=executorch_xnnpack", "input_shape=[1,3,16,16]"]),
    ("ernas.cli.export", ["format=executorch"]),
    ("ernas.cli.search", ["latency=executorch_xnnpack"]),
])
def test_missing_extra_is_refused(tmp_path, module, args):
    """Without the package (blocked from import): one error paragraph naming the extra, exit 2,
    no run directory."""
    r = cli(module, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, without=EXECUTORCH)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err and "\n\n" not in err
    assert 'pip install "ernas[executorch]"' in err
    assert outputs(tmp_path / "run") == [] and outputs(tmp_path) in ([], ["run"])
