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


def plot_probs(rows: list[dict], path: Path, max_points: int = 200) -> None:
    """One panel per decision; in it, one band per position (the position's row, 0 at the
    bottom of the band, 1 at its top) with one line per candidate: p(candidate) over the steps
    (at most ``max_points`` logged steps per line, evenly spaced)."""
    plt = pyplot()
    df = pd.DataFrame(rows, columns=["step", "position", "decision", "choice", "probability"])
    steps = sorted(df["step"].unique())
    if len(steps) > max_points:
        keep = set(steps[::-(-len(steps) // max_points)]) | {steps[-1]}
        df = df[df["step"].isin(keep)]
    positions = list(dict.fromkeys(df["position"])) or ["-"]
    decisions = list(dict.fromkeys(df["decision"])) or ["-"]
    row = {p: len(positions) - 1 - i for i, p in enumerate(positions)}  # first position on top
    fig, axes = plt.subplots(1, len(decisions), squeeze=False, sharey=True,
                             figsize=(3.0 * len(decisions), 0.32 * len(positions) + 1.2))
    for ax, dec in zip(axes[0], decisions):
        sub = df[df["decision"] == dec]
        choices = list(dict.fromkeys(sub["choice"]))
        for (pos, choice), g in sub.groupby(["position", "choice"], sort=False):
            ax.plot(g["step"].to_numpy(), row[pos] + 0.9 * g["probability"].to_numpy(),
                    color=f"C{choices.index(choice)}", lw=0.8)
        for k, c in enumerate(choices):
            ax.plot([], [], color=f"C{k}", label=str(c))
        ax.legend(fontsize=6, loc="upper right", ncol=min(len(choices), 4))
        ax.set_title(dec, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_ylim(-0.1, len(positions) + 0.6)
    axes[0][0].set_yticks([row[p] + 0.45 for p in positions], positions)
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
