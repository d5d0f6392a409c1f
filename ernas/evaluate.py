"""Evaluation: image quality, size and latency of trained models side by side, and Pareto plots.

Quality (``ernas.metrics``, BasicSR convention): PSNR = 10·log10(255²/MSE) and SSIM (11x11
Gaussian window, σ 1.5) on [0, 255] float RGB, network output clipped to [0, 1], no border crop,
all channels; per image, then averaged. Synthetic noise: ``test_noise`` (clean + σ/255·z, z seeded
by (seed, image index), the same z for every σ, not clipped). Paired folders use their real noisy
images (σ reported as ``real``).

Size: parameters and MACs (``ernas.metrics.count_macs``: conv/linear multiply-accumulates plus the
gate and attention products) at the latency input shape.

Latency: *predicted* = the latency table's corrected sum of op medians (``predict_ms``);
*measured* = median of ``backend.measure`` on the whole fused model (BatchNorm folded) at the
table's input shape on the same backend.
"""
from __future__ import annotations

import copy
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ernas.errors import ErnasError
from ernas.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ernas.metrics import count_macs, count_params, psnr, ssim
from ernas.space import Arch, load_arch
from ernas.train import load_model, resolve_checkpoint

__all__ = ["ModelEntry", "evaluate", "eval_images", "latency_of", "pareto", "pareto_front",
           "quality"]


@dataclass
class ModelEntry:
    """One row of the comparison: a name, an architecture and its checkpoint (None: random
    initialisation, reported as untrained)."""

    name: str
    arch: Arch
    checkpoint: str | None = None

    def model(self) -> nn.Module:
        return load_model(self.arch, resolve_checkpoint(self.checkpoint)
                          if self.checkpoint else None).eval()


# =========================================================================== data
def eval_images(data: str = "bundled", sigmas=(15, 25, 50), seed: int = 0,
                clean_dir=None, noisy_dir=None, color: bool = True, max_side: int | None = None,
                crop: int | None = None) -> list[dict]:
    """Evaluation items ``{"image", "sigma", "noisy", "clean"}`` (C x H x W tensors).

    ``data``: ``bundled`` (the bundled test split), ``folder`` (clean images of ``clean_dir``
    plus synthetic noise at each σ) or ``paired`` (``noisy_dir``/``clean_dir`` matched by name;
    σ = ``real``). ``crop``: centre crop (None: whole images)."""
    from ernas.data import (NoisyImageDataset, PairedImageDataset, bundled_images, clean_folder,
                            paired_folders)

    if data == "paired":
        if not (noisy_dir and clean_dir):
            raise ErnasError("data=paired needs noisy_dir=<folder> and clean_dir=<folder> "
                             "(images matched by file name).")
        ds = PairedImageDataset(paired_folders(noisy_dir, clean_dir, color, crop), crop,
                                train=False)
        return [{"image": it["name"], "sigma": "real", "noisy": it["noisy"],
                 "clean": it["clean"]} for it in (ds[i] for i in range(len(ds)))]
    if data == "bundled":
        images = bundled_images("test", color, max_side)
    elif data == "folder":
        if not clean_dir:
            raise ErnasError("data=folder needs clean_dir=<folder of clean images> (noise is "
                             "added at each sigma).")
        images = clean_folder(clean_dir, color, crop)
    else:
        raise ErnasError(f"data={data!r} is not known; use bundled, folder or paired.")
    if not sigmas:
        raise ErnasError("sigmas is empty; give at least one noise level, e.g. sigmas=[25].")
    items = []
    for s in sigmas:
        ds = NoisyImageDataset(images, crop, float(s), train=False, seed=seed)
        for i in range(len(ds)):
            it = ds[i]
            items.append({"image": it["name"], "sigma": _sigma_label(s), "noisy": it["noisy"],
                          "clean": it["clean"]})
    return items


def _sigma_label(s) -> str:
    return "real" if s == "real" else f"{float(s):g}"


@torch.no_grad()
def quality(model: nn.Module, items: list[dict], name: str, device="cpu") -> list[dict]:
    """Per-image rows ``{model, image, sigma, psnr, ssim}`` of one model."""
    model = model.to(device).eval()
    rows = []
    for it in items:
        out = model(it["noisy"][None].to(device)).float().cpu()[0]
        rows.append({"model": name, "image": it["image"], "sigma": it["sigma"],
                     "psnr": psnr(out, it["clean"]), "ssim": ssim(out, it["clean"])})
    return rows


# =========================================================================== latency
def latency_of(arch: Arch, model: nn.Module, input_shape, latency_cfg: dict | None,
               predict: bool = True, measure: bool = True, progress: bool = False) -> dict:
    """``{predicted_ms, measured_ms, table, backend}`` of one model on the configured backend.

    ``latency_cfg`` is the ``latency`` config group (``backend``, ``granularity``, ``table``,
    ``cache_dir``, ``budget``). The table is resolved for this architecture's own op keys (a
    matching shipped/cached table, else its missing keys are profiled into the cache)."""
    from ernas.latency.backends import MeasureBudget, make_backend
    from ernas.latency.predict import predict_ms
    from ernas.latency.resolve import resolve_table

    out = {"predicted_ms": None, "measured_ms": None, "table": None}
    if not latency_cfg or not (predict or measure):
        return out
    backend = make_backend(latency_cfg["backend"])
    budget = MeasureBudget.from_mapping(latency_cfg.get("budget"))
    shape = tuple(int(s) for s in input_shape)
    gran = latency_cfg.get("granularity", "block")
    if predict:
        table, path = resolve_table(arch.as_space(), shape, backend, gran,
                                    latency_cfg.get("table", "auto"),
                                    latency_cfg.get("cache_dir"), budget, progress)
        out["predicted_ms"] = predict_ms(table, arch, shape, gran)
        out["table"] = str(path)
    if measure:
        fused = copy.deepcopy(model).cpu().eval()
        fused.fuse()
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        out["measured_ms"] = float(np.median(backend.measure(fused, x, budget)))
    out["backend"] = backend.metadata()
    return out


# =========================================================================== the comparison
def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _report(rows: list[dict], labels: list[str], meta: dict) -> str:
    head = ["model", "params", "GMACs", "predicted ms", "measured ms"]
    for s in labels:
        sig = "real noise" if s == "real" else f"σ={s}"
        head += [f"PSNR {sig}", f"SSIM {sig}"]
    lines = ["# Evaluation report", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"] + ("" if r["trained"] else " (untrained)"), f"{r['params']:,}",
                 _fmt(r["macs"] / 1e9, 3), _fmt(r["predicted_ms"]), _fmt(r["measured_ms"])]
        for s in labels:
            cells += [_fmt(r.get(f"psnr_sigma{s}")), _fmt(r.get(f"ssim_sigma{s}"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    b = meta.get("backend") or {}
    lines += [
        "", "## Definitions", "",
        "- **PSNR** (dB): 10·log10(255²/MSE) on [0, 255] float images, all channels, no border "
        "crop, network output clipped to [0, 1] (BasicSR convention, `ernas.metrics.psnr`); "
        "mean over images.",
        "- **SSIM**: Wang et al. 2004 with an 11x11 Gaussian window (σ 1.5), K1 0.01, K2 0.03, "
        "on [0, 255] (`skimage.metrics.structural_similarity`, as BasicSR); mean over images.",
        f"- **Data**: {meta['data_description']}. Synthetic noise: clean + N(0, σ/255), seeded "
        f"by (seed={meta['seed']}, image index), the same draw for every σ, not clipped.",
        f"- **MACs**: multiply-accumulates of conv/linear layers plus SimpleGate and channel-"
        f"attention products (`ernas.metrics.count_macs`) at input {meta['input_shape']}; "
        f"normalisation, additions and activations count 0.",
        f"- **Latency** at input {meta['input_shape']}: *predicted* = corrected sum of the "
        f"latency table's op medians; *measured* = median of whole-model runs of the fused "
        f"model (BatchNorm folded). Backend {b.get('backend', '–')}, provider "
        f"{b.get('provider', '–')}, threads {b.get('threads', '–')}, dtype "
        f"{b.get('dtype', '–')}, device {b.get('device', '–')}.",
        "- *untrained*: no checkpoint given, so the weights are a seeded random initialisation "
        "(its quality numbers are not meaningful, its size and latency are).", ""]
    return "\n".join(lines)


def evaluate(entries: list[ModelEntry], out_dir, sigmas=(15, 25, 50), data: str = "bundled",
             clean_dir=None, noisy_dir=None, seed: int = 0, color: bool = True,
             max_side: int | None = None, crop: int | None = None,
             latency_cfg: dict | None = None, input_shape=(1, 3, 256, 256),
             predict: bool = True, measure: bool = True, device: str = "cpu",
             progress: bool = True) -> dict:
    """Evaluate ``entries`` (the first is the model under test, the rest baselines) and write
    ``per_image.csv``, ``results.csv``, ``report.md``, ``summary.json`` (and the first entry's
    ``arch.yaml``) into ``out_dir``. Returns the summary."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = eval_images(data, sigmas, seed, clean_dir, noisy_dir, color, max_side, crop)
    labels = list(dict.fromkeys(it["sigma"] for it in items))
    per_image, rows, meta_backend, tables = [], [], None, {}
    for e in tqdm(entries, desc="evaluate", disable=not progress):
        model = e.model()
        q = quality(model, items, e.name, device)
        per_image += q
        lat = latency_of(e.arch, model, input_shape, latency_cfg, predict, measure)
        meta_backend = lat.get("backend") or meta_backend
        tables[e.name] = lat["table"]
        row = {"name": e.name, "arch": e.arch.name, "arch_source": e.arch.source,
               "checkpoint": e.checkpoint or "", "trained": e.checkpoint is not None,
               "params": count_params(model), "macs": count_macs(model.cpu(), input_shape),
               "predicted_ms": lat["predicted_ms"], "measured_ms": lat["measured_ms"]}
        frame = pd.DataFrame(q)
        for s in labels:
            sub = frame[frame["sigma"] == s]
            row[f"psnr_sigma{s}"] = float(sub["psnr"].mean())
            row[f"ssim_sigma{s}"] = float(sub["ssim"].mean())
        rows.append(row)
    atomic_write_text(out / "per_image.csv", pd.DataFrame(
        per_image, columns=["model", "image", "sigma", "psnr", "ssim"]).to_csv(index=False))
    atomic_write_text(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    desc = {"bundled": "bundled test split (" + ", ".join(dict.fromkeys(
        it["image"] for it in items)) + ")", "folder": f"clean images of {clean_dir}",
        "paired": f"noisy/clean pairs of {noisy_dir} and {clean_dir}"}[data]
    meta = {"data_description": desc, "seed": seed, "input_shape": list(input_shape),
            "backend": meta_backend}
    atomic_write_text(out / "report.md", _report(rows, labels, meta))
    entries[0].arch.save(out / "arch.yaml")
    main = rows[0]
    head = "25" if "25" in labels else labels[0]
    summary = {
        "name": main["name"], "psnr": main[f"psnr_sigma{head}"],
        "ssim": main[f"ssim_sigma{head}"], "psnr_sigma": head,
        "measured_ms": main["measured_ms"], "predicted_ms": main["predicted_ms"],
        "latency_ms": main["measured_ms"] if main["measured_ms"] is not None
        else main["predicted_ms"],
        "params": main["params"], "macs": main["macs"], "models": rows,
        "data": data, "data_description": desc, "sigmas": labels, "seed": seed,
        "images": len(set(it["image"] for it in items)), "input_shape": list(input_shape),
        "latency_backend": meta_backend, "latency_tables": tables,
    }
    if len(rows) > 1:
        b = rows[1]
        summary["baseline"] = {k: b[k] for k in ("name", "predicted_ms", "measured_ms",
                                                 f"psnr_sigma{head}")}
        if b["measured_ms"] and main["measured_ms"]:
            summary["measured_speedup"] = b["measured_ms"] / main["measured_ms"]
        if b["predicted_ms"] and main["predicted_ms"]:
            summary["predicted_speedup"] = b["predicted_ms"] / main["predicted_ms"]
    atomic_write_json(out / "summary.json", summary)
    return summary


# =========================================================================== Pareto
LATENCY_FIELDS = ("measured_ms", "latency_ms", "predicted_ms", "predicted_latency_ms")
PSNR_FIELDS = ("psnr", "test_psnr", "best_val_psnr", "final_val_psnr", "inherited_val_psnr",
               "supernet_val_psnr")


def pareto_front(latency, quality_) -> np.ndarray:
    """Boolean mask of the non-dominated points when minimising latency and maximising quality:
    i is dominated iff some j has lat_j ≤ lat_i and q_j ≥ q_i with one inequality strict."""
    lat, q = np.asarray(latency, float), np.asarray(quality_, float)
    mask = np.ones(len(lat), dtype=bool)
    for i in range(len(lat)):
        better = (lat <= lat[i]) & (q >= q[i]) & ((lat < lat[i]) | (q > q[i]))
        mask[i] = not better.any()
    return mask


def _first(summary: dict, fields) -> tuple[str, float] | tuple[None, None]:
    for f in fields:
        v = summary.get(f)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return f, float(v)
    return None, None


def pareto(run_dirs, out_png, table=None) -> pd.DataFrame:
    """Latency–PSNR Pareto plot of several runs; writes ``out_png`` and ``pareto.csv`` beside it.

    Each run directory holds ``summary.json`` and ``arch.yaml``. Latency is the first of
    ``LATENCY_FIELDS`` found in the summary (or, with a ``table``, the arch's predicted latency);
    PSNR the first of ``PSNR_FIELDS``. The fields used are listed per run in the CSV."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for d in map(Path, run_dirs):
        s_path, a_path = d / "summary.json", d / "arch.yaml"
        if not s_path.is_file() or not a_path.is_file():
            raise ErnasError(f"{d}: a run directory for the Pareto plot needs summary.json and "
                             f"arch.yaml (search, retrain and evaluate runs write both).")
        summary = json.loads(s_path.read_text())
        arch = load_arch(a_path)
        lf, lat = _first(summary, LATENCY_FIELDS)
        if lat is None and table is not None:
            from ernas.latency.predict import predict_ms
            from ernas.latency.table import LatencyTable

            t = table if not isinstance(table, (str, Path)) else LatencyTable.load(table)
            lf, lat = "predicted_from_table", predict_ms(t, arch)
        pf, q = _first(summary, PSNR_FIELDS)
        if lat is None or q is None:
            raise ErnasError(f"{s_path}: no {'latency' if lat is None else 'PSNR'} figure in this "
                             f"summary (looked for "
                             f"{', '.join(LATENCY_FIELDS if lat is None else PSNR_FIELDS)}); "
                             f"evaluate the run first (ernas-evaluate) or pass a latency table.")
        rows.append({"run": str(d), "name": summary.get("name") or d.name, "latency_ms": lat,
                     "psnr": q, "latency_field": lf, "psnr_field": pf,
                     "params": summary.get("params"), "macs": summary.get("macs")})
    if not rows:
        raise ErnasError("pareto: no run directories given; pass runs=[dir1,dir2,...].")
    df = pd.DataFrame(rows)
    df["on_front"] = pareto_front(df["latency_ms"], df["psnr"])
    out_png = Path(out_png)
    atomic_write_text(out_png.with_name("pareto.csv"), df.to_csv(index=False))

    fig, ax = plt.subplots(figsize=(6, 4.2))
    off = df[~df["on_front"]]
    ax.scatter(off["latency_ms"], off["psnr"], c="0.6", label="dominated", zorder=2)
    front = df[df["on_front"]].sort_values("latency_ms")
    ax.step(front["latency_ms"], front["psnr"], where="post", c="C3", lw=1, zorder=1)
    ax.scatter(front["latency_ms"], front["psnr"], c="C3", label="Pareto front", zorder=3)
    for _, r in df.iterrows():
        ax.annotate(r["name"], (r["latency_ms"], r["psnr"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    fields = ", ".join(sorted(set(df["latency_field"]))), ", ".join(sorted(set(df["psnr_field"])))
    ax.set(xlabel=f"latency (ms) [{fields[0]}]", ylabel=f"PSNR (dB) [{fields[1]}]",
           title="latency–PSNR trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return df
