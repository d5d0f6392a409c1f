"""The shape benchmarks (digit scenes, SynthSeg-style brain) and the evaluator's added figures
(per-class IoU, per-image spread, boundary IoU), also in evaluate's results.csv and report.md."""
import numpy as np
import pandas as pd
import pytest
import torch

import ernas
from ernas.errors import ErnasError
from ernas.evaluate import ModelEntry, evaluate
from ernas.paths import SEARCH_SPACES
from ernas.task import make_task
from ernas.tasks.segment.digits import DIGIT_CLASSES, DIGIT_SAMPLE_RANGES, digit_scenes
from ernas.tasks.segment.evaluator import SegmentEvaluator, boundary_counts
from ernas.tasks.segment.synthbrain import SYNTH_SLABS, real_slices, slab_of, \
    synth_brain_slices


def test_digit_splits_use_disjoint_drawings_and_are_deterministic():
    """Fails if a digit drawing can appear in two splits or scenes depend on anything but the
    seed."""
    ranges = [set(r) for r in DIGIT_SAMPLE_RANGES.values()]
    assert sum(map(len, ranges)) == len(set().union(*ranges)) == 1797
    a, b = digit_scenes("val", seed=1)[:3], digit_scenes("val", seed=1)[:3]
    for (na, ia, ma), (nb, ib, mb) in zip(a, b):
        assert na == nb and np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert not np.array_equal(a[0][1], digit_scenes("val", seed=2)[0][1])
    name, image, mask = a[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.float32 and mask.max() < 11
    assert len(DIGIT_CLASSES) == 11 and 0.02 < (mask > 0).mean() < 0.4


def test_digit_class_is_not_coded_by_intensity():
    """Fails if a digit's colour followed its class (then a pixel lookup would solve it)."""
    scenes = digit_scenes("test")
    means = {}
    for _, image, mask in scenes:
        for k in np.unique(mask[mask > 0]):
            means.setdefault(int(k), []).append(image[mask == k].mean())
    spread = [np.std(v) for v in means.values() if len(v) > 5]
    assert len(spread) == 10 and min(spread) > 0.1


def test_synthetic_brain_slabs_and_seeds_are_disjoint():
    """Fails if a slice is in two splits, slabs of different splits touch, or the test set lacks
    its real-T1 companion."""
    z = {s: [z for slab in slabs for z in slab] for s, slabs in SYNTH_SLABS.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert min(abs(i - j) for i in z[a] for j in z[b]) >= 3
    test = synth_brain_slices("test")
    names = [n for n, _, _ in test]
    assert len(set(names)) == len(names) == 3 * len(z["test"])
    real = real_slices("test")
    assert {slab_of(n) for n in names} == {slab_of(n) for n, _, _ in real}
    assert len({slab_of(n) for n in names}) == len(SYNTH_SLABS["test"])
    task = make_task({"name": "segment", "data": "synthseg_brain"})
    assert task.eval_labels() == ["test", "test_real_t1"]
    assert len(task.eval_sets()["test_real_t1"]) == len(z["test"])


def test_synthetic_brain_intensities_are_random_per_class():
    """Fails if a tissue keeps one intensity order across samples (a lookup would solve it)."""
    orders = set()
    for _, image, labels in synth_brain_slices("val"):
        means = [image[..., 0][labels == k].mean() for k in range(3)]
        orders.add(tuple(np.argsort(means)))
    assert len(orders) >= 4


def test_boundary_iou_scores_outlines():
    """Fails if boundary IoU is not 1 for a perfect prediction or does not drop for a shifted
    outline more than the region IoU does."""
    target = np.zeros((20, 20), dtype=np.int64)
    target[4:16, 4:16] = 1
    assert (boundary_counts(target, target, 2, 255, 2)[:, 0]
            == boundary_counts(target, target, 2, 255, 2)[:, 1]).all()
    shifted = np.roll(target, 2, axis=1)
    counts = boundary_counts(shifted, target, 2, 255, 2)
    b_iou = counts[1, 0] / counts[1, 1]
    region = ((shifted == 1) & (target == 1)).sum() / ((shifted == 1) | (target == 1)).sum()
    assert b_iou < region - 0.2


def test_evaluator_per_class_and_per_image_spread_by_hand():
    """Fails if per-class IoU keys, the per-image mean or the spread are computed wrongly."""
    ev = SegmentEvaluator(("bg", "traffic light"), 255, boundary_width=1)
    t = torch.tensor([[[0, 0], [1, 1]]])
    ev.update(t.clone(), t, "a")                      # per-image mIoU 1
    ev.update(torch.tensor([[[0, 0], [0, 1]]]), t, "b")  # IoU bg 2/3, fg 1/2
    r = ev.compute()
    assert r["miou_image_mean"] == pytest.approx((1 + (2 / 3 + 1 / 2) / 2) / 2)
    assert r["miou_image_std"] == pytest.approx((1 - (2 / 3 + 1 / 2) / 2) / 2)
    assert r["iou_bg"] == pytest.approx(4 / 5) and r["iou_traffic_light"] == pytest.approx(3 / 4)
    assert 0 < r["boundary_iou"] <= 1 and "boundary_iou" in ev.rows()[0]
    with pytest.raises(ErnasError, match="channels"):  # logits of the wrong class count
        ev.update(torch.zeros(1, 1, 2, 2), t, "c")


def test_per_class_iou_reaches_results_and_report(tmp_path):
    """Fails if evaluate drops per-class IoU or the per-image spread from its outputs."""
    arch = ernas.load_arch(SEARCH_SPACES / "archs" / "unet_demo_classic.yaml")
    task = make_task({"name": "segment", "data": "brain", "downsample": 8})
    evaluate([ModelEntry("classic", arch)], tmp_path, task, predict=False, measure=False,
             progress=False, input_shape=(1, 1, 24, 20))
    results = pd.read_csv(tmp_path / "results.csv")
    for col in ("iou_background_test", "iou_grey_matter_test", "iou_white_matter_test",
                "miou_image_mean_test", "miou_image_std_test", "boundary_iou_test"):
        assert col in results.columns
    report = (tmp_path / "report.md").read_text()
    assert "iou_white_matter_test" in report and "miou_image_std_test" in report
