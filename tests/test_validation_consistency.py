"""Train/test consistency at validation: stitched tiles (``ernas.data.tiles.stitched``), precise
BatchNorm (``bn_calibration_batches``) and tiled validation (``val_tile``) in retraining, and
``benchmarks/validation_agreement.py`` re-validating a bench run's trainings."""
import json
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import pandas as pd
import pytest
import torch

from ernas.data.tiles import stitched
from ernas.families.nafnet import official_arch
from ernas.nn.batchnorm import batchnorms, recalibrate_bn
from ernas.task import make_task
from ernas.train import TrainConfig, resume, retrain, training_data
from ernas.train_loop import validate
from tiny_bench import digest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "validation_agreement.py"
TASK = make_task({"name": "denoise", "max_side": 256})
FAST = dict(steps=8, batch_size=2, crop=32, val_every=8, log_every=4, val_crop=64)


def _bn_arch():
    arch = official_arch(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1],
                         name="bn")
    for values in arch.values.values():
        values["norm"] = "batchnorm"
    return arch


def test_stitched_runs_each_tile_alone_and_crops_back():
    """Fails if tiles overlap or leak into each other, if the padding is not cropped back, or
    if an output with another channel count cannot be stitched."""
    x = torch.rand(1, 3, 50, 37)
    assert torch.equal(stitched(lambda t: t, x, (16, 16)), x)
    centred = stitched(lambda t: t - t.mean(dim=(-2, -1), keepdim=True), x, (16, 16))
    assert centred.shape == x.shape
    assert centred[..., :16, :16].mean().abs() < 1e-6            # a whole tile: its own mean
    assert not torch.allclose(centred, x - x.mean(dim=(-2, -1), keepdim=True))
    logits = stitched(lambda t: t.sum(dim=1, keepdim=True).repeat(1, 5, 1, 1), x, (16, 16))
    assert logits.shape == (1, 5, 50, 37)


def test_precise_bn_and_tiles_decide_validation_and_best_pt(tmp_path):
    """Fails if validation judges the running statistics of training instead of the
    recalibrated copy, if the copy is calibrated on other batches than those after the last
    step, if ``best.pt`` keeps other statistics than the judged ones, if the training state in
    ``last.pt`` is overwritten, or if ``val_tile`` is ignored."""
    arch = _bn_arch()
    cfg = TrainConfig(**FAST, bn_calibration_batches=3, val_tile=32)
    s = retrain(arch, tmp_path / "run", TASK, cfg, progress=False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    from ernas import build_model
    model = build_model(arch)
    model.load_state_dict(last)
    batches, val = training_data(TASK, cfg, 0)
    precise = deepcopy(model)
    assert recalibrate_bn(precise, (batches[cfg.steps + i][0] for i in range(3))) == 3
    for k, v in precise.state_dict().items():
        assert torch.equal(best[k], v), k
    means = [k for k in last if k.endswith("running_mean")]
    assert means and not all(torch.equal(last[k], best[k]) for k in means)
    tiled = validate(precise, val, "cpu", TASK, 32)
    assert s["best_val_psnr"] == pytest.approx(tiled, abs=1e-9)
    assert tiled != pytest.approx(validate(precise, val, "cpu", TASK), abs=1e-6)
    plain = retrain(arch, tmp_path / "plain", TASK, TrainConfig(**FAST), progress=False)
    assert plain["best_val_psnr"] == pytest.approx(validate(model, val, "cpu", TASK), abs=1e-9)


def test_resume_with_precise_bn_equals_an_uninterrupted_run(tmp_path):
    """Fails if the recalibration at a validation leaks into the training state a resumed run
    continues from."""
    arch = _bn_arch()
    cfg = TrainConfig(**{**FAST, "val_every": 4}, bn_calibration_batches=2)
    full = retrain(arch, tmp_path / "full", TASK, cfg, progress=False)
    retrain(arch, tmp_path / "part", TASK, cfg, progress=False, stop_at=4)
    again = resume(tmp_path / "part", progress=False)
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True)["model"]
                for d in ("full", "part"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert full["best_val_psnr"] == again["best_val_psnr"]


@pytest.mark.parametrize("arg,field", [("val_tile=8", "val_tile"),
                                       ("bn_calibration_batches=-1", "bn_calibration_batches")])
def test_bad_consistency_settings_are_refused_before_a_run_starts(tmp_path, arg, field):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.retrain", "steps=2", "threads=1",
                        "progress=false", arg, f"hydra.run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def _agree(run: Path, out: Path):
    return subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out), "--boots",
                           "200", "--bn-batches", "2", "--workers", "2"], capture_output=True,
                          text=True, timeout=600)


def test_validation_agreement_revalidates_every_ranked_training(tiny_protocol, tmp_path):
    """Fails if a ranked network's training is skipped, if the as-trained figure is not the
    training's own last validation, if tiles at the validation crop differ from the whole crop,
    or if the script writes into the run."""
    run, _ = tiny_protocol
    before = digest(p for p in run.rglob("*") if p.is_file())
    r = _agree(run, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert digest(before) == before
    scores = pd.read_csv(tmp_path / "out" / "validation_scores.csv")
    plan = json.loads((run / "plan.json").read_text())
    ranked = sorted(n for n, rec in plan["networks"].items()
                    if rec["arm"] in ("searched", "random") and rec.get("target") == 0)
    assert sorted(scores["network"].unique()) == ranked
    wide = scores.pivot_table(index=["network", "seed"], columns="way", values="value")
    assert list(wide.columns) == ["as_trained", "best_logged", "precise_bn", "precise_bn_tiles",
                                  "tiles"]
    for (name, seed), row in wide.iterrows():
        s = json.loads((run / "jobs" / f"train_{name}_seed{seed}" / "summary.json").read_text())
        assert row["as_trained"] == pytest.approx(s["final_val_psnr"], abs=1e-9)
        assert row["best_logged"] == pytest.approx(s["best_val_psnr"], abs=1e-12)
        assert row["tiles"] == pytest.approx(row["as_trained"], abs=1e-9)  # val_crop == crop


def test_validation_agreement_refuses_a_folder_that_is_not_a_bench_run(tmp_path):
    r = _agree(tmp_path, tmp_path / "out")
    assert r.returncode == 2 and "plan.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_batchnorm_free_networks_are_judged_as_they_are():
    """Fails if precise BatchNorm copies or changes a network without BatchNorm."""
    from ernas import build_model
    from ernas.train_loop import judged

    model = build_model(official_arch(width=8, enc_blk_nums=[1], middle_blk_num=1,
                                      dec_blk_nums=[1]))
    assert not batchnorms(model)
    cfg = TrainConfig(**FAST, bn_calibration_batches=4)
    assert judged(model, None, cfg, "cpu") is model


def test_evaluate_tile_judges_test_images_as_validation_did(tmp_path):
    """Fails if ``ernas-evaluate tile=`` is ignored (the figure would be the whole-image one) or
    stitched differently from validation, or if a tile too small is not refused."""
    from ernas import build_model
    from ernas.evaluate import quality

    arch = _bn_arch()
    retrain(arch, tmp_path / "run", TASK, TrainConfig(**FAST, val_tile=32), progress=False)
    base = [sys.executable, "-m", "ernas.cli.evaluate", f"checkpoint={tmp_path / 'run'}",
            "baseline.enabled=false", "predict_latency=false", "measure_latency=false",
            "task.max_side=256", "task.eval_sigmas=[25]", "threads=1", "progress=false"]
    r = subprocess.run([*base, "tile=32", f"hydra.run.dir={tmp_path / 'ev'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    model = build_model(arch)
    model.load_state_dict(torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"])
    task = make_task({"name": "denoise", "max_side": 256, "eval_sigmas": [25]})
    sets = task.eval_sets(0)
    tiled = quality(model, task, sets, "m", tile=32)[1]["psnr_sigma25"]
    whole = quality(model, task, sets, "m")[1]["psnr_sigma25"]
    assert s["tile"] == 32 and s["psnr"] == pytest.approx(tiled, abs=1e-9)
    assert tiled != pytest.approx(whole, abs=1e-6)
    assert "stitched 32x32 tiles" in (tmp_path / "ev" / "report.md").read_text()
    r = subprocess.run([*base, "tile=8", f"hydra.run.dir={tmp_path / 'bad'}"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "tile=8" in r.stderr
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file()]


def test_a_protocol_with_val_tile_tests_through_the_same_tiles(tmp_path):
    """Fails if the bench's test job judges whole images while its training validated tiles (or
    tiles a protocol that validates whole images)."""
    from omegaconf import OmegaConf

    from ernas.bench.plan import add_training, check_jobs

    def plan_for(recipe):
        cfg = OmegaConf.create({"train": {"overrides": recipe}, "threads": 1,
                                "evaluate": {"seed": 0}, "input_shape": [1, 3, 32, 32]})
        plan = {"networks": {"n": {"arch": "arch.yaml"}}, "jobs": {},
                "nodes": {"task": {"name": "denoise"}}}
        add_training(plan, tmp_path, cfg, "n", 0)
        check_jobs(plan)
        return plan["jobs"]["test_n_seed0"]["overrides"]

    assert plan_for({"steps": 4, "val_tile": 32})["tile"] == 32
    assert "tile" not in plan_for({"steps": 4})
