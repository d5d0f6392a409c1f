"""How mask pixel values become class ids: declared encodings and the 0/255 binary refusal.

A folder of masks may store classes as their ids (``0..K-1``, 255 = ignore: the default) or in
another encoding that must then be declared in the task config:

* ``mask_values: [v0, v1, ...]``: value ``v_k`` is class ``k`` (one value per class); a pixel
  holding any other value is an error, except ``ignore_index`` when it is not listed (it stays
  "ignore");
* ``binary: true``: the usual 0/255 binary masks of Kaggle and medical sets, i.e.
  ``mask_values: [0, 255]`` with two classes (background, foreground).

Undeclared masks holding only 0 and 255 with two classes are refused (:func:`refuse_binary_255`):
read as class ids they would turn the whole foreground into "ignore", and a model predicting
background everywhere would score mIoU 1.0.
"""
from __future__ import annotations

import numpy as np

from ernas.errors import ErnasError

BINARY_VALUES = (0, 255)


def declared_values(mask_values, binary: bool, num_classes, ignore_index: int,
                    data: str) -> tuple[int, ...] | None:
    """The checked ``mask_values`` of a task config (``binary`` gives ``(0, 255)``), or None."""
    if binary and mask_values is not None and tuple(mask_values) != BINARY_VALUES:
        raise ErnasError(f"task.binary=true means task.mask_values=[0, 255], but task.mask_values"
                         f"={list(mask_values)} was also given; keep one of the two.")
    values = BINARY_VALUES if binary else mask_values
    if values is None:
        return None
    if data != "folder":
        raise ErnasError(f"task.mask_values / task.binary apply to task.data=folder only (the "
                         f"{data} data has a fixed mask encoding); remove them.")
    if isinstance(values, (str, bytes)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 65535
            for v in values):
        raise ErnasError(f"task.mask_values={values!r} is not valid: give a list of mask pixel "
                         f"values, one per class in class order, e.g. [0, 255].")
    values = tuple(int(v) for v in values)
    if len(set(values)) != len(values) or len(values) < 2:
        raise ErnasError(f"task.mask_values={list(values)} must list at least two distinct "
                         f"values, one per class in class order (e.g. [0, 255]).")
    if num_classes is not None and num_classes != len(values):
        raise ErnasError(f"task.num_classes={num_classes} but task.mask_values lists "
                         f"{len(values)} values {list(values)}: give one value per class "
                         f"(or leave num_classes null).")
    return values


def values_to_class_ids(mask: np.ndarray, values: tuple[int, ...], ignore_index: int,
                        source: str) -> np.ndarray:
    """Class ids of a mask in the declared encoding ``values`` (value ``values[k]`` -> ``k``)."""
    present = np.unique(mask)
    allowed = set(values) | ({ignore_index} if ignore_index not in values else set())
    bad = [int(v) for v in present if int(v) not in allowed]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise ErnasError(f"Mask {source} holds values {shown}, which task.mask_values="
                         f"{list(values)} does not declare (one value per class, plus "
                         f"{ignore_index} = ignore when not listed). Fix the mask or the "
                         f"declaration.")
    out = np.full(mask.shape, ignore_index, dtype=np.int64)
    for k, v in enumerate(values):
        out[mask == v] = k
    return out


def refuse_binary_255(mask: np.ndarray, num_classes: int, ignore_index: int,
                      source: str) -> None:
    """ErnasError for an undeclared two-class mask that holds only 0 and 255."""
    if num_classes != 2 or ignore_index != 255:
        return
    present = set(np.unique(mask).tolist())
    if 255 in present and present <= {0, 255}:
        raise ErnasError(
            f"Mask {source} holds only the values 0 and 255, and task.num_classes=2. Read as "
            f"class ids, 255 is 'ignore', so every foreground pixel would vanish and a model "
            f"predicting background everywhere would score mIoU 1.0. Declare how the masks are "
            f"encoded: if 255 marks the foreground (the usual 0/255 binary mask), set "
            f"task.binary=true (the same as task.mask_values=[0,255]); if 255 really means "
            f"'ignore' and the foreground is 1, set task.mask_values=[0,1].")


def decode_folder_mask(mask: np.ndarray, source: str, values: tuple[int, ...] | None,
                       num_classes: int, ignore_index: int) -> np.ndarray:
    """Class ids of a folder mask: the declared ``values`` mapped, or the values themselves
    after :func:`refuse_binary_255` (use with ``functools.partial`` as ``PairFiles.decode``)."""
    if values is not None:
        return values_to_class_ids(mask, values, ignore_index, source)
    refuse_binary_255(mask, num_classes, ignore_index, source)
    return mask
