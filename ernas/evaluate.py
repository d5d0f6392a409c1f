"""Evaluation: task quality, size and latency of trained models side by side.

Quality: the task's evaluator (``Task.evaluator``) on each of its evaluation sets
(``Task.eval_sets``: the σ sweep for denoising, the test split for segmentation), whole images,
columns ``<metric>_<set>`` (e.g. ``psnr_sigma25``, ``miou_test``).

Size: parameters and MACs (``ernas.complexity``) at the latency input shape.

Latency: *predicted* = the latency table's corrected sum of op latencies (``predict_ms``);
*measured* = every model (BatchNorm folded) timed end to end on the table's backend with the
same session options, all models interleaved in shuffled rounds
(``ernas.latency.measure.measure_interleaved``), so a slow period of the machine hits them alike.
The measured speed-up over the baseline is the paired ratio (``paired_ratio``: the median over
rounds of the baseline's time over the model's in that round), which drift of the machine
between rounds does not move.

Memory (``memory_runs`` > 0, with the measured latency): each model's peak inference memory on
the latency backend's runtime and settings (``ernas.memory``: resident-set high-water mark above
the empty-session baseline, median of ``memory_runs`` fresh processes; ``peak_mem_spread`` =
max − min over them).

Output stride (``output_stride``): the input size over the size of the map the network predicts
on before upsampling (HRNet-lite: ``geometry.output_stride``; U-Net and NAFNet: 1; other
families: unknown). Networks at different strides differ in resolution as well as capacity, and
the report and the log say so.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ernas import inference_model
from ernas.progress import progress as progress_bar
from ernas.checkpoint import load_model, resolve_checkpoint
from ernas.complexity import count_macs, count_params
from ernas.data.tiles import stitched
from ernas.io import atomic_write_json, atomic_write_text
from ernas.latency.measure import paired_ratio
from ernas.space import Arch, SearchSpace

__all__ = ["ModelEntry", "evaluate", "measure_latencies", "output_stride", "quality"]

log = logging.getLogger(__name__)
_FULL_RESOLUTION = ("unet", "nafnet")  # families whose last layer runs at the input resolution


@dataclass
class ModelEntry:
    """One row of the comparison: a name, an architecture and its checkpoint (None: random
    initialisation, reported as untrained)."""

    name: str
    arch: Arch
    checkpoint: str | None = None

    def model(self) -> nn.Module:
        return load_model(self.arch, resolve_checkpoint(self.checkpoint)
                          if self.checkpoint else None).eval()


@torch.no_grad()
def quality(model: nn.Module, task, sets: dict, name: str, device="cpu", tile: int | None = None
            ) -> tuple[list[dict], dict[str, float]]:
    """Per-item rows and the metrics ``{f"{metric}_{set}": value}`` of one model, each item
    whole or (``tile``) through stitched tile x tile tiles (``ernas.data.tiles.stitched``), and
    ``nonfinite_<set>``: how many items' outputs hold inf/NaN (a model that overflows; a NaN
    output makes the item's metric and the set's NaN)."""
    model = model.to(device).eval()
    rows, metrics = [], {}
    for label, ds in sets.items():
        ev = task.evaluator()
        nonfinite = 0
        for i in range(len(ds)):
            item = ds[i]
            x = item["input"][None].to(device)
            out = (model(x) if tile is None else stitched(model, x, (tile, tile))).float().cpu()
            nonfinite += int(not torch.isfinite(out).all())
            ev.update(out, item["target"][None], item["name"])
        metrics.update({f"{k}_{label}": v for k, v in ev.compute().items()
                        if not isinstance(v, (list, tuple))})
        metrics[f"nonfinite_{label}"] = nonfinite
        rows += [{"model": name, "set": label, **r} for r in ev.rows()]
    return rows, metrics


def measure_latencies(models: dict[str, nn.Module], input_shape, latency_cfg: dict,
                      progress: bool = False) -> tuple[dict[str, dict], dict]:
    """``({name: stats}, backend metadata)``: every model fused and timed on the configured
    backend, all interleaved in shuffled rounds (see the module docstring)."""
    from ernas.latency.factory import make_backend
    from ernas.latency.measure import measure_interleaved

    backend = make_backend(latency_cfg["backend"])
    x = torch.rand(tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0))
    runners = {}
    for name, model in models.items():
        runners[name] = backend.runner(inference_model(copy.deepcopy(model).cpu()), x)
    return measure_interleaved(runners, **(latency_cfg.get("measure") or {})), backend.metadata()


def joint_space(archs: list[Arch]) -> SearchSpace | None:
    """The smallest space holding every arch (same family and geometry; per position and
    decision the values the archs use), so one table can predict them all; None otherwise."""
    if not archs or any(a.family != archs[0].family or a.geometry != archs[0].geometry
                        or set(a.values) != set(archs[0].values) for a in archs):
        return None
    choices = {}
    for p, first in archs[0].values.items():
        choices[p] = {}
        for d in first:
            vals = []
            for a in archs:
                if all(a.values[p][d] != v for v in vals):
                    vals.append(a.values[p][d])
            choices[p][d] = tuple(vals)
    return SearchSpace(archs[0].family, dict(archs[0].geometry), choices,
                       name="+".join(a.name for a in archs))


def predicted_latency(arch: Arch, input_shape, latency_cfg: dict, progress: bool = False,
                      resolved: list | None = None):
    """``(predicted ms, table path, probe record)``. ``resolved`` holds the ``(table, path)``
    pairs resolved so far in this evaluation: the first that holds every key of ``arch`` is used,
    so networks compared side by side are predicted from one table (one probe, one machine
    state); only an arch none of them covers resolves a table of its own."""
    from ernas.latency.predict import predict_ms
    from ernas.latency.resolve import resolve_from_config

    shape = tuple(int(s) for s in input_shape)
    gran = latency_cfg.get("granularity", "block")
    keys = arch.op_keys(shape, gran)
    found = next(((t, p) for t, p in resolved or [] if all(k in t for k in keys)), None)
    if found is None:
        found = resolve_from_config(arch.as_space(), shape, latency_cfg, progress)
        if resolved is not None:
            resolved.append(found)
    table, path = found
    return predict_ms(table, arch, shape, gran), str(path), table.probe


def output_stride(arch: Arch) -> int | None:
    """Input size over the resolution of the network's prediction before upsampling: HRNet-lite's
    ``geometry.output_stride`` (4 when unset), 1 for U-Net and NAFNet, None when unknown."""
    if arch.family == "hrnet_lite":
        return int(arch.geometry.get("output_stride", 4))
    return 1 if arch.family in _FULL_RESOLUTION else None


def stride_note(rows: list[dict]) -> str | None:
    """One sentence when the rows' known output strides differ, else None."""
    strides = sorted({r["output_stride"] for r in rows if r.get("output_stride") is not None})
    if len(strides) < 2:
        return None
    listed = ", ".join(map(str, strides[:-1])) + f" and {strides[-1]}"
    return (f"This evaluation compares networks at output strides {listed}: accuracy differences "
            f"include resolution.")


def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _report(rows: list[dict], columns: list[str], meta: dict) -> str:
    head = ["model", "params", "GMACs", "output stride", "predicted ms", "measured ms",
            "peak MiB"] + columns
    lines = ["# Evaluation report", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"] + ("" if r["trained"] else " (untrained)"), f"{r['params']:,}",
                 _fmt(r["macs"] / 1e9, 3), _fmt(r.get("output_stride")), _fmt(r["predicted_ms"]),
                 _fmt(r["measured_ms"]),
                 _fmt(r.get("peak_mem_mib"), 1)]
        cells += [_fmt(r.get(c), 4) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    b = meta.get("backend") or {}
    note = stride_note(rows)
    lines += ["", note] if note else []
    lines += [
        "", "## Definitions", "",
        f"- **Task** {meta['task']}: {meta['task_description']}"
        + (f"; every image through stitched {meta['tile']}x{meta['tile']} tiles, the size "
           f"the network was validated at." if meta.get("tile") else "."),
        f"- **MACs**: multiply-accumulates of conv/linear layers plus what blocks report "
        f"(`ernas.complexity.count_macs`) at input {meta['input_shape']}; normalisation, "
        f"additions and activations count 0.",
        f"- **Latency** at input {meta['input_shape']}: *predicted* = corrected sum of the latency "
        f"table's op latencies; *measured* = whole fused models (BatchNorm folded), all models "
        f"interleaved in shuffled rounds, statistic {meta.get('statistic', '–')}. Backend "
        f"{b.get('backend', '–')}, provider {b.get('provider', '–')}, threads "
        f"{b.get('threads', '–')}, spinning {b.get('spinning', '–')}, dtype "
        f"{b.get('dtype', '–')}, device {b.get('device', '–')}.",
        f"- **Peak memory** (MiB, {meta.get('memory') or 'not measured'}): resident-set "
        f"high-water mark of a fresh process loading the model and running it, above the same "
        f"process with the runtime and an empty session loaded; median over fresh processes.",
        "- **Output stride**: input size over the resolution the network predicts at before "
        "upsampling (HRNet-lite: its geometry's output_stride; U-Net, NAFNet: 1; –: unknown).",
        "- *untrained*: no checkpoint given, so the weights are a seeded random initialisation "
        "(its quality numbers are not meaningful, its size and latency are).", ""]
    return "\n".join(lines)


def _memories(entries, models, input_shape, latency_cfg, runs, rows) -> str | None:
    """Peak memory of every model into ``rows`` (``peak_mem_mib``, ``peak_mem_spread``); returns
    what was measured, or None where the backend's runtime has no memory runner."""
    from ernas.latency.factory import make_backend
    from ernas.memory import backend_runtime, network_memory

    backend = make_backend(latency_cfg["backend"])
    runtime, _ = backend_runtime(backend)
    for e, r in zip(entries, rows):
        m = network_memory(e.arch, models[e.name], backend, input_shape, runs)
        r["peak_mem_mib"] = None if m is None else m.mib
        r["peak_mem_spread"] = None if m is None else m.spread
    return None if runtime is None else f"{runtime}, threads {backend.threads}, {runs} runs"


def evaluate(entries: list[ModelEntry], out_dir, task, seed: int = 0,
             latency_cfg: dict | None = None, input_shape=(1, 3, 256, 256),
             predict: bool = True, measure: bool = True, device: str = "cpu",
             progress: bool = True, memory_runs: int = 0, tile: int | None = None) -> dict:
    """Evaluate ``entries`` (the first is the model under test, the rest baselines) on ``task``
    (``tile``: through stitched tiles, :func:`quality`) and write ``per_image.csv``,
    ``results.csv``, ``report.md``, ``summary.json`` (and the first entry's ``arch.yaml``) into
    ``out_dir``. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for e in entries:
        task.check_arch(e.arch)
    sets = task.eval_sets(seed)
    per_item, rows, models, probes, tables = [], [], {}, {}, []
    joint = joint_space([e.arch for e in entries]) if len(entries) > 1 else None
    if latency_cfg and predict and joint is not None:
        from ernas.latency.resolve import resolve_from_config

        tables.append(resolve_from_config(joint, tuple(int(v) for v in input_shape), latency_cfg,
                                          progress, scored=[e.arch for e in entries]))
    bar = progress_bar(len(entries), "evaluate", unit="model", enabled=progress)
    for e in entries:
        model = e.model()
        models[e.name] = model
        q_rows, q = quality(model, task, sets, e.name, device, tile)
        per_item += q_rows
        row = {"name": e.name, "arch": e.arch.name, "arch_source": e.arch.source,
               "checkpoint": e.checkpoint or "", "trained": e.checkpoint is not None,
               "params": count_params(model), "macs": count_macs(model.cpu(), input_shape),
               "output_stride": output_stride(e.arch),
               "predicted_ms": None, "measured_ms": None, "table": None,
               "peak_mem_mib": None, "peak_mem_spread": None, **q}
        if latency_cfg and predict:
            row["predicted_ms"], row["table"], probes[e.name] = predicted_latency(
                e.arch, input_shape, latency_cfg, progress, tables)
        rows.append(row)
        bar.update(1)
    bar.close()
    backend_meta, stats = None, {}
    if latency_cfg and measure:
        stats, backend_meta = measure_latencies(models, input_shape, latency_cfg, progress)
        for r in rows:
            r["measured_ms"] = stats[r["name"]]["ms"]
            r["measured_spread"] = stats[r["name"]].get("spread")
    memory = _memories(entries, models, input_shape, latency_cfg, memory_runs, rows) \
        if latency_cfg and measure and memory_runs > 0 else None
    if stride_note(rows):
        log.warning(stride_note(rows))
    columns = [f"{m}_{label}" for label in sets for m in task.metrics if f"{m}_{label}" in rows[0]]
    atomic_write_text(out / "per_image.csv", pd.DataFrame(per_item).to_csv(index=False))
    atomic_write_text(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    meta = {"task": task.name, "task_description": task.describe(), "tile": tile,
            "input_shape": list(input_shape), "backend": backend_meta,
            "statistic": ((latency_cfg or {}).get("measure") or {}).get("statistic"),
            "memory": memory}
    atomic_write_text(out / "report.md", _report(rows, columns, meta))
    entries[0].arch.save(out / "arch.yaml")
    main, head = rows[0], f"{task.metric}_{task.headline_set}"
    summary = {
        "name": main["name"], "task": task.to_dict(), "metric": task.metric,
        task.metric: main[head], "metric_set": task.headline_set,
        "measured_ms": main["measured_ms"], "predicted_ms": main["predicted_ms"],
        "params": main["params"], "macs": main["macs"], "models": rows,
        "peak_mem_mib": main.get("peak_mem_mib"), "memory": memory,
        "columns": columns, "seed": seed, "tile": tile, "input_shape": list(input_shape),
        "latency_backend": backend_meta, "latency_tables": {r["name"]: r["table"] for r in rows},
        "table_probes": probes,
        "measured_round_ms": {n: st["round_ms"] for n, st in stats.items()},
    }
    if len(rows) > 1:
        b = rows[1]
        summary["baseline"] = {k: b[k] for k in ("name", "predicted_ms", "measured_ms",
                                                 "peak_mem_mib", head)}
        if b["measured_ms"] and main["measured_ms"]:
            summary["measured_speedup"] = paired_ratio(stats[b["name"]], stats[main["name"]])
        if b["predicted_ms"] and main["predicted_ms"]:
            summary["predicted_speedup"] = b["predicted_ms"] / main["predicted_ms"]
    atomic_write_json(out / "summary.json", summary)
    return summary
