"""U-Net benchmark: the classic U-Net against the searched network on the embedded brain data
(task segment, 1-channel 96x80 MNI152 slices, 3 classes: background, grey and white matter).

1. search the U-Net demo space once (``ernas-search experiment=unet_seg``; or reuse
   ``--search DIR``);
2. retrain from scratch, with the same budget (steps, batch, crop, learning rate) and the same
   seeds (``--seeds``, 3 by default), the derived network and the classic U-Net of the same
   geometry (``unet_classic_w16``: the demo space's reference, ``archs/unet_demo_classic.yaml``:
   width 16 -> 256, four downsamplings, double 3x3 conv + BN + ReLU blocks, bilinear up with a
   1x1 conv); ``--full`` adds the full-width classic U-Net (``unet_classic_w64``,
   ``archs/unet_classic.yaml``: width 64 -> 1024, 2x2 transposed-conv up, 31.0 M parameters);
   the best validation checkpoint of each run is kept;
3. per seed, at input 1x1x96x80 (one whole slice): test mIoU, per-class IoU, pixel accuracy and
   mean Dice (one confusion matrix over all test slices), parameters and MACs
   (``ernas.complexity``), predicted latency (the demo space's onnxruntime-CPU tables at 1 and 2
   threads; the full-width U-Net gets a table of its own keys) and measured latency at 1 and 2
   threads: every model fused (BN folded) and its int8 file (onnxruntime static QDQ
   quantisation, calibrated on training crops) timed together, interleaved in shuffled rounds
   (``ernas.latency.measure.measure_interleaved``); int8 mIoU on the same whole test slices;
4. write ``unet_vs_searched.csv`` (one row per model and seed), ``unet_vs_searched.json`` (mean
   and std over seeds, ratios classic / searched, settings, machine) and
   ``unet_vs_searched.md``, and print the table.

    python benchmarks/unet_vs_searched.py --out runs/bench_unet --seeds 0 1 2 --steps 2000

Trailing ``KEY=VALUE`` arguments are overrides of the search config (``experiment=unet_seg``),
e.g. ``latency.cache_dir=...`` or ``latency.table=...``; its latency settings apply throughout.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics as st
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ernas.checkpoint import load_model
from ernas.cli.common import resolve_arch, task_of
from ernas.complexity import count_macs, count_params
from ernas.export import export_model, quantize_int8
from ernas.export.onnx import run_tiled, session
from ernas.io import atomic_write_text
from ernas.latency.factory import make_backend
from ernas.latency.measure import measure_interleaved
from ernas.latency.predict import predict_ms
from ernas.latency.resolve import resolve_from_config
from ernas.paths import EXPERIMENTS
from ernas.space import find_space, load_arch
from ernas.train import TrainConfig, retrain

THREADS = (1, 2)
SEARCHED, CLASSIC, FULL = "unet_searched", "unet_classic_w16", "unet_classic_w64"


def search_config(overrides: list[str]):
    from ernas.cli import search as search_cli  # noqa: F401 - registers the search schema

    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        return compose("search", ["experiment=unet_seg", *overrides])


def latency_config(cfg, threads: int) -> dict:
    lat = OmegaConf.to_container(cfg.latency, resolve=True)
    lat["backend"]["threads"] = threads
    return lat


def judge(predict, task) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean Dice of ``predict`` (1xCxHxW -> logits) on
    the whole test slices (one confusion matrix)."""
    ev = task.evaluator()
    ds = task.eval_sets(0)[task.headline_set]
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            ev.update(predict(item["input"][None].float()).float(), item["target"][None])
    r = ev.compute()
    out = {k: r[k] for k in ("miou", "pixel_accuracy", "mean_dice")}
    out.update({f"iou_{c}": v for c, v in zip(task.classes, r["iou_per_class"])})
    return out


def train_one(arch, task, seed: int, args, out: Path):
    """Retrain ``arch`` from scratch with the shared budget; the best validation checkpoint."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, crop=args.crop, seed=seed,
                      lr=args.lr, val_every=max(1, args.steps // 5), val_crop=None,
                      log_every=max(1, args.steps // 20), device="cpu", amp=False)
    retrain(arch, out, task, cfg, "scratch", progress=args.progress)
    return load_model(arch, out / "best.pt").eval()


def int8_file(arch, model, task, shape, seed: int, out: Path) -> str:
    """BN-folded fp32 ONNX (parity-checked) and its int8 QDQ file calibrated on training crops."""
    fp32 = export_model(arch, model, task, out, input_shape=shape)
    return quantize_int8(fp32["onnx"], task, out / "model_int8.onnx", 16, seed)["int8_onnx"]


def run_seed(archs: dict, task, seed: int, tables: dict, cfg, args, out: Path) -> list[dict]:
    shape = [int(s) for s in cfg.input_shape]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    rows, models, int8 = {}, {}, {}
    for name, arch in archs.items():
        run = out / f"seed{seed}" / name
        models[name] = model = train_one(arch, task, seed, args, run)
        int8[name] = int8_file(arch, model, task, shape, seed, run / "export")
        q8 = judge(lambda t, s=session(int8[name]): run_tiled(s, t, shape[2:]), task)
        rows[name] = {"model": name, "seed": seed, "params": count_params(model),
                      "macs": count_macs(model, tuple(shape)), **judge(model, task),
                      "int8_miou": q8["miou"],
                      **{f"predicted_ms_t{t}": predict_ms(tables[name][t], arch, shape)
                         for t in THREADS}}
    for t in THREADS:
        backend = make_backend(latency_config(cfg, t)["backend"])
        runners = {}
        for name, model in models.items():
            runners[name] = backend.runner(copy.deepcopy(model).fuse(), x)
            runners[f"{name}/int8"] = backend.onnx_runner(int8[name], shape)
        stats = measure_interleaved(runners, **latency_config(cfg, t)["measure"])
        for name, r in rows.items():
            r[f"measured_ms_t{t}"] = stats[name]["ms"]
            r[f"int8_ms_t{t}"] = stats[f"{name}/int8"]["ms"]
    return list(rows.values())


def summarize(df: pd.DataFrame) -> dict:
    """Mean and std over seeds per model, and classic / searched ratios of the means."""
    g = df.drop(columns=["seed"]).groupby("model", sort=False)
    mean, std = g.mean(), g.std().fillna(0.0)
    out = {"models": {m: {c: {"mean": float(mean.loc[m, c]), "std": float(std.loc[m, c])}
                          for c in mean.columns} for m in mean.index}}
    s = mean.loc[SEARCHED]
    for ref in (CLASSIC, FULL):
        if ref in mean.index:
            c = mean.loc[ref]
            out[f"{ref}_over_searched"] = {
                "params": c["params"] / s["params"], "macs": c["macs"] / s["macs"],
                **{f"measured_ms_t{t}": c[f"measured_ms_t{t}"] / s[f"measured_ms_t{t}"]
                   for t in THREADS},
                "miou_points_searched_minus_classic": 100 * (s["miou"] - c["miou"])}
    return out


def report(df: pd.DataFrame, classes) -> str:
    def ms(col, g):
        v = list(g[col])
        return f"{st.mean(v):.3f} ± {st.stdev(v) if len(v) > 1 else 0.0:.3f}"

    lat = [f"{kind}_ms_t{t}" for kind in ("predicted", "measured") for t in THREADS]
    iou = [f"iou_{c}" for c in classes]
    q8 = [f"int8_ms_t{t}" for t in THREADS] + ["int8_miou"]
    head = ["model", "params", "MACs (M)", *lat, "mIoU", *iou, *q8]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in df.groupby("model", sort=False):
        lines.append("| " + " | ".join(
            [name, f"{int(g['params'].iloc[0]):,}", f"{g['macs'].iloc[0] / 1e6:.1f}"]
            + [ms(c, g) for c in (*lat, "miou", *iou, *q8)]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--search", default=None, help="reuse this search run (its arch.yaml)")
    ap.add_argument("--search-steps", type=int, default=None, help="default: the experiment's")
    ap.add_argument("--steps", type=int, default=2000, help="retraining steps per model and seed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full", action="store_true", help="add the width-64 classic U-Net")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="search config overrides, KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    overrides = [f"progress={str(args.progress).lower()}", *args.overrides]
    if args.search_steps is not None:
        overrides += [f"search.steps={args.search_steps}",
                      f"search.warmup_steps={max(1, args.search_steps // 3)}",
                      f"search.checkpoint_every={args.search_steps}"]
    cfg = search_config(overrides)
    if args.search:
        run = Path(args.search)
    else:
        from ernas.cli import search as search_cli

        run = out / "search"
        search_cli.run(cfg, run)
    space, shape, task = find_space(cfg.space), [int(s) for s in cfg.input_shape], task_of(cfg)
    archs = {SEARCHED: load_arch(run / "arch.yaml"), CLASSIC: space.reference()}
    if args.full:
        archs[FULL] = resolve_arch("unet_classic")
    tables = {}
    for name, arch in archs.items():
        where = space if space.contains(arch) else arch.as_space()
        tables[name] = {t: resolve_from_config(where, shape, latency_config(cfg, t),
                                               args.progress)[0] for t in THREADS}
    rows = []
    for seed in args.seeds:
        rows += run_seed(archs, task, seed, tables, cfg, args, out)
        df = pd.DataFrame(rows)
        atomic_write_text(out / "unet_vs_searched.csv", df.to_csv(index=False))
    backend = make_backend(latency_config(cfg, 2)["backend"])
    result = {"settings": {**vars(args), "input_shape": shape, "space": space.name,
                           "search_run": str(run), "task": task.describe()},
              "machine": backend.metadata(), "archs": {n: a.to_dict() for n, a in archs.items()},
              **summarize(df)}
    atomic_write_text(out / "unet_vs_searched.json", json.dumps(result, indent=1, default=str))
    text = report(df, task.classes)
    atomic_write_text(out / "unet_vs_searched.md", text)
    print(f"brain segmentation, {len(args.seeds)} seed(s) x {args.steps} retraining steps, input "
          f"{shape}, onnxruntime CPU ({backend.metadata().get('device')}); mean ± std over "
          f"seeds\n\n" + text)
    for ref in (CLASSIC, FULL):
        r = result.get(f"{ref}_over_searched")
        if r:
            print(f"{ref} / searched: params {r['params']:.1f}x, MACs {r['macs']:.1f}x, measured "
                  f"latency {r['measured_ms_t1']:.2f}x (1 thread), {r['measured_ms_t2']:.2f}x "
                  f"(2 threads); mIoU searched − classic "
                  f"{r['miou_points_searched_minus_classic']:+.2f} points")
    print(f"wrote {out}/unet_vs_searched.csv, unet_vs_searched.json, unet_vs_searched.md")


if __name__ == "__main__":
    main()
