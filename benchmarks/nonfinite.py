"""Where does a trained denoiser stop giving finite outputs, and does validation see it?

For a retrain run directory (``arch.yaml`` + ``best.pt``) and each photo of a split of the
denoise task (noise σ, seeded as evaluation seeds it), the network is run three ways:

- ``whole``: the whole image, the network in eval mode (what the test stage scores);
- ``crop``: its ``--crop`` x ``--crop`` centre crop, as the task's dataset gives it to
  validation (``val_crop``);
- ``batch_stats``: the whole image with every BatchNorm normalising with the image's own
  statistics instead of its running ones (no BatchNorm: the same as ``whole``).

Per image and way: whether every output is finite, and the largest |activation| after each
depth-2 module (``encoders.0``, ``middle_blks.1``, …, in execution order), which shows where a
value grows: running-statistics BatchNorm rescales by fixed factors, so an activation that
leaves the training range is not brought back, and a multiplicative gate can square it block by
block. ``largest_activation`` and ``largest_at`` give a row's largest of them and its module;
``batchnorm_layers`` counts the network's BatchNorm layers. Several runs give one CSV, its rows
named by the run's folder (``run``) and its network (``network``)::

    python benchmarks/nonfinite.py runs/retrain/<run> [<run> ...] --split val --crop 128 \
        --out nonfinite.csv
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

WAYS = ("whole", "crop", "batch_stats")


def _largest_per_module(model: torch.nn.Module) -> tuple[dict, list]:
    """Forward hooks recording max |output| of each depth-2 module, in call order."""
    seen: dict[str, float] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, name=name: seen.__setitem__(name, float(out.detach().abs().max())))
        for name, m in model.named_modules() if name.count(".") == 1]
    return seen, hooks


def _on_batch_stats(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm layers normalise with each input's own statistics
    and leave their running statistics as they are (momentum 0)."""
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0
    return twin


def _largest(seen: dict) -> tuple[float, str]:
    """The largest recorded |activation| and its module (NaN counts as largest)."""
    if not seen:
        return math.nan, ""
    name = max(seen, key=lambda k: math.inf if math.isnan(seen[k]) else seen[k])
    return seen[name], name


def probe(run: Path, split: str, crop: int, max_side: int | None, sigma: float,
          seed: int) -> list[dict]:
    """One row per (image, way): ``run``, ``network``, ``batchnorm_layers``, ``finite``,
    ``output_max``, ``largest_activation``, ``largest_at`` and ``max_<module>`` columns."""
    from ernas import load_arch
    from ernas.checkpoint import load_model
    from ernas.task import make_task

    arch = load_arch(run / "arch.yaml")
    model = load_model(arch, run / "best.pt").eval()
    bn_layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    task = make_task({"name": "denoise", "max_side": max_side, "sigma": sigma})
    data, crops = task.dataset(split, None, seed), task.dataset(split, crop, seed)
    nets = {"whole": model, "crop": model, "batch_stats": _on_batch_stats(model)}
    rows = []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            for way in WAYS:
                x = (crops[i] if way == "crop" else item)["input"][None]
                seen, hooks = _largest_per_module(nets[way])
                y = nets[way](x)
                for h in hooks:
                    h.remove()
                largest, where = _largest(seen)
                rows.append({"run": run.name, "network": arch.name,
                             "batchnorm_layers": bn_layers,
                             "image": item["name"], "way": way,
                             "finite": bool(torch.isfinite(y).all()),
                             "output_max": float(y.abs().max()),
                             "largest_activation": largest, "largest_at": where,
                             **{f"max_{k}": v for k, v in seen.items()}})
    return rows


def _line(row: dict) -> str:
    growth = " ".join(f"{k[4:]}:{v:.2g}" for k, v in row.items()
                      if k.startswith("max_") and (math.isnan(v) or v > 10))
    return (f"{row['run']:>28} {row['image']:>14} {row['way']:>11}: "
            f"{'finite' if row['finite'] else 'NON-FINITE'}, largest |x| "
            f"{row['largest_activation']:.3g} at {row['largest_at']}"
            + (f"  (|x| > 10 at {growth})" if growth else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+",
                    help="retrain run directories (arch.yaml + best.pt)")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--crop", type=int, default=128, help="side of the centre crop (val_crop)")
    ap.add_argument("--max-side", type=int, default=512, help="the task's max_side")
    ap.add_argument("--sigma", type=float, default=25.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the rows as CSV")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for run in a.runs:
        found = probe(run, a.split, a.crop, a.max_side, a.sigma, a.seed)
        for row in found:
            print(_line(row))
        for way in WAYS:
            bad = [r["image"] for r in found if r["way"] == way and not r["finite"]]
            print(f"{run.name} {way}: {len(bad)} of {len(found) // len(WAYS)} "
                  f"images non-finite" + (f" ({', '.join(bad)})" if bad else ""))
        rows += found
    if a.out:
        import pandas as pd

        from ernas.io import atomic_write_text

        atomic_write_text(a.out, pd.DataFrame(rows).to_csv(index=False))


if __name__ == "__main__":
    main()
