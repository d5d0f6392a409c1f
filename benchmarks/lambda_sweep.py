"""Benchmark: the λ sweep through the real CLI, gathered into a table and a latency–PSNR plot.

Runs ``python -m ernas.cli.search -m experiment=lambda_sweep search.lam=<lams> ...`` (Hydra
multirun, one search per λ, ``hydra.sweep.dir=<out>/sweep``), then reads every run's
``summary.json`` into ``lambda_sweep.csv`` (λ, predicted_latency_ms, params, supernet_val_psnr,
decisiveness, plus the derived network's PSNR with inherited weights before retraining) and
draws ``lambda_sweep.png`` next to it (predicted latency vs PSNR, one point per λ). When
``ernas.evaluate.pareto`` is importable it also writes its Pareto plot (``pareto.png`` +
``pareto.csv``). Finally it checks that the predicted latency falls monotonically as λ rises.

``derived_psnr``: ``arch.yaml`` + ``inherited.pt`` of the run (``SuperNet.extract(derive())``)
in eval mode on the run's own validation batches (the α batches, steps 0..eval_batches-1, the
same ones ``supernet_val_psnr`` uses), ``ernas.metrics.psnr`` per image, averaged.

    python benchmarks/lambda_sweep.py                           # λ = 0, 0.25, 1, 4
    python benchmarks/lambda_sweep.py --lams 0,0.5,2 -o search.steps=200
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ernas.latency.backends import machine_description


def derived_psnr(run_dir: Path, overrides: list[str]) -> float:
    """PSNR of the run's derived network with inherited weights on its own val batches."""
    from hydra import compose, initialize_config_dir

    from ernas import build_model, load_arch
    from ernas.cli.search import search_data
    from ernas.metrics import psnr
    from ernas.paths import EXPERIMENTS
    from ernas.search import step_batches

    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        cfg = compose(config_name="search", overrides=overrides)
    _, val = search_data(cfg.data, cfg.seed)
    vb = step_batches(val, int(cfg.search.batch_size), cfg.seed + 1)
    model = build_model(load_arch(run_dir / "arch.yaml"))
    model.load_state_dict(torch.load(run_dir / "inherited.pt", map_location="cpu",
                                     weights_only=True), strict=True)
    model.eval()
    vals = []
    with torch.no_grad():
        for i in range(int(cfg.search.get("eval_batches", 4))):
            noisy, clean = vb(i)
            vals += [psnr(p, c) for p, c in zip(model(noisy), clean)]
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lams", default="0,0.25,1,4")
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="extra Hydra override for every run (repeatable)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-run", action="store_true", help="only gather an existing <out>/sweep")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_lambda_"))
    out.mkdir(parents=True, exist_ok=True)
    sweep = out / "sweep"
    common = ["experiment=lambda_sweep", "search.device=cpu", "progress=false", *args.override]
    cmd = [sys.executable, "-m", "ernas.cli.search", "-m", *common, f"search.lam={args.lams}",
           f"hydra.sweep.dir={sweep}"]
    print(f"λ sweep through ernas-search; machine: {machine_description()}, torch {torch.__version__} "
          f"(threads: the CLI's default, {torch.get_num_threads()})")
    print("command: " + " ".join(cmd))
    t0 = time.perf_counter()
    if not args.no_run:
        r = subprocess.run(cmd, capture_output=True, text=True)
        (out / "sweep_stdout.txt").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
        if r.returncode:
            sys.exit(f"the sweep failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - t0

    import pandas as pd

    rows = []
    for s_path in sorted(sweep.glob("*/summary.json")):
        s = json.loads(s_path.read_text())
        c = s["config"]
        rows.append({"lam": c["lam"], "predicted_latency_ms": s["predicted_latency_ms"],
                     "params": s["params"], "supernet_val_psnr": s["supernet_val_psnr"],
                     "derived_psnr": derived_psnr(s_path.parent, common + [
                         f"search.lam={c['lam']}"]),
                     "decisiveness": s["decisiveness"], "entropy": s["entropy"],
                     "macs": s["macs"], "speedup": s.get("speedup"),
                     "baseline_latency_ms": s["baseline_latency_ms"],
                     "search_seconds": s["search_seconds"], "run": str(s_path.parent)})
    if not rows:
        sys.exit(f"no summary.json under {sweep}")
    df = pd.DataFrame(rows).sort_values("lam").reset_index(drop=True)
    csv = out / "lambda_sweep.csv"
    df.to_csv(csv, index=False)
    first = json.loads((Path(df["run"][0]) / "summary.json").read_text())
    c = first["config"]
    print(f"settings (from the runs' summaries): space {first['space']}, steps {c['steps']}, "
          f"warmup {c['warmup_steps']}, batch {c['batch_size']}, mode {c['mode']}, latency "
          f"{c['latency_form']} (target {first['target_ms']:.2f} ms = baseline), entropy_max "
          f"{c['entropy_max']} ({c['entropy_shape']}), seed {c['seed']}, input "
          f"{first['input_shape']}, table {first.get('latency_table')}; sweep wall {wall:.0f} s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(df["predicted_latency_ms"], df["supernet_val_psnr"], "o-", c="C0",
            label="supernet (val)")
    ax.plot(df["predicted_latency_ms"], df["derived_psnr"], "s--", c="C1",
            label="derived, inherited weights (val)")
    for col in ("supernet_val_psnr", "derived_psnr"):  # one label per distinct point
        groups: dict = {}
        for _, r in df.iterrows():
            key = (round(r["predicted_latency_ms"], 2), round(r[col], 1))
            groups.setdefault(key, []).append(f"{r['lam']:g}")
        for (x, y), lams in groups.items():
            ax.annotate("λ=" + ",".join(lams), (x, y), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(df["baseline_latency_ms"][0], c="0.6", ls=":", label="NAFNet reference latency")
    ax.set(xlabel="predicted latency (ms)", ylabel="PSNR (dB)",
           title=f"λ sweep, {first['space']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / "lambda_sweep.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    pareto_note = "ernas.evaluate.pareto not available"
    try:
        from ernas.evaluate import pareto

        pareto(list(df["run"]), out / "pareto.png")
        pareto_note = f"{out / 'pareto.png'} + {out / 'pareto.csv'} (ernas.evaluate.pareto)"
    except ImportError:
        pass
    except Exception as e:  # the tool is young; the benchmark's own plot stands regardless
        pareto_note = f"ernas.evaluate.pareto failed: {type(e).__name__}: {e}"

    show = df[["lam", "predicted_latency_ms", "params", "supernet_val_psnr", "derived_psnr",
               "decisiveness", "speedup", "search_seconds"]]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    lat = df["predicted_latency_ms"].to_numpy()
    nonincr = bool(np.all(np.diff(lat) <= 1e-9))
    strict = bool(np.all(np.diff(lat) < -1e-9))
    print(f"predicted latency as λ rises: {' -> '.join(f'{v:.2f}' for v in lat)} ms; "
          f"monotonically non-increasing: {'YES' if nonincr else 'NO'}; strictly falling: "
          f"{'YES' if strict else 'NO'}")
    print(f"wrote {csv}, {png}; Pareto: {pareto_note}")


if __name__ == "__main__":
    main()
