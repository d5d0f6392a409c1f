"""Latency backends and the measurement primitive: real onnxruntime / torch / command timing on a
tiny 1x1 conv, session options (spinning), runners, interleaved rounds and statistics."""
import inspect
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ernas.errors import ErnasError
from ernas.latency.backends import (
    OnnxRuntimeBackend, TorchBackend)
from ernas.latency.command import CommandBackend
from ernas.latency.factory import make_backend
from ernas.latency.measure import (MeasureProtocol, measure_interleaved, paired_half_gap,
                                   paired_ratio, paired_spread, statistic, summarize)
from ernas.latency.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[1]
PY = shlex.quote(sys.executable)


def tiny():
    torch.manual_seed(0)
    return torch.nn.Conv2d(8, 8, 1), torch.randn(1, 8, 16, 16)


@pytest.fixture
def repo_on_path(monkeypatch):
    """Subprocesses must import ernas from this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))


def samples(backend, n, warmup=1):
    """``n`` latencies (ms) from the backend's runner on the tiny model, after ``warmup`` calls."""
    run = backend.runner(*tiny())
    for _ in range(warmup):
        run()
    return np.array([run() for _ in range(n)], dtype=np.float64)


def check_samples(s, n):
    assert isinstance(s, np.ndarray) and s.dtype == np.float64
    assert len(s) == n and np.all(np.isfinite(s)) and np.all(s > 0)


def test_onnxruntime_backend():
    b = OnnxRuntimeBackend(threads=1, graph_optimization="basic")
    check_samples(samples(b, 5), 5)
    meta = b.metadata()
    assert meta["backend"] == "onnxruntime" and meta["threads"] == 1
    assert meta["provider"] == "CPUExecutionProvider" and meta["graph_optimization"] == "basic"
    assert {"torch", "onnxruntime", "onnx", "numpy"} <= set(meta["versions"])
    assert meta["device"] and meta["hostname"] and meta["python"] and meta["dtype"] == "float32"
    assert meta["spinning"] is False and meta["execution_mode"] == "sequential"
    fp = meta["fingerprint"]
    assert fp["runtime"] == {"runtime": "onnxruntime", "version": meta["versions"]["onnxruntime"],
                             "provider": "CPUExecutionProvider", "graph_optimization": "basic",
                             "opset": 17, "execution_mode": "sequential", "threads": 1,
                             "spinning": False}
    assert fp["hardware"]["cpu_model"] == meta["device"] and len(fp["digest"]) == 12
    assert fp == b.fingerprint() and b.session_options() == fp["runtime"]
    assert OnnxRuntimeBackend(threads=1, spinning=True).fingerprint()["digest"] != fp["digest"]


@pytest.mark.parametrize("spinning", [False, True])
def test_onnxruntime_spinning_is_a_session_option(tmp_path, spinning):
    path = export_onnx(*tiny(), tmp_path / "m.onnx")
    b = OnnxRuntimeBackend(threads=2, spinning=spinning)
    opts = b.session(path).get_session_options()
    want = "1" if spinning else "0"
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == want
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == want
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert b.metadata()["spinning"] is spinning
    assert OnnxRuntimeBackend().spinning is False  # off by default
    with pytest.raises(ErnasError, match="spinning"):
        OnnxRuntimeBackend(spinning="no")


def test_runners(tmp_path):
    """One measurement primitive: every backend's runner returns one latency per call; the
    onnxruntime backend also runs already exported files (e.g. int8 models)."""
    b = OnnxRuntimeBackend(threads=1)
    for run in (b.runner(*tiny()), TorchBackend(threads=1).runner(*tiny()),
                b.onnx_runner(export_onnx(*tiny(), tmp_path / "m.onnx"), (1, 8, 16, 16))):
        values = [run() for _ in range(3)]
        assert all(isinstance(v, float) and v > 0 for v in values)
    dyn = export_onnx(*tiny(), tmp_path / "dyn.onnx", dynamic_hw=True)
    assert b.onnx_runner(dyn, (1, 8, 40, 24))() > 0


def test_measure_interleaved_rounds_and_order():
    calls = []

    def fake(name, value):
        def run():
            calls.append(name)
            return value
        return run

    runners = {n: fake(n, v) for n, v in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))}
    res = measure_interleaved(runners, rounds=6, per_round=2, warmup=1, seed=3, min_seconds=0)
    assert calls[:4] == ["a", "b", "c", "d"]  # warm-up: one call each
    timed = calls[4:]
    assert len(timed) == 6 * 4 * 2 and all(timed[i] == timed[i + 1] for i in range(0, 48, 2))
    orders = [tuple(timed[r * 8:(r + 1) * 8:2]) for r in range(6)]
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders)  # every runner every round
    assert len(set(orders)) > 1  # shuffled between rounds
    for name, v in (("a", 1.0), ("d", 4.0)):
        assert res[name]["ms"] == v and res[name]["n"] == 12 and res[name]["spread"] == 0.0
    calls.clear()
    measure_interleaved(runners, rounds=6, per_round=2, warmup=1, seed=3, min_seconds=0)
    assert calls[4:] == timed  # seeded: the same orders again
    with pytest.raises(ErnasError, match="rounds"):
        measure_interleaved(runners, rounds=0)
    calls.clear()  # min_seconds: rounds go on until the rounds have lasted that long
    res = measure_interleaved({"a": runners["a"]}, rounds=2, per_round=1, warmup=0,
                              min_seconds=0.05)
    assert res["a"]["n"] == len(calls) > 2


def test_paired_ratio_cancels_drift_shared_by_a_round():
    factors = [1.0, 3.0, 1.5, 2.0, 1.0, 2.5]  # the machine's slowness in each round
    calls = []

    def runner(base):
        def run():
            calls.append(1)
            return base * factors[(len(calls) - 1) // 2]  # 2 runners x 1 call per round
        return run

    res = measure_interleaved({"ref": runner(10.0), "net": runner(4.0)}, rounds=6,
                              per_round=1, warmup=0, min_seconds=0)
    assert res["ref"]["round_ms"] == pytest.approx([10 * f for f in factors])
    assert paired_ratio(res["ref"], res["net"]) == pytest.approx(2.5)
    assert paired_ratio([10.0, 30.0, 12.0], [5.0, 10.0, 3.0]) == pytest.approx(3.0)  # median
    with pytest.raises(ErnasError, match="same rounds"):
        paired_ratio([1.0, 2.0], [1.0])
    assert paired_spread(res["ref"], res["net"]) == 0.0  # every pass agrees on 2.5
    # per-round ratios 2, 3, 4: pass-to-pass |2-3|, |2-4|, |3-4| -> mean 4/3, over the median 3
    assert paired_spread([10.0, 30.0, 12.0], [5.0, 10.0, 3.0]) == pytest.approx(4 / 9)
    # split halves: per-round ratios 2, 3, 4, 5 -> even rounds' median 3, odd rounds' 4, of 3.5
    assert paired_half_gap([2.0, 3.0, 4.0, 5.0], [1.0] * 4) == pytest.approx(1 / 3.5)
    assert paired_half_gap(res["ref"], res["net"]) == 0.0
    assert paired_half_gap([2.0], [1.0]) == 0.0


def test_half_gap_compares_even_and_odd_rounds():
    """Even rounds at 10 ms, odd at 20: the halves disagree by 10 ms over the p20 of all (10);
    a steady runner has no gap, one round has none to measure."""
    assert summarize([[10.0], [20.0], [10.0], [20.0]])["half_gap"] == pytest.approx(1.0)
    assert summarize([[10.0, 11.0], [10.0, 11.0]])["half_gap"] == 0.0
    assert summarize([[10.0, 30.0]])["half_gap"] == 0.0


def test_statistics_and_protocol():
    s = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert statistic(s, "p20") == pytest.approx(1.8) and statistic(s, "min") == 1.0
    assert statistic(s, "median") == 3.0 and statistic(s, "mean") == 22.0
    assert statistic(s, "p100") == 100.0
    with pytest.raises(ErnasError, match="p20"):
        statistic(s, "p200")
    r = summarize([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]], "min")
    # pass-to-pass: |1-2|, |1-1|, |2-1| -> mean 2/3, over the median pass 1
    assert r["ms"] == 1.0 and r["n"] == 6 and r["spread"] == pytest.approx(2 / 3)
    p = MeasureProtocol.from_mapping({"rounds": 4, "statistic": "median"})
    assert p.rounds == 4 and p.to_dict()["statistic"] == "median"
    # a config's `measure` mapping is measure_interleaved's keywords, with the same defaults
    params = inspect.signature(measure_interleaved).parameters
    assert {f: params[f].default for f in MeasureProtocol().to_dict()} == MeasureProtocol().to_dict()
    with pytest.raises(ErnasError, match="roudns"):
        MeasureProtocol.from_mapping({"roudns": 4})
    with pytest.raises(ErnasError, match="per_round"):
        MeasureProtocol(per_round=0)


def test_onnxruntime_bad_settings():
    with pytest.raises(ErnasError, match="CPUExecutionProvider") as e:
        OnnxRuntimeBackend(provider="NoSuchExecutionProvider")
    assert "NoSuchExecutionProvider" in str(e.value)
    with pytest.raises(ErnasError, match="graph_optimization"):
        OnnxRuntimeBackend(graph_optimization="max")


def test_torch_backend_cpu():
    b = TorchBackend(device="cpu", threads=1)
    before = torch.get_num_threads()
    check_samples(samples(b, 5), 5)
    assert torch.get_num_threads() == before
    meta = b.metadata()
    assert meta["backend"] == "torch" and meta["threads"] == 1 and meta["provider"] == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_torch_backend_cuda_unavailable():
    with pytest.raises(ErnasError, match="CUDA is not available"):
        TorchBackend(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_cuda():  # pragma: no cover - runs on GPU machines only
    b = TorchBackend(device="cuda")
    check_samples(samples(b, 5), 5)
    assert b.metadata()["device"] == torch.cuda.get_device_name(0)


def test_command_backend_local_onnx(repo_on_path, tmp_path):
    template = f"{PY} -m ernas.latency.time_onnx {{model}} --repeats {{repeats}} --threads 1"
    b = CommandBackend(template, r"latency_ms: ([0-9.]+)", runs_per_call=4, workdir=str(tmp_path))
    s = samples(b, 6)
    check_samples(s, 6)  # 7 samples needed -> two calls of 4 runs
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, kept in workdir
    assert b.metadata()["backend"] == "command"


def test_command_backend_preset(repo_on_path):
    b = make_backend({"name": "command", "preset": "local_onnx", "runs_per_call": 3})
    check_samples(samples(b, 3, warmup=0), 3)


def test_command_backend_pattern_mismatch(repo_on_path):
    template = f"{PY} -m ernas.latency.time_onnx {{model}} --repeats {{repeats}} --threads 1"
    b = CommandBackend(template, r"elapsed=([0-9.]+)")
    with pytest.raises(ErnasError, match="matched nothing") as e:
        samples(b, 5)
    assert "elapsed=([0-9.]+)" in str(e.value) and "latency_ms:" in str(e.value)


def test_time_onnx_spinning_flag(tmp_path, capsys):
    from ernas.latency import time_onnx

    path = export_onnx(*tiny(), tmp_path / "m.onnx")
    for extra in ([], ["--spinning"]):
        assert time_onnx.main([str(path), "--repeats", "2", "--threads", "1", *extra]) == 0
        assert capsys.readouterr().out.count("latency_ms: ") == 2


def test_command_backend_units_and_shell():
    b = CommandBackend(f"{PY} -c \"print('avg=1500')\"", r"avg=(\d+)", unit="us")
    s = samples(b, 2, warmup=0)
    np.testing.assert_allclose(s, [1.5, 1.5])
    # `&&` runs through bash -c
    b = CommandBackend(f"true && {PY} -c \"print('t=0.002')\"", r"t=([0-9.]+)", unit="s")
    assert b.command("m.onnx")[:2] == ["bash", "-c"]
    np.testing.assert_allclose(samples(b, 1, warmup=0), [2.0])


def test_command_backend_failures():
    b = CommandBackend(f"{PY} -c \"import sys; print('boom'); sys.exit(3)\"", r"x=(\d+)")
    with pytest.raises(ErnasError, match="status 3"):
        samples(b, 5)
    with pytest.raises(ErnasError, match="not found"):
        samples(CommandBackend("no-such-tool-xyz {model}", r"x=(\d+)"), 5)
    with pytest.raises(ErnasError, match="capture group"):
        CommandBackend("true", r"x=\d+")


def test_make_backend():
    b = make_backend({"name": "onnxruntime", "threads": 1})
    assert isinstance(b, OnnxRuntimeBackend) and b.threads == 1
    assert isinstance(make_backend({"name": "torch"}), TorchBackend)
    with pytest.raises(ErnasError, match="onnxruntime") as e:
        make_backend({"name": "tensorrt"})
    assert "command" in str(e.value) and "torch" in str(e.value)
    with pytest.raises(ErnasError, match="thread") as e:
        make_backend({"name": "onnxruntime", "thread": 2})
    assert "threads" in str(e.value) and "graph_optimization" in str(e.value)
    assert "spinning" in str(e.value)
    assert make_backend({"name": "onnxruntime", "spinning": True}).spinning is True
    with pytest.raises(ErnasError, match="template"):
        make_backend({"name": "command"})
    with pytest.raises(ErnasError, match="local_onnx"):
        make_backend({"name": "command", "preset": "iphone"})


def test_make_backend_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"name": "torch", "threads": 1})
    assert make_backend(cfg).threads == 1


def test_onnxruntime_int8_times_the_qdq_model_with_the_exports_coverage():
    """``dtype: int8``: the file timed is the QDQ model (not the fp32 export), quantised with
    ernas-export's default coverage: a big-GEMM conv is int8, a narrow pointwise one stays
    float; the metadata states that coverage. Bugs caught: the fp32 file timed, or a table
    coverage that differs from what ``ernas-export`` ships."""
    import onnx
    import yaml

    backend = OnnxRuntimeBackend(threads=1, dtype="int8")
    torch.manual_seed(0)
    for conv, note in ((torch.nn.Conv2d(16, 32, 3, padding=1), "1 of 1 Conv"),
                       (torch.nn.Conv2d(8, 8, 1), "0 of 1 Conv")):
        run = backend.runner(conv, torch.randn(1, conv.in_channels, 16, 16))
        assert run.notes == {"int8": note} and run() > 0
        ops = [n.op_type for f in Path(run.workdir.name).glob("*_int8.onnx")
               for n in onnx.load(str(f)).graph.node]
        assert ("QuantizeLinear" in ops) == (note == "1 of 1 Conv") and "Conv" in ops
    cal = yaml.safe_load((REPO / "experiments" / "export.yaml").read_text())["calibration"]
    meta = backend.metadata()
    assert meta["dtype"] == "int8" and meta["int8"]["op_types"] == cal["op_types"]
    assert meta["int8"]["conv_rule"] == cal["conv_rule"]
    assert meta["int8"]["per_channel"] == cal["per_channel"]
    assert OnnxRuntimeBackend(threads=1).runner(*tiny()).__dict__.get("notes") is None
    with pytest.raises(ErnasError, match="dtype"):
        OnnxRuntimeBackend(threads=1, dtype="int4")
