"""Op-key enumeration, prediction, expected latency, table resolution and the profile CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import ernas
from ernas.paths import SEARCH_SPACES
from ernas.errors import ErnasError
from ernas.latency.backends import OnnxRuntimeBackend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.ops import build_op, parse_key
from ernas.latency.predict import ExpectedLatency, predict_ms
from ernas.latency.resolve import resolve_table
from ernas.latency.settings import LatencySettings
from ernas.latency.table import LatencyTable, MissingKeysError

SHAPE = (1, 3, 32, 32)
FAST = MeasureProtocol(rounds=2, per_round=2, warmup=1, min_seconds=0.2)
FAST_CLI = ["latency.measure.rounds=2", "latency.measure.per_round=2", "latency.measure.warmup=1",
            "latency.measure.min_seconds=0.2", "latency.recheck_rounds=2"]


@pytest.fixture(scope="module")
def tiny():
    return ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")


@pytest.fixture(scope="module")
def tiny_table(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tables") / "tiny.csv"
    lat = LatencySettings(backend={"name": "onnxruntime", "threads": 1}, cache_dir=path.parent,
                          measure=FAST, recheck_rounds=2)
    table, _ = resolve_table(tiny, SHAPE, lat, False, shipped_dir=path.parent / "none")
    assert table.probe["action"] == "profiled"
    return table


def test_ern_space_key_enumeration():
    ern = ernas.load_space(SEARCH_SPACES / "nafnet_ern.yaml")
    keys = ern.op_keys((1, 3, 256, 256), "block")
    blocks = [k for k in keys if k.startswith("nafblock")]
    # 4 levels x (2 norms after folding BN x 2 attention x 3 kernels x 2 x 2 expansions) + middle
    assert len(blocks) == 4 * 48 + 1
    assert not any("batchnorm" in k for k in keys)
    assert len(keys) == len(set(keys))
    ops = ern.op_keys((1, 3, 256, 256), "op")
    assert {parse_key(k).op for k in ops} == {"conv2d", "dwconv2d", "layernorm2d", "simplegate",
                                             "sca", "scale_add", "add", "upsample"}
    assert "layernorm2d[impl=reduce]@1x32x256x256:float32" in ops


def test_arch_keys_follow_choices(tiny):
    arch = tiny.reference()
    full = arch.op_keys(SHAPE, "op")
    arch.values["encoders.0.0"].update(keep=False)
    assert len(arch.op_keys(SHAPE, "op")) == len(full) - 12  # a NAF block runs 12 ops
    arch.values["encoders.1.0"].update(norm="batchnorm")
    keys = arch.op_keys(SHAPE, "op")
    assert sum("layernorm2d" in k for k in keys) == sum("layernorm2d" in k for k in full) - 4


@pytest.mark.parametrize("gran", ["block", "op"])
def test_every_key_builds_and_runs(tiny, gran):
    for key in tiny.op_keys(SHAPE, gran)[:40]:
        module, x = build_op(key)
        with torch.no_grad():
            y = module(x)
        assert torch.isfinite(y).all()


def test_predict_and_expected_latency_agree(tiny, tiny_table):
    arch = tiny.sample(4)
    pred = predict_ms(tiny_table, arch)
    assert pred == pytest.approx(float(tiny_table.lookup(arch.op_keys(SHAPE, "block")).sum()))
    exp = ExpectedLatency(tiny, tiny_table)
    assert exp.of_arch(arch) == pytest.approx(pred, rel=1e-9)
    # uniform probabilities: expectation = constant + per-position mean over all combos
    logits = {p: {d: torch.zeros(len(c), requires_grad=True) for d, c in tiny.choices[p].items()}
              for p in tiny.searchable}
    probs = {p: {d: torch.softmax(a, 0) for d, a in ds.items()} for p, ds in logits.items()}
    e = exp(probs)
    manual = float(tiny_table.lookup(tiny.fixed_keys(SHAPE, "block")).sum())
    for p in tiny.positions:
        lats = [float(tiny_table.lookup(tiny.position_keys(p, c, SHAPE, "block")).sum())
                for c in tiny.combos(p)]
        manual += float(np.mean(lats))
    assert e.item() == pytest.approx(manual, rel=1e-6)
    e.backward()
    g = logits["encoders.0.0"]["keep"].grad
    assert g is not None and g[0] > 0 > g[1]  # keeping the block costs time


def test_missing_keys_name_the_fill_command(tiny, tiny_table, tmp_path):
    ern = ernas.load_space(SEARCH_SPACES / "nafnet_ern.yaml")
    frame = tiny_table.to_frame()
    dropped = [k for k in frame.index if k.startswith("nafblock")][:3]
    LatencyTable(frame.drop(index=dropped), dict(tiny_table.metadata)).save(tmp_path / "t.csv")
    with pytest.raises(MissingKeysError) as e:
        resolve_table(tiny, SHAPE, LatencySettings(backend={"name": "onnxruntime", "threads": 1},
                                                   table=tmp_path / "t.csv"))
    msg = str(e.value)
    assert all(k in msg for k in dropped) and "ernas-profile" in msg and str(tmp_path) in msg
    with pytest.raises(MissingKeysError) as e:
        predict_ms(tiny_table, ern.reference(), input_shape=SHAPE,
                   fill_command="ernas-profile space=nafnet_ern")
    assert "conv2d[cout=32,k=3]@1x3x32x32" in str(e.value) and "19 op key" in str(e.value)
    assert "ernas-profile space=nafnet_ern" in str(e.value)


def test_mismatched_metadata_is_refused(tiny, tiny_table, tmp_path):
    tiny_table.save(tmp_path / "t.csv")
    with pytest.raises(ErnasError) as e:
        resolve_table(tiny, (1, 3, 64, 64), LatencySettings(
            backend={"name": "onnxruntime", "threads": 1}, table=tmp_path / "t.csv"))
    assert "input_shape" in str(e.value) and str(tmp_path / "t.csv") in str(e.value)
    with pytest.raises(ErnasError, match="threads"):
        resolve_table(tiny, SHAPE, LatencySettings(
            backend={"name": "onnxruntime", "threads": 2}, table=tmp_path / "t.csv"))


def test_auto_uses_a_matching_shipped_table_without_profiling(tiny, tiny_table, tmp_path):
    shipped = tmp_path / "shipped"
    tiny_table.save(shipped / "tiny.csv")
    before = (shipped / "tiny.csv").read_text()
    # the probe really runs; a huge tolerance keeps this test about selection, not speed
    lat = LatencySettings(backend=OnnxRuntimeBackend(threads=1), cache_dir=tmp_path / "cache",
                          measure=FAST, probe_tolerance=100, probe_cache_s=0)
    table, path = resolve_table(tiny, SHAPE, lat, False, shipped_dir=shipped)
    assert path == shipped / "tiny.csv" and len(table) == len(tiny_table)
    assert table.probe["action"] == "used" and table.probe["accepted"]
    assert table.probe["arch"] == "nafnet_tiny_reference" and table.probe["measured_ms"] > 0
    assert table.source == path
    assert not (tmp_path / "cache").exists() and path.read_text() == before


def _cli(module, *args, cwd):
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_profile_and_validate_cli(tmp_path):
    out = tmp_path / "table.csv"
    common = ["input_shape=[1,3,32,32]", "latency.backend.threads=1", f"output={out}",
              "progress=false", *FAST_CLI]
    _cli("ernas.cli.profile", *common, f"hydra.run.dir={tmp_path}/p", cwd=tmp_path)
    table = LatencyTable.load(out)
    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    assert set(table.keys()) == set(tiny.op_keys(SHAPE, "block"))
    assert table.metadata["input_shape"] == [1, 3, 32, 32] and table.metadata["threads"] == 1
    assert (table.to_frame()["p10_ms"] <= table.to_frame()["p90_ms"]).all()
    assert table.metadata["consistency"]["pairs"] == 256 and table.metadata["statistic"] == "p20"
    p = json.loads((tmp_path / "p/summary.json").read_text())
    assert p["consistency"]["pairs"] == 256 and p["session_options"]["spinning"] is False
    assert p["fingerprint"]["digest"] == table.metadata["fingerprint"]["digest"]
    before = out.read_bytes()
    r = _cli("ernas.cli.profile", *common, "mode=validate", "validate.n=6",
             "latency.anchor=true", "latency.anchor_samples=2", f"hydra.run.dir={tmp_path}/v",
             cwd=tmp_path)
    s = json.loads((tmp_path / "v/summary.json").read_text())
    an = s["anchored"]  # scored on the 7 networks that are not anchors, and said so
    assert an["n"] == 7 and f"within ±10% {100 * an['within_10pct']:.0f}%" in r.stdout
    assert an["anchors"] == ["reference", "smallest", "anchor_0", "anchor_1"]
    assert "anchored at the reference, the smallest and 2 sampled networks" in r.stdout
    for k in ("mape", "within_5pct", "within_10pct", "spearman", "kendall", "noise_floor"):
        assert k in s
    assert s["n"] == 9 and s["plain_sum"]["n"] == 9 and s["corrected_loo"]["n"] == 9
    assert s["table"] == str(out) and s["corrected_table"] is None
    assert (tmp_path / "v/validation.png").stat().st_size > 1000
    assert out.read_bytes() == before  # validation never writes into the table
    # validated as it is: latency.anchor does not calibrate the table validation scores
    assert "anchor" not in s["probe"] and s["table_correction"] is None


@pytest.mark.slow
def test_profile_cli_command_backend(tmp_path):
    """ernas-profile through the command backend config (``latency=command_local``, ~80 s: one
    process per timing call); CommandBackend itself is tested fast in test_backends.py."""
    arch = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").smallest()
    arch.save(tmp_path / "small.yaml")
    out = tmp_path / "cmd.csv"
    _cli("ernas.cli.profile", "latency=command_local", f"arch={tmp_path}/small.yaml",
         "input_shape=[1,3,16,16]", f"output={out}", "latency.measure.rounds=2",
         "latency.measure.per_round=2", "latency.backend.runs_per_call=4", "progress=false",
         f"hydra.run.dir={tmp_path}/c", cwd=tmp_path)
    table = LatencyTable.load(out)
    assert table.metadata["backend"] == "command" and len(table) == len(set(
        arch.op_keys((1, 3, 16, 16), "block")))
    assert (table.to_frame()["median_ms"] > 0).all()
    assert table.metadata["fingerprint"]["runtime"]["runtime"] == "command"


def test_bad_profile_request_is_one_paragraph(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.profile", "space=nope",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nafnet_tiny" in r.stderr


def test_int8_onnxruntime_table_marks_its_keys_and_serves_only_int8(tmp_path):
    """``ernas-profile latency.backend.dtype=int8`` on onnxruntime: the table says int8, its
    ``int8`` column counts each key's quantised convs (the U-Net's dense 3x3 blocks are int8,
    pooling has no conv), and a float32 request refuses it even when trusted. Bugs caught: the
    dtype dropped between the config and the backend, or an int8 table serving fp32 searches."""
    space = ernas.load_space(SEARCH_SPACES / "unet_demo.yaml")
    space.reference().save(tmp_path / "ref.yaml")
    out = tmp_path / "int8.csv"
    _cli("ernas.cli.profile", "space=unet_demo", f"arch={tmp_path}/ref.yaml",
         "latency.backend.dtype=int8", "latency.backend.threads=1", "input_shape=[1,1,32,32]",
         f"output={out}", *FAST_CLI, "progress=false", f"hydra.run.dir={tmp_path}/p", cwd=tmp_path)
    table = LatencyTable.load(out)
    assert table.metadata["dtype"] == "int8" and table.metadata["int8"]["op_types"] == ["Conv"]
    cells = {k: table.get(k)["int8"] for k in table.keys()}
    blocks = [k for k in cells if k.startswith("unet_block[att=none,conv=standard,cout=64")]
    assert blocks and all(cells[k] == "2 of 2 Conv" for k in blocks)
    assert all(cells[k] == "0 of 0 Conv" for k in cells if k.startswith("unet_pool"))
    with pytest.raises(ErnasError, match="dtype"):
        resolve_table(space, [1, 1, 32, 32], LatencySettings(
            backend={"name": "onnxruntime", "threads": 1}, table=str(out), trust_table=True,
            anchor=False))
