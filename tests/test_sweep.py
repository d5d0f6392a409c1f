"""A Hydra sweeper plugin optimises what a command returns: a 2-trial Optuna sweep over
search.lam maximises the searches' supernet validation PSNR."""
import subprocess
import sys

import pytest
import yaml

from test_hostile_inputs import SEARCH


def test_optuna_sweep_over_lam_reads_each_searchs_headline(tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "ernas.cli.search", "--multirun",
                        "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                        "hydra.sweeper.n_jobs=1", "hydra.sweeper.direction=maximize",
                        "hydra.sweeper.sampler.seed=0", "search.lam=interval(0.1,2.0)",
                        "search.steps=3", "latency.anchor=false", *SEARCH,
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    summaries = [yaml.safe_load(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2
    values = [s["supernet_val_psnr"] for s in summaries]
    assert best["best_value"] == pytest.approx(max(values))
    lams = [yaml.safe_load((p.parent / ".hydra" / "config.yaml").read_text())["search"]["lam"]
            for p in sorted(sweep.glob("*/summary.json"))]
    assert len(set(lams)) == 2 and all(0.1 <= v <= 2.0 for v in lams)
