"""Evaluation: per-image/summary outputs with a baseline row, folder data, Pareto front and plot."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ernas.data.images import bundled_names
from ernas.evaluate import ModelEntry, evaluate
from ernas.families.nafnet import official_arch
from ernas.pareto import pareto, pareto_front
from ernas.task import make_task
from ernas.train import TrainConfig, retrain

TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
TASK = make_task({"name": "denoise", "max_side": 256})
LATENCY = ["input_shape=[1,3,32,32]", "latency.backend.threads=1",
           "latency.measure.rounds=2", "latency.measure.per_round=1",
           "latency.measure.min_seconds=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A retrain run directory (arch.yaml + best.pt) of a tiny arch with a BatchNorm block."""
    torch.set_num_threads(1)
    arch = official_arch(**TINY, name="tiny_bn")
    arch.values["decoders.1.0"]["norm"] = "batchnorm"
    arch.values["encoders.1.0"]["keep"] = False
    out = tmp_path_factory.mktemp("run")
    retrain(arch, out, TASK, TrainConfig(steps=30, batch_size=4, crop=32, val_every=30,
                                         val_crop=64), progress=False)
    return out


def _cli(tmp_path, *args):
    # memory is tested in test_memory.py; here it would only cost fresh processes
    return subprocess.run([sys.executable, "-m", "ernas.cli.evaluate", "threads=1",
                           "progress=false", "memory_runs=0", *args], capture_output=True,
                          text=True, cwd=tmp_path)


def test_cli_evaluate_writes_tables_with_a_baseline(tmp_path, trained):
    r = _cli(tmp_path, f"checkpoint={trained}", f"hydra.run.dir={tmp_path / 'ev'}",
             f"latency.cache_dir={tmp_path / 'cache'}", "latency.anchor=true", *LATENCY)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "ev"
    for f in ("per_image.csv", "results.csv", "report.md", "summary.json", "arch.yaml"):
        assert (out / f).is_file(), f
    assert "statistic p20" in (out / "report.md").read_text()  # the measurement protocol's
    per = pd.read_csv(out / "per_image.csv")
    assert list(per.columns) == ["model", "set", "name", "psnr", "ssim"]
    assert len(per) == 2 * len(bundled_names("test")) * 3  # models x test images x sigmas
    assert np.isfinite(per["psnr"]).all() and per["ssim"].between(-1, 1).all()
    res = pd.read_csv(out / "results.csv")
    assert list(res["name"]) == ["tiny_bn", "reference"]
    for col in ("params", "macs", "predicted_ms", "measured_ms", "psnr_sigma15", "ssim_sigma25",
                "psnr_sigma50"):
        assert (res[col] > 0).all(), col
    assert res.loc[0, "params"] < res.loc[1, "params"]  # a skipped block
    # PSNR falls as the noise grows, for the trained model
    assert res.loc[0, "psnr_sigma15"] > res.loc[0, "psnr_sigma25"] > res.loc[0, "psnr_sigma50"]
    s = json.loads((out / "summary.json").read_text())
    assert s["psnr"] == pytest.approx(res.loc[0, "psnr_sigma25"]) and s["metric_set"] == "sigma25"
    assert s["baseline"]["name"] == "reference"
    # the prediction is the table's sum for this arch, from the table the summary names
    from ernas.latency.predict import predict_ms
    from ernas.latency.table import LatencyTable
    from ernas.space import load_arch

    # one table predicts both networks (one probe, one machine state)
    assert s["latency_tables"]["tiny_bn"] == s["latency_tables"]["reference"]
    table = LatencyTable.load(s["latency_tables"]["tiny_bn"])
    assert s["predicted_ms"] == pytest.approx(predict_ms(table, load_arch(out / "arch.yaml"),
                                                         (1, 3, 32, 32)))
    # the smallest network of {tiny_bn, reference} is tiny_bn itself: anchoring on it would
    # make its prediction its own measurement, so latency.anchor=true draws no line
    assert "being evaluated" in s["table_probes"]["tiny_bn"]["anchor"]["skipped"]
    assert "latency.anchor: not anchored" in r.stdout
    # both models measured in the same interleaved rounds, with the configured session options
    assert s["latency_backend"]["threads"] == 1 and s["latency_backend"]["spinning"] is False
    # the speed-up is paired: the median over rounds of baseline / model in that round
    rounds = s["measured_round_ms"]
    assert len(rounds["reference"]) == len(rounds["tiny_bn"]) >= 1
    assert s["measured_speedup"] == pytest.approx(float(np.median(
        np.array(rounds["reference"]) / np.array(rounds["tiny_bn"]))))
    report = (out / "report.md").read_text()
    assert "| tiny_bn |" in report and "reference (untrained)" in report
    assert "BasicSR" in report and "MACs" in report and "interleaved" in report
    # the printed verdict follows the numbers
    verdict = "faster" if s["measured_speedup"] >= 1 else "slower"
    assert f"x {verdict} than reference (measured)" in r.stdout


def test_folder_and_paired_data(tmp_path):
    import skimage.io

    from ernas.data import load_bundled

    (tmp_path / "clean").mkdir()
    (tmp_path / "noisy").mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(("coffee", "chelsea")):
        img = load_bundled(name, max_side=64)[:48, :48]
        skimage.io.imsave(tmp_path / "clean" / f"im{i}.png", (img * 255).round().astype(np.uint8),
                          check_contrast=False)
        noisy = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
        skimage.io.imsave(tmp_path / "noisy" / f"im{i}.png",
                          (noisy * 255).round().astype(np.uint8), check_contrast=False)
    task = make_task({"name": "denoise", "test_dir": str(tmp_path / "clean"),
                      "eval_sigmas": [15, 50]})
    sets = task.eval_sets()
    assert list(sets) == ["sigma15", "sigma50"] and [it["name"] for it in sets["sigma15"]] == \
        ["im0", "im1"]
    # the same noise draw at every sigma (seeded by image index), not clipped
    a, b = sets["sigma15"][0], sets["sigma50"][0]
    z15, z50 = (a["input"] - a["target"]) / (15 / 255), (b["input"] - b["target"]) / (50 / 255)
    assert torch.allclose(z15, z50, atol=1e-4) and b["input"].min() < 0
    arch = official_arch(**TINY, name="t")
    paired = make_task({"name": "denoise", "test_dir": str(tmp_path / "clean"),
                        "test_noisy_dir": str(tmp_path / "noisy")})
    s = evaluate([ModelEntry("t", arch)], tmp_path / "ev", paired, predict=False, measure=False,
                 progress=False)
    assert s["metric_set"] == "real" and math.isfinite(s["psnr"]) and s["measured_ms"] is None
    assert "noisy/clean pairs" in (tmp_path / "ev" / "report.md").read_text()


def test_pareto_front_on_hand_made_runs(tmp_path):
    #            name  latency  psnr
    points = [("a", 1.0, 28.0), ("b", 2.0, 30.0), ("c", 2.5, 29.0), ("d", 3.0, 31.0),
              ("e", 1.5, 27.0), ("f", 3.0, 30.5), ("g", 0.5, 25.0)]
    arch = official_arch(**TINY)
    dirs = []
    for i, (name, lat, q) in enumerate(points):
        d = tmp_path / name
        d.mkdir()
        arch.save(d / "arch.yaml")
        summary = {"name": name, "metric": "psnr", "measured_ms": lat, "psnr": q,
                   "predicted_ms": lat / 2}  # a measurement always wins over a prediction
        (d / "summary.json").write_text(json.dumps(summary))
        dirs.append(d)
    df = pareto(dirs, tmp_path / "plot" / "pareto.png")
    assert set(df.loc[df["on_front"], "name"]) == {"g", "a", "b", "d"}
    assert (df["latency_kind"] == "measured").all() and list(df["latency_ms"]) == \
        [lat for _, lat, _ in points]
    assert (tmp_path / "plot" / "pareto.png").stat().st_size > 1000
    csv = pd.read_csv(tmp_path / "plot" / "pareto.csv")
    assert list(csv["on_front"]) == list(df["on_front"])
    # a search run without a measurement is drawn with its prediction, apart: it neither joins
    # nor dominates the measured front, however fast it is predicted to be
    h = tmp_path / "h"
    h.mkdir()
    arch.save(h / "arch.yaml")
    (h / "summary.json").write_text(json.dumps({"name": "h", "metric": "psnr",
                                                "predicted_latency_ms": 0.1,
                                                "supernet_val_psnr": 40.0}))
    df2 = pareto(dirs + [h], tmp_path / "plot2" / "pareto.png")
    row = df2[df2["name"] == "h"].iloc[0]
    assert row["latency_kind"] == "predicted" and not row["on_front"]
    assert set(df2.loc[df2["on_front"], "name"]) == {"g", "a", "b", "d"}
    # ties: equal points are both on the front; a point equal in latency but worse is not
    assert list(pareto_front([1, 1, 1], [5, 5, 4])) == [True, True, False]
    # the CLI's Pareto mode
    r = _cli(tmp_path, f"runs=[{','.join(map(str, dirs))}]", f"hydra.run.dir={tmp_path / 'p'}")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(s["front"]) == {"g", "a", "b", "d"} and (tmp_path / "p" / "pareto.png").is_file()


def test_pareto_pools_seeds_of_a_network_and_fronts_each_series(tmp_path):
    hand, searched = official_arch(**TINY, name="hand"), official_arch(**TINY, name="t_searched")
    searched.values[next(iter(searched.values))]["kernel"] = 5  # another architecture
    #        dir        arch      name      latency  psnr
    runs = [("h_s0", hand, "hand", 2.0, 30.0), ("h_s1", hand, "hand", 2.2, 31.0),
            ("slow", hand, "slow", 4.0, 30.2),  # same arch, other name: another network
            ("s_s0", searched, None, 1.0, 29.0), ("s_s1", searched, None, 1.0, 29.4)]
    dirs = []
    for d, arch, name, lat, q in runs:
        (tmp_path / d).mkdir()
        arch.save(tmp_path / d / "arch.yaml")
        s = {"metric": "psnr", "measured_ms": lat, "psnr": q, "arch": arch.name}
        (tmp_path / d / "summary.json").write_text(json.dumps({**s, "name": name} if name else s))
        dirs.append(tmp_path / d)
    df = pareto(dirs, tmp_path / "plot" / "pareto.png")
    net = pd.read_csv(tmp_path / "plot" / "networks.csv").set_index("name")
    assert sorted(net.index) == ["hand", "slow", "t_searched"]
    assert net.loc["hand", "runs"] == 2 and net.loc["hand", "quality"] == pytest.approx(30.5)
    assert net.loc["hand", "latency_ms"] == pytest.approx(2.1)
    assert net.loc["hand", "quality_std"] == pytest.approx(np.std([30.0, 31.0], ddof=1))
    assert net.loc["t_searched", "series"] == "searched" and net.loc["hand", "series"] == \
        "hand-made"
    # fronts per series: the searched network is on its own front; "slow" is dominated by the
    # pooled "hand" (30.5 dB at 2.1 ms) though it beats hand's first seed
    assert net["on_front"].to_dict() == {"hand": True, "slow": False, "t_searched": True}
    assert df.groupby("name")["on_front"].all().to_dict() == net["on_front"].to_dict()


def test_cli_mismatched_checkpoint_is_a_user_error(tmp_path, trained):
    r = _cli(tmp_path, "arch=reference:nafnet_tiny", f"checkpoint={trained / 'best.pt'}",
             f"hydra.run.dir={tmp_path / 'x'}", "measure_latency=false", "predict_latency=false")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not match" in r.stderr and "encoders.1.0" in r.stderr


def test_outputs_that_overflow_are_counted_and_reported():
    from ernas.cli.evaluate import _line
    from ernas.evaluate import quality
    from ernas.task import make_task

    class Overflows(torch.nn.Module):  # NaN/inf where the input is bright, like a model whose
        def forward(self, x):          # activations overflow on some images
            m = float(x.mean())
            return x * (torch.nan if m > 1.5 else torch.inf if m > 0.5 else 1.0)

    g = torch.Generator().manual_seed(0)
    items = [{"input": torch.rand(3, 16, 16, generator=g) * s, "target": torch.rand(3, 16, 16),
              "name": f"im{i}"} for i, s in enumerate((0.5, 3.9, 1.9, 0.5))]
    rows, q = quality(Overflows(), make_task({"name": "denoise"}), {"sigma25": items}, "m")
    assert q["nonfinite_sigma25"] == 2 and math.isnan(q["psnr_sigma25"])
    s = {"name": "m", "metric": "psnr", "psnr": q["psnr_sigma25"], "metric_set": "sigma25",
         "measured_ms": 1.0, "predicted_ms": None, "models": [{"name": "m", **q}]}
    assert "non-finite output (the model overflows) on 2 item(s) of sigma25" in _line(s)
    s["models"][0]["nonfinite_sigma25"] = 0
    assert "non-finite" not in _line(s)
