"""Latency fidelity (issue 9): a table is used only on the machine it describes.

Fingerprints and probes refuse foreign or wrong tables (with the field or the ratio named),
single-decision pairs are monotone, E[LAT] equals a Monte Carlo estimate, validation never
mutates its input, and (slow) a table profiled here predicts whole networks measured here.

No assertion depends on this machine's speed: the resolve logic runs on ``CostBackend``, whose
"latency" is a deterministic count of parameters (additive, so a network costs exactly the sum
of its keys); the real-backend probe test asserts an order-of-magnitude fact (a table scaled
3x is refused at a ±25% tolerance even if the machine's speed drifts 1.7x between profiling and
probing, as it does on this VM under load).
"""
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import ernas
from ernas.errors import ErnasError
from ernas.latency.anchor import ANCHOR_SAMPLES
from ernas.latency.backends import OnnxRuntimeBackend
from ernas.latency.consistency import (check_consistency, inconsistent_pairs,
                                       single_decision_pairs)
from ernas.latency.fingerprint import digest, fingerprint, fingerprint_differences, host_hardware
from ernas.latency.measure import MeasureProtocol
from ernas.latency.predict import ExpectedLatency, predict_ms
from ernas.latency.resolve import resolve_table
from ernas.latency.settings import LatencySettings
from ernas.latency.table import LatencyTable
from ernas.latency.validation import validate_table
from ernas.paths import LATENCY_TABLES
from ernas.space import find_space
from cost_device import QUICK, SHAPE, CostBackend, cost_settings


def _resolve(tiny, shipped_dir=None, **kw):
    where = {"shipped_dir": shipped_dir} if shipped_dir is not None else {}
    return resolve_table(tiny, SHAPE, cost_settings(**kw), False, **where)


def _edit_metadata(src, dest, fn):
    t = LatencyTable.load(src)
    fn(t.metadata)
    t.save(dest)
    return dest


# --------------------------------------------------------------------------- fingerprints
def test_fingerprint_fields_and_digest():
    hw = host_hardware()
    for field in ("cpu_vendor", "cpu_model", "cpu_family", "cpu_model_number", "cpu_stepping",
                  "logical_cores", "physical_cores", "l2_cache_kib", "l3_cache_kib", "isa"):
        assert field in hw
    b = OnnxRuntimeBackend(threads=1)
    fp = b.fingerprint()
    assert fp == b.fingerprint() and fp["digest"] == digest(fp)
    assert "hostname" not in json.dumps(fp) and "date" not in fp["runtime"]
    other = fingerprint({**fp["hardware"], "isa": ["avx2"]}, fp["runtime"])
    assert other["digest"] != fp["digest"]
    assert fingerprint_differences(other, fp) == [
        f'hardware.isa: table has ["avx2"], this machine has {json.dumps(fp["hardware"]["isa"])}']
    assert fingerprint_differences(fp, fp) == []
    assert "unknown host" in fingerprint_differences(None, fp)[0]


def test_explicit_table_from_another_fingerprint_is_refused(tiny, cost_table, tmp_path):
    def other_host(meta):
        meta["fingerprint"]["hardware"]["l3_cache_kib"] = 1234
        meta["fingerprint"]["runtime"]["version"] = "0.9"

    path = _edit_metadata(cost_table, tmp_path / "other.csv", other_host)
    with pytest.raises(ErnasError) as e:
        _resolve(tiny, table=path)
    msg = str(e.value)
    assert str(path) in msg and "hardware.l3_cache_kib: table has 1234" in msg
    assert "runtime.version" in msg and "trust_table" in msg
    with pytest.warns(UserWarning, match="l3_cache_kib"):
        t, p = _resolve(tiny, table=path, trust_table=True)
    assert p == path and t.probe["action"] == "trusted"
    # a table of another CPU (its device name too) is still usable knowingly: validating a
    # shipped table of another machine here is what trust_table is for
    def other_cpu(meta):
        other_host(meta)
        meta["device"] = meta["fingerprint"]["hardware"]["cpu_model"] = "Other CPU"

    path = _edit_metadata(cost_table, tmp_path / "other_cpu.csv", other_cpu)
    with pytest.raises(ErnasError, match="device") as e:
        _resolve(tiny, table=path)
    assert "latency.trust_table=true" in str(e.value)  # the fix names the way to use it
    with pytest.warns(UserWarning, match="Other CPU"):
        t, _ = _resolve(tiny, table=path, trust_table=True)
    assert any("Other CPU" in d for d in t.probe["fingerprint_differences"])


def test_auto_refuses_unknown_and_foreign_hosts(tiny, cost_table, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ernas")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    _edit_metadata(cost_table, shipped / "a_unknown.csv", lambda m: m.pop("fingerprint"))
    _edit_metadata(cost_table, shipped / "b_foreign.csv",
                   lambda m: m["fingerprint"]["hardware"].update(cpu_stepping="99"))
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    t, path = _resolve(tiny, cache_dir=tmp_path / "cache", shipped_dir=shipped)
    assert path.parent == tmp_path / "cache" and t.probe["action"] == "profiled"
    reasons = [r["reason"] for r in t.probe["refused"]]
    assert len(reasons) == 2 and "unknown host" in reasons[0]
    assert "hardware.cpu_stepping" in reasons[1]
    said = caplog.text  # the refusals are logged (ernas.latency.resolve)
    assert "a_unknown.csv not used" in said and "cpu_stepping" in said
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before


# --------------------------------------------------------------------------- probe
def test_probe_accepts_a_correct_table_and_caches(tiny, cost_table, tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(cost_table.parent, shipped, ignore=shutil.ignore_patterns("probes.json"))
    cache = tmp_path / "cache"
    t, path = _resolve(tiny, cache_dir=cache, shipped_dir=shipped)
    rec = t.probe
    assert path == shipped / cost_table.name and rec["action"] == "used" and rec["accepted"]
    assert rec["ratio"] == pytest.approx(1.0) and rec["cached"] is False
    assert rec["arch"] == "nafnet_tiny_reference" and rec["tolerance"] == 0.25
    t, _ = _resolve(tiny, cache_dir=cache, shipped_dir=shipped)
    assert t.probe["cached"] is True and t.probe["ratio"] == rec["ratio"]
    t, _ = _resolve(tiny, cache_dir=cache, shipped_dir=shipped, probe_cache_s=0)
    assert t.probe["cached"] is False


def test_probe_mismatch_rescale_and_error(tiny, cost_table, tmp_path):
    scaled = LatencyTable.load(cost_table).scaled(3.0)
    scaled.metadata.pop("rescaled")
    shipped = tmp_path / "shipped"
    scaled.save(shipped / "scaled.csv")
    kw = dict(cache_dir=tmp_path / "cache", shipped_dir=shipped)
    with pytest.raises(ErnasError, match="ratio 0.33"):
        _resolve(tiny, on_mismatch="error", **kw)
    with pytest.warns(UserWarning, match="scaled by 0.333"):
        t, path = _resolve(tiny, on_mismatch="rescale", **kw)
    assert path == shipped / "scaled.csv" and t.probe["action"] == "rescaled"
    original = LatencyTable.load(cost_table)
    keys = tiny.op_keys(SHAPE, "block")
    np.testing.assert_allclose(t.lookup(keys), original.lookup(keys), rtol=1e-9, atol=1e-12)
    with pytest.raises(ErnasError, match="does not hold on this machine") as e:
        _resolve(tiny, table=shipped / "scaled.csv", cache_dir=tmp_path / "cache")
    assert "ratio 0.33" in str(e.value) and "on_mismatch=rescale" in str(e.value)
    t, path = _resolve(tiny, **kw)  # default: profile a table for this machine
    assert t.probe["action"] == "profiled" and path.parent == tmp_path / "cache"
    assert "ratio 0.33" in t.probe["refused"][0]["reason"]


def test_probe_refuses_a_scaled_table_on_the_real_backend(tmp_path):
    """Real onnxruntime timing: a correct table (with the baseline probe recorded when it was
    profiled) is copied with every row scaled 3x; the probe refuses the copy."""
    (tmp_path / "s.yaml").write_text(
        "family: nafnet\nname: tiny_k\ngeometry: {img_channel: 3, width: 8, enc_blk_nums: [1, 1],"
        " middle_blk_num: 1, dec_blk_nums: [1, 1]}\nblocks:\n  all: {kernel: [3, 5]}\n")
    space = ernas.load_space(tmp_path / "s.yaml")
    proto = MeasureProtocol(rounds=3, per_round=2, warmup=1, min_seconds=0.3)
    backend = OnnxRuntimeBackend(threads=1)
    lat = LatencySettings(backend=backend, cache_dir=tmp_path / "cache", measure=proto,
                          recheck_rounds=2)
    good, path = resolve_table(space, SHAPE, lat, False, shipped_dir=tmp_path / "none")
    bad = good.scaled(3.0)
    bad.save(tmp_path / "scaled.csv")
    with pytest.raises(ErnasError, match="does not hold on this machine"):
        resolve_table(space, SHAPE, lat.replace(table=tmp_path / "scaled.csv",
                                                probe_cache_s=0), False)


# --------------------------------------------------------------------------- consistency
def test_single_decision_pair_counts():
    """Adjacent values in the family's order, identical or empty key lists skipped, equal
    pairs at several positions counted once (the counts issue 9 reported)."""
    shape = (1, 3, 256, 256)
    assert len(single_decision_pairs(find_space("nafnet_tiny"), shape)) == 256
    assert len(single_decision_pairs(find_space("nafnet_ern"), shape)) == 512


def test_consistency_check_rechecks_and_reports(tiny, cost_table):
    table = LatencyTable.load(cost_table)
    pairs = single_decision_pairs(tiny, SHAPE, "block")
    assert inconsistent_pairs(table, pairs) == []  # parameter counts are monotone
    k3 = next(k for k in table.keys() if "kernel=3" in k and "attention=sca" in k)
    k5 = k3.replace("kernel=3", "kernel=5")
    row = table.get(k5)
    table.add_summary(k3, {"ms": 2 * row["ms"], "median": 2 * row["median_ms"], "p10": 1.0,
                           "p90": 1.0, "mean": 1.0, "n": 1})
    rec = check_consistency(tiny, table, None, tolerance=0.05, progress=False)
    assert rec["before"] == rec["after"] >= 1 and rec["rechecked_keys"] == 0
    bad = rec["inconsistent"][0]
    assert bad["decision"] == "kernel" and (bad["cheaper"], bad["costlier"]) == (3, 5)
    assert bad["ratio"] == pytest.approx(2.0) and table.metadata["consistency"] == rec
    rec = check_consistency(tiny, table, CostBackend(), protocol=QUICK, progress=False,
                            recheck_rounds=2)
    assert rec["before"] >= 1 and rec["after"] == 0 and rec["rechecked_keys"] >= 2
    assert table.get(k3)["ms"] < table.get(k5)["ms"]


SHIPPED = sorted(LATENCY_TABLES.glob("*.csv"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_tables_carry_a_true_consistency_report(path):
    """Every shipped table was made with the protocol (fingerprint, probe baseline) and its
    header's consistency report is what a recount of its single-decision pairs finds: pairs
    listing the cheaper choice >5% slower that survived the re-check are reported, not hidden
    (some are real: a 4-channel separable conv can run slower than an 8-channel one)."""
    table = LatencyTable.load(path)
    meta = table.metadata
    assert meta.get("fingerprint") and meta.get("probe_baseline"), path.name
    pairs = single_decision_pairs(find_space(meta["space"]), meta["input_shape"],
                                  meta.get("granularity", "block"))
    bad = inconsistent_pairs(table, pairs, meta["consistency"]["tolerance"])
    assert meta["consistency"]["pairs"] == len(pairs)
    assert meta["consistency"]["after"] == len(bad) == len(meta["consistency"]["inconsistent"])
    assert len(bad) <= 0.1 * len(pairs), f"{len(bad)}/{len(pairs)} inconsistent pairs"


# --------------------------------------------------------------------------- E[LAT]
def test_expected_latency_matches_monte_carlo(tiny, cost_table):
    """E[LAT] at non-uniform probabilities equals the mean of predict_ms over architectures
    sampled from those probabilities (within 4 standard errors)."""
    table = LatencyTable.load(cost_table)
    rng = np.random.default_rng(0)
    probs = {p: {d: torch.tensor(rng.dirichlet(np.full(len(c), 0.7)))
                 for d, c in tiny.choices[p].items()} for p in tiny.searchable}
    exact = float(ExpectedLatency(tiny, table, SHAPE, "block")(probs))
    samples = []
    for _ in range(3000):
        arch = tiny.smallest()
        for p, ds in probs.items():
            for d, pr in ds.items():
                cands = tiny.choices[p][d]
                arch.values[p][d] = cands[rng.choice(len(cands), p=pr.numpy())]
        samples.append(predict_ms(table, arch, SHAPE, "block"))
    mc, se = float(np.mean(samples)), float(np.std(samples) / np.sqrt(len(samples)))
    uniform = {p: {d: torch.full((len(c),), 1 / len(c), dtype=torch.float64)
                   for d, c in ds.items()} for p, ds in tiny.choices.items() if p in probs}
    assert abs(mc - exact) <= 4 * se + 1e-9
    # the probabilities matter: the uniform expectation is far from this one
    assert abs(float(ExpectedLatency(tiny, table, SHAPE, "block")(uniform)) - exact) > 4 * se


# --------------------------------------------------------------------------- validation
def test_validate_never_writes_into_the_shipped_table(tmp_path):
    """ernas-profile mode=validate on a shipped table (tiny n) leaves the file byte-identical;
    the fitted correction goes to a new file in the run directory, and only when asked."""
    path = next(p for p in SHIPPED if p.name.startswith("nafnet_tiny_onnxruntime"))
    meta = LatencyTable.load(path).metadata
    before = path.read_bytes()
    shape = ",".join(map(str, meta["input_shape"]))
    args = [sys.executable, "-m", "ernas.cli.profile", f"space={meta['space']}", "mode=validate",
            f"output={path}", f"input_shape=[{shape}]",
            f"latency.backend.threads={meta['threads']}",
            "validate.n=0", "latency.measure.rounds=2", "latency.measure.per_round=1",
            "latency.measure.warmup=0", "latency.measure.min_seconds=0", "progress=false"]
    run = tmp_path / "run"
    r = subprocess.run(args + ["validate.write_corrected=true", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert path.read_bytes() == before
    assert sorted(p.name for p in LATENCY_TABLES.iterdir()) == sorted(p.name for p in SHIPPED)
    s = json.loads((run / "summary.json").read_text())
    assert s["n"] == 3 and "noise_floor" in s and s["table"] == str(path)
    # the largest is the only network left to score an anchored line on: none, and why
    assert s["anchored"] is None and "3 needed" in s["anchored_skipped"]
    assert "anchored: not scored: only 1 networks" in r.stdout
    corrected = run / f"{path.stem}_corrected.csv"
    assert s["corrected_table"] == str(corrected)
    c = LatencyTable.load(corrected)
    assert c.metadata["correction"]["source_table"] == str(path)
    assert c.keys() == LatencyTable.load(path).keys()


def test_validate_refuses_to_write_under_shipped_tables(tiny, cost_table):
    table = LatencyTable.load(cost_table)
    with pytest.raises(ErnasError, match="never writes there"):
        validate_table(tiny, table, CostBackend(), LATENCY_TABLES / "x", n=0, protocol=QUICK)


def test_validate_in_process_leaves_the_table_object_alone(tiny, cost_table, tmp_path):
    table = LatencyTable.load(cost_table)
    meta, frame = json.dumps(table.metadata, sort_keys=True), table.to_frame()
    s = validate_table(tiny, table, CostBackend(), tmp_path, n=4, protocol=QUICK,
                       write_corrected=True, progress=False)
    assert json.dumps(table.metadata, sort_keys=True) == meta and table.to_frame().equals(frame)
    assert s["mape"] == pytest.approx(0.0, abs=1e-9)  # the cost model is exactly additive
    assert s["within_10pct"] == 1.0 and s["noise_floor"] == 0.0
    assert (tmp_path / f"{cost_table.stem}_corrected.csv").exists()
    for name in ("validation.csv", "validation.png", "summary.json"):
        assert (tmp_path / name).exists()


class DriftingCostBackend(CostBackend):
    """CostBackend on a machine whose speed changes every round of ``n`` calls (one call per
    network per round): round r runs ``factors[r]`` times slower, as a VM's slow phases do."""

    def __init__(self, n: int, factors):
        super().__init__()
        self.n, self.factors, self.calls = n, list(factors), 0

    def runner(self, module, example_input):
        ms = super().runner(module, example_input)()

        def run():
            f = self.factors[(self.calls // self.n) % len(self.factors)]
            self.calls += 1
            return ms * f
        return run


def test_validation_speedups_are_paired_so_drift_cancels(tiny, cost_table, tmp_path):
    """Rounds at 1x, 3x, 1.5x and 2x the table's machine speed: absolute predictions are off
    (the p20 of the samples is ~1.3x), the speed-ups over the reference are exact. Fails when
    speed-ups are judged on absolute figures, inverted, taken against another network than the
    reference, or when the reference's trivial 1.0 is counted."""
    n = 4
    backend = DriftingCostBackend(n + 3 + ANCHOR_SAMPLES, [1, 3, 1.5, 2])
    proto = MeasureProtocol(rounds=4, per_round=1, warmup=0, min_seconds=0)
    s = validate_table(tiny, LatencyTable.load(cost_table), backend, tmp_path, n=n,
                       protocol=proto, progress=False)
    assert backend.calls == 4 * (n + 3 + ANCHOR_SAMPLES)
    assert s["mape"] > 0.2
    assert s["speedup"]["n"] == n + 2 and s["speedup"]["mape"] == pytest.approx(0, abs=1e-9)
    df = pd.read_csv(tmp_path / "validation.csv")
    sm = df.set_index("arch")
    assert sm.loc["reference", "measured_speedup"] == pytest.approx(1.0)
    assert sm.loc["smallest", "measured_speedup"] > 1.3  # a real spread, not all ones
    assert np.allclose(df["measured_speedup"], df["predicted_speedup"])
    # the drift is all shared by a round: each pass's speed-up is the same, its absolute isn't
    assert s["noise_floor"] > 0.3 and s["speedup"]["noise_floor"] == pytest.approx(0, abs=1e-9)
    # anchoring at networks of the same pass absorbs the drift (a pure scale here)
    an = s["anchored"]
    assert an["mape"] == pytest.approx(0, abs=1e-9)
    assert an["offset_ms"] == pytest.approx(0, abs=1e-9)
    assert an["scale"] == pytest.approx(sm.loc["reference", "measured_ms"]
                                        / sm.loc["reference", "sum_ms"])


@pytest.mark.slow
def test_profile_and_validate_tiny_end_to_end(tiny, tmp_path):
    """Profile the tiny space at 1x3x64x64 on onnxruntime (1 thread) and validate it on the same
    machine. Bounds, for a busy 2-core VM: other tenants cause multi-second phases up to ~1.7x
    slower. Interleaving spreads them over all networks of one validation alike, so ranks
    (Spearman >= 0.8) and the leave-one-out corrected MAPE (<= 25%, the correction absorbs a
    common scale) are held tightly; the plain sums can be off by the speed ratio between the
    profiling and the validation phases, so they are held to within 2x (MAPE <= 100%). On a
    quiet machine expect plain MAPE < 10% at 256x256 (issue 9 measured 3.6%)."""
    shape = (1, 3, 64, 64)
    backend = OnnxRuntimeBackend(threads=1)
    proto = MeasureProtocol(rounds=6, per_round=3, warmup=2, min_seconds=1.0)
    lat = LatencySettings(backend=backend, cache_dir=tmp_path / "cache", measure=proto,
                          recheck_rounds=8)
    table, _ = resolve_table(tiny, shape, lat, False, shipped_dir=tmp_path / "none")
    assert table.metadata["consistency"]["pairs"] == 256
    s = validate_table(tiny, table, backend, tmp_path / "v", n=12, protocol=proto,
                       progress=False)
    assert s["spearman"] >= 0.8, s
    assert s["corrected_loo"]["mape"] <= 0.25, s
    assert s["plain_sum"]["mape"] <= 1.0, s
