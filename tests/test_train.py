"""Retraining: each initialisation, pretrained mapping, distillation, exact resume, CLI errors."""
import json
import subprocess
import sys

import pytest
import torch

from ernas import build_model, load_arch, load_space
from ernas.errors import ErnasError
from ernas.families.nafnet import official_arch
from ernas.paths import SEARCH_SPACES
from ernas.batches import StepBatches
from ernas.checkpoint import init_model, load_weights
from ernas.distill import DistillConfig, Distiller, forward_with_features
from ernas.task import make_task
from ernas.train import TrainConfig, resume, retrain

TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
FAST = dict(steps=12, batch_size=2, crop=32, val_every=6, log_every=3, val_crop=64)
TASK = make_task({"name": "denoise", "max_side": 256})
CLI_FAST = ["steps=8", "batch_size=2", "crop=32", "val_every=4", "log_every=2", "val_crop=64",
            "task.max_side=256", "threads=1", "progress=false"]


def _cli(tmp_path, run, *args):
    r = subprocess.run([sys.executable, "-m", "ernas.cli.retrain", *CLI_FAST,
                        f"hydra.run.dir={tmp_path / run}", *args],
                       capture_output=True, text=True, cwd=tmp_path)
    return r


def _randomise(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _tiny_arch(name="tiny", **changes):
    arch = official_arch(**TINY, name=name)
    for pos, choice in changes.items():
        arch.values[pos.replace("__", ".")].update(choice)
    return arch


# --------------------------------------------------------------------------- scratch via the CLI
def test_cli_scratch_writes_all_outputs(tmp_path):
    r = _cli(tmp_path, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    for f in ("arch.yaml", "init_report.json", "best.pt", "last.pt", "log.csv", "curves.png",
              "summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 8 and s["finished"] and s["init"] == "scratch"
    for k in ("best_val_psnr", "params", "macs", "seconds", "throughput_img_s"):
        assert s[k] and s[k] > 0, k
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,lr,loss") and len(log) == 1 + 4
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["val_psnr"] == pytest.approx(s["best_val_psnr"])
    assert "best val psnr" in r.stdout


# --------------------------------------------------------------------------- supernet init
def test_supernet_init_extracts_the_searched_weights(tmp_path):
    from ernas.batches import step_batches
    from ernas.data import bundled_images
    from ernas.latency.predict import ExpectedLatency
    from ernas.latency.table import LatencyTable
    from ernas.search import SearchConfig, run_search
    from ernas.tasks.denoise.data import NoisyImageDataset

    space = load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    shape = (1, 3, 32, 32)
    table = LatencyTable(metadata={"input_shape": list(shape), "granularity": "block"})
    for i, key in enumerate(space.op_keys(shape)):
        table.add(key, [0.1 + 0.01 * i])
    ds = NoisyImageDataset(bundled_images("train", max_side=128), 16, 25, seed=0)
    batch = step_batches(ds, 2, 0)
    cfg = SearchConfig(steps=3, warmup_steps=1, batch_size=2, eval_batches=1, log_every=1)
    run_search(space, ExpectedLatency(space, table), batch, batch, cfg, tmp_path / "search",
               task=TASK, progress=False)
    arch = load_arch(tmp_path / "search" / "arch.yaml")
    model, report = init_model(arch, "supernet", tmp_path / "search")
    inherited = torch.load(tmp_path / "search" / "inherited.pt", weights_only=True)
    assert set(inherited) == set(model.state_dict())
    assert all(torch.equal(inherited[k], v) for k, v in model.state_dict().items())
    assert report["space"] == "nafnet_tiny" and not report["left_at_init"]
    # and through the CLI
    r = _cli(tmp_path, "rt", f"arch={tmp_path / 'search' / 'arch.yaml'}", "init=supernet",
             f"source={tmp_path / 'search' / 'checkpoint.pt'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "rt" / "init_report.json").read_text())
    assert rep["init"] == "supernet" and rep["counts"]["copied"] == len(inherited)


# --------------------------------------------------------------------------- pretrained mapping
def test_pretrained_mapping_copies_pads_and_drops(tmp_path):
    torch.manual_seed(0)
    official = _randomise(build_model(official_arch(**TINY)))
    path = tmp_path / "NAFNet-tiny.pth"
    torch.save({"params": official.state_dict()}, path)  # the official release's layout
    arch = _tiny_arch("derived", encoders__0__0={"kernel": 5},
                      decoders__0__0={"dw_expand": 1, "ffn_expand": 1},
                      encoders__1__0={"keep": False})
    model, report = init_model(arch, "pretrained", path)
    src, dst = official.state_dict(), model.state_dict()
    # same-shape tensors are copied exactly
    assert report["copied"] and all(torch.equal(dst[k], src[k]) for k in report["copied"])
    assert "middle_blks.0.conv1.weight" in report["copied"]
    assert "encoders.0.0.conv1.weight" in report["copied"]
    # kernel 3 -> 5: zero-padded, and the block computes the same function
    assert "encoders.0.0.conv2.weight" in report["adapted"]
    w5 = dst["encoders.0.0.conv2.weight"]
    assert w5.shape[-1] == 5 and torch.equal(w5[..., 1:4, 1:4], src["encoders.0.0.conv2.weight"])
    assert w5[..., 0, :].abs().sum() == 0 and w5[..., :, 4].abs().sum() == 0
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.encoders[0][0](x), official.encoders[0][0](x), atol=1e-6)
    # expansion 2 -> 1: the first channels of each gate half
    c1s, c1d = src["decoders.0.0.conv1.weight"], dst["decoders.0.0.conv1.weight"]  # 32 -> 16
    assert torch.equal(c1d, torch.cat([c1s[:8], c1s[16:24]]))
    assert torch.equal(dst["decoders.0.0.conv3.weight"], src["decoders.0.0.conv3.weight"][:, :8])
    assert torch.equal(dst["decoders.0.0.sca.1.weight"], src["decoders.0.0.sca.1.weight"][:8, :8])
    # the skipped block is dropped
    assert report["dropped_blocks"] == ["encoders.1.0"]
    assert "encoders.1.0.conv1.weight" in report["unused_source_keys"]
    assert not report["left_at_init"]
    # mismatched width: nothing fits the intro, so it is left at init and reported
    wide = official_arch(**{**TINY, "width": 16})
    _, rep2 = init_model(wide, "pretrained", path)
    assert "intro.weight" in rep2["left_at_init"]


def test_pretrained_cli_writes_init_report(tmp_path):
    official = _randomise(build_model(official_arch(**TINY)))
    torch.save({"params": official.state_dict()}, tmp_path / "w.pth")
    arch = _tiny_arch("derived", encoders__0__0={"kernel": 7, "norm": "batchnorm"})
    arch.save(tmp_path / "arch.yaml")
    r = _cli(tmp_path, "rt", f"arch={tmp_path / 'arch.yaml'}", "init=pretrained",
             f"source={tmp_path / 'w.pth'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "rt" / "init_report.json").read_text())
    assert rep["counts"]["adapted"] >= 1 and "encoders.0.0.norm1.running_mean" in rep["left_at_init"]


# --------------------------------------------------------------------------- distillation
def test_distillation_adds_a_feature_term(tmp_path):
    teacher_arch = official_arch(**{**TINY, "width": 16}, name="teacher")
    teacher = _randomise(build_model(teacher_arch), seed=1, scale=0.1)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    student_arch = _tiny_arch("student", encoders__0__0={"dw_expand": 1})
    cfg = DistillConfig(teacher_arch, str(tmp_path / "teacher.pt"), w_out=1.0, w_feat=0.5)
    d = Distiller(student_arch, cfg, TASK)
    assert all(isinstance(a, torch.nn.Conv2d) and a.out_channels == 2 * a.in_channels
               for a in d.adapters)  # 8->16, 16->32, 16->32, 8->16
    student = build_model(student_arch)
    x = torch.rand(2, 3, 32, 32)
    y, feats = forward_with_features(student, student_arch.spec, x)
    assert torch.equal(y, student(x))
    assert [f.shape for f in feats] == [f.shape for f in student.features(x)]
    out_l, feat_l = d.loss(x, y, [a(f) for a, f in zip(d.adapters, feats)])
    assert out_l > 0 and feat_l > 0
    s = retrain(student_arch, tmp_path / "run", TASK, TrainConfig(**FAST), distill=cfg,
                progress=False)
    assert s["distill"] and s["best_val_psnr"] > 0
    import pandas as pd
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert (log["feat_loss"] > 0).all() and (log["out_loss"] > 0).all()
    assert (log["loss"] > log["task_loss"]).all()


# --------------------------------------------------------------------------- resume
def test_resume_equals_an_uninterrupted_run(tmp_path):
    arch = _tiny_arch("r", decoders__1__0={"norm": "batchnorm"})
    cfg = TrainConfig(**FAST)
    full = retrain(arch, tmp_path / "full", TASK, cfg, progress=False)
    part = retrain(arch, tmp_path / "part", TASK, cfg, progress=False, stop_at=5)
    assert part["steps"] == 5 and not part["finished"]
    again = resume(tmp_path / "part", progress=False)
    assert again["steps"] == cfg.steps and again["finished"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert full["best_val_psnr"] == again["best_val_psnr"]
    import pandas as pd
    la, lb = (pd.read_csv(tmp_path / d / "log.csv").drop(columns="seconds") for d in ("full", "part"))
    pd.testing.assert_frame_equal(la, lb)


def test_worker_batches_equal_in_process_batches():
    from ernas.data import bundled_images
    from ernas.tasks.denoise.data import NoisyImageDataset

    ds = NoisyImageDataset(bundled_images("train", max_side=128), 16, 25, seed=3)
    batches = StepBatches(ds, 2, 3)
    direct = [batches[s] for s in range(4, 8)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(4, 8),
                                         num_workers=2)
    for (n1, c1), (n2, c2) in zip(direct, loader):
        assert torch.equal(n1, n2) and torch.equal(c1, c2)


# --------------------------------------------------------------------------- user errors
def test_mismatched_checkpoint_lists_keys(tmp_path):
    torch.save(build_model(official_arch(**TINY)).state_dict(), tmp_path / "w.pt")
    arch = _tiny_arch("other", encoders__0__0={"kernel": 5}, middle_blks__0={"keep": False})
    with pytest.raises(ErnasError) as e:
        load_weights(build_model(arch), tmp_path / "w.pt", arch)
    msg = str(e.value)
    assert "encoders.0.0.conv2.weight" in msg and "unexpected" in msg and "other" in msg


def test_cli_missing_arch_is_one_paragraph(tmp_path):
    r = _cli(tmp_path, "x", f"arch={tmp_path / 'nope.yaml'}")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = _cli(tmp_path, "y", "init=pretrained")
    assert r.returncode == 2 and "source" in r.stderr


def test_cli_stop_and_resume(tmp_path):
    r = _cli(tmp_path, "run", "stop_at=3")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 3 and not s["finished"] and (tmp_path / "run" / "last.pt").is_file()
    r = _cli(tmp_path, "again", f"resume={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 8 and s["finished"]
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["resumed_run"] == \
        str(tmp_path / "run")


@pytest.mark.parametrize("value,best,replaces", [
    (20.0, None, True), (float("nan"), None, True),   # the first validation always writes best.pt
    (21.0, 20.0, True), (19.0, 20.0, False), (20.0, 20.0, False),
    (20.0, float("nan"), True),                       # a finite value replaces a NaN best
    (float("nan"), 20.0, False), (float("inf"), 20.0, False), (float("nan"), float("nan"), False),
])
def test_non_finite_validation_never_holds_best(value, best, replaces):
    """A network that gave NaN on a validation image at its first validation must not keep
    ``best.pt`` once it validates finite (``v > nan`` is always false)."""
    from ernas.train_loop import improves

    assert improves(value, best) is replaces
