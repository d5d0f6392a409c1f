"""Semantic-segmentation metrics (confusion matrix, IoU, Dice) and training loss; torch only.

Metric convention (Pascal VOC / Cityscapes benchmarks): one K x K confusion matrix ``M`` is
accumulated over the whole evaluation set, ``M[t, p]`` = number of pixels of true class t predicted
as p, pixels whose target is ``ignore_index`` skipped. Per class k, with ``TP = M[k, k]``,
``FP = sum_t M[t, k] - TP`` and ``FN = sum_p M[k, p] - TP``:

* ``IoU_k = TP / (TP + FP + FN)`` and ``Dice_k = 2 TP / (2 TP + FP + FN)``;
* ``miou`` and ``mean_dice`` average over the classes with a non-zero union ``TP + FP + FN`` (a
  class absent from both targets and predictions of the whole set is left out, its IoU is NaN);
* ``pixel_accuracy = sum_k TP_k / sum M``.

These are dataset-level figures, not means of per-image scores: a class missing from one image
does not count as IoU 0 or 1 there. Every figure is a fraction in [0, 1] (NaN when nothing was
counted).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ernas.errors import ErnasError


class ConfusionMatrix:
    """Accumulates a ``num_classes`` x ``num_classes`` confusion matrix (rows: target, columns:
    prediction) over batches; see the module docstring for the figures of :meth:`compute`."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ErnasError(f"num_classes={num_classes!r} is not valid: give the number of "
                             f"classes as a positive integer.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` logits N x K x H x W (argmax over K) or class ids N x H x W,
        ``target`` class ids N x H x W."""
        k = self.num_classes
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != k:
                raise ErnasError(f"Logits have {pred.shape[1]} channels but the confusion matrix "
                                 f"has {k} classes; the model must output one channel per class.")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ErnasError(f"Prediction shape {tuple(pred.shape)} does not match target shape "
                             f"{tuple(target.shape)}; expected N x K x H x W logits or N x H x W "
                             f"class ids with an N x H x W target.")
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long()
        for what, ids in (("Target", t), ("Prediction", p)):
            if ids.numel() and (ids.min() < 0 or ids.max() >= k):
                raise ErnasError(f"{what} holds class ids outside 0..{k - 1} (other than the "
                                 f"ignore value {self.ignore_index}): min {int(ids.min())}, max "
                                 f"{int(ids.max())}. Check num_classes.")
        counts = torch.bincount(t * k + p, minlength=k * k).reshape(k, k)
        self.matrix += counts.cpu()

    def compute(self) -> dict:
        """``miou``, ``iou_per_class`` (list, NaN for absent classes), ``pixel_accuracy``,
        ``mean_dice`` (floats in [0, 1]) and ``num_pixels`` (int, non-ignored pixels)."""
        m = self.matrix.double()
        tp = m.diagonal()
        fp, fn = m.sum(dim=0) - tp, m.sum(dim=1) - tp
        union = tp + fp + fn
        present = union > 0
        nan = torch.full_like(tp, math.nan)
        iou = torch.where(present, tp / union.clamp(min=1), nan)
        dice = torch.where(present, 2 * tp / (union + tp).clamp(min=1), nan)
        total = m.sum()
        return {
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "iou_per_class": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_dice": float(dice[present].mean()) if present.any() else math.nan,
            "num_pixels": int(total),
        }


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 1.0,
                      dice_weight: float = 1.0, ignore_index: int = 255, eps: float = 1.0
                      ) -> torch.Tensor:
    """``ce_weight * CE + dice_weight * (1 - mean_k (2 S_py + eps) / (S_p + S_y + eps))``.

    ``logits`` N x K x H x W, ``target`` N x H x W class ids. CE is the cross-entropy averaged
    over non-ignored pixels. The soft Dice term uses ``p = softmax(logits)`` and the one-hot
    target ``y``, with sums over the non-ignored pixels of the whole batch: ``S_py = sum p_k y_k``,
    ``S_p = sum p_k``, ``S_y = sum y_k``, averaged over all K classes; ``eps`` (in pixels) keeps
    classes absent from both near a score of 1. Pixels whose target is ``ignore_index`` do not
    affect the loss; a batch without any valid pixel gives 0 (with gradients).
    """
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    probs = torch.where(valid.unsqueeze(1), logits.float().softmax(dim=1), 0.0)
    onehot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot * valid.unsqueeze(1)
    dims = (0, 2, 3)
    score = (2 * (probs * onehot).sum(dims) + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return ce_weight * ce + dice_weight * (1.0 - score.mean())
