"""Embedded benchmark that needs shape: SynthSeg-style brain slices (Billot et al., MedIA 2023).

Labels are those of :mod:`ernas.tasks.segment.brain` (argmax of the MNI152 tissue maps: 0
background/CSF, 1 grey matter, 2 white matter, ``downsample`` 2 gives 96 x 80 slices). Images
are generated from the label maps, per sample:

1. deformation: a random affine map (rotation ±10°, scale 0.9..1.1, shift ±4 % of the side)
   composed with a smooth elastic field (Gaussian-filtered noise, σ 4 pixels, peak near 2
   pixels), applied to the labels (nearest neighbour);
2. intensities: per class a Gaussian with a random mean in [0, 1] and a random standard
   deviation in [0, 0.08] (so the order of the tissues' intensities is random), then a blur of
   σ in [0, 1] pixel;
3. a smooth multiplicative bias field ``exp(b)``, ``b`` a 4 x 4 grid of N(0, 0.25²) values
   upsampled cubically; additive noise N(0, s²) with s in [0, 0.05]; rescaled to [0, 1]; gamma
   ``exp(N(0, 0.25²))``.

Slabs: the usable slices z 14..146 form 27 slabs of 3 slices, 5 apart (2-slice gaps); slab j is
test when j % 4 == 1 (7 slabs), val when j % 4 == 3 (6 slabs), train otherwise (14 slabs).
Every slice gives :data:`SYNTH_VARIANTS` samples per split; sample ``v`` of slice ``z`` of
``split`` draws from ``default_rng([seed, split_code, z, v])``, so seeds never repeat across
splits. Names ``sb_<split>_s<slab>_z<z>_v<v>`` carry the slab, for bootstraps by slab.
:func:`real_slices` gives the real T1 slices of the same slabs (a domain-shift figure: an
intensity lookup solves them).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from ernas.data.keyed import check_seed
from ernas.errors import ErnasError
from ernas.tasks.segment.brain import _check_downsample, _labelled

SYNTH_SLABS = {split: tuple(range(14 + 5 * j, 17 + 5 * j) for j in range(27) if rule(j))
               for split, rule in (("train", lambda j: j % 2 == 0), ("val", lambda j: j % 4 == 3),
                                   ("test", lambda j: j % 4 == 1))}
SYNTH_VARIANTS = {"train": 8, "val": 2, "test": 3}

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _slab_index(z: int) -> int:
    return (z - 14) // 5


def _deformed(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels warped by a random affine map and a smooth elastic field (nearest neighbour)."""
    h, w = labels.shape
    angle, scale = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.04, 0.04, 2) * (h, w)
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = rows - cy, cols - cx
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    src_y, src_x = c * y - s * x + cy + shift[0], s * y + c * x + cx + shift[1]
    for coord in (src_y, src_x):
        field = gaussian_filter(rng.normal(size=(h, w)), 4.0)
        coord += 2.0 * field / (np.abs(field).max() + 1e-8)
    return map_coordinates(labels, [src_y, src_x], order=0, mode="nearest").astype(np.int64)


def _bias_field(shape, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.normal(0.0, 0.25, (4, 4))
    field = zoom(coarse, (shape[0] / 4, shape[1] / 4), order=3)[:shape[0], :shape[1]]
    return np.exp(field)


def synth_image(labels: np.ndarray, rng: np.random.Generator, num_classes: int = 3
                ) -> np.ndarray:
    """A float32 image in [0, 1] generated from a label map (steps 2 and 3 of the module
    docstring)."""
    means = rng.uniform(0.0, 1.0, num_classes)
    stds = rng.uniform(0.0, 0.08, num_classes)
    image = means[labels] + stds[labels] * rng.normal(size=labels.shape)
    image = gaussian_filter(image, rng.uniform(0.0, 1.0))
    image = image * _bias_field(labels.shape, rng)
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.05), labels.shape)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo + 1e-8)
    return np.clip(image ** np.exp(rng.normal(0.0, 0.25)), 0.0, 1.0).astype(np.float32)


def _check_split(split: str) -> None:
    if split not in SYNTH_SLABS:
        raise ErnasError(f"Unknown synthseg_brain data split {split!r}; use one of "
                         f"{', '.join(repr(s) for s in SYNTH_SLABS)}.")


def synth_brain_slices(split: str, downsample: int = 2, seed: int = 0
                       ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(name, image H x W x 1, labels H x W)]``: the synthetic samples of ``split``."""
    _check_split(split)
    seed = check_seed(seed)
    _, labels = _labelled(_check_downsample(downsample))
    out = []
    for slab in SYNTH_SLABS[split]:
        for z in slab:
            for v in range(SYNTH_VARIANTS[split]):
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], z, v])
                warped = _deformed(labels[:, :, z], rng)
                name = f"sb_{split}_s{_slab_index(z):02d}_z{z:03d}_v{v}"
                out.append((name, synth_image(warped, rng)[..., None], warped))
    return out


def real_slices(split: str, downsample: int = 2) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The real T1 slices (and labels) of the slabs of ``split``; names ``t1_s<slab>_z<z>``."""
    _check_split(split)
    t1, labels = _labelled(_check_downsample(downsample))
    return [(f"t1_s{_slab_index(z):02d}_z{z:03d}", t1[:, :, z, None].copy(),
             labels[:, :, z].copy()) for slab in SYNTH_SLABS[split] for z in slab]


def slab_of(name: str) -> str:
    """The slab id in a sample name (``sb_test_s03_z029_v1`` and ``t1_s03_z029`` -> ``s03``)."""
    return next((part for part in name.split("_") if part.startswith("s") and part[1:].isdigit()),
                name)
