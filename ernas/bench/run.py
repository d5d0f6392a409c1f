"""``ernas-bench``: run a protocol from its stated config to its report, resumably.

Stages (each skipped when its output exists, so ``resume=<bench dir>`` continues a killed run):

1. ``protocol.yaml`` (the config as stated), ``latency_table.csv`` (resolved once: every search
   and every prediction uses these prices), ``plan.json`` and ``archs/``;
2. with ``tune.lams``: the tuning searches and ``tuning.json``, λ per target chosen on
   validation (``ernas.bench.tune``); then the searches, then the trainings (Hydra multiruns
   through the protocol's launcher);
3. ``selection.json`` from validation only, then the selected networks' extra training seeds;
4. ``latency.json``: every network measured in ``measure_passes`` passes, each with new sessions,
   all networks interleaved (run it on a quiet machine), and its peak memory on the backend's
   runtime (``peak_mem_mib``, ``ernas.memory``); the scaled front from validation;
5. test evaluations (once per training), then ``arms.csv``, ``comparisons.csv``, ``pareto.png``,
   ``report.md`` and ``summary.json``.

``until=search|train|latency`` stops after that stage (e.g. train on a busy or remote machine,
then ``resume=<dir>`` on a quiet one, or on the target device, for the latency stage).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ernas.bench import analysis, report
from ernas.bench.config import Protocol
from ernas.bench.jobs import PLAN, launch, load_plan
from ernas.bench.plan import TABLE, add_selected_seeds, build_plan, check_jobs, stage_jobs
from ernas.bench.tune import TUNING, tuning
from ernas.config import validated
from ernas.io import atomic_write_json, atomic_write_text
from ernas.space import find_space, load_arch

log = logging.getLogger(__name__)
CONFIG = "protocol.yaml"


def _say(msg: str) -> None:
    log.info(msg)


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def prepare(cfg, out: Path) -> None:
    """Stage 1: the frozen config, the protocol's table and the plan (before any job)."""
    from ernas.latency.resolve import resolve_from_config
    from ernas.latency.table import LatencyTable

    space = find_space(cfg.space)
    shape = [int(s) for s in cfg.input_shape]
    if (out / TABLE).is_file():
        table = LatencyTable.load(out / TABLE)
    else:
        table, source = resolve_from_config(space, shape, cfg.latency, cfg.progress)
        _say(f"latency table {source} ({table.probe.get('action') if table.probe else 'used'})")
    plan, archs = build_plan(cfg, table, out)
    check_jobs(plan)
    _warn_cropped_validation(plan, cfg.task.get("eval_tile"))
    atomic_write_text(out / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    table.metadata = {**table.metadata, "bench_protocol": str(cfg.protocol)}
    table.save(out / TABLE)
    for path, arch in archs.items():
        arch.save(path)
    atomic_write_json(out / PLAN, plan)


def _warn_cropped_validation(plan: dict, eval_tile) -> None:
    """Warn when the trainings validate on centre crops while the test stage scores whole images
    (or tiles of another size): validation then never sees what only whole images provoke."""
    from ernas.api import compose

    job = next((j for j in plan["jobs"].values() if j["command"] == "retrain"), None)
    crop = compose("retrain", job["overrides"]).val_crop if job else None
    if crop is not None and crop != eval_tile:
        log.warning(f"the trainings validate on {crop}x{crop} centre crops (train.overrides."
                    f"val_crop) but the test stage scores "
                    f"{'whole images' if eval_tile is None else f'{eval_tile}x{eval_tile} tiles'}"
                    f": a network that fails only there (e.g. non-finite outputs) passes "
                    f"validation and is selected. State val_crop: null (or the test's tile) in "
                    f"a new protocol file to validate as the test scores.")


def selection(cfg, out: Path) -> dict:
    """Stage 3: validation selects; the selected networks get every training seed."""
    path = out / "selection.json"
    if path.is_file():
        return _json(path)
    plan = load_plan(out)
    val = analysis.validation(plan, cfg.train.others_seeds)
    sel = analysis.select(plan, val, cfg.select.headline_drop)
    add_selected_seeds(plan, out, cfg, sorted({*sel["searched"].values(), *sel["random"].values()}))
    atomic_write_json(out / PLAN, plan)
    atomic_write_json(path, sel)
    _say(f"selected on validation: searched {list(sel['searched'].values())}, random "
         f"{list(sel['random'].values())}, headline {sel['headline']}")
    return sel


def measure(cfg, out: Path) -> dict:
    """Stage 4: measured latency of every network, ``measure_passes`` passes (median)."""
    from ernas.checkpoint import load_model
    from ernas.evaluate import measure_latencies

    path = out / "latency.json"
    if path.is_file():
        return _json(path)
    plan = load_plan(out)
    models = {n: load_model(load_arch(r["arch"])) for n, r in plan["networks"].items()}
    lat = OmegaConf.to_container(cfg.latency, resolve=True)
    passes = {n: [] for n in models}
    for k in range(cfg.measure_passes):
        _say(f"latency pass {k + 1}/{cfg.measure_passes}: {len(models)} networks interleaved")
        stats, meta = measure_latencies(models, cfg.input_shape, lat, cfg.progress)
        for n in models:
            passes[n].append(float(stats[n]["ms"]))
    rec = {"passes": passes, "measured_ms": {n: float(np.median(v)) for n, v in passes.items()},
           "backend": meta, **_memory(plan, models, lat, cfg.input_shape)}
    atomic_write_json(path, rec)
    return rec


def _memory(plan: dict, models: dict, lat: dict, input_shape) -> dict:
    """``peak_mem_mib`` and ``peak_mem_spread`` ({network: MiB}, None where the backend's
    runtime has no memory runner) of every network (``ernas.memory.network_memory``)."""
    from ernas.latency.factory import make_backend
    from ernas.memory import network_memories

    _say(f"peak memory of {len(models)} networks (fresh processes)")
    mem = network_memories({n: (load_arch(plan["networks"][n]["arch"]), m)
                            for n, m in models.items()}, make_backend(lat["backend"]), input_shape)
    return {"peak_mem_mib": {n: None if m is None else m.mib for n, m in mem.items()},
            "peak_mem_spread": {n: None if m is None else m.spread for n, m in mem.items()}}


def finish(cfg, out: Path, sel: dict, lat: dict) -> dict:
    """Stage 5 (after the test jobs): comparisons, verdicts and the report files."""
    plan = load_plan(out)
    measured = lat["measured_ms"]
    ev = _json(Path(next(j for j in plan["jobs"].values()
                         if j["command"] == "evaluate")["run_dir"]) / "summary.json")
    metric, set_name = ev["metric"], cfg.evaluate.set or ev["metric_set"]
    sel = {**sel, "searched": {int(k): v for k, v in sel["searched"].items()},
           "random": {int(k): v for k, v in sel["random"].items()}}
    scores = {n: analysis.test_scores(plan, n, set_name, metric) for n in plan["networks"]}
    front_pts = [tuple(p) for p in _json(out / "front.json")]
    comps = analysis.comparisons(plan, sel, scores, measured, front_pts, cfg.bootstrap)
    verdicts = analysis.verdict_lines(comps, plan, sel, measured, cfg.bootstrap)
    arms = report.arms_table(plan, sel, scores, measured, lat["passes"], front_pts, cfg.bootstrap,
                             cfg.input_shape, lat.get("peak_mem_mib"))
    meta = {"set": set_name, "metric": metric, "passes": cfg.measure_passes,
            "alpha": cfg.bootstrap.alpha, "headline_rule": sel["headline_rule"],
            "tuning": _json(out / TUNING) if (out / TUNING).is_file() else None}
    report.write(out, (out / CONFIG).read_text(encoding="utf-8"), plan, arms, comps, verdicts,
                 meta)
    summary = {"protocol": plan["protocol"], "metric": metric, "set": set_name,
               "headline": sel["headline"], "verdicts": verdicts,
               "networks": len(plan["networks"]), "jobs": len(plan["jobs"]),
               "report": str(out / "report.md")}
    atomic_write_json(out / "summary.json", summary)
    for v in verdicts:
        _say(v)
    _say(f"report: {out / 'report.md'} (arms.csv, comparisons.csv, test_per_image.csv, "
         "pareto.png)")
    return summary


def _stopped(out: Path, stage: str) -> dict:
    _say(f"stopped after stage {stage!r} (until={stage}); continue with: "
         f"ernas-bench resume={out}")
    return {"stopped_after": stage, "resume": str(out)}


def run_protocol(cfg, out: Path) -> dict:
    """Run (or continue) the protocol ``cfg`` in the claimed directory ``out``, up to and
    including the stage ``cfg.until`` (``null``: to the report)."""
    validated(cfg, Protocol, "bench config")
    if not (out / PLAN).is_file():
        prepare(cfg, out)
    go = dict(launcher=cfg.launcher,
              launcher_settings=OmegaConf.to_container(cfg.launcher_settings, resolve=True))
    tune_ids = [j for j in stage_jobs(load_plan(out), "search") if j.startswith("tune_")]
    launch(out, "tune", tune_ids, **go)
    tuning(cfg, out)
    launch(out, "search", stage_jobs(load_plan(out), "search"), **go)
    if cfg.until == "search":
        return _stopped(out, "search")
    launch(out, "train", stage_jobs(load_plan(out), "retrain"), **go)
    sel = selection(cfg, out)
    launch(out, "train_selected", stage_jobs(load_plan(out), "retrain"), **go)
    if cfg.until == "train":
        return _stopped(out, "train")
    lat = measure(cfg, out)
    if cfg.until == "latency":
        return _stopped(out, "latency")
    if not (out / "front.json").is_file():
        plan = load_plan(out)
        val = analysis.validation(plan, cfg.train.others_seeds)
        atomic_write_json(out / "front.json",
                          analysis.scaled_front(plan, val, lat["measured_ms"]))
    launch(out, "test", stage_jobs(load_plan(out), "evaluate"), **go)
    return finish(cfg, out, sel, lat)
