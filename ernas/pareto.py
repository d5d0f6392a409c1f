"""Latency–quality Pareto plot of several runs (``ernas-evaluate runs=[...]``).

Each run directory holds ``summary.json`` and ``arch.yaml`` (search, retrain and evaluate runs
write both). Latency is the *measured* one when the summary has it; a run without a measurement
is drawn with its *predicted* latency in another marker and legend entry, never mixed silently.
Quality is the task's headline metric (``summary["metric"]``, PSNR for runs that predate it):
the evaluated value, else the best validation value, else the inherited/supernet value of a
search.

**Networks.** Runs with the same name (the summary's ``name``, else its ``arch`` name, else the
directory's name) and the same architecture are repeats of one network (seeds): it is drawn at
its mean latency and mean quality, with ± one standard deviation of the quality over runs as an
error bar. **Series**: networks derived by a search (arch names ``<space>_searched``) and the
others (hand-made); each series gets its own front, the non-dominated networks (measured ones
only, when any network of the series was measured). The same drawing (``plot_fronts``) is the
figure of ``benchmarks/pareto.py``.
"""
from __future__ import annotations

import hashlib
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
SEARCHED_SUFFIX = "_searched"


def pareto_front(latency, quality) -> np.ndarray:
    """Boolean mask of the non-dominated points when minimising latency and maximising quality:
    i is dominated iff some j has lat_j ≤ lat_i and q_j ≥ q_i with one inequality strict."""
    lat, q = np.asarray(latency, float), np.asarray(quality, float)
    mask = np.ones(len(lat), dtype=bool)
    for i in range(len(lat)):
        better = (lat <= lat[i]) & (q >= q[i]) & ((lat < lat[i]) | (q > q[i]))
        mask[i] = not better.any()
    return mask


def arch_digest(arch) -> str:
    """A short hash of an architecture's content (family, geometry, values; not its name)."""
    d = arch.to_dict()
    d.pop("name", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    arch = load_arch(a_path)
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
        lf, lat, kind = "predicted_from_table", predict_ms(t, arch), "predicted"
    qf, q = _first(summary, (metric, f"best_val_{metric}", f"inherited_val_{metric}",
                             f"supernet_val_{metric}"))
    if lat is None or q is None:
        what = "latency" if lat is None else metric
        raise ErnasError(f"{s_path}: no {what} figure in this summary; evaluate the run first "
                         f"(ernas-evaluate checkpoint={d}) or pass pareto_table=<latency table>.")
    name = summary.get("name") or (summary["arch"] if isinstance(summary.get("arch"), str)
                                   else d.name)
    return {"run": str(d), "name": name, "arch_digest": arch_digest(arch),
            "series": "searched" if arch.name.endswith(SEARCHED_SUFFIX) else "hand-made",
            "latency_ms": lat, "latency_kind": kind, "latency_field": lf, "quality": q,
            "metric": metric, "quality_field": qf, "params": summary.get("params"),
            "macs": summary.get("macs")}


def networks(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per network (runs grouped by name and architecture): mean latency, mean and
    standard deviation (ddof 1; 0 for one run) of the quality, ``runs`` = number of runs, and
    ``on_front`` within its series (see the module docstring)."""
    g = runs.groupby(["name", "arch_digest", "latency_kind"], sort=False)
    net = g.agg(series=("series", "first"), latency_ms=("latency_ms", "mean"),
                quality=("quality", "mean"), quality_std=("quality", "std"),
                runs=("run", "count"), params=("params", "first"),
                macs=("macs", "first")).reset_index()
    net["quality_std"] = net["quality_std"].fillna(0.0)
    net["on_front"] = False
    for _, rows in net.groupby("series", sort=False):
        measured = rows["latency_kind"] == "measured"
        pool = rows[measured if measured.any() else ~measured]
        net.loc[pool.index, "on_front"] = pareto_front(pool["latency_ms"], pool["quality"])
    return net


def plot_fronts(net: pd.DataFrame, path, title: str, ylabel: str,
                threshold: tuple[float, str] | None = None) -> None:
    """Draw ``net`` (columns ``name``, ``series``, ``latency_ms``, ``latency_kind``,
    ``quality``, ``quality_std``, ``on_front``, optional ``reference``) to ``path``: one colour
    per series, error bars of ± one std, each series' front as a line, log latency axis;
    predicted latencies in hollow markers; ``threshold`` = (quality, label) draws a level."""
    from matplotlib import ticker

    from ernas.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (s, rows) in enumerate(net.groupby("series", sort=False)):
        color, marker = f"C{i}", "osv^D"[i % 5]
        for kind in ("measured", "predicted"):
            sub = rows[rows["latency_kind"] == kind]
            if len(sub):
                ax.errorbar(sub["latency_ms"], sub["quality"], yerr=sub["quality_std"],
                            fmt=marker, c=color, capsize=3, label=f"{s} ({kind} latency)",
                            mfc=color if kind == "measured" else "none")
        fr = rows[rows["on_front"]].sort_values("latency_ms")
        ax.plot(fr["latency_ms"], fr["quality"], c=color, lw=1)
        for _, r in rows.iterrows():
            ax.annotate(str(r["name"]), (r["latency_ms"], r["quality"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    if "reference" in net and net["reference"].any():
        ref = net[net["reference"]].iloc[0]
        ax.plot(ref["latency_ms"], ref["quality"], "k*", ms=12, label="reference")
    if threshold is not None:
        ax.axhline(threshold[0], c="0.5", ls="--", lw=1, label=threshold[1])
    ax.set(xscale="log", xlabel="latency (ms, log scale)", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(8))
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def pareto(run_dirs, out_png, table=None) -> pd.DataFrame:
    """Draw ``out_png`` of the networks in ``run_dirs`` and write ``pareto.csv`` (one row per
    run, with its network's ``on_front``) and ``networks.csv`` beside it; returns the runs."""
    rows = [_row(Path(d), table) for d in run_dirs]
    if not rows:
        raise ErnasError("pareto: no run directories given; pass runs=[dir1,dir2,...].")
    metrics = sorted({r["metric"] for r in rows})
    if len(metrics) > 1:
        raise ErnasError(f"pareto: the runs report different metrics ({', '.join(metrics)}); plot "
                         f"runs of one task together.")
    df = pd.DataFrame(rows)
    net = networks(df)
    key = ["name", "arch_digest", "latency_kind"]
    df = df.merge(net[key + ["on_front"]], on=key, how="left")
    out_png = Path(out_png)
    atomic_write_text(out_png.with_name("pareto.csv"), df.to_csv(index=False))
    atomic_write_text(out_png.with_name("networks.csv"), net.to_csv(index=False))
    spread = " (mean ± std over runs of a network)" if (net["runs"] > 1).any() else ""
    plot_fronts(net, out_png, f"latency–{metrics[0]} trade-off of {len(df)} runs",
                f"{metrics[0]}{spread}")
    return df
