"""Prove a latency table against end-to-end measurement of whole networks.

For N sampled architectures (plus the smallest, the largest and the reference: the headline
networks) the fused network is measured on the table's backend, all networks together in
interleaved shuffled rounds with the table's statistic (``ernas.latency.measure``), and compared
with the table's prediction.

Figures, for predictions ``p`` and measurements ``m`` over the networks:
MAPE = mean |p − m| / m; ``within_5pct``/``within_10pct`` = fraction with |p − m| / m ≤ 5% / 10%;
Spearman ρ and Kendall τ between p and m. They are given for

- ``as_predicted``: what ernas predicts, ``predict_ms`` (the plain sum of key latencies, times a
  stored correction if the table has one) — the headline figures;
- ``plain_sum``: Σ_k t(k) over the network's keys;
- ``corrected_loo``: the linear correction ``m ≈ a·Σ t + b`` fitted by least squares, judged out
  of sample by leave-one-out (each network predicted by a fit on the others).

``speedup``: the same figures for speed-ups over the reference network, predicted
``p_ref / p_i`` against measured ``paired_ratio(ref, i)`` (the median over rounds of the per-round
ratio, ``ernas.latency.measure``), over every network but the reference. A slow phase of the
machine scales a whole round alike and cancels in the paired ratio, while it shifts absolute
figures; so ``speedup`` tells the table's error apart from the machine's drift, and it is the
figure a search's trade-off (and the Pareto benchmark's agreement) depends on. Its
``noise_floor`` is the median over networks of the pass-to-pass spread of the per-round ratio
(``paired_spread``), the noise a single pass's speed-up carries.

``anchored``: the table anchored in this session as ``latency.anchor`` anchors it at use time
(``ernas.latency.anchor``): the reference, the smallest and ``anchor_samples`` networks drawn
as a search draws them (rows ``anchor_<i>``, measured in the same pass, not among the headline
networks), ``m ≈ a·Σ t + b`` through the reference with the least-squares slope of the others;
scored (absolute and speed-ups ``(a·Σ_ref + b)/(a·Σ_i + b)``) out of sample, on every network
but the anchors and their twins. It is what a user gets who times those networks on the day (a
few seconds): the machine's drift since profiling (a scale) and a per-network overhead the keys
do not add (an offset) are absorbed, and what is left is the table's error in the shape of the
front.

``measurement_noise`` (and ``speedup.measurement_noise``) is the median over networks of the
split-half gap (``half_gap``/``paired_half_gap``, ``ernas.latency.measure``): how much two
half-length measurements of one figure disagree; an error well above it is the table's.

``noise_floor`` is the median over networks of their pass-to-pass spread (mean difference of
the per-round statistic between two rounds, over its median; ``ernas.latency.measure``): errors
below it cannot be told from the noise of a single pass. All networks are live at once so that
they can be interleaved (~300 MB each for the ERN space at 256x256).

Validation never changes its input: not the table object, not its file. The fitted correction is
written only when asked (``write_corrected``), as a new table ``<out_dir>/<stem>_corrected.csv``.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ernas import build_model, inference_model
from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.latency.anchor import ANCHOR_SAMPLES, anchor_archs, anchor_problem, anchored_fit
from ernas.latency.backends import Backend
from ernas.latency.measure import (MeasureProtocol, paired_half_gap, paired_ratio,
                                   paired_spread)
from ernas.latency.predict import predict_ms
from ernas.latency.table import LatencyTable
from ernas.paths import LATENCY_TABLES

__all__ = ["accuracy", "anchor_rows", "anchored_accuracy", "fit_correction", "loo_predictions",
           "validate_table", "validated_networks", "validation_archs"]


def accuracy(pred: np.ndarray, meas: np.ndarray) -> dict:
    rel = np.abs(pred - meas) / meas
    return {"mape": float(rel.mean()), "within_5pct": float((rel <= 0.05).mean()),
            "within_10pct": float((rel <= 0.10).mean()),
            "spearman": float(stats.spearmanr(pred, meas).statistic),
            "kendall": float(stats.kendalltau(pred, meas).statistic), "n": int(len(pred))}


def fit_correction(raw: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """Least-squares (a, b) of meas ≈ a·raw + b."""
    a, b = np.polyfit(raw, meas, 1)
    return float(a), float(b)


def loo_predictions(raw: np.ndarray, meas: np.ndarray) -> np.ndarray:
    out = np.empty_like(raw)
    for i in range(len(raw)):
        keep = np.arange(len(raw)) != i
        a, b = fit_correction(raw[keep], meas[keep])
        out[i] = a * raw[i] + b
    return out


def anchored_accuracy(df: pd.DataFrame, anchors: list[int],
                      twins=()) -> tuple[dict | None, str | None]:
    """Accuracy of the table anchored at the rows ``anchors`` (the reference first, then the
    smallest and the sampled anchors; module docstring), on the other networks (``twins``: rows
    of the same network as an anchor, left out too), and None; or None and why no line is
    scored (fewer than 3 other networks, ``anchor_problem``, a slope ≤ 0)."""
    ref, small = anchors[0], anchors[1]
    raw, meas = df["sum_ms"].to_numpy(), df["measured_ms"].to_numpy()
    rest = df.drop(index=sorted({*anchors, *twins}))
    if len(rest) < 3:
        return None, (f"only {len(rest)} networks are not anchors or twins of one (3 needed); "
                      f"raise validate.n")
    why = anchor_problem(raw[[ref, small]], meas[[ref, small]])
    if why:
        return None, why
    a, b = anchored_fit(raw, meas, ref, anchors[1:])
    if a <= 0:
        return None, f"the anchors' least-squares slope {a:.3g} is not positive"
    pred = a * rest["sum_ms"].to_numpy() + b
    return {**accuracy(pred, rest["measured_ms"].to_numpy()), "scale": a, "offset_ms": b,
            "anchors": [df.loc[i, "arch"] for i in anchors], "scored_on": len(rest),
            "speedup": accuracy((a * raw[ref] + b) / pred,
                                rest["measured_speedup"].to_numpy())}, None


def validation_archs(space, n: int, seed: int):
    rng = random.Random(seed)
    named = [("smallest", space.smallest()), ("largest", space.largest()),
             ("reference", space.reference())]
    return named + [(f"sample_{i:03d}", space.sample(rng)) for i in range(n)]


def validated_networks(space, n: int, seed: int, anchor_samples: int, shape,
                       gran: str) -> list:
    """(name, arch) of every network a validation measures: ``validation_archs`` and the anchor
    samples as ``anchor_<i>`` (the same draws as ``latency.anchor``)."""
    drawn = anchor_archs(space, anchor_samples, shape, gran)
    return validation_archs(space, n, seed) + [(k.replace("sample_", "anchor_"), a)
                                               for k, a in drawn.items() if k.startswith("sample_")]


def _protected(path: Path) -> bool:
    """Whether ``path`` lies under the shipped tables or the installed package."""
    import ernas

    path = path.resolve()
    roots = (LATENCY_TABLES.resolve(), Path(ernas.__file__).resolve().parent)
    return any(path == r or r in path.parents for r in roots)


def _measure(space, backend: Backend, protocol: MeasureProtocol, shape: tuple, gran: str,
             n: int, seed: int, anchor_samples: int, progress: bool) -> tuple[list, dict]:
    """The validation networks plus the anchor samples (``anchor_<i>``) as (name, arch) pairs,
    and their end-to-end measurements, all interleaved in one pass."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    named = validated_networks(space, n, seed, anchor_samples, shape, gran)
    runners = {name: backend.runner(inference_model(build_model(arch)), x)
               for name, arch in named}
    measured = protocol.measure(runners, progress=progress, desc="validating")
    del runners
    return named, measured


def _frame(table: LatencyTable, named: list, measured: dict, shape: tuple,
           gran: str) -> pd.DataFrame:
    """One row per network: table sum, prediction, measurement with its spread, and speed-ups
    over the reference (predicted ratio and measured paired ratio)."""
    rows = []
    for name, arch in named:
        m = measured[name]
        rows.append({"arch": name, "anchor_sample": name.startswith("anchor_"),
                     "sum_ms": float(table.lookup(arch.op_keys(shape, gran)).sum()),
                     "predicted_ms": predict_ms(table, arch, shape, gran),
                     "measured_ms": m["ms"], "median_ms": m["median"], "p10_ms": m["p10"],
                     "p90_ms": m["p90"], "pass_spread": m["spread"], "half_gap": m["half_gap"],
                     "samples": m["n"]})
    df = pd.DataFrame(rows)
    ref = df.index[df["arch"] == "reference"][0]
    ref_m = measured["reference"]
    df["predicted_speedup"] = df.loc[ref, "predicted_ms"] / df["predicted_ms"]
    df["measured_speedup"] = [paired_ratio(ref_m, measured[a]) for a in df["arch"]]
    df["speedup_spread"] = [paired_spread(ref_m, measured[a]) for a in df["arch"]]
    df["speedup_half_gap"] = [paired_half_gap(ref_m, measured[a]) for a in df["arch"]]
    return df


def anchor_rows(df: pd.DataFrame, keys: list) -> tuple[list[int], list[int]]:
    """The anchors' rows of a validation frame (the reference, the smallest, then the anchor
    samples) and their twins' (other rows with the op keys of an anchor; ``keys``: per row)."""
    anchors = [df.index[df["arch"] == "reference"][0], df.index[df["arch"] == "smallest"][0],
               *df.index[df["anchor_sample"]]]
    twins = [i for i, k in enumerate(keys) if i not in anchors and k in [keys[j] for j in anchors]]
    return anchors, twins


def _add_fits(df: pd.DataFrame, keys: list) -> tuple[dict | None, str | None]:
    """Add the leave-one-out corrected and the anchored predictions to ``df`` (``keys``: each
    row's op keys, to find the anchors' twins); return ``anchored_accuracy``'s answer."""
    main = df[~df["anchor_sample"]]
    raw, meas = main["sum_ms"].to_numpy(), main["measured_ms"].to_numpy()
    df.loc[main.index, "loo_corrected_ms"] = (loo_predictions(raw, meas) if len(main) >= 3
                                              else raw.copy())
    anchors, twins = anchor_rows(df, keys)
    anchored, unanchored = anchored_accuracy(df, anchors, twins)
    df["anchored_ms"] = (anchored["scale"] * df["sum_ms"] + anchored["offset_ms"]
                         if anchored else np.nan)
    df["anchored_scored"] = bool(anchored) & ~df.index.isin([*anchors, *twins])
    df["rel_error"] = (df["predicted_ms"] - df["measured_ms"]) / df["measured_ms"]
    return anchored, unanchored


def _accuracies(df: pd.DataFrame, anchored: dict | None, unanchored: str | None) -> dict:
    """The figures of the module docstring over the validation networks (anchor samples apart):
    as predicted, plain sum, leave-one-out corrected, anchored (or why not), noise, speed-ups
    and the fitted line."""
    main = df[~df["anchor_sample"]]
    others = main[main["arch"] != "reference"]
    raw, pred, meas, loo = (main[c].to_numpy() for c in ("sum_ms", "predicted_ms",
                                                         "measured_ms", "loo_corrected_ms"))
    a, b = fit_correction(raw, meas)
    as_pred = accuracy(pred, meas)
    return {**as_pred, "as_predicted": as_pred, "plain_sum": accuracy(raw, meas),
            "corrected_loo": accuracy(loo, meas), "anchored": anchored,
            "anchored_skipped": unanchored, "noise_floor": float(main["pass_spread"].median()),
            "measurement_noise": float(main["half_gap"].median()),
            "speedup": {**accuracy(others["predicted_speedup"].to_numpy(),
                                   others["measured_speedup"].to_numpy()),
                        "noise_floor": float(others["speedup_spread"].median()),
                        "measurement_noise": float(others["speedup_half_gap"].median())},
            "fitted_correction": {"scale": a, "offset_ms": b, "fitted_on": len(main)}}


def _write_corrected(table: LatencyTable, table_path: Path | None, out: Path, space,
                     summary: dict) -> str:
    """The table with the fitted correction in its metadata, as ``<stem>_corrected.csv``."""
    stem = table_path.stem if table_path else f"{space.name}_table"
    dest = out / f"{stem}_corrected.csv"
    meta = {**copy.deepcopy(table.metadata), "correction": {
        **summary["fitted_correction"], "validated_on": summary["fitted_correction"]["fitted_on"],
        "source_table": str(table_path) if table_path else None}}
    LatencyTable(table.to_frame(), meta).save(dest)
    return str(dest)


def validate_table(space, table: LatencyTable, backend: Backend, out_dir: str | Path,
                   n: int = 30, seed: int = 0, protocol: MeasureProtocol | None = None,
                   table_path: str | Path | None = None, write_corrected: bool = False,
                   progress: bool = True, anchor_samples: int = ANCHOR_SAMPLES) -> dict:
    """Measure sampled networks end to end; write validation.csv, validation.png and
    summary.json in ``out_dir``; return the summary (see the module docstring)."""
    protocol = protocol or MeasureProtocol()
    out = Path(out_dir)
    if _protected(out):
        raise ErnasError(f"Validation would write its results into {out}, under the shipped "
                         f"tables or the installed package; ernas never writes there. Give it a "
                         f"run directory (ernas-profile writes into its Hydra run dir).")
    out.mkdir(parents=True, exist_ok=True)
    table_path = Path(table_path) if table_path else table.path
    shape = tuple(table.metadata["input_shape"])
    gran = table.metadata.get("granularity", "block")
    if n < 0 or anchor_samples < 0:
        raise ErnasError(f"validate.n={n} and latency.anchor_samples={anchor_samples} must be "
                         f">= 0.")
    named, measured = _measure(space, backend, protocol, shape, gran, n, seed, anchor_samples,
                               progress)
    df = _frame(table, named, measured, shape, gran)
    anchored, unanchored = _add_fits(df, [arch.op_keys(shape, gran) for _, arch in named])
    summary = {**_accuracies(df, anchored, unanchored),
               "table_correction": copy.deepcopy(table.metadata.get("correction")),
               "space": space.name, "granularity": gran, "input_shape": list(shape),
               "table": str(table_path) if table_path else None,
               "table_fingerprint": (table.metadata.get("fingerprint") or {}).get("digest"),
               "probe": table.probe,
               "backend": backend.name, "device": backend.metadata().get("device"),
               "session_options": backend.session_options(), "protocol": protocol.to_dict(),
               "corrected_table": None}
    if write_corrected:
        summary["corrected_table"] = _write_corrected(table, table_path, out, space, summary)
    df.to_csv(out / "validation.csv", index=False)
    _plot(df, out / "validation.png", summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _plot(df: pd.DataFrame, path: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = df["measured_ms"].min() * 0.8, df["measured_ms"].max() * 1.2
    x = np.linspace(lo, hi, 10)
    ax.plot(x, x, "k-", lw=1, label="predicted = measured")
    ax.fill_between(x, 0.9 * x, 1.1 * x, color="tab:green", alpha=0.15, label="±10%")
    main = df[~df["anchor_sample"]]
    ax.scatter(main["measured_ms"], main["predicted_ms"], s=14, c="tab:gray", label="predicted")
    ax.scatter(df["measured_ms"], df["loo_corrected_ms"], s=16, c="tab:blue",
               label="corrected (leave-one-out)")
    if s["anchored"]:
        rest = df["anchored_scored"]
        ax.scatter(df.loc[rest, "measured_ms"], df.loc[rest, "anchored_ms"], s=14, marker="x",
                   c="tab:orange", label="anchored (reference, smallest, samples)")
    ax.set(xlabel="measured latency (ms)", ylabel="predicted latency (ms)", xlim=(lo, hi),
           ylim=(lo, hi), title=f"{s['space']} · {s['backend']} · {s['granularity']} keys\n"
           f"MAPE {100 * s['mape']:.1f}%, ±10% {100 * s['within_10pct']:.0f}%, "
           f"ρ {s['spearman']:.3f}, noise floor {100 * s['noise_floor']:.1f}%\n"
           f"speed-ups over the reference (paired): MAPE {100 * s['speedup']['mape']:.1f}%, "
           f"±10% {100 * s['speedup']['within_10pct']:.0f}%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
