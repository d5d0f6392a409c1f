"""Quality and latency of the exported files of one network (fp32 and its quantised versions),
shared by the ONNX, ExecuTorch and LiteRT exports.

For every file kind ``k``: the task's metrics ``<name>_<k>``; for every ``k`` but fp32 the quality
change ``<metric>_delta_<k> = metric(k) − metric(fp32)``. The files are timed interleaved
(``ernas.latency.measure.measure_interleaved``): ``<k>_ms``, and ``<k>_speedup``, the paired
per-round ratio fp32 / k (``ernas.latency.measure.paired_ratio``).
"""
from __future__ import annotations

from typing import Callable

from ernas.latency.measure import measure_interleaved, paired_ratio

__all__ = ["judge_files"]


def judge_files(files: dict, quality: Callable[[str, object], dict], runners: dict,
                metric: str, measure_cfg: dict | None) -> dict:
    """Score ``files`` (kind → path; ``quality(kind, path)`` → metrics, fp32 first) and time
    ``runners`` (kind → callable); returns the summary fields of the module docstring."""
    out = {}
    for kind, path in files.items():
        for name, value in quality(kind, path).items():
            out[f"{name}_{kind}"] = value
        if kind != "fp32":
            out[f"{metric}_delta_{kind}"] = out[f"{metric}_{kind}"] - out[f"{metric}_fp32"]
    lat = measure_interleaved(runners, **(measure_cfg or {}))
    for kind, stats in lat.items():
        out[f"{kind}_ms"] = stats["ms"]
        if kind != "fp32":
            out[f"{kind}_speedup"] = paired_ratio(lat["fp32"], lat[kind])
    return out
