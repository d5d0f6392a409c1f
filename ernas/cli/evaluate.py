"""``ernas-evaluate``: the task's metrics, size and latency of a model beside a baseline
(``results.csv``, ``per_image.csv``, ``report.md``, ``summary.json``), or with ``runs=[...]`` the
latency–quality Pareto plot of several runs (``pareto.png``, ``pareto.csv``)."""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from ernas.cli.common import (arch_for, claim_run_dir, device_name, hydra_main, log_start,
                              output_dir, resolve_arch, task_of, user_errors)
from ernas.cli.schema import Evaluate
from ernas.config import validated
from ernas.errors import ErnasError
from ernas.io import atomic_write_json

log = logging.getLogger(__name__)


@user_errors
def run(cfg: DictConfig, out=None) -> dict:
    from ernas.evaluate import ModelEntry, evaluate
    from ernas.pareto import pareto

    params = validated(cfg, Evaluate, "evaluate config")
    if params.threads:
        import torch
        torch.set_num_threads(params.threads)
    if params.runs:
        dirs = run_dirs(params.runs)
        out = claim_run_dir(out) if out else output_dir()
        log_start("evaluate", out, runs=len(dirs), pareto_table=cfg.pareto_table)
        df = pareto(dirs, out / "pareto.png", cfg.pareto_table)
        summary = {"runs": df.to_dict(orient="records"),
                   "front": list(dict.fromkeys(df.loc[df["on_front"], "name"])),
                   "plot": str(out / "pareto.png"), "csv": str(out / "pareto.csv")}
        atomic_write_json(out / "summary.json", summary)
        print(f"Pareto fronts of {len(df)} runs: {', '.join(summary['front'])}; wrote "
              f"{out / 'pareto.png'}, pareto.csv and networks.csv")
        return summary
    arch = arch_for(cfg.arch, cfg.checkpoint)
    entries = [ModelEntry(cfg.name or arch.name, arch,
                          str(cfg.checkpoint) if cfg.checkpoint else None)]
    b = cfg.baseline
    if b.enabled:
        if b.arch:
            b_arch = resolve_arch(b.arch)
        else:
            b_arch = arch.as_space().reference()
            b_arch.name = "reference"
        same = (b_arch.geometry, b_arch.values, b.checkpoint) == (arch.geometry, arch.values,
                                                                   cfg.checkpoint)
        if not same:  # comparing a model with itself adds nothing
            entries.append(ModelEntry(b.name or b_arch.name, b_arch,
                                      str(b.checkpoint) if b.checkpoint else None))
    latency = OmegaConf.to_container(cfg.latency, resolve=True) if cfg.get("latency") else None
    if latency and not cfg.arch:
        latency = search_table(latency, cfg.checkpoint)
    out = claim_run_dir(out) if out else output_dir()
    _log_start(cfg, out, latency, entries)
    summary = evaluate(entries, out, task_of(cfg), cfg.seed, latency, tuple(cfg.input_shape),
                       cfg.predict_latency, cfg.measure_latency, cfg.device, cfg.progress,
                       params.memory_runs, params.tile)
    print(_line(summary) + f"; wrote {out}/report.md, results.csv")
    return summary


def _log_start(cfg: DictConfig, out, latency: dict | None, entries: list) -> None:
    """The start line: run folder, device, the latency backend when latency is predicted or
    measured, the models compared."""
    from ernas.latency.factory import make_backend

    timed = latency and (cfg.predict_latency or cfg.measure_latency)
    log_start("evaluate", out, device_name(cfg.device),
              make_backend(latency["backend"]) if timed else None,
              models=", ".join(e.name for e in entries), task=cfg.task.name,
              input_shape=list(cfg.input_shape))


def search_table(latency: dict, checkpoint) -> dict:
    """``latency`` predicting from a search run's copy of its table (the table and anchored
    line the search optimised) when ``checkpoint`` is that run and ``latency.table`` is auto."""
    from pathlib import Path

    from ernas.cli.search import RUN_TABLE

    if not checkpoint or latency.get("table") not in (None, "auto"):
        return latency
    c = Path(str(checkpoint))
    copy = (c if c.is_dir() else c.parent) / RUN_TABLE
    if not copy.is_file():
        return latency
    log.info("predicting from the search's own table %s (the table and line it optimised); "
             "give latency.table=<table> to predict from another.", copy)
    return {**latency, "table": str(copy), "trust_table": True, **_copy_key_threads(latency, copy)}


def _copy_key_threads(latency: dict, copy) -> dict:
    """``{"key_threads": n}`` when the copy's keys were timed at n threads and its line anchored
    at the requested ``backend.threads`` (a search run with ``latency.key_threads``), else {}."""
    from ernas.latency.table import LatencyTable

    meta = LatencyTable.load(copy).metadata
    line = (meta.get("correction") or {}).get("anchored") or {}
    asked = (latency.get("backend") or {}).get("threads")
    if asked is not None and line.get("threads") == asked != meta.get("threads"):
        return {"key_threads": meta.get("threads")}
    return {}


def run_dirs(runs) -> list[str]:
    """Run directories from a list, or from one glob pattern (expanded here, so directory names
    with ',' or '=' — Hydra sweep folders — need no quoting)."""
    import glob

    if isinstance(runs, str):
        found = sorted(glob.glob(runs))
        if not found:
            raise ErnasError(f"runs={runs!r}: the pattern matches no directory; give run "
                             f"directories (a list) or a glob such as "
                             f"'runs/search_multirun/<date>/*'.")
        return found
    return [str(r) for r in runs]


def _line(s: dict) -> str:
    """One line: the headline metric and latency, and the comparison with the baseline stated
    from the numbers (faster or slower)."""
    m = s["metric"]
    lat = s["measured_ms"] if s["measured_ms"] is not None else s["predicted_ms"]
    kind = "measured" if s["measured_ms"] is not None else "predicted"
    line = (f"{s['name']}: {m} {s[m]:.3f} on {s['metric_set']}, {kind} latency "
            f"{'n/a' if lat is None else f'{lat:.2f} ms'}")
    b = s.get("baseline")
    if b and lat is not None and b.get(f"{kind}_ms"):
        r = s.get("measured_speedup") if kind == "measured" else None
        r = r or b[f"{kind}_ms"] / lat  # measured: paired per round (ernas.evaluate)
        line += (f"; {max(r, 1 / r):.2f}x {'faster' if r >= 1 else 'slower'} than "
                 f"{b['name']} ({kind})")
    if s.get("peak_mem_mib") is not None:
        line += f"; peak memory {s['peak_mem_mib']:.1f} MiB"
        if b and b.get("peak_mem_mib"):
            line += f" ({b['name']}: {b['peak_mem_mib']:.1f} MiB)"
    main = next((r for r in s.get("models", []) if r["name"] == s["name"]), {})
    bad = {k.removeprefix("nonfinite_"): v for k, v in main.items()
           if k.startswith("nonfinite_") and v}
    if bad:
        line += ("; WARNING: non-finite output (the model overflows) on " + ", ".join(
            f"{v} item(s) of {k}" for k, v in bad.items()) + f": their {m} is NaN")
    return line


main = hydra_main("evaluate", run)


if __name__ == "__main__":
    main()
