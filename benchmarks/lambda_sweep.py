"""Benchmark: the latency trade-off swept, additive λ and multiplicative β, on ernas-search's setup.

Each arm is one search (``benchmarks/search_schedule.py``'s runner: ``experiments/search.yaml``
plus overrides, run in-process, sequentially): ``search.latency_form=additive search.lam=λ`` for
every λ of ``--lams`` and ``search.latency_form=multiplicative search.beta=β`` for every β of
``--betas``. For the PSNR loss the two forms add λ·r and (10/ln 10)·β·ln r (dB) to the loss.
It prints and writes ``results.csv`` (decisiveness, commit step, predicted latency, supernet and
inherited validation metric with recalibrated BatchNorm, discretisation gap, kept blocks, whether
the arch collapsed to the latency of ``space.smallest()``) and ``lambda_sweep.png`` (predicted
latency vs inherited metric, one point per arm), then checks the spread: the number of distinct
derived latencies, and that no arm with a latency term collapsed.

    python benchmarks/lambda_sweep.py                                   # λ 0,0.5,2; β 0.1,0.3,1
    python benchmarks/lambda_sweep.py --lams 0,1 --betas 0.2 -o search.steps=300
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ernas.latency.backends import machine_description
from search_schedule import report, run_arms


def plot(df, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for form, marker in (("lam", "o"), ("beta", "s")):
        sub = df[df["arm"].str.startswith(form)]
        ax.scatter(sub["predicted_ms"], sub[f"inherited_val_{metric}"], marker=marker,
                   label={"lam": "additive λ", "beta": "multiplicative β"}[form])
        for r in sub.itertuples():
            ax.annotate(r.arm, (r.predicted_ms, getattr(r, f"inherited_val_{metric}")),
                        fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axvline(df["baseline_ms"].iloc[0], c="0.6", ls=":", label="reference arch")
    ax.axvline(df["smallest_ms"].iloc[0], c="0.8", ls="--", label="space.smallest()")
    ax.set(xlabel="predicted latency (ms)", ylabel=f"inherited val {metric} (BN recalibrated)",
           title="latency trade-off sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lams", default="0,0.5,2")
    ap.add_argument("--betas", default="0.1,0.3,1")
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="Hydra override for every arm (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_lambda_"))
    arms = {f"lam{v}": ["search.latency_form=additive", f"search.lam={v}"]
            for v in args.lams.split(",") if v}
    arms.update({f"beta{v}": ["search.latency_form=multiplicative", f"search.beta={v}"]
                 for v in args.betas.split(",") if v})
    print(f"latency trade-off sweep; machine: {machine_description()}; torch {torch.__version__}, "
          f"{args.threads} thread(s); output {out}")
    df = run_arms(arms, ["search.device=cpu", "progress=false", *args.override], out,
                  args.threads)
    print(report(df))
    metric = next(c for c in df.columns if c.startswith("inherited_val_"))[len("inherited_val_"):]
    plot(df, out / "lambda_sweep.png", metric)
    pulled = df[~df["arm"].isin(["lam0", "lam0.0", "beta0", "beta0.0"])]
    print(f"distinct derived latencies: {df['predicted_ms'].round(3).nunique()} of {len(df)}; "
          f"arms with a latency term at space.smallest()'s latency: "
          f"{int(pulled['collapsed'].sum())} of {len(pulled)}; wrote {out / 'results.csv'}, "
          f"{out / 'lambda_sweep.png'}")


if __name__ == "__main__":
    main()
