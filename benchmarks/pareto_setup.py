"""The starting points of a Pareto run (``pareto.py``): the scaled-NAFNet front's architectures,
the held-out test tiles, the task reading them, the pinned search table and the retraining budget
of the equal-samples inherited series."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from pareto_phases import compose_cfg

REDUCTIONS = ("shallow", "noln", "nosca", "noln_nosca", "bn", "bnhi", "bnhi3")
PARTS = ("shallow", "noln", "nosca", "bn", "bnhi", "bnhi3")  # a reduction joins parts with "_"
BN_LEVELS = {"bn": 99, "bnhi": 2, "bnhi3": 3}  # BatchNorm in the blocks of levels < this


def tiles(img: np.ndarray, size: int) -> list[tuple[int, int, np.ndarray]]:
    """``(row, col, tile)`` for the non-overlapping ``size`` squares of an H x W x C image
    (the grid centred; the margins left over are dropped)."""
    rows, cols = img.shape[0] // size, img.shape[1] // size
    top, left = (img.shape[0] - rows * size) // 2, (img.shape[1] - cols * size) // 2
    return [(r, c, img[top + r * size:top + (r + 1) * size, left + c * size:left + (c + 1) * size])
            for r in range(rows) for c in range(cols)]


def reduction(name: str) -> str:
    """``name`` if it joins distinct PARTS with "_" (e.g. ``shallow_bnhi``) with at most one
    norm replacement; the argparse type of ``--reductions``."""
    parts = name.split("_")
    norms = [p for p in parts if p in BN_LEVELS or p == "noln"]
    bad = [p for p in parts if p not in PARTS]
    if bad or len(set(parts)) < len(parts) or len(norms) > 1:
        import argparse

        raise argparse.ArgumentTypeError(
            f"reduction {name!r}: join distinct parts of {', '.join(PARTS)} with '_' "
            f"(e.g. shallow_bnhi), with at most one of noln/bn/bnhi/bnhi3")
    return name


def scaled_archs(space, widths, reductions, reduction_widths=()) -> dict:
    """``{name: Arch}`` of the scaled-NAFNet front (see the module docstring): the official
    NAFNet at the space's width and at ``widths``, and every reduction (parts joined by "_")
    at the space's width and at ``reduction_widths``, named ``nafnet_w<width>_<reduction>``."""
    from ernas.families.nafnet import official_arch
    from ernas.families.nafnet.model import level_of

    g = dict(space.geometry)
    w0 = g["width"]
    out = {f"nafnet_w{w}": official_arch(**{**g, "width": w}, name=f"nafnet_w{w}")
           for w in sorted(set(widths) | {w0})}
    shallow = {"enc_blk_nums": [min(n, 1) for n in g["enc_blk_nums"]],
               "middle_blk_num": min(g["middle_blk_num"], 1),
               "dec_blk_nums": [min(n, 1) for n in g["dec_blk_nums"]]}
    for w in sorted(set(reduction_widths) | {w0}, reverse=True):
        for r in reductions:
            parts = set(reduction(r).split("_"))
            name = f"nafnet_w{w}_{r}"
            arch = official_arch(**{**g, "width": w, **(shallow if "shallow" in parts else {})},
                                 name=name)
            bn = next((BN_LEVELS[p] for p in parts if p in BN_LEVELS), 0)
            for pos, v in arch.values.items():
                if "noln" in parts:
                    v["norm"] = "none"
                if level_of(pos, g) < bn:
                    v["norm"] = "batchnorm"
                if "nosca" in parts:
                    v["attention"] = "none"
            out[name] = arch
    return out


def write_tiles(folder: Path, size: int) -> dict:
    """PNG tiles of every bundled image the colour task neither trains nor validates on."""
    from PIL import Image

    from ernas.data import BUNDLED_SPLITS, load_bundled
    from ernas.io import atomic_write_bytes, atomic_write_json

    used = {n for s in ("train", "val") for n in BUNDLED_SPLITS["color"][s]}
    counts = {}
    for kind, splits in BUNDLED_SPLITS.items():
        for name in (n for names in splits.values() for n in names if n not in used):
            img = np.round(load_bundled(name) * 255).astype(np.uint8)
            parts = tiles(img, size)
            for r, c, tile in parts:
                buf = io.BytesIO()
                Image.fromarray(tile.squeeze(-1) if tile.shape[-1] == 1 else tile).save(buf, "PNG")
                atomic_write_bytes(folder / f"{kind}-{name}-r{r}c{c}.png", buf.getvalue())
            counts[f"{kind}:{name}"] = len(parts)
    atomic_write_json(folder / "tiles.json", counts)
    return counts


def make_task(cfg, tiles_dir: Path):
    from omegaconf import OmegaConf

    from ernas.task import make_task as make

    return make({**OmegaConf.to_container(cfg.task, resolve=True), "test_dir": str(tiles_dir)})


def equal_sample_steps(steps: int, batch: int, search_steps: int, search_batch: int) -> int:
    """Retraining steps of the ``supernet_eq`` series: the inherited weights already saw
    search_steps·search_batch crops in the search's weight steps, so the retraining gets
    steps − ⌈search_steps·search_batch / batch⌉ and the weights see as many crops in all as the
    scaled networks' steps·batch."""
    eq = steps - -(-search_steps * search_batch // batch)
    if eq < 1:
        sys.exit(f"--init supernet_eq: the search's {search_steps} steps x batch {search_batch} "
                 f"already exceed the retraining budget of {steps} steps x batch {batch}; use "
                 f"fewer --search-steps or more --steps.")
    return eq


def pin_table(overrides: list[str], path: Path) -> str:
    """Resolve the search space's latency table as a search would (``resolve_from_config``:
    a table that holds on this machine, else one profiled here) and save it to ``path``, so every
    search of the run, and the hinge targets, use this one table; with ``latency.anchor=true``
    among ``overrides`` the saved table carries the anchored line, which every search keeps.
    Returns where the table came from."""
    from ernas.latency.resolve import resolve_from_config
    from ernas.space import find_space

    cfg = compose_cfg(overrides)
    space, shape = find_space(cfg.space), [int(s) for s in cfg.input_shape]
    table, source = resolve_from_config(space, shape, cfg.latency, False)
    table.save(path)
    # a space that fixes some choices (e.g. BatchNorm at some levels) may not contain its own
    # reference, whose prediction sets the hinge targets: its missing keys are profiled into
    # the pinned copy with the table's backend and protocol
    missing = [k for k in space.reference().op_keys(shape, cfg.latency.granularity)
               if k not in table]
    if missing:
        from ernas.latency.factory import make_backend
        from ernas.latency.ops import build_op
        from ernas.latency.profile import as_protocol, profile_keys

        profile_keys(missing, build_op, make_backend(cfg.latency.backend), path,
                     {f: table.metadata.get(f) for f in ("space", "input_shape", "granularity")},
                     as_protocol(cfg.latency.get("measure")), progress=False)
        source = f"{source} + the reference's {len(set(missing))} keys profiled now"
    return str(source)
