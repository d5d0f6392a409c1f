"""ernas-bench: the tiny protocol end to end (killed after its searches and resumed through the
joblib launcher), selection on validation only, tie verdicts, and refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ernas.bench import analysis, stats
from ernas.bench.config import Bootstrap
from tiny_bench import BENCH, digest as _digest

ROOT = Path(__file__).resolve().parents[1]


def test_every_arm_is_reported_and_finished_jobs_are_kept(tiny_protocol):
    out, kept = tiny_protocol
    assert _digest(kept) == kept  # the searches finished before the kill were not re-run
    arms = pd.read_csv(out / "arms.csv")
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(arms["network"]) == sorted(plan["networks"])
    assert set(arms["arm"]) == {"reference", "searched", "random", "scaled"}
    assert sorted(arms.loc[arms.arm == "searched", "search_seed"]) == [0, 1]
    assert sorted(arms.loc[arms.arm == "random", "draw"]) == [0, 1]
    assert sorted(arms.loc[arms.arm == "scaled", "network"]) == ["scaled_batchnorm", "scaled_w4"]
    assert arms["measured_ms"].gt(0).all() and arms["test"].notna().all()
    # every network's peak memory, measured in the latency stage
    assert arms["peak_mem_mib"].gt(0).all()
    assert "| peak_mem_mib |" in (out / "report.md").read_text()
    lat = json.loads((out / "latency.json").read_text())
    assert set(lat["peak_mem_mib"]) == set(plan["networks"])
    # every network's prediction from the protocol's table (searched: its search's), and its size
    assert arms.loc[arms.arm != "scaled", "predicted_ms"].gt(0).all() and arms["macs"].gt(0).all()
    sel = json.loads((out / "selection.json").read_text())
    # the reference and the selected networks carry every training seed, the others one
    multi = {"reference", sel["searched"]["0"], sel["random"]["0"]}
    assert dict(zip(arms.network, arms.train_seeds)) == {
        n: 2 if n in multi else 1 for n in plan["networks"]}
    comps = pd.read_csv(out / "comparisons.csv")
    assert len(comps) == 4 and comps["alpha_each"].eq(0.05 / 4).all()
    # beside every judged interval, the one over test images alone: the headline's, rebuilt
    # from the per-image files with each network's seeds averaged
    head = comps.iloc[3]
    summary = json.loads((out / "summary.json").read_text())
    scores = {n: analysis.test_scores(plan, n, summary["set"], summary["metric"])
              for n in (sel["headline"], "reference")}
    units = stats.paired_interval(stats.seed_mean(scores[sel["headline"]]),
                                  stats.seed_mean(scores["reference"]), 0.05 / 4, 200, seed=3)
    assert (head["units_ci_low"], head["units_ci_high"]) == pytest.approx((units.low, units.high))
    assert head["difference"] == pytest.approx(units.estimate)
    # the units behind every interval, in one file: each network's rows for each training seed,
    # whose mean over the primary set is arms.csv's test figure
    rows = pd.read_csv(out / "test_per_image.csv")
    tested = {j.removeprefix("test_") for j in plan["jobs"] if j.startswith("test_")}
    assert {f"{n}_seed{s}" for n, s in zip(rows.network, rows.train_seed)} == tested
    assert dict(zip(rows.network, rows.arm)) == dict(zip(arms.network, arms.arm))
    primary = rows[rows["set"] == summary["set"]]
    per_seed = primary.groupby(["network", "train_seed"])[summary["metric"]].mean()
    assert per_seed.groupby("network").mean().to_dict() == pytest.approx(
        dict(zip(arms.network, arms.test)))
    assert (out / "pareto.png").stat().st_size > 0
    assert "## Verdicts" in (out / "report.md").read_text()


def test_test_is_scored_after_selection_once_per_training(tiny_protocol):
    out, _ = tiny_protocol
    plan = json.loads((out / "plan.json").read_text())
    selected_at = (out / "selection.json").stat().st_mtime
    trainings = [j for j in plan["jobs"] if j.startswith("train_")]
    tests = [j for j in plan["jobs"] if j.startswith("test_")]
    assert sorted(t.removeprefix("test_") for t in tests) == \
        sorted(t.removeprefix("train_") for t in trainings)
    for t in tests:
        per_image = Path(plan["jobs"][t]["run_dir"]) / "per_image.csv"
        assert per_image.stat().st_mtime > selected_at


def _summaries(tmp_path, vals: dict[str, float]) -> dict:
    """A plan whose trainings hold the given best validation figures (real files)."""
    plan = {"targets": [{"fraction": 0.5, "ms": 1.0}], "networks": {}, "jobs": {}}
    for name, v in vals.items():
        arm = name.split("_")[0]
        rec = {"arm": arm, "target": 0} if arm in ("searched", "random") else {"arm": arm}
        plan["networks"][name] = rec
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"metric": "psnr", "best_val_psnr": v}))
        plan["jobs"][f"train_{name}_seed0"] = {"command": "retrain", "run_dir": str(d)}
    return plan


def test_selection_reads_validation_not_test(tmp_path):
    # searched_a would be best on test (it is not given to selection at all) but is worst on
    # validation; searched_b is best on validation and must be the one selected
    plan = _summaries(tmp_path, {"reference": 30.0, "searched_a": 29.0, "searched_b": 29.99,
                                 "random_x": 29.5, "random_y": 29.4, "scaled_w": 29.2})
    val = analysis.validation(plan, [0])
    sel = analysis.select(plan, val, headline_drop=0.005)
    assert sel["searched"] == {0: "searched_b"} and sel["random"] == {0: "random_x"}
    assert sel["headline"] == "searched_b"


def test_a_diverged_network_is_never_selected(tmp_path):
    plan = _summaries(tmp_path, {"reference": 30.0, "searched_a": float("nan"),
                                 "searched_b": 20.0, "random_x": 29.0})
    sel = analysis.select(plan, analysis.validation(plan, [0]), headline_drop=0.005)
    assert sel["searched"][0] == "searched_b"


def test_overlapping_intervals_are_a_tie_and_clear_gaps_are_not():
    rng = np.random.default_rng(0)
    base = rng.normal(30, 2, size=12)
    swing = np.tile([1.5, -1.5], 6)  # per-image differences of ±1.5 dB around +0.05
    other = {0: base, 1: base + 0.1}
    close = {0: base + 0.1 + swing}
    iv = stats.paired_interval(close, other, 0.05, 2000)
    assert iv.verdict == "tie" and iv.low < 0 < iv.high and iv.estimate == pytest.approx(0.05)
    better = {0: base + 1.0}
    assert stats.paired_interval(better, {0: base, 1: base + 0.01}, 0.05, 2000).verdict == "above"
    assert stats.paired_interval({0: base}, better, 0.05, 2000).verdict == "below"
    assert stats.majority(["above", "tie", "above"]) == "above"
    assert stats.majority(["above", "tie"]) == "tie"


def test_the_units_only_interval_leaves_the_training_seed_spread_out():
    """Bug caught: ``seed_mean`` keeping one seed (or resampling seeds), so the test-units-only
    interval would show the seed spread it is there to separate out, or not resample images."""
    rng = np.random.default_rng(1)
    base = rng.normal(30, 2, size=40)
    image_noise = rng.normal(0, 0.2, size=40)  # the paired difference varies image by image
    wobbly = {0: base + 1.0 + image_noise, 1: base - 0.6 + image_noise,
              2: base + 0.5 + image_noise}  # seed spread 1.6 dB, mean +0.3 + noise
    steady = {0: base, 1: base.copy(), 2: base.copy()}
    full = stats.paired_interval(wobbly, steady, 0.05, 4000)
    units = stats.paired_interval(stats.seed_mean(wobbly), stats.seed_mean(steady), 0.05, 4000)
    assert full.verdict == "tie" and full.high - full.low > 1.5
    assert units.estimate == pytest.approx(full.estimate)
    assert units.estimate == pytest.approx(0.3 + image_noise.mean())
    # over the images alone: about ±1.96·sd/√n of the per-image differences
    half = 1.96 * image_noise.std() / np.sqrt(40)
    assert (units.high - units.low) / 2 == pytest.approx(half, rel=0.2)


def test_a_mixture_counts_every_seed_of_its_networks_once():
    """Bug caught: a network trained with seeds 0 and 1 entering a three-seed mixture's seed 2
    with its seed 0, so seed 0 weighed twice in the front's scores."""
    a = {0: np.array([1.0, 2.0]), 1: np.array([3.0, 4.0]), 2: np.array([5.0, 6.0])}
    b = {0: np.array([0.0, 0.0]), 1: np.array([10.0, 10.0])}
    mix = stats.mixture([(0.5, a), (0.5, b)])
    assert sorted(mix) == [0, 1, 2]
    np.testing.assert_allclose(mix[2], 0.5 * a[2] + 0.5 * np.array([5.0, 5.0]))
    np.testing.assert_allclose(stats.seed_mean(mix)[0],
                               0.5 * stats.seed_mean(a)[0] + 0.5 * stats.seed_mean(b)[0])
    once = {0: np.array([7.0, 8.0])}  # a network trained once enters every seed with that run
    np.testing.assert_allclose(stats.mixture([(1.0, once), (0.0, a)])[2], once[0])


def test_a_network_without_finite_scores_is_not_scored_never_a_tie():
    """Bug caught: an overflowing network (NaN test scores) on the scaled front gave an interval
    of NaNs, which the verdict called a tie."""
    base = np.random.default_rng(0).normal(30, 2, size=12)
    overflow = {0: np.full(12, np.nan)}
    iv = stats.paired_interval({0: base}, overflow, 0.05, 200)
    assert iv.verdict == "not scored"
    assert stats.majority(["not scored", "not scored"]) == "not scored"
    assert stats.majority(["not scored", "tie", "tie"]) == "tie"


def test_the_scaled_front_interpolates_image_by_image():
    pts = stats.front([("slow", 10.0, 31.0), ("fast", 4.0, 29.0), ("dominated", 8.0, 28.0)])
    assert pts == [("fast", 4.0), ("slow", 10.0)]
    scores = {"fast": {0: np.array([29.0, 27.0])}, "slow": {0: np.array([31.0, 33.0])}}
    mid, how = stats.front_at(7.0, pts, scores)
    assert np.allclose(mid[0], [30.0, 30.0]) and "0.50·fast" in how
    assert stats.front_at(2.0, pts, scores)[0] is scores["fast"]


def test_non_inferiority_uses_the_stated_bound(tmp_path):
    plan = {"targets": [], "networks": {}}
    sel = {"searched": {}, "random": {}, "headline": "h"}
    ref = {0: np.full(20, 30.0), 1: np.full(20, 30.02)}
    boot = Bootstrap(samples=500, alpha=0.05, noninferiority=0.005, margin="relative",
                     speedup=2.0)
    ok = analysis.comparisons(plan, sel, {"h": {0: np.full(20, 29.95)}, "reference": ref},
                              {}, [], boot)
    assert ok[0]["verdict"] == "non-inferior" and ok[0]["threshold"] == pytest.approx(-0.15005)
    bad = analysis.comparisons(plan, sel, {"h": {0: np.full(20, 29.5)}, "reference": ref},
                               {}, [], boot)
    assert bad[0]["verdict"] == "not shown"
    # an absolute margin is in the metric's units (one mIoU point = 0.01), not scaled
    boot.margin, boot.noninferiority = "absolute", 0.01
    miou = {0: np.full(20, 0.66), 1: np.full(20, 0.66)}
    rows = analysis.comparisons(plan, sel, {"h": {0: np.full(20, 0.655)}, "reference": miou},
                                {}, [], boot)
    assert rows[0]["threshold"] == pytest.approx(-0.01) and rows[0]["verdict"] == "non-inferior"
    rows = analysis.comparisons(plan, sel, {"h": {0: np.full(20, 0.645)}, "reference": miou},
                                {}, [], boot)
    assert rows[0]["verdict"] == "not shown"


@pytest.mark.parametrize("override, fragment", [
    ("targets=[1.5]", "targets=[1.5]"),
    ("train.others_seeds=[5]", "train.others_seeds"),
    ("launcher=threads", "launcher='threads'"),
    ("until=report", "until='report'"),
    ("bootstrap.margin=percent", "bootstrap.margin='percent'"),
    ("targets=[0.01] random.max_tries=500", "random.draws=2"),
    ("scaled=[{name:w3,geometry:{width:3}}]", "'width' must be even"),
])
def test_a_bad_protocol_is_refused_before_anything_is_written(tmp_path, bench_env, override,
                                                              fragment):
    out = tmp_path / "run"
    r = subprocess.run([*BENCH, *override.split(), f"hydra.run.dir={out}"], cwd=tmp_path,
                       capture_output=True, text=True, env=bench_env)
    # latency notes may come first (the table is resolved before the draws), then the paragraph
    assert r.returncode == 2 and "\nerror: " in "\n" + r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and fragment in " ".join(r.stderr.split())
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if "random.max_tries" not in override:  # refused before the run directory is claimed
        assert written == [], written
    else:  # refused from the draws, after the table was resolved: only the claim and its log
        assert [n for n in written if n not in (".ernas.lock", ".hydra", "bench.log")] == []


def test_resume_refuses_a_changed_protocol(tiny_protocol, tmp_path):
    out, _ = tiny_protocol
    before = _digest(p for p in out.rglob("*") if p.is_file() and p.suffix != ".log")
    r = subprocess.run([*BENCH, f"resume={out}", "targets=[0.5]",
                        f"hydra.run.dir={tmp_path / 'log'}"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "targets" in r.stderr, r.stderr[-2000:]
    assert _digest(before) == before


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments" / "experiment")
                                         .glob("protocol_*.yaml")))
def test_shipped_protocols_compose_validate_and_build_their_networks(name):
    from omegaconf import OmegaConf

    from ernas.api import compose
    from ernas.bench.config import Protocol
    from ernas.bench.plan import reference_arch, scaled_arch
    from ernas.cli.common import task_of
    from ernas.config import validated
    from ernas.space import find_space

    cfg = compose("bench", [f"experiment={name}"])
    p = validated(cfg, Protocol, name)
    assert p.protocol == name and len(p.search.seeds) >= 2
    space = find_space(cfg.space)
    task = task_of(cfg)
    change = OmegaConf.to_container(cfg.reference, resolve=True)
    task.check_arch(reference_arch(space, change))
    for spec in OmegaConf.to_container(cfg.scaled, resolve=True):
        arch = scaled_arch(space, spec, change)
        task.check_arch(arch)
        assert arch.to_dict() != reference_arch(space, change).to_dict()
    if not name.endswith("tiny"):  # the minimum sizes
        assert len(p.search.seeds) >= 3 and p.random.draws >= 5 and len(p.train.seeds) >= 3


def test_a_second_search_job_in_one_launcher_worker_composes(tmp_path):
    """The joblib launcher restores Hydra's singletons (the ConfigStore) from the parent before
    every job, so a schema registered by the first job's imports is gone for the second."""
    script = (
        "from hydra.core.singleton import Singleton\n"
        "state = Singleton.get_state()\n"
        "from ernas.api import compose\n"
        "compose('search', ['space=nafnet_tiny'])\n"
        "Singleton.set_state(state)\n"
        "print(compose('search', ['space=nafnet_tiny']).search.steps)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr[-2000:]


def test_a_protocol_reference_can_be_a_smaller_network_of_the_space():
    """The HRNet protocol's reference (the space's network without stage 4) is the shipped
    Mini-HRNet-like network, and its scaled variants start from it."""
    from omegaconf import OmegaConf

    import ernas
    from ernas.api import compose
    from ernas.bench.plan import reference_arch, scaled_arch
    from ernas.complexity import count_params
    from ernas.space import find_space

    cfg = compose("bench", ["experiment=protocol_segment_hrnet"])
    space, change = find_space(cfg.space), OmegaConf.to_container(cfg.reference)
    ref = ernas.build_model(reference_arch(space, change))
    mini = ernas.build_model(ernas.load_arch("hrnet_mini_os2"))
    assert count_params(ref) == count_params(mini)
    assert count_params(ref) < count_params(ernas.build_model(reference_arch(space)))
    full = scaled_arch(space, {"name": "full", "blocks": {k: {"keep": True} for k in
                                                          ("stage4", "fourth_branch", "fuse4")}},
                       change)
    assert full.to_dict()["blocks"] == reference_arch(space).to_dict()["blocks"]


@pytest.mark.parametrize("val_crop,eval_tile,warns", [
    (128, None, True), (None, None, False), (128, 128, False), (64, 128, True)])
def test_validation_on_crops_while_test_scores_whole_images_is_warned(caplog, val_crop,
                                                                       eval_tile, warns):
    """Cropped validation hid a BatchNorm NAFNet that gave NaN on whole images: a protocol
    that validates otherwise than its test scores is told so when it is prepared."""
    import logging

    from ernas.bench.run import _warn_cropped_validation

    plan = {"jobs": {"train_reference_seed0": {"command": "retrain",
                                               "overrides": {"val_crop": val_crop}}}}
    with caplog.at_level(logging.WARNING, logger="ernas.bench.run"):
        _warn_cropped_validation(plan, eval_tile)
    assert ("centre crops" in caplog.text) is warns
