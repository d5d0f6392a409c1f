"""The segment task's evaluator: dataset-level confusion matrix, per-class IoU, per-image spread
and (optionally) boundary IoU.

Figures of :meth:`SegmentEvaluator.compute` (fractions in [0, 1]):

* ``miou``, ``pixel_accuracy``, ``mean_dice``: one confusion matrix over the whole set
  (:class:`~ernas.tasks.segment.metrics.ConfusionMatrix`);
* ``iou_<class>``: the per-class IoU of that matrix (NaN for a class absent from targets and
  predictions of the whole set);
* ``miou_image_mean`` and ``miou_image_std``: mean and standard deviation (ddof 0) over images of
  each image's own mIoU, the spread behind the dataset-level figure;
* ``boundary_iou`` (when ``boundary_width`` is set): Boundary IoU (Cheng et al., CVPR 2021) per
  class, the intersection over union of the ground-truth and predicted pixels lying within
  ``boundary_width`` pixels of their own region's contour (the region minus its erosion), summed
  over the set, averaged over classes with a non-empty union. It scores outlines, which a
  region-level IoU dominated by large interiors barely sees. Ignored pixels count in neither.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import binary_erosion

from ernas.errors import ErnasError
from ernas.task import Evaluator
from ernas.tasks.segment.metrics import ConfusionMatrix


def metric_names(classes, boundary: bool) -> tuple[str, ...]:
    """Every key :meth:`SegmentEvaluator.compute` returns, headline first."""
    extra = ("boundary_iou",) if boundary else ()
    return ("miou", "pixel_accuracy", "mean_dice", "miou_image_mean", "miou_image_std",
            *extra, *(class_key(c) for c in classes))


def class_key(name: str) -> str:
    """The per-class IoU key of a class name (``iou_traffic_light``)."""
    return "iou_" + str(name).replace(" ", "_")


def _boundary(region: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``region`` within ``width`` pixels of its contour (image borders count as
    outside, so a region touching the border has a contour there)."""
    inner = binary_erosion(region, iterations=width, border_value=0)
    return region & ~inner


def boundary_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int,
                    width: int) -> np.ndarray:
    """``[K, 2]`` boundary intersections and unions of one H x W class-id image pair."""
    valid = target != ignore_index
    out = np.zeros((num_classes, 2), dtype=np.int64)
    for k in range(num_classes):
        gt = _boundary(target == k, width) & valid
        pr = _boundary(pred == k, width) & valid
        out[k] = (gt & pr).sum(), (gt | pr).sum()
    return out


class SegmentEvaluator(Evaluator):
    """Streaming evaluator of the segment task (see the module docstring)."""

    def __init__(self, classes, ignore_index: int, boundary_width: int | None = None,
                 unit_of=None):
        self.classes = tuple(classes)
        self.unit_of = unit_of
        self.num_classes, self.ignore_index = len(self.classes), ignore_index
        self.boundary_width = boundary_width
        self.total = ConfusionMatrix(self.num_classes, ignore_index)
        self._boundary = np.zeros((self.num_classes, 2), dtype=np.int64)
        self._rows: list[dict] = []

    def update(self, pred, target, name=None):
        self.total.update(pred, target)  # checks the logits' channels against the classes
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        for i in range(len(target)):
            one = ConfusionMatrix(self.num_classes, self.ignore_index)
            one.update(pred[i:i + 1], target[i:i + 1])
            r = one.compute()
            row = {"name": name if len(target) == 1 else f"{name}[{i}]",
                   "miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"]}
            if self.unit_of is not None:
                row["unit"] = self.unit_of(row["name"])
            if self.boundary_width:
                counts = boundary_counts(pred[i].cpu().numpy(), target[i].cpu().numpy(),
                                         self.num_classes, self.ignore_index,
                                         self.boundary_width)
                self._boundary += counts
                row["boundary_iou"] = _mean_ratio(counts)
            self._rows.append(row)

    def compute(self):
        r = self.total.compute()
        if not r["num_pixels"]:
            raise ErnasError("segment evaluator: nothing to evaluate (no labelled pixels).")
        per_image = np.array([row["miou"] for row in self._rows], dtype=float)
        per_image = per_image[np.isfinite(per_image)]
        out = {"miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"],
               "mean_dice": r["mean_dice"], "iou_per_class": r["iou_per_class"],
               "miou_image_mean": float(per_image.mean()) if per_image.size else math.nan,
               "miou_image_std": float(per_image.std()) if per_image.size else math.nan}
        if self.boundary_width:
            out["boundary_iou"] = _mean_ratio(self._boundary)
        out.update({class_key(c): v for c, v in zip(self.classes, r["iou_per_class"])})
        return out

    def rows(self):
        return list(self._rows)


def _mean_ratio(counts: np.ndarray) -> float:
    present = counts[:, 1] > 0
    if not present.any():
        return math.nan
    return float((counts[present, 0] / counts[present, 1]).mean())


def confusion_of(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 ignore_index: int) -> np.ndarray:
    """The K x K confusion matrix of one prediction (logits or ids) against its target."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.matrix.numpy().copy()
