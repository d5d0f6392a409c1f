"""ernas-bench's λ tuning: the rule on constructed figures, the stage on the tiny protocol (real
searches through the CLI), and refusals of a grid that contradicts the protocol."""
import json
import math
import os
import subprocess
import sys

import pytest

from ernas.bench.tune import choose
from ernas.errors import ErnasError


def _row(lam, ratio, val):
    return {"lam": lam, "ratio": ratio, "val": val}


def test_a_lam_whose_argmax_misses_the_target_loses_to_one_that_hits_it():
    # λ 0.5 scores best on validation but its argmax is 40% over the target: not chosen
    rows = [_row(0.5, 1.40, 30.0), _row(2.0, 1.05, 29.0), _row(8.0, 0.97, 28.5)]
    assert choose(rows, tolerance=0.1) == 1
    # among qualifying λ the best validation figure wins, a diverged one never does
    rows = [_row(0.5, 1.02, float("nan")), _row(2.0, 0.95, 28.0), _row(8.0, 1.01, 28.7)]
    assert choose(rows, tolerance=0.1) == 2


def test_without_a_qualifying_lam_the_nearest_in_log_ratio_is_chosen():
    # 0.7 is nearer than 1.5 in |log ratio| (0.357 vs 0.405), though farther in plain difference
    rows = [_row(0.5, 1.5, 30.0), _row(8.0, 0.7, 20.0)]
    assert abs(math.log(0.7)) < abs(math.log(1.5)) and abs(0.7 - 1) < abs(1.5 - 1)
    assert choose(rows, tolerance=0.1) == 1


def test_a_grid_beside_a_stated_lam_is_refused():
    from ernas.api import compose
    from ernas.bench.config import Protocol
    from ernas.config import validated

    cfg = compose("bench", ["experiment=protocol_denoise", "tune.lams=[1,4]"])
    with pytest.raises(ErnasError, match="search.lam=0.5 while tune.lams"):
        validated(cfg, Protocol, "bench config")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny protocol with a λ grid of two, tuning seed 1, stopped after its searches."""
    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "run"
    env = {**os.environ, "ERNAS_CACHE": str(tmp / "cache")}
    r = subprocess.run([sys.executable, "-m", "ernas.cli.bench", "experiment=protocol_denoise_tiny",
                        "tune.lams=[0,4]", "tune.seed=1", "tune.tolerance=0.5", "until=search",
                        f"hydra.run.dir={out}"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out, env


def test_the_tuning_stage_chooses_on_validation_and_the_other_seeds_search_with_it(tuned):
    _, out, _ = tuned
    plan = json.loads((out / "plan.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    rows = tuning["rows"]
    assert [(t["target"], t["lam"]) for t in rows] == [(0, 0.0), (0, 4.0)]
    j = choose(rows, 0.5)
    assert [t["chosen"] for t in rows] == [k == j for k in range(2)]
    lam = rows[j]["lam"]
    assert tuning["chosen_lam"] == {"0": lam}
    for k, t in enumerate(rows):  # each tuning search ran with its own λ and the tuning seed
        s = json.loads((out / "jobs" / f"tune_t0_l{k}" / "summary.json").read_text())
        assert s["config"]["lam"] == t["lam"] and s["config"]["seed"] == 1
        assert t["ratio"] == pytest.approx(s["argmax_predicted_ms"] / s["target_ms"])
    # seed 0 searched with the chosen λ; seed 1 is the tuning search itself, not run again
    searches = sorted(k for k in plan["jobs"] if plan["jobs"][k]["command"] == "search")
    assert searches == ["search_t0_s0", "tune_t0_l0", "tune_t0_l1"]
    s0 = json.loads((out / "jobs" / "search_t0_s0" / "summary.json").read_text())
    assert s0["config"]["lam"] == lam and s0["config"]["seed"] == 0
    chosen_arch = str(out / "jobs" / f"tune_t0_l{j}" / "arch.yaml")
    assert plan["networks"]["searched_t0_s1"]["arch"] == chosen_arch
    trains = [v for k, v in plan["jobs"].items() if k.startswith("train_searched_t0_s1_")]
    assert trains and all(t["overrides"]["arch"] == chosen_arch for t in trains)


@pytest.mark.slow
def test_the_report_lists_every_tuning_search_and_the_choice(tuned):
    tmp, out, env = tuned
    r = subprocess.run([sys.executable, "-m", "ernas.cli.bench", f"resume={out}",
                        f"hydra.run.dir={tmp / 'log'}"], cwd=tmp, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "tuning.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("target,lam,argmax_ms,ratio")
    report = (out / "report.md").read_text()
    assert "## λ tuning (validation only)" in report and "Tuning searches: 2," in report
