import math

import pytest
import torch
import torch.nn.functional as F

from ernas.errors import ErnasError
from ernas.tasks.segment.metrics import ConfusionMatrix, segmentation_loss

IGN = 255

# Two 2 x 3 images, 3 classes. Image 1 has no class 2 in its target (one ignored pixel is
# predicted as 2 and must not count); image 2 has every class.
TARGET_1 = [[0, 0, 1], [1, 1, IGN]]
PRED_1 = [[0, 1, 1], [1, 0, 2]]
TARGET_2 = [[2, 2, 0], [2, 1, 1]]
PRED_2 = [[2, 0, 0], [2, 1, 2]]
MATRIX_1 = [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
MATRIX_2 = [[1, 0, 0], [0, 1, 1], [1, 0, 2]]
# Summed: TP = (2, 3, 2), FP = (2, 1, 1), FN = (1, 2, 1).
IOU = [2 / 5, 3 / 6, 2 / 4]
DICE = [4 / 7, 6 / 9, 4 / 6]


def _t(rows):
    return torch.tensor([rows])


def _matrix(target, pred, k=3):
    cm = ConfusionMatrix(k)
    cm.update(_t(pred), _t(target))
    return cm


def test_confusion_matrix_by_hand():
    assert _matrix(TARGET_1, PRED_1).matrix.tolist() == MATRIX_1
    assert _matrix(TARGET_2, PRED_2).matrix.tolist() == MATRIX_2
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([PRED_1, PRED_2]), torch.tensor([TARGET_1, TARGET_2]))
    assert cm.matrix.tolist() == [[2, 1, 0], [1, 3, 1], [1, 0, 2]]
    out = cm.compute()
    assert out["num_pixels"] == 11
    assert out["iou_per_class"] == pytest.approx(IOU)
    assert out["miou"] == pytest.approx(sum(IOU) / 3)
    assert out["mean_dice"] == pytest.approx(sum(DICE) / 3)
    assert out["pixel_accuracy"] == pytest.approx(7 / 11)


def test_dataset_miou_is_not_the_mean_of_per_image_ious():
    cm = ConfusionMatrix(3)
    cm.update(_t(PRED_1), _t(TARGET_1))
    cm.update(_t(PRED_2), _t(TARGET_2))
    per_image = [_matrix(TARGET_1, PRED_1).compute(), _matrix(TARGET_2, PRED_2).compute()]
    # image 1: class 2 never appears, so its IoU is NaN and left out of that image's mean
    assert math.isnan(per_image[0]["iou_per_class"][2])
    assert per_image[0]["miou"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert per_image[1]["miou"] == pytest.approx(0.5)
    mean_of_images = (per_image[0]["miou"] + per_image[1]["miou"]) / 2
    assert cm.compute()["miou"] == pytest.approx(sum(IOU) / 3)
    assert abs(cm.compute()["miou"] - mean_of_images) > 5e-3


def test_logits_absent_classes_ignore_and_reset():
    k = 4  # class 3 never appears anywhere
    logits = F.one_hot(torch.tensor([PRED_2]), k).permute(0, 3, 1, 2).float() * 5.0
    by_logits, by_ids = ConfusionMatrix(k), ConfusionMatrix(k)
    by_logits.update(logits, _t(TARGET_2))
    by_ids.update(_t(PRED_2), _t(TARGET_2))
    assert torch.equal(by_logits.matrix, by_ids.matrix)
    out = by_logits.compute()
    assert math.isnan(out["iou_per_class"][3])
    assert out["miou"] == pytest.approx(0.5)
    for value in (out["miou"], out["pixel_accuracy"], out["mean_dice"]):
        assert 0.0 <= value <= 1.0
    ignored = ConfusionMatrix(k)
    ignored.update(_t([[3, 3, 3], [0, 0, 0]]), _t([[IGN, IGN, IGN], [0, 0, 0]]))
    assert ignored.compute()["num_pixels"] == 3 and ignored.compute()["miou"] == 1.0
    ignored.reset()
    assert ignored.compute()["num_pixels"] == 0 and math.isnan(ignored.compute()["miou"])


def test_confusion_matrix_rejects_bad_shapes_and_ids():
    cm = ConfusionMatrix(3)
    with pytest.raises(ErnasError, match="channels"):
        cm.update(torch.zeros(1, 4, 2, 3), _t(TARGET_2))
    with pytest.raises(ErnasError, match="shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), _t(TARGET_2))
    with pytest.raises(ErnasError, match="Target"):
        cm.update(_t(PRED_2), _t([[0, 7, 0], [0, 0, 0]]))


# --------------------------------------------------------------------------- loss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    target[:, 0, :2] = IGN
    return torch.randn(2, 3, 5, 6, generator=g), target


def test_loss_decreases_toward_the_target():
    noise, target = _batch()
    onehot = F.one_hot(torch.where(target == IGN, 0, target), 3).permute(0, 3, 1, 2).float()
    losses = [float(segmentation_loss(noise + step * onehot, target)) for step in range(0, 12, 2)]
    assert all(math.isfinite(v) for v in losses)
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.05


def test_loss_ignores_ignored_pixels():
    logits, target = _batch(1)
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, target)
    loss.backward()
    assert logits.grad[:, :, 0, :2].abs().max() == 0
    changed = logits.detach().clone()
    changed[:, :, 0, :2] = torch.randn(2, 3, 2) * 100
    assert segmentation_loss(changed, target).item() == pytest.approx(loss.item(), abs=1e-6)
    all_ignored = torch.full_like(target, IGN)
    assert segmentation_loss(logits.detach(), all_ignored).item() == 0.0


def test_loss_terms_match_their_formulas():
    logits, target = _batch(2)
    ce = segmentation_loss(logits, target, ce_weight=1.0, dice_weight=0.0)
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits, target, ignore_index=IGN)))
    dice = float(segmentation_loss(logits, target, ce_weight=0.0, dice_weight=1.0, eps=1.0))
    valid = target != IGN
    probs = logits.softmax(1).permute(0, 2, 3, 1)[valid]  # P x K over non-ignored pixels
    onehot = F.one_hot(target[valid], 3).float()
    scores = [(2 * (probs[:, k] * onehot[:, k]).sum() + 1) / (probs[:, k].sum()
                                                               + onehot[:, k].sum() + 1)
              for k in range(3)]
    assert dice == pytest.approx(1 - float(sum(scores)) / 3, abs=1e-6)
    assert 0.0 < dice < 1.0
