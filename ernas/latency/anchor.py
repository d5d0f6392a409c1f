"""Calibrate a table on the day: two networks timed now, and the line through them.

A table is profiled once; the machine that uses it drifts (this VM ran 0.8x to 1.3x the speed
it profiled at, hours apart), and a whole network costs its key sum times a factor plus a
per-network overhead the keys do not add. ``latency.anchor=true`` times two networks of the
space end to end, together (interleaved rounds, the table's statistic): the probe's network
(the reference) and ``space.smallest()``, and stores the line through them as the table's
correction, in memory only (a search's run copy keeps it):

    m ≈ a·Σ + b,   a = (m_ref − m_min) / (Σ_ref − Σ_min),   b = m_ref − a·Σ_ref,

where Σ is a network's key sum and m its measured latency. ``predict_ms`` and ``E[LAT]`` then
return ``a·Σ + b``. It is few-shot calibration on the target device with the fewest shots that
fix both a scale and an offset; ``ernas-profile mode=validate`` reports the same two-point fit
made in its own pass and scored on every other network (``anchored``), which is the evidence
for it. A table that already carries an anchored correction (a search's run copy) keeps it, so
a resumed search and its evaluation predict with the line the search used.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ernas.latency.backends import Backend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.table import LatencyTable

__all__ = ["anchor_table", "anchored_fit"]


def anchored_fit(raw, meas, i: int, j: int) -> tuple[float, float] | None:
    """(a, b) of the line ``meas ≈ a·raw + b`` through points ``i`` and ``j``; None when their
    ``raw`` values coincide (no line through them)."""
    raw, meas = np.asarray(raw, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    if abs(raw[i] - raw[j]) <= 1e-9 * max(abs(raw[i]), abs(raw[j])):
        return None
    a = (meas[i] - meas[j]) / (raw[i] - raw[j])
    return float(a), float(meas[i] - a * raw[i])


def anchor_table(table: LatencyTable, space, backend: Backend, input_shape, granularity: str,
                 protocol: MeasureProtocol | None = None, reference=None) -> dict:
    """Time the anchors (``reference``, default ``space.reference()``, and ``space.smallest()``),
    store ``metadata['correction']`` (scale, offset_ms, anchored: the record) on ``table`` and
    return the record; ``{"skipped": why}`` when the table already carries an anchored
    correction or the two anchors have the same key sum (a space of one architecture)."""
    from ernas import build_model, inference_model

    old = (table.metadata.get("correction") or {}).get("anchored")
    if old:
        return {**old, "skipped": "kept the anchoring the table carries (a search's run copy)"}
    shape = tuple(int(s) for s in input_shape)
    archs = {"reference": reference or space.reference(), "smallest": space.smallest()}
    sums = {k: float(table.lookup(a.op_keys(shape, granularity)).sum()) for k, a in archs.items()}
    if anchored_fit([sums["reference"], sums["smallest"]], [1.0, 0.0], 0, 1) is None:
        return {"skipped": f"not anchored: the reference and the smallest network of "
                           f"{space.name} have the same key sum ({sums['reference']:.4g} ms), "
                           f"no line runs through them"}
    stat = table.metadata.get("statistic", "median")
    protocol = replace(protocol or MeasureProtocol(), statistic=stat)
    x = torch.randn(*shape)
    runners = {k: backend.runner(inference_model(build_model(a)), x) for k, a in archs.items()}
    res = protocol.measure(runners)
    meas = {k: res[k]["ms"] for k in archs}
    a, b = anchored_fit([sums["reference"], sums["smallest"]],
                        [meas["reference"], meas["smallest"]], 0, 1)
    record = {"networks": {k: a_.name for k, a_ in archs.items()}, "sum_ms": sums,
              "measured_ms": meas, "statistic": stat, "time": time.time()}
    table.metadata["correction"] = {"scale": a, "offset_ms": b, "anchored": record}
    return {**record, "scale": a, "offset_ms": b}
