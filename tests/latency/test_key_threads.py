"""``latency.key_threads``: keys timed at one thread count, networks predicted at another through
the line anchored on networks timed at the backend's threads (onnxruntime, real sessions)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ernas
from ernas.errors import ErnasError
from ernas.latency.anchor import anchor_table
from ernas.latency.factory import make_backend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.resolve import resolve_from_config, table_choice
from ernas.latency.settings import LatencySettings
from ernas.latency.table import LatencyTable
from ernas.paths import LATENCY_TABLES, SEARCH_SPACES

ROOT = Path(__file__).resolve().parents[2]
SHAPE = [1, 3, 32, 32]
FAST = MeasureProtocol(rounds=2, per_round=2, warmup=1, min_seconds=0.2)
FAST_CLI = ["latency.measure.rounds=2", "latency.measure.per_round=2", "latency.measure.warmup=1",
            "latency.measure.min_seconds=0.2", "latency.recheck_rounds=2", "progress=false",
            "input_shape=[1,3,32,32]"]
ORT = {"name": "onnxruntime", "threads": 2}


def _profile(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.profile", *FAST_CLI, *args],
                       capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def t1_table(tmp_path_factory):
    """A table profiled by the CLI asked for 2-thread networks with keys at 1 thread."""
    d = tmp_path_factory.mktemp("key_threads")
    _profile("latency.backend.threads=2", "latency.key_threads=1", f"output={d / 't1.csv'}",
             f"hydra.run.dir={d}/p", cwd=d)
    return d / "t1.csv"


def _settings(table, **kw):
    return LatencySettings(backend=ORT, table=str(table), trust_table=True, measure=FAST,
                           anchor_samples=2, **kw)


def test_profile_times_the_keys_at_key_threads(t1_table):
    """Fails if ernas-profile ignores latency.key_threads (its table would say 2 threads)."""
    assert LatencyTable.load(t1_table).metadata["threads"] == 1


def test_one_thread_keys_are_anchored_on_two_thread_networks(t1_table):
    """The 1-thread table serves a 2-thread request only with key_threads=1, and its line is
    drawn from networks timed at 2 threads. Fails if key_threads is ignored (the table is refused
    for its threads), if the anchors run at the keys' threads, or if the choice does not say so."""
    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    with pytest.raises(ErnasError, match="threads: table has 1"):
        resolve_from_config(tiny, SHAPE, _settings(t1_table), progress=False)
    table, path = resolve_from_config(tiny, SHAPE, _settings(t1_table, key_threads=1),
                                      progress=False)
    rec = table.probe["anchor"]
    assert table.metadata["threads"] == 1 and rec["threads"] == 2 and rec["key_threads"] == 1
    assert table.metadata["correction"]["scale"] == rec["scale"] > 0
    assert "keys timed at 1 thread(s), networks at 2" in table_choice(table, path, given=True)


def test_no_line_no_prediction_at_other_threads(t1_table):
    """One architecture cannot be anchored on itself, so its 1-thread sum would price a 2-thread
    run: refused with the fix. Fails if the plain 1-thread sum is used silently."""
    arch = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").reference()
    with pytest.raises(ErnasError, match="latency.key_threads=null"):
        resolve_from_config(arch.as_space(), SHAPE, _settings(t1_table, key_threads=1),
                            progress=False)


def test_a_line_anchored_at_other_threads_is_drawn_again(t1_table):
    """A run copy anchored at 2 threads, asked for at 1 thread, is anchored again at 1 (a kept
    line would price 1-thread runs at 2). Fails if any carried line is kept."""
    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    table = LatencyTable.load(t1_table)
    first = anchor_table(table, tiny, make_backend(ORT), SHAPE, "block", FAST, samples=1)
    same = anchor_table(table, tiny, make_backend(ORT), SHAPE, "block", FAST, samples=1)
    assert "kept" in same["skipped"]
    again = anchor_table(table, tiny, make_backend({**ORT, "threads": 1}), SHAPE, "block", FAST,
                         samples=1)
    assert "skipped" not in again and again["threads"] == 1 and first["threads"] == 2
    assert table.metadata["correction"]["anchored"]["threads"] == 1


def test_a_line_fitted_at_other_threads_never_prices(t1_table):
    """A line anchored at 2 threads is dropped for a 1-thread request even when no new line can
    be drawn (one network), so the 1-thread sums price it as they are; a record written before
    lines carried their thread count counts as the table's own. Fails if a line fitted at
    another thread count survives, or if old records are re-anchored or dropped."""
    from ernas.latency.predict import predict_ms

    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    one = tiny.reference().as_space()
    table = LatencyTable.load(t1_table)
    anchor_table(table, tiny, make_backend(ORT), SHAPE, "block", FAST, samples=1)
    old = {**table.metadata["correction"]}
    plain = float(table.lookup(tiny.reference().op_keys(SHAPE, "block")).sum())
    rec = anchor_table(table, one, make_backend({**ORT, "threads": 1}), SHAPE, "block", FAST)
    assert "not anchored" in rec["skipped"] and "correction" not in table.metadata
    assert predict_ms(table, tiny.reference(), SHAPE, "block") == pytest.approx(plain)
    table.metadata["correction"] = {**old, "anchored": {
        k: v for k, v in old["anchored"].items() if k != "threads"}}
    kept = anchor_table(table, one, make_backend({**ORT, "threads": 1}), SHAPE, "block", FAST)
    assert "kept" in kept["skipped"] and table.metadata["correction"]["scale"] == old["scale"]


def test_bench_jobs_keep_the_line_of_keys_timed_elsewhere():
    """``ernas-bench`` pins its table without re-anchoring; with key_threads the jobs keep
    anchoring on, which keeps the pinned line (and passes the settings' check). Fails if every
    job is pinned with anchor off (refused: key_threads needs the anchor)."""
    from omegaconf import OmegaConf

    from ernas.bench.plan import job_nodes

    lat = {"backend": ORT, "anchor": True}
    for key_threads, anchored in ((1, True), (None, False), (2, False)):
        cfg = OmegaConf.create({"task": {}, "latency": {**lat, "key_threads": key_threads}})
        node = job_nodes(cfg, "t.csv")["latency"]
        assert node["anchor"] is anchored and node["trust_table"] and node["table"] == "t.csv"
        LatencySettings.from_config(node)


def test_evaluate_from_a_search_copy_takes_its_key_threads(t1_table, tmp_path):
    """``ernas-evaluate checkpoint=<search run>`` predicts from the run's copy; a copy of keys
    timed at 1 thread with a line anchored at 2 serves a 2-thread request with key_threads=1,
    and a 1-thread request without. Fails if the copy's key_threads is not carried over."""
    from ernas.cli.evaluate import search_table
    from ernas.cli.search import RUN_TABLE

    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    table = LatencyTable.load(t1_table)
    anchor_table(table, tiny, make_backend(ORT), SHAPE, "block", FAST, samples=1)
    table.save(tmp_path / RUN_TABLE)
    two = search_table({"backend": ORT, "table": "auto"}, tmp_path)
    assert two["key_threads"] == 1 and two["table"] == str(tmp_path / RUN_TABLE)
    one = search_table({"backend": {**ORT, "threads": 1}, "table": "auto"}, tmp_path)
    assert "key_threads" not in one and one["trust_table"]


@pytest.mark.parametrize("changes, phrase", [
    ({"key_threads": 0}, "latency.key_threads=0 must be an integer >= 1"),
    ({"key_threads": True}, "latency.key_threads=True must be an integer"),
    ({"key_threads": 1, "anchor": False}, "needs latency.anchor=true"),
    ({"key_threads": 1, "backend": {"name": "command", "preset": "local_onnx"}},
     "needs a CPU backend with a threads setting"),
    ({"key_threads": 1, "backend": {"name": "torch", "device": "cuda", "threads": 2}},
     "needs a CPU backend"),
])
def test_key_threads_refusals(changes, phrase):
    """Each bad combination is one paragraph naming the field."""
    with pytest.raises(ErnasError, match=phrase):
        LatencySettings(**{"backend": ORT, **changes})


def test_write_corrected_is_refused_with_key_threads(tmp_path):
    """A corrected copy would label 1-thread keys with a 2-thread line: refused, exit 2, before
    anything is timed or written."""
    r = subprocess.run([sys.executable, "-m", "ernas.cli.profile", *FAST_CLI, "mode=validate",
                        "latency.backend.threads=2", "latency.key_threads=1",
                        "validate.write_corrected=true", f"hydra.run.dir={tmp_path}/v"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "validate.write_corrected" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "v" / "validation.csv").exists()


def test_key_threads_equal_to_threads_changes_nothing():
    s = LatencySettings(backend=ORT, key_threads=2, anchor=False)
    assert not s.keys_elsewhere and s.key_settings() is s


@pytest.mark.slow
def test_validate_cli_measures_networks_at_the_backends_threads(t1_table, tmp_path):
    """``mode=validate`` with key_threads prices with the 1-thread table and times the networks
    at 2 threads. Fails if either side takes the other's thread count."""
    r = _profile("mode=validate", "validate.n=3", "latency.anchor_samples=2",
                 "latency.backend.threads=2", "latency.key_threads=1", f"output={t1_table}",
                 f"hydra.run.dir={tmp_path}/v", cwd=tmp_path)
    s = json.loads((tmp_path / "v/summary.json").read_text())
    assert s["session_options"]["threads"] == 2 and s["table"] == str(t1_table)
    assert "keys timed at 1 thread(s), networks measured at 2" in r.stdout
    assert s["anchored"]["n"] == 4


def _key_threads_bench(space, shape, validation, measured, *tables):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import key_threads
    finally:
        sys.path.pop(0)
    return key_threads.main(["--space", space, "--input", shape.replace("x", ","),
                             "--validation", str(validation), "--measured-table", str(measured),
                             "--table", *map(str, tables)])


@pytest.mark.parametrize("space, shape", [("unet_demo", "1x1x96x80"),
                                          ("nafnet_tiny", "1x3x256x256")])
def test_rescoring_reproduces_the_shipped_figures(space, shape):
    """benchmarks/key_threads.py redraws each shipped 2-thread validation's networks, reproduces
    its own anchored figures (docs/results/latency_fidelity_executorch_amd.csv) and the shipped
    re-scoring (latency_key_threads_executorch_amd.csv), and refuses a table that did not price
    it. Fails if the draws, the anchors or the twins drift, or the shipped figures are stale."""
    import pandas as pd

    stem = f"{space}_executorch_xnnpack_AMD-EPYC_{shape}_block_t{{}}.csv"
    val = ROOT / f"docs/results/latency_validation_executorch_{space}_t2.csv"
    out = _key_threads_bench(space, shape, val, LATENCY_TABLES / stem.format(2),
                             LATENCY_TABLES / stem.format(1))
    fid = pd.read_csv(ROOT / "docs/results/latency_fidelity_executorch_amd.csv")
    own = fid[(fid["space"] == space) & (fid["threads"] == 2)].iloc[0]
    assert out.loc[0, "within_10"] == pytest.approx(own["anchored_within_10"])
    assert out.loc[0, "mape"] == pytest.approx(own["anchored_mape"])
    shipped = pd.read_csv(ROOT / "docs/results/latency_key_threads_executorch_amd.csv")
    shipped = shipped[shipped["space"] == space].reset_index(drop=True)
    pd.testing.assert_frame_equal(out, shipped, check_dtype=False)
    with pytest.raises(SystemExit, match="do not reproduce"):
        _key_threads_bench(space, shape, val, LATENCY_TABLES / stem.format(1),
                           LATENCY_TABLES / stem.format(2))
