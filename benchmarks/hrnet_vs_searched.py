"""HRNet-lite benchmark: the hand-made references against the searched network on the embedded
brain data (task segment, 1-channel 96x80 MNI152 slices, 3 classes).

1. search the demo space once (``ernas-search experiment=hrnet_seg``; or reuse ``--search DIR``);
2. retrain the derived network and the references ``archs/hrnet_w18_small.yaml`` (HRNet-W18-
   small-like) and ``archs/hrnet_mini.yaml`` (Mini-HRNet-like) from scratch with the same budget
   (steps, batch, crop, learning rate) for each seed, keep the best validation checkpoint;
3. per seed: mIoU on the test slices (whole images, one confusion matrix), parameters, MACs
   (``ernas.complexity``), measured latency (the three fused models timed interleaved in shuffled
   rounds on onnxruntime CPU, ``ernas.evaluate.measure_latencies``) and predicted latency (the
   demo space's table, which holds every key of the references too) at 1 and 2 threads, input
   1x1x96x80;
4. write ``hrnet_vs_searched.csv`` (columns ``model, seed, params, macs, measured_ms_t1,
   measured_ms_t2, predicted_ms_t1, predicted_ms_t2, miou``), ``hrnet_vs_searched.md`` (mean ±
   std over seeds) and ``latency_miou.png``: mIoU against measured latency (1 and 2 threads) for
   these models and, when ``--unet`` names the U-Net benchmark's output (its folder or CSV with
   the same columns), for the U-Net search and its references on the same axes.

    python benchmarks/hrnet_vs_searched.py --out runs/bench_hrnet --seeds 0 1 2 --steps 2000 \
        --unet runs/bench_unet
"""
from __future__ import annotations

import argparse
import statistics as st
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ernas.checkpoint import load_model
from ernas.cli import search as search_cli  # also registers the search config schema
from ernas.cli.common import resolve_arch, task_of
from ernas.complexity import count_macs, count_params
from ernas.evaluate import measure_latencies, quality
from ernas.io import atomic_write_text
from ernas.latency.predict import predict_ms
from ernas.latency.resolve import resolve_from_config
from ernas.paths import EXPERIMENTS
from ernas.plots import pyplot, save_png
from ernas.space import find_space, load_arch
from ernas.train import TrainConfig, retrain

COLUMNS = ["model", "seed", "params", "macs", "measured_ms_t1", "measured_ms_t2",
           "predicted_ms_t1", "predicted_ms_t2", "miou"]
REFERENCES = ("hrnet_w18_small", "hrnet_mini")
THREADS = (1, 2)


def search_config(overrides: list[str]):
    with initialize_config_dir(str(EXPERIMENTS), version_base="1.3"):
        return compose("search", ["experiment=hrnet_seg", *overrides])


def latency_config(cfg, threads: int) -> dict:
    lat = OmegaConf.to_container(cfg.latency, resolve=True)
    lat["backend"]["threads"] = threads
    return lat


def search(cfg, out: Path) -> Path:
    search_cli.run(cfg, out)
    return out


def train_one(arch, task, seed: int, args, out: Path):
    """Retrain ``arch`` from scratch with the shared budget; the best validation checkpoint."""
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, crop=args.crop, seed=seed,
                      lr=args.lr, val_every=max(1, args.steps // 4), val_crop=None,
                      log_every=max(1, args.steps // 20), device="cpu", amp=False)
    retrain(arch, out, task, cfg, "scratch", progress=args.progress)
    return load_model(arch, out / "best.pt").eval()


def run_seed(archs: dict, task, seed: int, tables: dict, cfg, args, out: Path) -> list[dict]:
    shape = tuple(int(s) for s in cfg.input_shape)
    models, rows = {}, []
    for name, arch in archs.items():
        models[name] = train_one(arch, task, seed, args, out / f"seed{seed}" / name)
        _, q = quality(models[name], task, task.eval_sets(seed), name)
        rows.append({"model": name, "seed": seed, "params": count_params(models[name]),
                     "macs": count_macs(models[name], shape),
                     "miou": q[f"{task.metric}_{task.headline_set}"],
                     **{f"predicted_ms_t{t}": predict_ms(tables[t], arch, shape)
                        for t in THREADS}})
    for t in THREADS:
        stats, _ = measure_latencies(models, shape, latency_config(cfg, t), args.progress)
        for r in rows:
            r[f"measured_ms_t{t}"] = stats[r["model"]]["ms"]
    return rows


def mean_std(values) -> str:
    values = list(values)
    sd = st.stdev(values) if len(values) > 1 else 0.0
    return f"{st.mean(values):.3f} ± {sd:.3f}"


def report(df: pd.DataFrame) -> str:
    head = ["model", "params", "MACs (M)", "measured ms t1", "measured ms t2",
            "predicted ms t1", "predicted ms t2", "mIoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, g in df.groupby("model", sort=False):
        lines.append("| " + " | ".join(
            [name, f"{int(g['params'].iloc[0]):,}", f"{g['macs'].iloc[0] / 1e6:.1f}"]
            + [mean_std(g[c]) for c in COLUMNS[4:]]) + " |")
    mean = df.groupby("model", sort=False).mean(numeric_only=True)
    if {"hrnet_searched", "hrnet_mini"} <= set(mean.index):
        s, m = mean.loc["hrnet_searched"], mean.loc["hrnet_mini"]
        lines += ["", (f"Searched vs Mini-HRNet-like (means over {df['seed'].nunique()} seed(s)): "
                       f"measured {m['measured_ms_t1'] / s['measured_ms_t1']:.2f}x (1 thread), "
                       f"{m['measured_ms_t2'] / s['measured_ms_t2']:.2f}x (2 threads) faster; "
                       f"mIoU {s['miou'] - m['miou']:+.4f}.")]
    return "\n".join(lines) + "\n"


def unet_rows(ref: str | None) -> pd.DataFrame | None:
    """The U-Net benchmark's rows: ``ref`` is its CSV or the folder holding it."""
    if not ref:
        return None
    p = Path(ref)
    files = sorted(p.glob("*.csv")) if p.is_dir() else [p]
    for f in files:
        df = pd.read_csv(f)
        if set(COLUMNS) <= set(df.columns):
            return df
    print(f"no CSV with columns {', '.join(COLUMNS)} at {ref}; plotting HRNet-lite only")
    return None


def plot(frames: dict[str, pd.DataFrame], path: Path) -> None:
    """mIoU against measured latency at 1 and 2 threads; mean ± std over seeds per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    markers = {"HRNet-lite": "o", "U-Net": "s"}
    for ax, t in zip(axes, THREADS):
        for family, df in frames.items():
            g = df.groupby("model", sort=False)
            mean, sd = g.mean(numeric_only=True), g.std(numeric_only=True).fillna(0.0)
            for name in mean.index:
                searched = "search" in name
                ax.errorbar(mean.loc[name, f"measured_ms_t{t}"], mean.loc[name, "miou"],
                            xerr=sd.loc[name, f"measured_ms_t{t}"], yerr=sd.loc[name, "miou"],
                            fmt=markers[family], mfc=None if searched else "none", capsize=3,
                            label=f"{family}: {name}")
                ax.annotate(name, (mean.loc[name, f"measured_ms_t{t}"], mean.loc[name, "miou"]),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(plt.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(plt.ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"measured latency (ms, onnxruntime CPU, {t} thread{'s' * (t > 1)})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (test)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle("brain segmentation, 1x1x96x80: searched (filled) vs hand-made (hollow)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_png(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--search", default=None, help="reuse this search run (its arch.yaml)")
    ap.add_argument("--search-steps", type=int, default=None, help="default: the experiment's")
    ap.add_argument("--steps", type=int, default=600, help="retraining steps per model and seed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--unet", default=None, help="U-Net benchmark output (folder or CSV)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    overrides = [f"progress={str(args.progress).lower()}"]
    if args.search_steps is not None:
        warmup = max(1, args.search_steps // 3)
        overrides += [f"search.steps={args.search_steps}", f"search.warmup_steps={warmup}",
                      f"search.checkpoint_every={args.search_steps}"]
    cfg = search_config(overrides)
    run = Path(args.search) if args.search else search(cfg, out / "search")
    archs = {"hrnet_searched": load_arch(run / "arch.yaml"),
             **{name: resolve_arch(name) for name in REFERENCES}}
    task = task_of(cfg)
    space, shape = find_space(cfg.space), [int(s) for s in cfg.input_shape]
    tables = {t: resolve_from_config(space, shape, latency_config(cfg, t), args.progress)[0]
              for t in THREADS}
    rows = []
    for seed in args.seeds:
        rows += run_seed(archs, task, seed, tables, cfg, args, out)
        df = pd.DataFrame(rows, columns=COLUMNS)
        atomic_write_text(out / "hrnet_vs_searched.csv", df.to_csv(index=False))
    text = report(df)
    atomic_write_text(out / "hrnet_vs_searched.md", text)
    frames = {"HRNet-lite": df}
    unet = unet_rows(args.unet)
    if unet is not None:
        frames["U-Net"] = unet
    plot(frames, out / "latency_miou.png")
    print(text + f"wrote {out}/hrnet_vs_searched.csv, hrnet_vs_searched.md, latency_miou.png")


if __name__ == "__main__":
    main()
