"""Prove a latency table against end-to-end measurement of whole networks.

For N sampled architectures (plus the smallest, the largest and the reference) we measure the
fused network on the table's backend and compare with the prediction. Per-op sums drift from
end-to-end time (fusion across ops, layout changes, per-call overhead), so we also fit the linear
correction ``measured ≈ a·Σ t(k) + b`` and report it honestly by leave-one-out: each architecture
is predicted by a fit on the others. The full-data fit is stored in the table's metadata
(``correction``), where ``predict_ms`` and ``ExpectedLatency`` apply it.

Figures: MAPE = mean |pred − meas|/meas; within_x = fraction with |pred − meas|/meas ≤ x;
Spearman ρ and Kendall τ between predicted and measured.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from ernas import build_model
from ernas.io import atomic_write_json
from ernas.latency.backends import Backend, MeasureBudget
from ernas.latency.table import LatencyTable
from ernas.space import SearchSpace


def accuracy(pred: np.ndarray, meas: np.ndarray) -> dict:
    rel = np.abs(pred - meas) / meas
    return {"mape": float(rel.mean()), "within_5pct": float((rel <= 0.05).mean()),
            "within_10pct": float((rel <= 0.10).mean()),
            "spearman": float(stats.spearmanr(pred, meas).statistic),
            "kendall": float(stats.kendalltau(pred, meas).statistic), "n": int(len(pred))}


def fit_correction(raw: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    a, b = np.polyfit(raw, meas, 1)
    return float(a), float(b)


def loo_predictions(raw: np.ndarray, meas: np.ndarray) -> np.ndarray:
    out = np.empty_like(raw)
    for i in range(len(raw)):
        keep = np.arange(len(raw)) != i
        a, b = fit_correction(raw[keep], meas[keep])
        out[i] = a * raw[i] + b
    return out


def validation_archs(space: SearchSpace, n: int, seed: int):
    rng = random.Random(seed)
    named = [("smallest", space.smallest()), ("largest", space.largest()),
             ("reference", space.reference())]
    return named + [(f"sample_{i:03d}", space.sample(rng)) for i in range(n)]


def validate_table(space: SearchSpace, table: LatencyTable, backend: Backend, out_dir: str | Path,
                   n: int = 30, seed: int = 0, budget: MeasureBudget | None = None,
                   table_path: str | Path | None = None, store_correction: bool = True,
                   progress: bool = True, rounds: int = 3) -> dict:
    """Measure sampled networks end to end; write validation.csv, validation.png, summary.json.

    Each network is measured in ``rounds`` interleaved passes (alternating order) and its
    latency is the median of the passes, so slow drift of the machine hits all networks alike;
    ``repeatability`` reports the median relative spread (max − min)/median of one network's
    passes — the noise floor against which the prediction errors should be read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(table.metadata["input_shape"])
    gran = table.metadata.get("granularity", "block")
    torch.manual_seed(0)
    nets = [(name, arch, build_model(arch).eval().fuse())
            for name, arch in validation_archs(space, n, seed)]
    x = torch.randn(shape)
    passes: dict[str, list[float]] = {name: [] for name, _, _ in nets}
    bar = tqdm(total=rounds * len(nets), desc="validating", disable=not progress)
    for r in range(rounds):
        for name, _, model in (nets if r % 2 == 0 else nets[::-1]):
            passes[name].append(float(np.median(backend.measure(model, x, budget))))
            bar.update(1)
    bar.close()
    rows = []
    for name, arch, _ in nets:
        p = np.array(passes[name])
        rows.append({"arch": name, "sum_ms": float(table.lookup(arch.op_keys(shape, gran)).sum()),
                     "measured_ms": float(np.median(p)), "min_pass_ms": float(p.min()),
                     "max_pass_ms": float(p.max()),
                     "pass_spread": float((p.max() - p.min()) / np.median(p))})
    df = pd.DataFrame(rows)
    raw, meas = df["sum_ms"].to_numpy(), df["measured_ms"].to_numpy()
    loo = loo_predictions(raw, meas)
    plain, corrected = accuracy(raw, meas), accuracy(loo, meas)
    use = corrected["mape"] < plain["mape"]  # keep the correction only if it helps out of sample
    a, b = fit_correction(raw, meas) if use else (1.0, 0.0)
    df["predicted_ms"] = a * raw + b
    df["loo_corrected_ms"] = loo
    df["rel_error"] = ((loo if use else raw) - meas) / meas
    summary = {**(corrected if use else plain),
               "model": "linear correction of per-key sums (leave-one-out)" if use else
                        "plain per-key sums (the correction did not help under leave-one-out)",
               "plain_sum": plain, "corrected_loo": corrected, "rounds": rounds,
               "repeatability": float(df["pass_spread"].median()),
               "correction": {"scale": a, "offset_ms": b, "fitted_on": len(df), "used": use},
               "space": space.name, "granularity": gran, "input_shape": list(shape),
               "backend": backend.metadata().get("backend"), "device": backend.metadata().get("device"),
               "table": str(table_path) if table_path else None}
    df.to_csv(out / "validation.csv", index=False)
    _plot(df, out / "validation.png", summary)
    atomic_write_json(out / "summary.json", summary)
    if store_correction and table_path:
        table.metadata["correction"] = summary["correction"]
        table.save(table_path)
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
    ax.scatter(df["measured_ms"], df["sum_ms"], s=14, c="tab:gray", label="plain sum of keys")
    ax.scatter(df["measured_ms"], df["loo_corrected_ms"], s=16, c="tab:blue",
               label="corrected (leave-one-out)")
    ax.set(xlabel="measured latency (ms)", ylabel="predicted latency (ms)", xlim=(lo, hi),
           ylim=(lo, hi), title=f"{s['space']} · {s['backend']} · {s['granularity']} keys\n"
           f"MAPE {100 * s['mape']:.1f}%, ±10% {100 * s['within_10pct']:.0f}%, "
           f"ρ {s['spearman']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
