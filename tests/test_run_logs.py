"""Run logs as the run goes: ``log.csv`` gets a row every ``log_every`` steps (not only at
checkpoints), a resumed run keeps each step once, and ``logger=tensorboard`` writes the search's
numbers as TensorBoard scalars. Search on nafnet_tiny at 16x16 with the synthetic table of
test_search_loop; retraining a tiny NAFNet on the bundled photos."""
import math
from pathlib import Path

import pandas as pd
import pytest

from ernas import load_space
from ernas.batches import StepBatches, step_batches
from ernas.families.nafnet import official_arch
from ernas.latency.predict import ExpectedLatency
from ernas.search import run_search
from ernas.task import make_task
from ernas.train import TrainConfig, resume, retrain, training_data
from test_search_loop import TASK, SmoothImages, cfg, synthetic_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    space = load_space(ROOT / "search_spaces" / "nafnet_tiny.yaml")
    expected = ExpectedLatency(space, synthetic_table(space))
    return (space, expected, step_batches(SmoothImages(16, 0), 2, seed=0),
            step_batches(SmoothImages(8, 1), 2, seed=1))


def _search(setup, out, **kw):
    space, expected, train, val = setup
    run_kw = {k: kw.pop(k) for k in ("stop_after", "resume") if k in kw}
    return run_search(space, expected, train, val, cfg(**kw), out, task=TASK, progress=False,
                      **run_kw)


def test_search_log_has_rows_before_its_first_checkpoint(setup, tmp_path):
    """A run killed before any checkpoint (stop_after) has already logged its steps."""
    _search(setup, tmp_path, steps=12, warmup_steps=2, log_every=2, checkpoint_every=100,
            stop_after=7)
    assert not (tmp_path / "checkpoint.pt").exists()
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["step"]) == [0, 2, 4, 6]
    assert log["alpha_updated"].tolist() == [0, 1, 1, 1]
    assert log["val_psnr"].isna().tolist() == [True, False, False, False]
    assert log[["total", "train_psnr", "expected_ms", "entropy"]].notna().all().all()


def test_resumed_search_logs_each_step_once_as_an_uninterrupted_run(setup, tmp_path):
    kw = dict(steps=12, warmup_steps=2, log_every=2, checkpoint_every=5)
    _search(setup, tmp_path / "full", **kw)
    part = tmp_path / "part"
    _search(setup, part, stop_after=7, **kw)  # checkpoint at step 5, rows up to step 6
    assert list(pd.read_csv(part / "log.csv")["step"]) == [0, 2, 4, 6]
    _search(setup, part, resume=True, stop_after=9, **kw)  # from step 5: step 6 logged again
    assert list(pd.read_csv(part / "log.csv")["step"]) == [0, 2, 4, 6, 8]
    _search(setup, part, resume=True, **kw)
    full, resumed = (pd.read_csv(d / "log.csv") for d in (tmp_path / "full", part))
    assert list(resumed["step"]) == [0, 2, 4, 6, 8, 10, 11]
    pd.testing.assert_frame_equal(full, resumed, rtol=1e-6)


class _FailingAt(StepBatches):
    """Training batches whose step ``fail_at`` cannot be read (as a file lost mid-run)."""

    def __init__(self, batches: StepBatches, fail_at: int):
        super().__init__(batches.dataset, batches.batch_size, batches.key)
        self.fail_at = fail_at

    def __getitem__(self, step):
        if int(step) == self.fail_at:
            raise OSError(f"batch {step} is unreadable")
        return super().__getitem__(step)


def test_retrain_log_has_rows_between_checkpoints_and_resume_redoes_the_rest(tmp_path):
    task = make_task({"name": "denoise", "max_side": 256})
    arch = official_arch(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1],
                         name="tiny")
    c = TrainConfig(steps=8, batch_size=2, crop=32, val_every=4, log_every=2, val_crop=64,
                    device="cpu")
    retrain(arch, tmp_path / "full", task, c, progress=False)
    batches, val_set = training_data(task, c, 0)
    part = tmp_path / "part"
    with pytest.raises(OSError, match="batch 6"):  # after step 6; last.pt holds step 4
        retrain(arch, part, task, c, progress=False, data=(_FailingAt(batches, 6), val_set))
    log = pd.read_csv(part / "log.csv")
    assert list(log["step"]) == [2, 4, 6]
    assert math.isnan(log["val_psnr"][0]) and log["val_psnr"][1] > 0
    resume(part, progress=False)
    full, resumed = (pd.read_csv(d / "log.csv").drop(columns="seconds")
                     for d in (tmp_path / "full", part))
    assert list(resumed["step"]) == [2, 4, 6, 8]
    pd.testing.assert_frame_equal(full, resumed, rtol=1e-6)


def test_search_tensorboard_scalars_match_the_log(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _search(setup, tmp_path, steps=6, warmup_steps=2, log_every=2, logger="tensorboard")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    log = pd.read_csv(tmp_path / "log.csv")
    for tag, col in (("search/loss", "total"), ("search/task_loss", "task"),
                     ("search/latency_loss", "latency"), ("train/psnr", "train_psnr"),
                     ("arch/expected_ms", "expected_ms"), ("arch/entropy", "entropy"),
                     ("arch/decisiveness", "decisiveness"), ("search/lr_alpha", "lr_alpha")):
        assert tag in tags, (tag, sorted(tags))
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == list(log["step"]), tag
        assert [got[s] for s in log["step"]] == pytest.approx(log[col].tolist(), rel=1e-5), tag
    val = {e.step: e.value for e in acc.Scalars("val/psnr")}  # α steps only
    assert sorted(val) == list(log.loc[log["alpha_updated"] == 1, "step"])
    assert "search/entropy_term" in tags
    assert any(t.startswith("alpha/") for t in tags)
