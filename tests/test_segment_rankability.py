"""``benchmarks/seg_rankability.py``: trivial baselines, slab bootstrap, the verdict, and a real
run of both checks on a tiny generated set."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "seg_rankability.py"
sys.path.insert(0, str(SCRIPT.parent))

from seg_rankability import (  # noqa: E402
    bootstrap_ci,
    class_intensity_order,
    fit_lookup,
    gmm_predict,
    group_of,
    judge,
    miou_of,
)


def _banded(seed, levels=(0.1, 0.5, 0.9)):
    """A 3-class image whose label is coded by intensity: band k at grey level levels[k]."""
    rng = np.random.default_rng(seed)
    mask = np.repeat(rng.integers(0, 3, (8, 1)), 16, axis=1).repeat(2, axis=0)
    image = np.asarray(levels, dtype=np.float32)[mask][..., None] + 0.01 * rng.random((16, 16, 1))
    return f"im{seed}", image.astype(np.float32), mask


def test_lookup_solves_intensity_coded_labels_only():
    """Fails if the lookup maps bins to the wrong labels (it must solve intensity-coded data) or
    leaks labels another way (it must fail when the coding changes)."""
    train = [_banded(s) for s in range(4)]
    table = fit_lookup(train, 3)
    for _, image, mask in [_banded(9)]:
        np.testing.assert_array_equal(table[np.clip((image[..., 0] * 255).round(), 0, 255)
                                            .astype(int)], mask)
    swapped = [_banded(9, levels=(0.9, 0.5, 0.1))]
    pred = table[np.clip((swapped[0][1][..., 0] * 255).round(), 0, 255).astype(int)]
    assert (pred == swapped[0][2]).mean() < 0.8


def test_gmm_gives_clusters_the_labels_in_intensity_order():
    """Fails if components are not matched to labels by the rank of their means."""
    train = [_banded(s) for s in range(4)]
    order = class_intensity_order(train, 3)
    assert list(order) == [0, 1, 2]
    _, image, mask = _banded(7)
    np.testing.assert_array_equal(gmm_predict(image, order), mask)
    _, image, mask = _banded(7, levels=(0.9, 0.5, 0.1))  # reversed coding: classes 0, 2 swap
    assert (gmm_predict(image, order) == np.array([2, 1, 0])[mask]).all()


def test_bootstrap_resamples_slabs_not_slices():
    """Fails if slices of one slab are resampled independently (the CI would not be the range
    of slab combinations) or if the slab of a name is misread."""
    assert group_of("sb_test_s05_z039_v2", "synthseg_brain") == "s05"
    assert group_of("t1_s05_z039", "synthseg_brain") == "s05"
    assert group_of("digits_test_003", "digits") == "digits_test_003"
    good, bad = np.diag([5, 5]), np.array([[5, 5], [5, 0]])
    mats = np.stack([good, good, bad, bad])
    lo, hi = bootstrap_ci(mats, ["s01", "s01", "s02", "s02"], reps=400)
    assert lo == pytest.approx(miou_of(bad * 4)) and hi == pytest.approx(miou_of(good * 4))
    lo, hi = bootstrap_ci(np.stack([good, good]), ["s01", "s02"], reps=50)
    assert lo == hi == 1.0


def _row(model, miou, lo, hi):
    return {"model": model, "miou_test": miou, "ci_lo": lo, "ci_hi": hi}


def test_verdict_needs_both_checks():
    """Fails if a baseline within 10 points, or overlapping capacity CIs, still 'can rank'."""
    nets = [_row("unet_tiny", .5, .45, .55), _row("unet_small", .7, .65, .75),
            _row("unet_classic", .9, .85, .95)]
    trivial = [_row("lookup", .3, .2, .4), _row("gmm", .2, .1, .3), _row("conv1x1", .79, .7, .8)]
    ok = judge(trivial + nets)
    assert ok["verdict"] == "can rank" and ok["gaps"]["conv1x1"] == pytest.approx(0.11)
    close = judge(trivial[:2] + [_row("conv1x1", .81, .7, .9)] + nets)
    assert close["verdict"] == "cannot rank" and close["trivial_check"] is False
    overlap = judge(trivial + [nets[0], _row("unet_small", .7, .5, .86), nets[2]])
    assert overlap["verdict"] == "cannot rank" and overlap["capacity_check"] is False
    assert judge(trivial)["verdict"] == "incomplete"


def test_both_checks_run_on_a_tiny_digit_set(tmp_path):
    """A real run (few steps): fails if a baseline or a network is missing, if the gaps are not
    classic minus baseline, or if the outputs are not written."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", "digits", "--limit", "4",
                        "--steps", "2", "--batch-size", "2", "--crop", "32", "--boots", "20",
                        "--out", str(tmp_path / "rank")], capture_output=True, text=True,
                       cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    v = json.loads((tmp_path / "rank" / "verdict.json").read_text())
    by = {row["model"]: row for row in v["rows"]}
    assert list(by) == ["lookup", "gmm", "conv1x1", "unet_tiny", "unet_small", "unet_classic"]
    for row in v["rows"]:
        assert 0 <= row["ci_lo"] <= row["miou_test"] <= row["ci_hi"] <= 1
    for m in ("lookup", "gmm", "conv1x1"):
        assert v["gaps"][m] == pytest.approx(by["unet_classic"]["miou_test"] - by[m]["miou_test"])
    assert v["verdict"] in ("can rank", "cannot rank") and v["bootstrap_unit"] == "image"
    pair = v["paired_differences"]["unet_classic - unet_small"]
    assert pair["diff"] == pytest.approx(by["unet_classic"]["miou_test"]
                                         - by["unet_small"]["miou_test"])
    assert "Rankability of `digits`" in (tmp_path / "rank" / "report.md").read_text()
    assert (tmp_path / "rank" / "unet_classic" / "best.pt").is_file()


def test_bad_arguments_are_refused(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--steps" in r.stderr


def test_paired_difference_resamples_both_models_together():
    """Fails if the paired bootstrap resamples the two models independently (a model compared
    with itself would then spread around 0) or gets the difference wrong."""
    from seg_rankability import paired_ci

    rng = np.random.default_rng(0)
    hard = [np.array([[10, 0], [0, 10]]) * k for k in rng.integers(1, 5, 8)]
    a = np.stack([np.array([[m[0, 0], 0], [2, m[1, 1] - 2]]) for m in hard])   # slightly worse
    b = np.stack([np.array([[m[0, 0], 0], [3 * (i % 3), m[1, 1] - 3 * (i % 3)]])
                  for i, m in enumerate(hard)])                                 # varies more
    groups = [f"u{i}" for i in range(8)]
    diff, lo, hi = paired_ci(a, b, groups, reps=300)
    assert diff == pytest.approx(miou_of(a.sum(0)) - miou_of(b.sum(0)))
    assert lo <= diff <= hi
    same = paired_ci(a, a, groups, reps=50)
    assert same == (0.0, 0.0, 0.0)
