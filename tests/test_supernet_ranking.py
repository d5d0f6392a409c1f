"""``benchmarks/supernet_ranking.py``: rank agreement and regret, and every supernet of the tiny
protocol scoring its target's networks with the weights its search ended with."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tiny_bench import digest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "supernet_ranking.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from supernet_ranking import agreement, summarise  # noqa: E402


def test_agreement_reads_order_sign_and_regret():
    """Fails if τ or ρ lose their sign, the regret trusts the proxy's smallest value, or a
    missing score is ranked instead of dropped."""
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    same = agreement(y * 10, y, boots=200)
    assert same["kendall"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    assert same["ci_low"] == pytest.approx(1) and same["regret"] == 0
    flipped = agreement(-y, y, boots=200)
    assert flipped["kendall"] == pytest.approx(-1) and flipped["regret"] == pytest.approx(4)
    swapped = agreement([1, 2, 3, 5, 4, np.nan], [*y, 9.0], boots=200)
    assert swapped["n"] == 5 and swapped["kendall"] == pytest.approx(0.8)
    assert swapped["regret"] == pytest.approx(1) and swapped["ci_low"] <= 0.8 <= swapped["ci_high"]
    assert np.isnan(agreement([1, 2], [1, 2])["kendall"])


def test_the_ceiling_sets_one_training_seed_against_the_other():
    """Fails if the seed-to-seed row reads the mean instead of the two seeds, or if a free proxy
    is scored against one seed instead of the mean."""
    seed0, seed1 = np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 4, 3])
    scores = pd.DataFrame({"target": 0, "scorer": "-", "network": list("abcd"),
                           "params": [1, 2, 3, 4], "macs": [4, 3, 2, 1],
                           "predicted_ms": [1, 1, 1, 2], "trained_seed0": seed0,
                           "trained_seed1": seed1, "trained": (seed0 + seed1) / 2})
    rows = summarise(scores, boots=100).set_index("proxy")
    assert rows.loc["training_seed", "scorer"] == "0~1"
    assert rows.loc["training_seed", "kendall"] == pytest.approx(2 / 3)
    assert rows.loc["params", "kendall"] == pytest.approx(agreement([1, 2, 3, 4],
                                                                    (seed0 + seed1) / 2)["kendall"])
    assert rows.loc["macs", "kendall"] < 0


def _rank(run: Path, out: Path):
    return subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out),
                           "--boots", "200"], capture_output=True, text=True, timeout=600)


def test_every_supernet_scores_its_targets_networks_and_the_run_is_untouched(tiny_protocol,
                                                                            tmp_path):
    """Fails if a supernet is loaded at another step than its search's last (the derived
    network's inherited score would differ from the search's own ``inherited.pt``), if a
    network or a training seed goes missing, if the trained figure is not the mean of the
    trainings' best validation figures, or if the script writes into the run."""
    from ernas import load_arch
    from ernas.api import compose
    from ernas.cli.common import task_of
    from ernas import build_model
    from ernas.train_loop import validate

    run, _ = tiny_protocol
    before = digest(p for p in run.rglob("*") if p.is_file())
    r = _rank(run, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert digest(before) == before
    scores = pd.read_csv(tmp_path / "out" / "ranking_scores.csv")
    plan = json.loads((run / "plan.json").read_text())
    ranked = sorted(n for n, rec in plan["networks"].items() if rec["arm"] != "reference"
                    and rec.get("target") == 0)
    searches = sorted(j for j in plan["jobs"] if j.startswith("search_"))
    assert sorted(scores["scorer"].unique()) == ["-", *searches]
    for _, g in scores.groupby("scorer"):
        assert sorted(g["network"]) == ranked
    supernet_rows = scores[scores["scorer"] != "-"]
    assert np.isfinite(supernet_rows[["inherited", "supernet", "alpha"]].to_numpy()).all()
    assert (supernet_rows["alpha"] < 0).all()
    for name in ranked:
        row = scores[(scores["scorer"] == "-") & (scores["network"] == name)].iloc[0]
        best = [json.loads((run / "jobs" / f"train_{name}_seed0" / "summary.json").read_text())
                ["best_val_psnr"]]
        assert row["trained_seed0"] == pytest.approx(best[0]) and row["trained"] == \
            pytest.approx(np.mean(best))
    job = plan["jobs"]["search_t0_s0"]
    cfg = compose("search", job["overrides"], job["nodes"])
    task = task_of(cfg)
    arch = load_arch(run / "jobs" / "search_t0_s0" / "arch.yaml")
    model = build_model(arch)
    model.load_state_dict(torch.load(run / "jobs" / "search_t0_s0" / "inherited.pt"))
    val_crop = plan["jobs"]["train_reference_seed0"]["overrides"]["val_crop"]
    own = validate(model, task.dataset("val", val_crop, 0), torch.device("cpu"), task)
    mine = supernet_rows[(supernet_rows["scorer"] == "search_t0_s0")
                         & (supernet_rows["network"] == "searched_t0_s0")]["inherited"].item()
    assert mine == pytest.approx(own, abs=1e-4)
    summary = pd.read_csv(tmp_path / "out" / "ranking_summary.csv")
    assert set(summary["proxy"]) == {"params", "macs", "predicted_ms", "inherited", "supernet",
                                      "alpha"}
    assert (summary["n"] == len(ranked)).all()


def test_a_folder_that_is_not_a_bench_run_is_refused_with_exit_2(tmp_path):
    r = _rank(tmp_path, tmp_path / "out")
    assert r.returncode == 2 and "plan.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_ranking_study_is_protocol_denoise_budget_at_one_of_its_targets():
    """Fails if the study's searches or training recipe drift from the protocol whose supernets
    it judges, or if it drops the second training seed the ceiling needs."""
    from omegaconf import OmegaConf

    from ernas.api import compose
    from ernas.bench.config import Protocol
    from ernas.config import validated

    study = compose("bench", ["experiment=ranking_denoise_budget"])
    base = compose("bench", ["experiment=protocol_denoise_budget"])
    validated(study, Protocol, "ranking_denoise_budget")
    for key in ("space", "input_shape", "search", "tune", "task", "latency", "reference"):
        assert OmegaConf.select(study, key) == OmegaConf.select(base, key), key
    assert study.train.overrides == base.train.overrides and study.space == "nafnet_ern_small"
    assert set(study.targets) <= set(base.targets) and study.random.seed == base.random.seed
    assert len(study.train.others_seeds) >= 2 and study.random.draws >= 8
