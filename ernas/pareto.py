"""Latency–quality Pareto plot of several runs (``ernas-evaluate runs=[...]``).

Each run directory holds ``summary.json`` and ``arch.yaml`` (search, retrain and evaluate runs
write both). Latency is the *measured* one when the summary has it; a run without a measurement
is drawn with its *predicted* latency in another marker and legend entry, never mixed silently.
Quality is the task's headline metric (``summary["metric"]``, PSNR for runs that predate it):
the evaluated value, else the best validation value, else the inherited/supernet value of a
search. The front is computed over measured points only when any exist.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ernas.errors import ErnasError
from ernas.io import atomic_write_text
from ernas.space import load_arch

MEASURED = ("measured_ms",)
PREDICTED = ("predicted_ms", "predicted_latency_ms")


def pareto_front(latency, quality) -> np.ndarray:
    """Boolean mask of the non-dominated points when minimising latency and maximising quality:
    i is dominated iff some j has lat_j ≤ lat_i and q_j ≥ q_i with one inequality strict."""
    lat, q = np.asarray(latency, float), np.asarray(quality, float)
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


def _row(d: Path, table) -> dict:
    s_path, a_path = d / "summary.json", d / "arch.yaml"
    if not s_path.is_file() or not a_path.is_file():
        raise ErnasError(f"{d}: a run directory for the Pareto plot needs summary.json and "
                         f"arch.yaml (search, retrain and evaluate runs write both).")
    summary = json.loads(s_path.read_text())
    metric = summary.get("metric", "psnr")
    lf, lat = _first(summary, MEASURED)
    kind = "measured"
    if lat is None:
        lf, lat = _first(summary, PREDICTED)
        kind = "predicted"
    if lat is None and table is not None:
        from ernas.latency.predict import predict_ms
        from ernas.latency.table import LatencyTable

        t = table if not isinstance(table, (str, Path)) else LatencyTable.load(table)
        lf, lat, kind = "predicted_from_table", predict_ms(t, load_arch(a_path)), "predicted"
    qf, q = _first(summary, (metric, f"best_val_{metric}", f"inherited_val_{metric}",
                             f"supernet_val_{metric}"))
    if lat is None or q is None:
        what = "latency" if lat is None else metric
        raise ErnasError(f"{s_path}: no {what} figure in this summary; evaluate the run first "
                         f"(ernas-evaluate checkpoint={d}) or pass pareto_table=<latency table>.")
    return {"run": str(d), "name": summary.get("name") or d.name, "latency_ms": lat,
            "latency_kind": kind, "latency_field": lf, "quality": q, "metric": metric,
            "quality_field": qf, "params": summary.get("params"), "macs": summary.get("macs")}


def pareto(run_dirs, out_png, table=None) -> pd.DataFrame:
    """Draw ``out_png`` and write ``pareto.csv`` beside it (see the module docstring)."""
    from ernas.plots import pyplot, save_png

    rows = [_row(Path(d), table) for d in run_dirs]
    if not rows:
        raise ErnasError("pareto: no run directories given; pass runs=[dir1,dir2,...].")
    metrics = sorted({r["metric"] for r in rows})
    if len(metrics) > 1:
        raise ErnasError(f"pareto: the runs report different metrics ({', '.join(metrics)}); plot "
                         f"runs of one task together.")
    df = pd.DataFrame(rows)
    measured = df["latency_kind"] == "measured"
    pool = measured if measured.any() else ~measured
    df["on_front"] = False
    df.loc[pool, "on_front"] = pareto_front(df.loc[pool, "latency_ms"], df.loc[pool, "quality"])
    out_png = Path(out_png)
    atomic_write_text(out_png.with_name("pareto.csv"), df.to_csv(index=False))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for kind, marker in (("measured", "o"), ("predicted", "^")):
        sub = df[df["latency_kind"] == kind]
        off = sub[~sub["on_front"]]
        if len(off):
            ax.scatter(off["latency_ms"], off["quality"], c="0.6", marker=marker, zorder=2,
                       label=f"dominated ({kind} latency)")
        on = sub[sub["on_front"]]
        if len(on):
            ax.scatter(on["latency_ms"], on["quality"], c="C3", marker=marker, zorder=3,
                       label=f"Pareto front ({kind} latency)")
    front = df[df["on_front"]].sort_values("latency_ms")
    ax.step(front["latency_ms"], front["quality"], where="post", c="C3", lw=1, zorder=1)
    for _, r in df.iterrows():
        ax.annotate(r["name"], (r["latency_ms"], r["quality"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xlabel="latency (ms)", ylabel=metrics[0], title=f"latency–{metrics[0]} trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out_png, dpi=110)
    return df
