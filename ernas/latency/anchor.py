"""Calibrate a table on the day: a few networks timed now, and the line through them.

A table is profiled once; the machine that uses it drifts (this VM ran 0.8x to 1.3x the speed
it profiled at, hours apart), and a whole network costs its key sum times a factor plus a
per-network overhead the keys do not add. ``latency.anchor=true`` times, together (interleaved
rounds, the table's statistic), the probe's network (the reference), ``space.smallest()`` and
``latency.anchor_samples`` networks sampled from the space (seed ``ANCHOR_SEED``, none the same
network as another anchor or as a network being evaluated), and stores the line through the
reference whose slope fits the others by least squares, as the table's correction, in memory
only (a search's run copy keeps it):

    m ≈ a·S + b,   a = Σ_j x_j·y_j / Σ_j x_j²,   x_j = S_j − S_ref,  y_j = m_j − m_ref,
    b = m_ref − a·S_ref,

where S is a network's key sum and m its measured latency, j over the anchors other than the
reference. With no samples it is the line through the reference and the smallest,
``a = (m_ref − m_min) / (S_ref − S_min)``. The reference is predicted exactly, so speed-ups
over it are anchored at a measured figure; the samples set the slope over the middle of the
space, where the two end points alone mislead when one of them runs unlike the rest (the tiny
space's reference: key sum / measured 1.03, against 1.07-1.22 for its other networks, Intel
draws of 1 Dec 2026). ``predict_ms`` and ``E[LAT]`` then return ``a·S + b``. It is few-shot
calibration on the target device; ``ernas-profile mode=validate`` times the same anchors in its
own pass and scores the line on every other network (``anchored``), which is the evidence for
it. A table that already carries an anchored correction (a search's run copy) keeps it, so a
resumed search and its evaluation predict with the line the search used; a line anchored at
another thread count than the request's is drawn again.

The keys may be timed at another thread count than the networks run at
(``latency.key_threads``): S is then the key sum at ``key_threads`` and m the network measured at
``backend.threads``, and the line alone carries one to the other. At 2 threads, ExecuTorch keys
timed alone gain unevenly from the second thread and overprice networks unevenly, while 1-thread
sums anchored on 2-thread networks predicted them far better (docs/profile.md).
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import torch

from ernas.errors import ErnasError
from ernas.latency.backends import Backend
from ernas.latency.measure import MeasureProtocol
from ernas.latency.table import LatencyTable

__all__ = ["ANCHOR_SAMPLES", "ANCHOR_SEED", "MIN_SEPARATION", "anchor_archs", "anchor_problem",
           "anchor_table", "anchored_fit", "anchors_phrase"]

#: anchors whose key sums differ by less than this fraction of the larger are too close for a line
MIN_SEPARATION = 0.2
#: sampled networks timed beside the reference and the smallest (``latency.anchor_samples``)
ANCHOR_SAMPLES = 4
#: seed of their draw: validation times the very networks a search anchors on (a seed of its
#: own, so that validation's draws, ``validate.seed`` 0, 1, ..., do not repeat the anchors)
ANCHOR_SEED = 7919


def anchored_fit(raw, meas, i: int, others) -> tuple[float, float] | None:
    """(a, b) of the line ``meas ≈ a·raw + b`` through point ``i`` with the least-squares slope
    of the points ``others`` (an index or indices) about it (module docstring); the line through
    two points for one other; None when no other point's ``raw`` differs from point ``i``'s."""
    raw, meas = np.asarray(raw, dtype=np.float64), np.asarray(meas, dtype=np.float64)
    j = np.atleast_1d(np.asarray(others, dtype=int))
    x, y = raw[j] - raw[i], meas[j] - meas[i]
    if float(x @ x) <= (1e-9 * abs(raw[i])) ** 2:
        return None
    a = float(x @ y) / float(x @ x)
    return a, float(meas[i] - a * raw[i])


def anchors_phrase(drawn: int, requested: int) -> str:
    """Which networks anchored a line, in words: ``drawn`` sampled of ``requested``."""
    if requested == 0:
        return "the reference and the smallest (two-point line)"
    short = (f" ({requested} asked for; the space has no more distinct networks)"
             if drawn < requested else "")
    return (f"the reference, the smallest and {drawn} sampled network{'s' * (drawn != 1)}"
            f"{short}")


def anchor_archs(space, samples: int, shape, granularity: str, reference=None,
                 avoid=()) -> dict:
    """The anchors by role: ``reference`` (default ``space.reference()``), ``smallest`` and
    ``sample_<i>``, ``samples`` networks drawn with ``ANCHOR_SEED``, each a different network
    (op keys) from every other anchor and from ``avoid``; fewer when the space has no more."""
    archs = {"reference": reference or space.reference(), "smallest": space.smallest()}
    seen = [a.op_keys(shape, granularity) for a in (*archs.values(), *avoid)]
    rng = random.Random(ANCHOR_SEED)
    for _ in range(50 * samples):
        if len(archs) == 2 + samples:
            break
        arch = space.sample(rng)
        keys = arch.op_keys(shape, granularity)
        if keys not in seen:
            seen.append(keys)
            archs[f"sample_{len(archs) - 2}"] = arch
    return archs


def anchor_problem(raw, meas=None) -> str | None:
    """Why no trustworthy line runs through two anchors with key sums ``raw = (S_1, S_2)`` and,
    when timed, measured latencies ``meas``; None when it does. Refused: sums closer than
    ``MIN_SEPARATION·max(S)`` (noise δ on the measurements moves the slope by about
    ``2δ/(S_1 − S_2)``), and measurements in the opposite order to the sums (a slope ≤ 0)."""
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
                 exclude=(), samples: int = ANCHOR_SAMPLES) -> dict:
    """Time the anchors (``anchor_archs``: ``reference``, default ``space.reference()``, the
    smallest and ``samples`` sampled networks), store ``metadata['correction']`` (scale,
    offset_ms, anchored: the record) on ``table`` and return the record with the line;
    ``{"skipped": why, ...}`` when the table already carries an anchored correction fitted at
    ``backend``'s thread count (the record and its line; one fitted at another count is dropped
    and a line drawn again), and when no line is drawn (``anchor_problem``, a slope ≤ 0, a line
    ≤ 0 ms at the smallest network; ``exclude``: the architectures whose predictions will be
    scored, never anchors)."""
    from ernas import build_model, inference_model

    corr = table.metadata.get("correction") or {}
    threads = backend.metadata().get("threads")
    if corr.get("anchored"):
        # a record from before key_threads was anchored at the table's own thread count
        if corr["anchored"].get("threads", table.metadata.get("threads")) == threads:
            return {**corr["anchored"], "scale": corr["scale"], "offset_ms": corr["offset_ms"],
                    "skipped": "kept the anchoring the table carries (a search's run copy)"}
        del table.metadata["correction"]  # fitted at another thread count: never used here
    if space.is_arch:
        return {"skipped": f"not anchored: {space.name} is one architecture, and anchoring it on "
                           f"itself would make its prediction its own measurement"}
    if samples < 0:
        raise ErnasError(f"latency.anchor_samples={samples} must be >= 0 (0: the line through "
                         f"the reference and the smallest alone).")
    shape = tuple(int(s) for s in input_shape)
    archs = anchor_archs(space, samples, shape, granularity, reference, exclude)
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
    roles = list(archs)
    line = anchored_fit([sums[k] for k in roles], [meas[k] for k in roles], 0, range(1, len(roles)))
    if not why and line[0] <= 0:
        why = (f"the anchors' least-squares slope {line[0]:.3g} is not positive (the machine was "
               f"disturbed while timing them)")
    if not why and line[0] * sums["smallest"] + line[1] <= 0:
        why = (f"the line (slope {line[0]:.3g}, offset {line[1]:.3g} ms) predicts "
               f"{line[0] * sums['smallest'] + line[1]:.3g} ms for the smallest network, measured "
               f"at {meas['smallest']:.3g} ms: the sampled anchors ran slow against it (the "
               f"machine was disturbed while timing them), and a line with no positive latency "
               f"at the bottom of the space would steer a search to nonsense")
    if why:
        return {"skipped": f"not anchored: {why}", "sum_ms": sums, "measured_ms": meas}
    a, b = line
    record = {"networks": {k: a_.name for k, a_ in archs.items()},
              "blocks": {k: a_.to_dict()["blocks"] for k, a_ in archs.items()},
              "samples_requested": samples, "sum_ms": sums, "measured_ms": meas,
              "statistic": stat, "threads": threads, "key_threads": table.metadata.get("threads"),
              "time": time.time()}
    table.metadata["correction"] = {"scale": a, "offset_ms": b, "anchored": record}
    return {**record, "scale": a, "offset_ms": b}
