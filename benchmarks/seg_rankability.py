"""Can a segmentation benchmark rank networks? The two checks of issue 34 on one data source.

Check (a), trivial baselines vs the classic U-Net, on the test split:

* ``lookup``: a 256-bin table from grey intensity (the mean over channels) to the most frequent
  label of that bin in the training pixels (unseen bins: the most frequent label overall);
* ``gmm``: per test image, a Gaussian mixture of ``num_classes`` components over its grey
  intensities; components ranked by mean are given the labels ranked by their mean training
  intensity;
* ``conv1x1``: one 1x1 convolution (a per-pixel linear classifier) trained with the retraining
  recipe of ``ernas.train`` (AdamW, cosine schedule, the task's loss, the same keyed batches and
  validation selection), in this file because it is not an architecture of a family.

Check (b), graded capacity: the classic U-Net layout (``search_spaces/archs/
unet_demo_classic.yaml``: four downsamplings, bilinear up-sampling) at widths 4 (tiny), 8 (small)
and 16 (classic), each trained by ``ernas.train.retrain`` with the same ``TrainConfig``.

Figures: test mIoU from one confusion matrix over the set, with a 95 % percentile bootstrap CI
that resamples images (``digits``, ``shapes``) or slabs (``synthseg_brain``, ``brain``:
neighbouring slices are correlated). Verdict "can rank" when every trivial baseline is at least
10 mIoU points below the classic U-Net and tiny < small < classic with non-overlapping CIs;
else "cannot rank". Beside the verdict, paired bootstrap differences (both models on the same
resampled units) of each baseline and each capacity step. Writes ``results.csv``,
``verdict.json``, ``report.md`` and ``matrices.npz`` (per-item confusion matrices) into
``--out``; ``--reuse`` keeps finished U-Net runs there trained with the same settings::

    python benchmarks/seg_rankability.py --data digits --steps 600 --out runs/rank_digits
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ernas
from ernas.batches import StepBatches, data_key
from ernas.checkpoint import load_model
from ernas.io import atomic_write_json, atomic_write_text
from ernas.paths import SEARCH_SPACES
from ernas.task import make_task
from ernas.tasks.segment.data import IGNORE_INDEX
from ernas.tasks.segment.evaluator import confusion_of
from ernas.train import TrainConfig, retrain, validate

log = logging.getLogger("seg_rankability")

WIDTHS = {"unet_tiny": 4, "unet_small": 8, "unet_classic": 16}
GAP = 0.10  # mIoU points (as a fraction) every trivial baseline must stay below the classic


# --------------------------------------------------------------------------- figures


def miou_of(matrix: np.ndarray) -> float:
    """Dataset-level mIoU of a summed confusion matrix (classes with a non-zero union)."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


def group_of(name: str, data: str) -> str:
    """Bootstrap unit of a test item: its slab for the brain data, else the image."""
    if data in ("synthseg_brain", "brain"):
        from ernas.tasks.segment.synthbrain import slab_of

        return slab_of(name)
    return name


def bootstrap_ci(matrices: np.ndarray, groups: list[str], reps: int = 1000, seed: int = 0
                 ) -> tuple[float, float]:
    """95 % percentile CI of the mIoU of summed matrices, resampling whole groups."""
    names = sorted(set(groups))
    per_group = np.stack([matrices[[g == n for g in groups]].sum(0) for n in names])
    rng = np.random.default_rng(seed)
    draws = [miou_of(per_group[rng.integers(len(names), size=len(names))].sum(0))
             for _ in range(reps)]
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def paired_ci(better: np.ndarray, worse: np.ndarray, groups: list[str], reps: int = 1000,
              seed: int = 0) -> tuple[float, float, float]:
    """mIoU(better) - mIoU(worse) and its 95 % CI, both models on the same resampled groups
    (a paired bootstrap: the difference's spread, not the sum of two marginal spreads)."""
    names = sorted(set(groups))
    pick = [np.array([g == n for g in groups]) for n in names]
    a = np.stack([better[m].sum(0) for m in pick])
    b = np.stack([worse[m].sum(0) for m in pick])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        idx = rng.integers(len(names), size=len(names))
        draws.append(miou_of(a[idx].sum(0)) - miou_of(b[idx].sum(0)))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return miou_of(a.sum(0)) - miou_of(b.sum(0)), float(lo), float(hi)


# --------------------------------------------------------------------------- trivial baselines


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).mean(axis=-1)


def _bins(grey: np.ndarray) -> np.ndarray:
    return np.clip((grey * 255).round().astype(np.int64), 0, 255)


def fit_lookup(train, num_classes: int) -> np.ndarray:
    """256-entry table: grey-level bin -> most frequent training label of that bin."""
    counts = np.zeros((256, num_classes), dtype=np.int64)
    for _, image, mask in train:
        valid = mask != IGNORE_INDEX
        np.add.at(counts, (_bins(_grey(image))[valid], mask[valid]), 1)
    table = counts.argmax(1)
    table[counts.sum(1) == 0] = counts.sum(0).argmax()
    return table


def class_intensity_order(train, num_classes: int) -> np.ndarray:
    """Labels sorted by their mean training grey level (absent labels last)."""
    sums, counts = np.zeros(num_classes), np.zeros(num_classes)
    for _, image, mask in train:
        valid = mask != IGNORE_INDEX
        np.add.at(sums, mask[valid], _grey(image)[valid])
        np.add.at(counts, mask[valid], 1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    return np.argsort(means, kind="stable")


def gmm_predict(image: np.ndarray, order: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-image Gaussian mixture on grey levels; component of rank r -> label ``order[r]``."""
    from sklearn.mixture import GaussianMixture

    grey = _grey(image).reshape(-1, 1).astype(np.float64)
    k = min(len(order), len(np.unique(grey)))
    gmm = GaussianMixture(k, random_state=seed, reg_covar=1e-4).fit(grey)
    rank = np.argsort(np.argsort(gmm.means_.ravel()))
    return order[rank[gmm.predict(grey)]].reshape(image.shape[:2])


def train_conv1x1(task, cfg: TrainConfig, out: Path) -> torch.nn.Module:
    """A 1x1 convolution trained with ``ernas.train``'s recipe, best validation weights."""
    torch.manual_seed(cfg.seed)
    net = torch.nn.Conv2d(task.in_channels, len(task.classes), 1)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=cfg.betas)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.eta_min)
    key = data_key(cfg.seed, 0)
    batches = StepBatches(task.dataset("train", cfg.crop, key, random=True), cfg.batch_size, key)
    val_set = task.dataset("val", cfg.val_crop, cfg.seed)
    best, best_state = -1.0, None
    for step in range(cfg.steps):
        x, y = batches[step]
        loss = task.loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            v = validate(net, val_set, "cpu", task)
            if v > best:
                best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)
    torch.save(best_state, out / "conv1x1.pt")
    return net.eval()


# --------------------------------------------------------------------------- networks


def unet_arch(task, width: int, name: str, out: Path):
    """The classic U-Net layout at ``width`` with the task's channels, saved under ``out``."""
    import yaml

    spec = yaml.safe_load((SEARCH_SPACES / "archs" / "unet_demo_classic.yaml").read_text())
    spec["name"] = name
    spec["geometry"].update(in_channels=task.in_channels, num_classes=len(task.classes),
                            width=width)
    path = out / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return ernas.load_arch(path)


@torch.no_grad()
def net_matrices(net, dataset, num_classes: int) -> tuple[np.ndarray, list[str]]:
    """Per-item confusion matrices of a network over a whole-image dataset."""
    net.eval()
    mats, names = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        mats.append(confusion_of(net(item["input"][None]).float(), item["target"][None],
                                 num_classes, IGNORE_INDEX))
        names.append(item["name"])
    return np.stack(mats), names


def id_matrices(preds, samples, num_classes: int) -> np.ndarray:
    return np.stack([confusion_of(torch.from_numpy(np.asarray(p))[None],
                                  torch.from_numpy(mask)[None], num_classes, IGNORE_INDEX)
                     for p, (_, _, mask) in zip(preds, samples)])


# --------------------------------------------------------------------------- the run


def finished_run(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The summary of a finished retrain run in ``run_dir`` with exactly ``cfg``, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    same = summary.get("finished") and summary.get("config") == cfg.to_dict()
    if not same:
        log.info("%s: not reused (unfinished or another configuration); retraining", run_dir)
    return summary if same else None


def limited(task, split: str, limit: int | None) -> list:
    samples = task.samples(split)
    return list(samples[:limit]) if limit else list(samples)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = make_task({"name": "segment", "data": args.data})
    if args.limit:  # a small slice of every split (tests, quick looks)
        task._samples = {s: limited(task, s, args.limit) for s in ("train", "val", "test")}
    k = len(task.classes)
    train, test = task.samples("train"), task.samples("test")
    test_set = task.dataset("test")
    names = [test_set[i]["name"] for i in range(len(test_set))]
    groups = [group_of(n, args.data) for n in names]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                      seed=args.seed, val_every=max(1, args.steps // 4), val_crop=None,
                      device="cpu", log_every=max(1, args.steps // 10))
    matrices = {}
    t0 = time.perf_counter()
    table = fit_lookup(train, k)
    matrices["lookup"] = id_matrices([table[_bins(_grey(im))] for _, im, _ in test], test, k)
    order = class_intensity_order(train, k)
    matrices["gmm"] = id_matrices([gmm_predict(im, order) for _, im, _ in test], test, k)
    matrices["conv1x1"] = net_matrices(train_conv1x1(task, cfg, out), test_set, k)[0]
    extra = {}
    if not args.trivial_only:
        for name, width in WIDTHS.items():
            arch = unet_arch(task, width, name, out)
            summary = finished_run(out / name, cfg) if args.reuse else None
            if summary is None:
                summary = retrain(arch, out / name, task, cfg, progress=False)
            net = load_model(arch, summary["best"]).eval()
            matrices[name] = net_matrices(net, test_set, k)[0]
            for label, ds in task.eval_sets().items():
                if label != "test":
                    extra[(name, label)] = miou_of(net_matrices(net, ds, k)[0].sum(0))
    rows = []
    for name, mats in matrices.items():
        lo, hi = bootstrap_ci(mats, groups, args.boots, args.seed)
        row = {"model": name, "miou_test": miou_of(mats.sum(0)), "ci_lo": lo, "ci_hi": hi}
        row.update({key[1]: v for key, v in extra.items() if key[0] == name})
        rows.append(row)
    verdict = judge(rows)
    pairs = [(m, "unet_classic") for m in ("lookup", "gmm", "conv1x1")] + [
        ("unet_tiny", "unet_small"), ("unet_small", "unet_classic")]
    verdict["paired_differences"] = {
        f"{b} - {a}": dict(zip(("diff", "ci_lo", "ci_hi"),
                               paired_ci(matrices[b], matrices[a], groups, args.boots,
                                         args.seed)))
        for a, b in pairs if a in matrices and b in matrices}
    np.savez_compressed(out / "matrices.npz", names=np.array(names), **matrices)
    result = {"data": args.data, "steps": args.steps, "batch_size": args.batch_size,
              "crop": args.crop, "seed": args.seed, "limit": args.limit,
              "bootstrap_unit": "slab" if groups != names else "image",
              "bootstrap_units": len(set(groups)), "test_items": len(names),
              "seconds": time.perf_counter() - t0, "machine": platform.platform(),
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
              "rows": rows, **verdict}
    import pandas as pd

    atomic_write_text(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_json(out / "verdict.json", result)
    atomic_write_text(out / "report.md", report(result))
    return result


def judge(rows: list[dict]) -> dict:
    """The two checks (see the module docstring); checks whose models were not run are None."""
    by = {r["model"]: r for r in rows}
    trivial = [m for m in ("lookup", "gmm", "conv1x1") if m in by]
    out = {"gaps": {}, "trivial_check": None, "capacity_check": None}
    if "unet_classic" in by:
        top = by["unet_classic"]["miou_test"]
        out["gaps"] = {m: top - by[m]["miou_test"] for m in trivial}
        out["trivial_check"] = all(g >= GAP for g in out["gaps"].values())
    if all(m in by for m in WIDTHS):
        t, s, c = (by[m] for m in WIDTHS)
        out["capacity_check"] = bool(t["ci_hi"] < s["ci_lo"] and s["ci_hi"] < c["ci_lo"])
    ran = out["trivial_check"] is not None and out["capacity_check"] is not None
    out["verdict"] = ("can rank" if ran and out["trivial_check"] and out["capacity_check"]
                      else "cannot rank" if ran else "incomplete")
    return out


def report(r: dict) -> str:
    extra = sorted({k for row in r["rows"] for k in row} - {"model", "miou_test", "ci_lo",
                                                            "ci_hi"})
    head = ["model", "test mIoU", "95 % CI"] + extra
    lines = [f"# Rankability of `{r['data']}`: {r['verdict']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["rows"]:
        lines.append("| " + " | ".join([row["model"], f"{row['miou_test']:.3f}",
                                        f"{row['ci_lo']:.3f}..{row['ci_hi']:.3f}"]
                                       + [f"{row.get(k, float('nan')):.3f}" for k in extra])
                     + " |")
    lines += ["", f"- trivial baselines >= {GAP * 100:.0f} points below the classic U-Net: "
              f"{r['trivial_check']} (gaps: " + ", ".join(
                  f"{m} {g * 100:+.1f}" for m, g in r["gaps"].items()) + ")",
              f"- tiny < small < classic with non-overlapping CIs: {r['capacity_check']}",
              "- paired bootstrap differences (same resampled units for both): " + "; ".join(
                  f"{k} {d['diff'] * 100:+.1f} [{d['ci_lo'] * 100:+.1f}, {d['ci_hi'] * 100:+.1f}]"
                  for k, d in r.get("paired_differences", {}).items()) + " points",
              f"- {r['steps']} steps, batch {r['batch_size']}, crop {r['crop']}, seed {r['seed']}; "
              f"bootstrap over {r['bootstrap_units']} {r['bootstrap_unit']}s "
              f"({r['test_items']} test items); {r['seconds']:.0f} s on {r['machine']}, "
              f"{r['threads']} threads", f"- command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits",
                   choices=["digits", "synthseg_brain", "brain", "shapes"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boots", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="use the first N items of each split")
    p.add_argument("--trivial-only", action="store_true", help="check (a)'s baselines only")
    p.add_argument("--reuse", action="store_true",
                   help="reuse finished U-Net runs under --out trained with the same settings")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.crop < 8 or args.boots < 10 or (
            args.limit is not None and args.limit < 2):
        p.error("--steps and --batch-size must be >= 1, --crop >= 8, --boots >= 10, "
                "--limit >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args)
    log.info(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
