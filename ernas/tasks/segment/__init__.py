"""Task ``segment``: semantic segmentation, judged by mIoU over the whole evaluation set.

Data (``data``): ``brain`` (embedded default, real: grey/white-matter segmentation of MNI152
slices, 1 channel, 3 classes; ``brain``), ``shapes`` (embedded labelled synthetic RGB set, 5
classes; ``shapes``), ``voc`` (Pascal VOC layout under ``root``, 21 classes), ``cityscapes``
(Cityscapes layout under ``root``, 19 train ids) or ``folder`` (``root/<split>/images`` and
``root/<split>/masks`` matched by file name, ``num_classes`` given). VOC and Cityscapes have no
public test labels, so their ``test`` split is their ``val`` split (the usual report). Test items
are never used for search or retraining.

Loss: ``ce_weight``·cross-entropy + ``dice_weight``·soft Dice (``metrics.segmentation_loss``),
pixels of ``ignore_index`` (255) skipped. Metrics (``metrics.ConfusionMatrix``, the
VOC/Cityscapes convention): one confusion matrix accumulated over the whole set; ``miou``
(headline), per-class IoU, ``pixel_accuracy`` and ``mean_dice``, fractions in [0, 1]. Evaluation
runs on whole images (the family's model pads to its multiple and crops back). Output
distillation: KL(softmax(t/T) ‖ softmax(s/T))·T² with ``distill_temperature`` T.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from ernas.errors import ErnasError
from ernas.task import Evaluator, Task
from ernas.tasks.segment.data import (CITYSCAPES_CLASSES, IGNORE_INDEX, VOC_CLASSES,
                                      SegmentationDataset, cityscapes_samples,
                                      segmentation_folders, voc_samples)
from ernas.tasks.segment.metrics import ConfusionMatrix, segmentation_loss

DATA = ("brain", "shapes", "voc", "cityscapes", "folder")
SPLITS = ("train", "val", "test")


class SegmentEvaluator(Evaluator):
    """Dataset-level confusion matrix; per-image pixel accuracy and mIoU as rows."""

    def __init__(self, num_classes: int, ignore_index: int):
        self.total = ConfusionMatrix(num_classes, ignore_index)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._rows: list[dict] = []

    def update(self, pred, target, name=None):
        self.total.update(pred, target)
        for i in range(len(target)):
            one = ConfusionMatrix(self.num_classes, self.ignore_index)
            one.update(pred[i:i + 1], target[i:i + 1])
            r = one.compute()
            self._rows.append({"name": name if len(target) == 1 else f"{name}[{i}]",
                               "miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"]})

    def compute(self):
        r = self.total.compute()
        if not r["num_pixels"]:
            raise ErnasError("segment evaluator: nothing to evaluate (no labelled pixels).")
        return {"miou": r["miou"], "pixel_accuracy": r["pixel_accuracy"],
                "mean_dice": r["mean_dice"], "iou_per_class": r["iou_per_class"]}

    def rows(self):
        return list(self._rows)


@dataclass
class SegmentTask(Task):
    """Semantic segmentation (see the module docstring); the fields are the ``task`` config."""

    name = "segment"
    metric = "miou"
    metric_label = "mIoU"
    metrics = ("miou", "pixel_accuracy", "mean_dice")

    data: str = "brain"
    root: str | None = None          # voc / cityscapes / folder
    num_classes: int | None = None   # folder (others: fixed by the data)
    color: bool = True               # folder: RGB (true) or grey input
    downsample: int = 2              # brain: in-plane downsampling of the 192x160 slices
    max_side: int | None = None      # voc / cityscapes / folder: downscale to this longest side
    data_seed: int = 0               # shapes: which synthetic images
    ignore_index: int = IGNORE_INDEX
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    distill_temperature: float = 2.0

    def __post_init__(self):
        if self.data not in DATA:
            raise ErnasError(f"task.data={self.data!r} is not known; use one of "
                             f"{', '.join(DATA)}.")
        if self.data in ("voc", "cityscapes", "folder") and not self.root:
            raise ErnasError(f"task.data={self.data} needs task.root=<dataset folder>.")
        if self.data == "folder" and not (isinstance(self.num_classes, int)
                                          and self.num_classes > 1):
            raise ErnasError("task.data=folder needs task.num_classes=<number of classes, >= 2> "
                             "(mask values are class ids 0..num_classes-1, 255 = ignore).")
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            raise ErnasError(f"task.ce_weight={self.ce_weight} and task.dice_weight="
                             f"{self.dice_weight} must be >= 0 and not both 0.")
        if not self.distill_temperature > 0:
            raise ErnasError(f"task.distill_temperature={self.distill_temperature} must be > 0.")
        self._samples: dict[str, list] = {}

    # ------------------------------------------------------------------ data
    @property
    def classes(self) -> tuple[str, ...]:
        from ernas.tasks.segment.brain import BRAIN_CLASSES
        from ernas.tasks.segment.shapes import SHAPE_CLASSES

        fixed = {"brain": BRAIN_CLASSES, "shapes": SHAPE_CLASSES, "voc": VOC_CLASSES,
                 "cityscapes": CITYSCAPES_CLASSES}
        if self.data in fixed:
            return tuple(fixed[self.data])
        return tuple(f"class_{k}" for k in range(self.num_classes))

    @property
    def in_channels(self) -> int:
        return 1 if self.data == "brain" or (self.data == "folder" and not self.color) else 3

    def samples(self, split: str) -> list:
        """``[(name, H x W x C image, H x W mask)]`` of a split (read once, validated)."""
        if split not in SPLITS:
            raise ErnasError(f"segment: split {split!r} is not one of {', '.join(SPLITS)}.")
        if split not in self._samples:
            self._samples[split] = self._read(split)
        return self._samples[split]

    def _read(self, split: str) -> list:
        if self.data == "brain":
            from ernas.tasks.segment.brain import brain_slices

            return brain_slices(split, self.downsample)
        if self.data == "shapes":
            from ernas.tasks.segment.shapes import shape_samples

            return shape_samples(split, self.data_seed)
        labelled = "val" if split == "test" else split  # no public test labels
        if self.data == "voc":
            return voc_samples(self.root, labelled, self.max_side)
        if self.data == "cityscapes":
            return cityscapes_samples(self.root, labelled, self.max_side)
        base = Path(self.root) / split
        return segmentation_folders(base / "images", base / "masks", self.num_classes,
                                    self.color, self.max_side)

    def dataset(self, split, crop=None, seed=0, random=False):
        return SegmentationDataset(self.samples(split), len(self.classes), crop, train=random,
                                   seed=seed)

    def eval_labels(self):
        return ["test"]

    def eval_sets(self, seed=0):
        return {"test": self.dataset("test")}

    def describe(self):
        where = {"brain": "MNI152 brain slices (nilearn's template; grey/white matter)",
                 "shapes": "the embedded synthetic shapes set", "voc": f"Pascal VOC at {self.root}",
                 "cityscapes": f"Cityscapes at {self.root}",
                 "folder": f"images/masks folders under {self.root}"}[self.data]
        return (f"{where}, test split, whole images; mIoU, pixel accuracy and mean Dice from one "
                f"confusion matrix over the whole set ({len(self.classes)} classes: "
                f"{', '.join(self.classes)}; label {self.ignore_index} ignored)")

    # ------------------------------------------------------------------ learning and judging
    def loss(self, pred, target):
        return segmentation_loss(pred.float(), target, self.ce_weight, self.dice_weight,
                                 self.ignore_index)

    def distill_loss(self, pred, teacher_pred):
        """KL(softmax(t/T) ‖ softmax(s/T))·T², averaged over pixels."""
        t = self.distill_temperature
        log_s = F.log_softmax(pred.float() / t, dim=1)
        log_t = F.log_softmax(teacher_pred.float() / t, dim=1)
        return (log_t.exp() * (log_t - log_s)).sum(1).mean() * t * t

    def evaluator(self):
        return SegmentEvaluator(len(self.classes), self.ignore_index)

    def batch_metric(self, pred, target):
        cm = ConfusionMatrix(len(self.classes), self.ignore_index)
        cm.update(pred.detach().float().cpu(), target.detach().cpu())
        v = cm.compute()["miou"]
        return float(v) if np.isfinite(v) else 0.0

    def check_arch(self, arch):
        cin, cout = arch.spec.io_channels(arch.geometry)
        want = (self.in_channels, len(self.classes))
        if (cin, cout) != want:
            raise ErnasError(f"architecture {arch.name!r} ({arch.source}) takes {cin} channels "
                             f"and gives {cout}, but task segment with data={self.data} needs "
                             f"{want[0]} in and {want[1]} out (one per class); set the "
                             f"geometry's in_channels/num_classes accordingly.")


TASK = SegmentTask
