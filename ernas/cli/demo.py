"""``ernas-demo``: search → retrain (derived and baseline) → evaluate → export, then the table.

The task (``task=...``) and its settings apply to every stage. ``experiment`` (default: the
task's preset, ``presets.<task>.experiment`` in demo.yaml, e.g. ``unet_seg`` for segment) is
composed into the search stage, and the search's ``input_shape`` is where evaluation and export
measure latency and MACs; evaluation predicts latency from the table the search used (its run
copy, ``search/latency_table.csv``), so the predicted speed-up is the one the search optimised.
A task's preset adds per-stage overrides, then ``stages.<name>=[...]``
adds the user's."""
from __future__ import annotations

import json

from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from ernas.cli import evaluate, export, retrain, search
from ernas.cli.common import hydra_main, log_start, output_dir, user_errors
from ernas.cli.schema import Demo
from ernas.config import validated
from ernas.io import atomic_write_json, atomic_write_text


def _stage(name: str, overrides: list[str], task: DictConfig) -> DictConfig:
    cfg = compose(config_name=name, overrides=[str(o) for o in overrides])
    with open_dict(cfg):
        cfg.task = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
    return cfg


def _verdict(r: float, what: str) -> str:
    """'1.58x lower …' / '1.20x higher …' for a speed-up ``r`` (old time / new time)."""
    return f"{max(r, 1 / r):.2f}x {'lower' if r >= 1 else 'higher'} {what}"


def table(ev: dict, ex: dict) -> str:
    """The comparison table of the evaluate and export summaries, verdicts from the numbers."""
    rows, cols, m = ev["models"], ev["columns"], ev["metric"]
    head = ["model", "params", "GMACs", "pred. ms", "meas. ms"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['params']:,}", f"{r['macs'] / 1e9:.3f}",
                 f"{r['predicted_ms']:.2f}", f"{r['measured_ms']:.2f}"]
        lines.append("| " + " | ".join(cells + [f"{r[c]:.4g}" for c in cols]) + " |")
    d, b = rows[0], rows[-1]
    head_col = f"{m}_{ev['metric_set']}"
    measured = ev.get("measured_speedup") or b["measured_ms"] / d["measured_ms"]
    lines.append(f"\nderived vs baseline: {_verdict(measured, 'measured latency')} "
                 f"({_verdict(b['predicted_ms'] / d['predicted_ms'], 'predicted')}), parameters "
                 f"{100 * (d['params'] / b['params'] - 1):+.1f}%, {head_col} "
                 f"{d[head_col] - b[head_col]:+.3f}")
    lines.append(f"\nexport (whole test images, {ex['eval_set']}, tiles "
                 f"{ex['eval_tile'][0]}x{ex['eval_tile'][1]}; max |onnxruntime − torch| "
                 f"{ex['max_abs_diff']:.2e}):\n")
    lines += ["| file | " + m + " | ms |", "|---|---|---|"]
    for kind in ("fp32", "int8", "qat"):
        if f"{kind}_ms" in ex:
            note = "" if kind == "fp32" else \
                f" ({_verdict(ex[f'{kind}_speedup'], 'latency than fp32')})"
            lines.append(f"| {kind} | {ex[f'{m}_{kind}']:.4g} | {ex[f'{kind}_ms']:.2f}{note} |")
    return "\n".join(lines)


STAGES = ("search", "retrain", "evaluate", "export")


def stage_overrides(cfg: DictConfig) -> dict[str, list]:
    """Per stage: the task's preset overrides (``presets.<task name>.<stage>``), then
    ``stages.<stage>``."""
    preset = cfg.presets.get(cfg.task.name) or {}
    return {name: [*(preset.get(name) or []), *cfg.stages[name]] for name in STAGES}


@user_errors
def run(cfg: DictConfig) -> dict:
    validated(cfg, Demo, "demo config")
    out = output_dir()
    log_start("demo", out, task=cfg.task.name, experiment=cfg.experiment,
              stages="search, retrain (derived and baseline), evaluate, export, each in its "
                     "own folder with its own start line",
              search_steps=cfg.search_steps, retrain_steps=cfg.retrain_steps)
    st, task = stage_overrides(cfg), cfg.task
    experiment = [f"experiment={cfg.experiment}"] if cfg.experiment else []
    s_cfg = _stage("search", [*experiment, f"search.steps={cfg.search_steps}", f"seed={cfg.seed}",
                              *st["search"]], task)
    shape = "input_shape=[" + ",".join(str(int(v)) for v in s_cfg.input_shape) + "]"
    s = search.run(s_cfg, out / "search")
    common = [f"steps={cfg.retrain_steps}", f"seed={cfg.seed}", "init=scratch", *st["retrain"]]
    retrain.run(_stage("retrain", [f"arch={out / 'search'}", *common], task),
                out / "retrain_derived")
    retrain.run(_stage("retrain", [f"arch=reference:{s_cfg.space}", *common], task),
                out / "retrain_baseline")
    # predicted latencies from the table the search optimised (resolved and probed minutes ago)
    pinned = [f"latency.table={out / 'search' / search.RUN_TABLE}", "latency.trust_table=true"]
    ev = evaluate.run(_stage("evaluate", [
        f"checkpoint={out / 'retrain_derived'}", "name=derived",
        f"baseline.arch=reference:{s_cfg.space}", f"baseline.checkpoint={out / 'retrain_baseline'}",
        "baseline.name=baseline", shape, *pinned, *st["evaluate"]], task), out / "evaluate")
    ex = export.run(_stage("export", [f"checkpoint={out / 'retrain_derived'}", shape,
                                      *st["export"]], task), out / "export")
    text = table(ev, ex)
    print("\n" + text)
    summary = {"search": {k: s[k] for k in ("predicted_latency_ms", "baseline_latency_ms",
                                             "decisiveness")},
               "models": ev["models"], "metric": ev["metric"],
               "measured_speedup": ev.get("measured_speedup"),
               "export": {k: v for k, v in ex.items() if not isinstance(v, (dict, list))},
               "table": text}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", "# ernas demo\n\n" + text + "\n")
    print(f"\nall outputs in {out} (summary.json, report.md, one folder per stage)")
    return json.loads(json.dumps(summary, default=str))


main = hydra_main("demo", run)


if __name__ == "__main__":
    main()
