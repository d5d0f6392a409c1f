"""PNG plots: one writer (atomic, Agg backend) and the plots of search and training runs."""
from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from ernas.io import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_probs(rows: list[dict], path: Path) -> None:
    """Small multiples: one panel per (position, decision), one line per candidate."""
    plt = pyplot()
    df = pd.DataFrame(rows, columns=["step", "position", "decision", "choice", "probability"])
    positions = list(dict.fromkeys(df["position"])) or ["-"]
    decisions = list(dict.fromkeys(df["decision"])) or ["-"]
    size = (2.2 * len(decisions), 1.4 * len(positions) + 0.6)
    fig, axes = plt.subplots(len(positions), len(decisions), squeeze=False, sharex=True,
                             sharey=True, figsize=size)
    for i, pos in enumerate(positions):
        for j, dec in enumerate(decisions):
            ax = axes[i][j]
            sub = df[(df["position"] == pos) & (df["decision"] == dec)]
            for choice, g in sub.groupby("choice", sort=False):
                ax.plot(g["step"], g["probability"], label=str(choice))
            if len(sub):
                ax.legend(fontsize=5, loc="upper left")
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(dec, fontsize=8)
            if j == 0:
                ax.set_ylabel(pos, fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_search_curves(rows: list[dict], path: Path, metric: str = "psnr",
                       label: str = "PSNR (dB)") -> None:
    """Expected latency (ms) and the training batches' headline metric over the steps."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["expected_ms"] for r in rows])
    a.set(xlabel="step", ylabel="E[latency] (ms)", title="expected latency")
    b.plot(steps, [r[f"train_{metric}"] for r in rows])
    b.set(xlabel="step", ylabel=label, title=f"training {metric}")
    fig.tight_layout()
    save_png(fig, path)


def plot_train_curves(rows: list[dict], path: Path, metric: str = "psnr",
                      label: str = "PSNR (dB)") -> None:
    """Training loss (total and, with distillation, the task part) and the validation metric
    against the step."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    tr = [r for r in rows if r.get("loss") is not None]
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="total")
    if any(r.get("feat_loss") or r.get("out_loss") for r in tr):
        a.plot([r["step"] for r in tr], [r["task_loss"] for r in tr], label="task loss")
        a.legend(fontsize=7)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    va = [r for r in rows if r.get(f"val_{metric}") is not None]
    b.plot([r["step"] for r in va], [r[f"val_{metric}"] for r in va], marker="o")
    b.set(xlabel="step", ylabel=label, title=f"validation {metric}")
    fig.tight_layout()
    save_png(fig, path)
