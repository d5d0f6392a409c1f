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

__all__ = ["MIN_SEPARATION", "anchor_problem", "anchor_table", "anchored_fit"]

#: anchors whose key sums differ by less than this fraction of the larger are too close for a line
MIN_SEPARATION = 0.2


def anchored_fit(raw, meas, i: int, j: int) -> tuple[float, float] | None:
    """(a, b) of the line ``meas ≈ a·raw + b`` through points ``i`` and ``j``; None when their
    ``raw`` values coincide (no line through them)."""
    raw, meas = np.asarray(raw, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    if abs(raw[i] - raw[j]) <= 1e-9 * max(abs(raw[i]), abs(raw[j])):
        return None
    a = (meas[i] - meas[j]) / (raw[i] - raw[j])
    return float(a), float(meas[i] - a * raw[i])


def anchor_problem(raw, meas=None) -> str | None:
    """Why no trustworthy line runs through two anchors with key sums ``raw = (Σ_1, Σ_2)`` and,
    when timed, measured latencies ``meas``; None when it does. Refused: sums closer than
    ``MIN_SEPARATION·max(Σ)`` (noise δ on the measurements moves the slope by about
    ``2δ/(Σ_1 − Σ_2)``), and measurements in the opposite order to the sums (a slope ≤ 0)."""
    s1, s2 = np.asarray(raw, dtype=np.float64)
    if abs(s1 - s2) < MIN_SEPARATION * max(abs(s1), abs(s2)):
        return (f"the anchors' key sums {s1:.4g} and {s2:.4g} ms lie within "
                f"{100 * MIN_SEPARATION:g}% of each other; a line through two close points turns "
                f"their measurement noise into its slope")
    if meas is None:
        return None
    m1, m2 = np.asarray(meas, dtype=np.float64)
    if (m1 - m2) * (s1 - s2) <= 0:
        fast, slow = (m2, m1) if s2 < s1 else (m1, m2)
        return (f"the anchor predicted faster measured {fast:.4g} ms against {slow:.4g} ms: the "
                f"line would invert the order of predictions (the machine was disturbed while "
                f"timing them)")
    return None


def anchor_table(table: LatencyTable, space, backend: Backend, input_shape, granularity: str,
                 protocol: MeasureProtocol | None = None, reference=None,
                 exclude=()) -> dict:
    """Time the anchors (``reference``, default ``space.reference()``, and ``space.smallest()``),
    store ``metadata['correction']`` (scale, offset_ms, anchored: the record) on ``table`` and
    return the record with the line; ``{"skipped": why, ...}`` when the table already carries an
    anchored correction (the record and its line), and when no line is drawn (module
    docstring; ``exclude``: the architectures whose predictions will be scored)."""
    from ernas import build_model, inference_model

    corr = table.metadata.get("correction") or {}
    if corr.get("anchored"):
        return {**corr["anchored"], "scale": corr["scale"], "offset_ms": corr["offset_ms"],
                "skipped": "kept the anchoring the table carries (a search's run copy)"}
    if space.is_arch:
        return {"skipped": f"not anchored: {space.name} is one architecture, and anchoring it on "
                           f"itself would make its prediction its own measurement"}
    shape = tuple(int(s) for s in input_shape)
    archs = {"reference": reference or space.reference(), "smallest": space.smallest()}
    keys = {k: a.op_keys(shape, granularity) for k, a in archs.items()}
    if keys["reference"] == keys["smallest"]:
        return {"skipped": f"not anchored: the smallest network of {space.name} is its "
                           f"reference, so there is no second network to draw a line through"}
    for role in ("reference", "smallest"):
        scored = next((e for e in exclude if e.op_keys(shape, granularity) == keys[role]), None)
        if scored is not None:
            return {"skipped": f"not anchored: the {role} network of {space.name} is "
                               f"{scored.name}, a network being evaluated, whose prediction "
                               f"would be its own measurement"}
    sums = {k: float(table.lookup(v).sum()) for k, v in keys.items()}
    why = anchor_problem([sums["reference"], sums["smallest"]])
    if why:
        return {"skipped": f"not anchored: {why}", "sum_ms": sums}
    stat = table.metadata.get("statistic", "median")
    protocol = replace(protocol or MeasureProtocol(), statistic=stat)
    x = torch.randn(*shape)
    runners = {k: backend.runner(inference_model(build_model(a)), x) for k, a in archs.items()}
    res = protocol.measure(runners)
    meas = {k: res[k]["ms"] for k in archs}
    why = anchor_problem([sums["reference"], sums["smallest"]],
                         [meas["reference"], meas["smallest"]])
    if why:
        return {"skipped": f"not anchored: {why}", "sum_ms": sums, "measured_ms": meas}
    a, b = anchored_fit([sums["reference"], sums["smallest"]],
                        [meas["reference"], meas["smallest"]], 0, 1)
    record = {"networks": {k: a_.name for k, a_ in archs.items()}, "sum_ms": sums,
              "measured_ms": meas, "statistic": stat, "time": time.time()}
    table.metadata["correction"] = {"scale": a, "offset_ms": b, "anchored": record}
    return {**record, "scale": a, "offset_ms": b}
