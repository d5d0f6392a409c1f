"""Benchmark: search runs side by side (the α schedule by default), one arm after another.

Each arm is ``ernas-search``'s own configuration (``experiments/search.yaml`` composed with
Hydra: space, task, bundled data, latency table, batches) plus the arm's overrides, run
in-process with ``run_search`` on ``--threads`` CPU threads, sequentially. Per arm it reports,
from the run's ``summary.json`` and ``log.csv``:

  decisiveness    mean over decisions of max_c softmax(α)_c at the end;
  commit step     first logged step with decisiveness ≥ 0.9 (α has committed), and the training
                  PSNR/metric (mean of the logged values) in the 50 steps before it vs the last 50:
                  α that commits while the weights still improve commits on an unfinished model;
  E[lat] ms       predicted latency of the derived arch (the table's), and the baseline's;
  supernet/inh.   validation metric of the supernet and of the extracted network with inherited
                  weights, both with BatchNorm recalibrated on training batches;
  gap             supernet − inherited (the discretisation gap);
  arch            kept blocks, whether its predicted latency is that of ``space.smallest()``
                  (a collapse), and a short form per block.

Grid: ``--grid lr_alpha=3e-3,3e-2 --grid warmup_steps=150,300`` runs the product over the
``search.`` fields; ``--arm NAME=ov1,ov2`` adds explicit arms (full Hydra overrides); ``-o`` adds
an override to every arm. Results: ``<out>/results.csv`` and ``<out>/<arm>/`` run directories.

    python benchmarks/search_schedule.py                               # tiny: lr_α x warm-up
    python benchmarks/search_schedule.py -o space=nafnet_ern_small -o search.steps=300 \\
        -o search.crop=32 --grid lr_alpha=3e-3,3e-2 --grid warmup_steps=75,150
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from ernas.latency.backends import machine_description

SCHEDULE_GRID = ["lr_alpha=3e-3,1e-2,3e-2", "warmup_steps=150,300"]


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import ernas.search  # noqa: F401  (registers SearchConfig as search.yaml's schema)
    from ernas.paths import EXPERIMENTS

    with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
        return hcompose(config_name="search", overrides=list(overrides))


def grid_arms(grid: list[str]) -> dict[str, list[str]]:
    """``["lr_alpha=a,b", "warmup_steps=c,d"]`` -> one arm per combination of search fields."""
    axes = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in grid)]
    return {"_".join(f"{k}{v}" for (k, _), v in zip(axes, combo)):
            [f"search.{k}={v}" for (k, _), v in zip(axes, combo)]
            for combo in itertools.product(*(vals for _, vals in axes))}


def short(v: dict) -> str:
    """A NAFNet block choice in a few characters (other families: their values joined)."""
    if not v.get("keep", True):
        return "skip"
    if "norm" not in v:
        return "/".join(str(x) for x in v.values())
    n = {"layernorm": "LN", "batchnorm": "BN", "none": "-"}[v["norm"]]
    return f"{n}/{'sca' if v['attention'] == 'sca' else '-'}/k{v['kernel']}/" \
           f"d{v['dw_expand']}f{v['ffn_expand']}"


def arm_row(run_dir: Path, space, smallest_ms: float) -> dict:
    """The figures of one finished run (see the module docstring)."""
    import pandas as pd

    from ernas import load_arch

    s = json.loads((run_dir / "summary.json").read_text())
    log = pd.read_csv(run_dir / "log.csv")
    m = s["metric"]
    train = log[f"train_{m}"]
    hit = log[log["decisiveness"] >= 0.9]
    commit = int(hit["step"].iloc[0]) if len(hit) else None
    before = train[(log["step"] < commit) & (log["step"] >= commit - 50)].mean() if commit \
        else float("nan")
    arch = load_arch(run_dir / "arch.yaml")
    searched = {p: arch.values[p] for p in space.searchable}
    return {"decisiveness": s["decisiveness"], "entropy": s["entropy"], "commit_step": commit,
            f"train_{m}_before_commit": before,
            f"train_{m}_last50": train[log["step"] >= log["step"].max() - 50].mean(),
            "predicted_ms": s["predicted_latency_ms"], "baseline_ms": s["baseline_latency_ms"],
            f"supernet_val_{m}": s[f"supernet_val_{m}"],
            f"inherited_val_{m}": s[f"inherited_val_{m}"],
            "gap": s["discretisation_gap"],
            "kept": sum(not space.spec.inactive(v) for v in searched.values()),
            "positions": len(searched),
            "collapsed": s["predicted_latency_ms"] <= smallest_ms * (1 + 1e-9),
            "arch": ", ".join(f"{p}={short(v)}" for p, v in searched.items()),
            "seconds": s["search_seconds"]}


def run_arms(arms: dict[str, list[str]], common: list[str], out: Path, threads: int):
    """Run every arm (``common`` + its overrides) sequentially into ``out/<arm>``; return and
    write ``out/results.csv``. Arms whose ``summary.json`` exists are read, not re-run."""
    import pandas as pd

    from ernas.cli.search import prepare
    from ernas.search import run_search

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, overrides) in enumerate(arms.items()):
        cfg = compose([*common, *overrides])
        p = prepare(cfg)
        run_dir = out / name
        if i == 0:
            sc = p["scfg"]
            print(f"space {cfg.space}, task {p['task'].name}, input {p['shape']}, table "
                  f"{p['table_path']}; steps {sc.steps}, batch {sc.batch_size}, crop {sc.crop}, "
                  f"mode {sc.mode}, latency {sc.latency_form} (λ {sc.lam}, β {sc.beta}), "
                  f"entropy_max {sc.entropy_max} ({sc.entropy_shape}), seed {sc.seed}; common "
                  f"overrides {common}", flush=True)
        if not (run_dir / "summary.json").is_file():
            t0 = time.perf_counter()
            run_search(p["space"], p["expected"], p["train_batch"], p["val_batch"], p["scfg"],
                       run_dir, p["task"], progress=False, input_shape=p["shape"])
            print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        smallest_ms = p["expected"].of_arch(p["space"].smallest())
        rows.append({"arm": name, "overrides": " ".join(overrides), "smallest_ms": smallest_ms,
                     **arm_row(run_dir, p["space"], smallest_ms)})
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    return pd.DataFrame(rows)


def report(df) -> str:
    """The results table (without the arch strings) and one arch line per arm."""
    cols = [c for c in df.columns if c not in ("overrides", "arch", "baseline_ms", "smallest_ms")]
    lines = [df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"),
             (f"predicted latency of the baseline (reference arch) "
              f"{df['baseline_ms'].iloc[0]:.2f} ms, of space.smallest() "
              f"{df['smallest_ms'].iloc[0]:.2f} ms")]
    lines += [f"{r.arm}: {r.arch}" for r in df.itertuples()]
    return "\n".join(lines)


def parse_args(description: str, grid: list[str] | None = None):
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--grid", action="append", default=None,
                    help=f"FIELD=v1,v2 over search.FIELD (repeatable; default {grid})")
    ap.add_argument("--arm", action="append", default=[],
                    help="NAME=override1,override2 (full Hydra overrides; repeatable)")
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="Hydra override for every arm (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    arms = grid_arms(args.grid if args.grid is not None else (grid or []))
    for a in args.arm:
        name, _, ovs = a.partition("=")
        arms[name] = [o for o in ovs.split(",") if o]
    return args, arms


def main() -> None:
    args, arms = parse_args(__doc__, SCHEDULE_GRID)
    out = Path(args.out or tempfile.mkdtemp(prefix="ernas_schedule_"))
    common = ["search.device=cpu", "progress=false", *args.override]
    print(f"search schedule comparison; machine: {machine_description()}; torch "
          f"{torch.__version__}, {args.threads} thread(s); output {out}")
    df = run_arms(arms, common, out, args.threads)
    print(report(df))


if __name__ == "__main__":
    main()
