"""LiteRT + XNNPACK: the latency backend (timing, the .tflite computes the module, threads and
the fingerprint), a real profile through ernas-profile, ``ernas-export format=tflite`` (fp32
parity, scored and timed) and the refusals, the missing optional extra among them."""
import json

import numpy as np
import pytest
import torch

import ernas
from ernas.errors import ErnasError
from ernas.extras import LITERT
from ernas.latency.table import LatencyTable
from ernas.paths import SEARCH_SPACES
from optional_extras import cli, outputs

needs_litert = pytest.mark.skipif(not LITERT.available(),
                                  reason='optional extra: pip install "ernas[litert]"')
FAST = ["latency.measure.rounds=2", "latency.measure.per_round=2",
        "latency.measure.min_seconds=0", "latency.backend.threads=1", "progress=false"]


def _versions() -> dict:
    from importlib.metadata import version

    return {"ai-edge-litert": version("ai-edge-litert"), "litert-torch": version("litert-torch")}


@needs_litert
def test_backend_timing_parity_threads():
    from ernas.latency.factory import make_backend
    from ernas.latency.litert import LitertBackend, TfliteModel

    b = make_backend({"name": "litert", "threads": 1})
    v = _versions()
    assert isinstance(b, LitertBackend)
    assert b.fingerprint()["runtime"] == {
        "runtime": "ai-edge-litert", "version": v["ai-edge-litert"], "converter": "litert-torch",
        "converter_version": v["litert-torch"], "provider": "xnnpack", "threads": 1}
    two = make_backend({"name": "litert", "threads": 2})
    assert two.fingerprint()["digest"] != b.fingerprint()["digest"]
    assert b.metadata()["versions"]["ai-edge-litert"] == v["ai-edge-litert"]
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 16, 16)
    run = b.runner(conv, x)
    ms = [run() for _ in range(3)]
    assert all(np.isfinite(ms)) and min(ms) > 0
    assert run.model.channels_last  # NHWC at the model's boundary, as inside a network
    with torch.no_grad():
        want = conv(x)
    assert float((run.model(x) - want).abs().max()) < 1e-4
    tflite, channels_last = b.to_tflite(conv, x)
    assert tflite[4:8] == b"TFL3"  # the flatbuffer's file identifier
    two_threads = TfliteModel(tflite, 2, channels_last)  # same file, another thread count
    assert float((two_threads(x) - want).abs().max()) < 1e-4
    for bad in ({"threads": 0}, {"threads": True}, {"dtype": "float16"}):
        with pytest.raises(ErnasError, match=next(iter(bad))):
            make_backend({"name": "litert", **bad})


@needs_litert
def test_int8_tflite_boundary_quantises_and_dequantises():
    """A conv stack converts to a .tflite with int8 input and output tensors; TfliteModel
    quantises the float input, q = round(x/s) + z, and dequantises the output, so the result
    is PyTorch's within the int8 grid. Bugs caught: float fed to an int8 input (refused by the
    interpreter), or int8 codes returned as values."""
    from ernas.latency.litert import TfliteModel, to_tflite

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 16, 16)
    tflite, channels_last = to_tflite(net, x, [torch.randn(1, 8, 16, 16) for _ in range(4)])
    model = TfliteModel(tflite, 1, channels_last)
    assert model.in_q[0] == np.int8 and model.out_q[0] == np.int8
    with torch.no_grad():
        want = net(x)
    err = float((model(x) - want).abs().max())
    assert err < 0.1 * float(want.abs().max()), err


@needs_litert
def test_nafblock_parity():
    """A whole NAF block (LayerNorm, SimpleGate, channel attention) converts and computes the
    PyTorch block."""
    from ernas.latency.factory import make_backend
    from ernas.latency.ops import build_op

    arch = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest()
    key = next(k for k in arch.op_keys((1, 3, 16, 16), "block") if k.startswith("nafblock"))
    module, x = build_op(key)
    module.eval()
    run = make_backend({"name": "litert", "threads": 1}).runner(module, x)
    with torch.no_grad():
        assert float((run.model(x) - module(x)).abs().max()) < 1e-4
    assert np.isfinite(run()) and run() > 0


@needs_litert
def test_profile_cli_on_litert(tmp_path):
    """The tiny space's smallest network, profiled per block on LiteRT by ernas-profile."""
    arch = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest()
    arch.save(tmp_path / "small.yaml")
    out = tmp_path / "lite.csv"
    r = cli("ernas.cli.profile", "latency=litert", f"arch={tmp_path}/small.yaml",
             "input_shape=[1,3,16,16]", f"output={out}", *FAST, f"hydra.run.dir={tmp_path}/p",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(out)
    keys = set(arch.op_keys((1, 3, 16, 16), "block"))
    frame = table.to_frame()
    assert set(table.keys()) == keys and np.isfinite(frame["ms"]).all() and (frame["ms"] > 0).all()
    meta, v = table.metadata, _versions()
    assert meta["backend"] == "litert" and meta["threads"] == 1
    assert meta["fingerprint"]["runtime"] == {
        "runtime": "ai-edge-litert", "version": v["ai-edge-litert"], "converter": "litert-torch",
        "converter_version": v["litert-torch"], "provider": "xnnpack", "threads": 1}
    assert "[START]" not in r.stdout  # the converter's progress tree is silenced


@needs_litert
def test_export_tflite_fp32_parity_and_int8(tmp_path):
    """The tiny space's smallest network to model.tflite (parity) and model_int8.tflite (PT2E
    int8 tensors inside), both scored and timed against each other. Bugs caught: an int8 file
    that is not quantised, a quality that collapses (a wrong boundary conversion), or a missing
    paired timing."""
    from ernas.latency.litert import TfliteModel

    ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest().save(tmp_path / "a.yaml")
    r = cli("ernas.cli.export", "format=tflite", f"arch={tmp_path / 'a.yaml'}",
             f"hydra.run.dir={tmp_path / 'ex'}", "input_shape=[1,3,32,32]", "threads=1",
             "calibration.inputs=2", "task.eval_sigmas=[25]", "task.max_side=64", *FAST,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    m = s["metric"]
    assert s["format"] == "tflite" and s["parity_ok"] and s["max_abs_diff"] <= 1e-4
    assert s["channels_last_io"] and s["fp32_ms"] > 0 and np.isfinite(s[f"{m}_fp32"])
    assert s["latency_backend"]["backend"] == "litert"
    data = (tmp_path / "ex" / "model.tflite").read_bytes()
    assert data[4:8] == b"TFL3" and len(data) == s["tflite_bytes"]
    int8 = tmp_path / "ex" / "model_int8.tflite"
    assert int8.read_bytes()[4:8] == b"TFL3" and s["int8_tflite_bytes"] == int8.stat().st_size
    def int8_tensors(path):
        return sum(t["dtype"] == np.int8 for t in
                   TfliteModel(path, 1, True).interpreter.get_tensor_details())

    assert int8_tensors(int8) > 5 and int8_tensors(tmp_path / "ex" / "model.tflite") == 0
    assert abs(s[f"{m}_delta_int8"]) < 1.0 and s["int8_ms"] > 0 and s["int8_speedup"] > 0
    assert (tmp_path / "ex" / "arch.yaml").is_file() and not list((tmp_path / "ex").glob("*.onnx"))
    assert "max |litert - torch|" in r.stdout and "; int8 " in r.stdout
    assert "training mode" not in r.stdout + r.stderr  # the graph was exported in eval mode


@needs_litert
def test_export_tflite_refusals(tmp_path):
    r = cli("ernas.cli.export", "format=tflite", "dynamic_hw=true", "qat.steps=2",
            f"hydra.run.dir={tmp_path / 'q'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(f in r.stderr for f in ("dynamic_hw=true", "qat.steps", "format=tflite"))
    assert outputs(tmp_path / "q") == []


@pytest.mark.parametrize("module,args", [
    ("ernas.cli.profile", ["latency=litert", "input_shape=[1,3,16,16]"]),
    ("ernas.cli.search", ["latency=litert"]),
    ("ernas.cli.export", ["format=tflite"]),
])
def test_missing_extra_is_refused(tmp_path, module, args):
    """Without the packages (blocked from import): one error paragraph naming the extra, exit 2,
    no run directory."""
    r = cli(module, *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, without=LITERT)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.startswith("error:") and "Traceback" not in err and "\n\n" not in err
    assert 'pip install "ernas[litert]"' in err
    assert ("format=tflite" if "export" in module else "latency.backend.name=litert") in err
    assert outputs(tmp_path / "run") == [] and outputs(tmp_path) in ([], ["run"])


@needs_litert
def test_export_onnx_refuses_litert_timing(tmp_path):
    """format=onnx times ONNX files: latency=litert is refused before anything is written."""
    r = cli("ernas.cli.export", "latency=litert", f"hydra.run.dir={tmp_path / 'o'}",
             cwd=tmp_path)
    assert r.returncode == 2 and "latency=litert cannot run" in r.stderr, r.stderr[-3000:]
    assert "format=tflite" in r.stderr
    assert "Traceback" not in r.stderr and outputs(tmp_path / "o") == []
