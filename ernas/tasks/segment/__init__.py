"""Task ``segment``: semantic segmentation, judged by mIoU over the whole evaluation set.

Data (``data``): ``synthseg_brain`` (the default; embedded, SynthSeg-style images generated
from the MNI152 tissue label maps with random per-class intensities, bias, noise, gamma and
deformation; its test set is reported beside the real T1 slices of the test slabs,
``test_real_t1``; ``synthbrain``), ``brain`` (embedded,
real: grey/white-matter segmentation of MNI152 slices, 1 channel, 3 classes; ``brain``; an
intensity lookup solves it, so it cannot rank networks), ``digits`` (embedded:
scikit-learn's handwritten digits on photos, 11 classes that only shape tells apart;
``digits``), ``shapes`` (embedded labelled synthetic RGB set, 5 classes; ``shapes``), ``voc``
(Pascal VOC layout under ``root``, 21 classes), ``cityscapes`` (Cityscapes layout under
``root``, 19 train ids) or ``folder`` (``root/<split>/images`` and ``root/<split>/masks``
matched by file name, ``num_classes`` given, mask encoding declared with ``mask_values`` or
``binary``: ``masks``). VOC and Cityscapes have no public test labels: their official ``val``
split is the test set only, and the validation split (model selection) is ``val_fraction`` of
the official ``train`` split drawn with ``split_seed`` (``official``); the lists are written
into the run directory (``splits.json``). With ``sbd_root`` (VOC only) the training split adds
the SBD images that are in neither VOC val nor the carved validation (an image also in VOC train
is taken once, with VOC's mask); the counts go into ``splits.json`` (``sbd``). Test items are
never used for search or retraining.

Loss: ``ce_weight``·cross-entropy + ``dice_weight``·soft Dice (``metrics.segmentation_loss``),
pixels of ``ignore_index`` (255) skipped. Metrics (``evaluator.SegmentEvaluator``): one
confusion matrix accumulated over the whole set, ``miou`` (headline), per-class IoU
(``iou_<class>``), ``pixel_accuracy``, ``mean_dice``, the mean and spread of per-image mIoU, and
for the brain data boundary IoU; fractions in [0, 1]. Evaluation runs on whole images (the
family's model pads to its multiple and crops back). Output distillation:
KL(softmax(t/T) ‖ softmax(s/T))·T² with ``distill_temperature`` T.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.task import Task
from ernas.tasks.segment.data import (IGNORE_INDEX, PairFiles, SegmentationDataset, scan_masks,
                                      segmentation_folder_files)
from ernas.tasks.segment.evaluator import SegmentEvaluator, metric_names
from ernas.tasks.segment.masks import declared_values, decode_folder_mask
from ernas.tasks.segment.metrics import ConfusionMatrix, segmentation_loss
from ernas.tasks.segment.official import (CITYSCAPES_CLASSES, VOC_CLASSES, add_extra_training,
                                          cityscapes_files, official_split, sbd_files, voc_files)

log = logging.getLogger(__name__)

DATA = ("brain", "synthseg_brain", "digits", "shapes", "voc", "cityscapes", "folder")
SPLITS = ("train", "val", "test")
BOUNDARY_WIDTH = 2  # pixels of the contour band of boundary IoU (brain data)


@dataclass
class SegmentTask(Task):
    """Semantic segmentation (see the module docstring); the fields are the ``task`` config."""

    name = "segment"
    metric = "miou"
    metric_label = "mIoU"

    data: str = "synthseg_brain"
    root: str | None = None          # voc / cityscapes / folder
    num_classes: int | None = None   # folder (others: fixed by the data)
    color: bool = True               # folder: RGB (true) or grey input
    downsample: int = 2              # brain: in-plane downsampling of the 192x160 slices
    max_side: int | None = None      # voc / cityscapes / folder: downscale to this longest side
    data_seed: int = 0               # shapes / digits / synthseg_brain: which synthetic images
    mask_values: list | None = None  # folder: mask value of each class, in class order
    binary: bool = False             # folder: 0/255 masks (mask_values [0, 255], 2 classes)
    val_fraction: float = 0.1        # voc / cityscapes: share of official train held out as val
    split_seed: int = 0              # voc / cityscapes: which images are held out
    sbd_root: str | None = None      # voc: SBD folder, extra training images
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
        self._values = declared_values(self.mask_values, self.binary, self.num_classes,
                                       self.ignore_index, self.data)
        if self._values is not None and self.num_classes is None:
            self.num_classes = len(self._values)
        if self.data == "folder" and not (isinstance(self.num_classes, int)
                                          and self.num_classes > 1):
            raise ErnasError("task.data=folder needs task.num_classes=<number of classes, >= 2> "
                             "(mask values are class ids 0..num_classes-1, 255 = ignore; declare "
                             "other encodings with task.mask_values or task.binary=true).")
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            raise ErnasError(f"task.ce_weight={self.ce_weight} and task.dice_weight="
                             f"{self.dice_weight} must be >= 0 and not both 0.")
        if self.sbd_root is not None and (not isinstance(self.sbd_root, str)
                                          or not self.sbd_root.strip()):
            raise ErnasError(f"task.sbd_root={self.sbd_root!r} is not a folder path: give the SBD "
                             f"folder (the one holding dataset/img, dataset/cls) or null.")
        if self.sbd_root is not None and self.data != "voc":
            raise ErnasError(f"task.sbd_root={self.sbd_root!r} adds SBD training images to Pascal "
                             f"VOC (task.data=voc); with task.data={self.data} it has no use. Set "
                             f"task.sbd_root=null, or task.data=voc with task.root=<VOC folder>.")
        if self.data in ("voc", "cityscapes") and not 0 < self.val_fraction < 1:
            raise ErnasError(f"task.val_fraction={self.val_fraction!r} must be in (0, 1): the "
                             f"share of the official train split held out for validation.")
        if not self.distill_temperature > 0:
            raise ErnasError(f"task.distill_temperature={self.distill_temperature} must be > 0.")
        self._samples: dict[str, list] = {}
        self._sbd_counts: dict[str, int] | None = None

    # ------------------------------------------------------------------ data
    @property
    def classes(self) -> tuple[str, ...]:
        from ernas.tasks.segment.brain import BRAIN_CLASSES
        from ernas.tasks.segment.digits import DIGIT_CLASSES
        from ernas.tasks.segment.shapes import SHAPE_CLASSES

        fixed = {"brain": BRAIN_CLASSES, "synthseg_brain": BRAIN_CLASSES,
                 "digits": DIGIT_CLASSES, "shapes": SHAPE_CLASSES, "voc": VOC_CLASSES,
                 "cityscapes": CITYSCAPES_CLASSES}
        if self.data in fixed:
            return tuple(fixed[self.data])
        return tuple(f"class_{k}" for k in range(self.num_classes))

    @property
    def in_channels(self) -> int:
        grey = self.data in ("brain", "synthseg_brain") or (self.data == "folder"
                                                             and not self.color)
        return 1 if grey else 3

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every figure the evaluator computes, headline first (``evaluator.metric_names``)."""
        return metric_names(self.classes, self._boundary_width() is not None)

    def _boundary_width(self) -> int | None:
        return BOUNDARY_WIDTH if self.data in ("brain", "synthseg_brain") else None

    def samples(self, split: str) -> list:
        """``[(name, H x W x C image, H x W mask)]`` or lazy :class:`PairFiles` of a split (listed
        once; user masks scanned once)."""
        if split not in SPLITS:
            raise ErnasError(f"segment: split {split!r} is not one of {', '.join(SPLITS)}.")
        if split not in self._samples:
            self._samples[split] = self._read(split)
        return self._samples[split]

    def _read(self, split: str) -> list:
        if self.data == "brain":
            from ernas.tasks.segment.brain import brain_slices

            return brain_slices(split, self.downsample)
        if self.data == "synthseg_brain":
            from ernas.tasks.segment.synthbrain import synth_brain_slices

            return synth_brain_slices(split, self.downsample, self.data_seed)
        if self.data == "digits":
            from ernas.tasks.segment.digits import digit_scenes

            return digit_scenes(split, self.data_seed)
        if self.data == "shapes":
            from ernas.tasks.segment.shapes import shape_samples

            return shape_samples(split, self.data_seed)
        if self.data in ("voc", "cityscapes"):
            files_of = voc_files if self.data == "voc" else cityscapes_files
            pairs = official_split(files_of, self.root, split, self.max_side, self.val_fraction,
                                   self.split_seed)
            sbd = split == "train" and self.sbd_root is not None
            return self._with_sbd(pairs) if sbd else pairs
        base = Path(self.root) / split
        decode = functools.partial(decode_folder_mask, values=self._values,
                                   num_classes=self.num_classes, ignore_index=self.ignore_index)
        pairs = segmentation_folder_files(base / "images", base / "masks", self.num_classes,
                                          self.color, self.max_side, decode)
        scan_masks(pairs)
        return pairs

    def _with_sbd(self, train: list) -> list:
        """VOC train plus the SBD images outside VOC val (test) and the carved validation."""
        excluded = {p.name for split in ("val", "test") for p in self.samples(split)}
        pairs, counts = add_extra_training(train, sbd_files(self.sbd_root, self.max_side),
                                           excluded)
        self._sbd_counts = {"voc_train": counts["official_train"],
                            "sbd_listed": counts["extra_listed"],
                            "sbd_added": counts["extra_added"],
                            "sbd_excluded_val_or_test": counts["extra_in_val_or_test"],
                            "sbd_already_in_voc_train": counts["extra_in_train"]}
        log.info("segment: training on %d VOC train images plus %d SBD images (%d SBD images "
                 "left out: in VOC val, the test set, or in the held-out validation; %d already "
                 "in VOC train, VOC's mask kept)", counts["official_train"],
                 counts["extra_added"], counts["extra_in_val_or_test"], counts["extra_in_train"])
        return pairs

    def record_splits(self, out_dir) -> None:
        """Write ``splits.json`` (the sample names of every split) into a run directory, for
        data read from user folders (VOC, Cityscapes, folder)."""
        if self.data in ("voc", "cityscapes", "folder"):
            names = {split: [s.name if isinstance(s, PairFiles) else s[0]
                             for s in self.samples(split)] for split in SPLITS}
            sbd = {"sbd": {"root": str(self.sbd_root), **self._sbd_counts}} \
                if self.sbd_root is not None else {}
            atomic_write_json(Path(out_dir) / "splits.json", {
                "data": self.data, "root": str(self.root), "val_fraction": self.val_fraction,
                "split_seed": self.split_seed, **sbd, **names})

    def dataset(self, split, crop=None, seed=0, random=False):
        return SegmentationDataset(self.samples(split), len(self.classes), crop, train=random,
                                   seed=seed)

    def eval_labels(self):
        return ["test", "test_real_t1"] if self.data == "synthseg_brain" else ["test"]

    def eval_sets(self, seed=0):
        sets = {"test": self.dataset("test")}
        if self.data == "synthseg_brain":
            from ernas.tasks.segment.synthbrain import real_slices

            sets["test_real_t1"] = SegmentationDataset(
                real_slices("test", self.downsample), len(self.classes), train=False)
        return sets

    def describe(self):
        where = {"brain": "MNI152 brain slices (nilearn's template; grey/white matter)",
                 "synthseg_brain": "SynthSeg-style images generated from MNI152 tissue labels "
                                   "(test; test_real_t1: the real T1 slices of the test slabs)",
                 "digits": "handwritten digits (scikit-learn) on photo crops",
                 "shapes": "the embedded synthetic shapes set", "voc": f"Pascal VOC at {self.root}"
                 + (f" (training adds SBD at {self.sbd_root}, less VOC val and the validation)"
                    if self.sbd_root is not None else ""),
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
        return SegmentEvaluator(self.classes, self.ignore_index, self._boundary_width(),
                                unit_of=self._unit_of())

    def _unit_of(self):
        """The bootstrap unit of a sample name: the slab for the synthetic brain data
        (neighbouring slices are correlated), else the image."""
        if self.data == "synthseg_brain":
            from ernas.tasks.segment.synthbrain import slab_of
            return slab_of
        return None

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
        if self.data in ("voc", "cityscapes", "folder"):  # list (and scan) user data now, so a
            for split in SPLITS:                           # bad file is refused before any write
                self.samples(split)


TASK = SegmentTask
