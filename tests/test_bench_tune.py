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
    # a failed search (no finite validation figure) is not the fallback while another has one
    rows = [_row(0.5, 1.01, float("nan")), _row(8.0, 0.7, 20.0)]
    assert choose(rows, tolerance=0.005) == 1


def test_equal_figures_go_to_the_smaller_lam():
    rows = [_row(4.0, 1.02, 28.0), _row(2.0, 0.99, 28.0)]
    assert choose(rows, tolerance=0.1) == 1
    rows = [_row(4.0, 1.5, 28.0), _row(2.0, 1.5, 27.0)]
    assert choose(rows, tolerance=0.1) == 1


@pytest.mark.parametrize("overrides, flat, fragment", [
    (["experiment=protocol_denoise"], {}, "search.lam=0.5 while tune.lams"),
    (["experiment=protocol_denoise_tuned", "tune.seed=1"], {}, "tune.seed=1 must be"),
    (["experiment=protocol_denoise_tuned", "+search.overrides.search={lam:2}"], {},
     "search.lam=2 while tune.lams"),
    (["experiment=protocol_denoise_tuned"], {"search.latency_form": "multiplicative"},
     "has no λ"),
])
def test_a_grid_the_protocol_contradicts_is_refused(overrides, flat, fragment):
    from ernas.api import compose
    from ernas.bench.config import Protocol
    from ernas.config import validated

    cfg = compose("bench", [*overrides, "tune.lams=[1,4]"])
    for key, value in flat.items():  # keys with a dot, as a protocol file writes them
        cfg.search.overrides[key] = value
    with pytest.raises(ErnasError, match=fragment):
        validated(cfg, Protocol, "bench config")
    if not flat and len(overrides) == 1:  # the same protocol without a grid is accepted
        validated(compose("bench", overrides), Protocol, "bench config")


def test_a_protocol_stated_before_tuning_existed_still_validates():
    """resume= validates the run's own protocol.yaml, which may have no tune node."""
    from omegaconf import OmegaConf

    from ernas.api import compose
    from ernas.bench.config import Protocol
    from ernas.config import validated

    cfg = compose("bench", ["experiment=protocol_segment_hrnet_band"])
    data = OmegaConf.to_container(cfg, resolve=True)
    del data["tune"]
    assert validated(OmegaConf.create(data), Protocol, "bench config").tune.lams == []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny protocol with a λ grid of two, tuning seed 7, stopped after its searches."""
    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "run"
    env = {**os.environ, "ERNAS_CACHE": str(tmp / "cache")}
    r = subprocess.run([sys.executable, "-m", "ernas.cli.bench", "experiment=protocol_denoise_tiny",
                        "tune.lams=[0,4]", "tune.seed=7", "tune.tolerance=0.99", "until=search",
                        f"hydra.run.dir={out}"], cwd=tmp, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, out, env


def test_the_tuning_stage_chooses_on_validation_and_the_other_seeds_search_with_it(tuned):
    _, out, _ = tuned
    plan = json.loads((out / "plan.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    rows = tuning["rows"]
    assert [(t["target"], t["lam"]) for t in rows] == [(0, 0.0), (0, 4.0)]
    summaries = [json.loads((out / "jobs" / f"tune_t0_l{k}" / "summary.json").read_text())
                 for k in range(2)]
    for t, s in zip(rows, summaries):  # each tuning search ran with its λ and the tuning seed
        assert s["config"]["lam"] == t["lam"] and s["config"]["seed"] == 7
        assert t["ratio"] == pytest.approx(s["argmax_predicted_ms"] / s["target_ms"])
    # every ratio is inside ±99%, so the best inherited validation figure decides
    assert all(abs(t["ratio"] - 1) <= 0.99 for t in rows)
    vals = [s[f"inherited_val_{s['metric']}"] for s in summaries]
    j = 0 if vals[0] >= vals[1] else 1
    assert [t["chosen"] for t in rows] == [k == j for k in range(2)]
    assert tuning["chosen_lam"] == {"0": rows[j]["lam"]}
    # every arm seed searched once at the chosen λ; the tuning searches are not arms
    searches = sorted(k for k in plan["jobs"] if plan["jobs"][k]["command"] == "search")
    assert searches == ["search_t0_s0", "search_t0_s1", "tune_t0_l0", "tune_t0_l1"]
    for k in (0, 1):
        s = json.loads((out / "jobs" / f"search_t0_s{k}" / "summary.json").read_text())
        assert s["config"]["lam"] == rows[j]["lam"] and s["config"]["seed"] == k
        assert plan["networks"][f"searched_t0_s{k}"]["arch"] == s["arch_path"]


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
    assert "## λ tuning (validation only)" in report
    assert "target 0.7: 2 searches" in report and "+ 2 tuning searches" in report
