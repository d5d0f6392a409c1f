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
    with pytest.raises(ErnasError, match="threads"):
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


@pytest.mark.parametrize("changes, phrase", [
    ({"key_threads": 0}, "latency.key_threads=0 must be an integer >= 1"),
    ({"key_threads": True}, "latency.key_threads=True must be an integer"),
    ({"key_threads": 1, "anchor": False}, "needs latency.anchor=true"),
    ({"key_threads": 1, "backend": {"name": "command", "preset": "local_onnx"}},
     "needs a backend with a threads setting"),
])
def test_key_threads_refusals(changes, phrase):
    """Each bad combination is one paragraph naming the field."""
    with pytest.raises(ErnasError, match=phrase):
        LatencySettings(**{"backend": ORT, **changes})


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


def _key_threads_bench(validation, measured, *tables):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import key_threads
    finally:
        sys.path.pop(0)
    return key_threads.main(["--space", "unet_demo", "--input", "1,1,96,80", "--validation",
                             str(validation), "--measured-table", str(measured),
                             "--table", *map(str, tables)])


def test_rescoring_reproduces_the_shipped_validation():
    """benchmarks/key_threads.py redraws the shipped 2-thread validation's networks, reproduces
    its own anchored figure (docs/results/latency_fidelity_executorch_amd.csv) and refuses a
    table that did not price it. Fails if the draws, the anchors or the twins drift."""
    import pandas as pd

    stem = "unet_demo_executorch_xnnpack_AMD-EPYC_1x1x96x80_block_t{}.csv"
    val = ROOT / "docs/results/latency_validation_executorch_unet_demo_t2.csv"
    out = _key_threads_bench(val, LATENCY_TABLES / stem.format(2), LATENCY_TABLES / stem.format(1))
    fid = pd.read_csv(ROOT / "docs/results/latency_fidelity_executorch_amd.csv")
    shipped = fid[(fid["space"] == "unet_demo") & (fid["threads"] == 2)].iloc[0]
    assert out.loc[0, "within_10"] == pytest.approx(shipped["anchored_within_10"])
    assert out.loc[0, "mape"] == pytest.approx(shipped["anchored_mape"])
    assert out["key_threads"].tolist() == [2, 1] and out["scored_on"].tolist() == [31, 31]
    with pytest.raises(SystemExit, match="do not reproduce"):
        _key_threads_bench(val, LATENCY_TABLES / stem.format(1), LATENCY_TABLES / stem.format(2))
