"""The probe: time a table's network end to end and compare with the table's prediction.

``ratio = measured / predicted`` (the sum of the network's key latencies, before any fitted
correction), judged against the ratio the table's own machine saw right after profiling
(``probe_baseline``, ``expected_ratio``; 1 without one): with ``relative = ratio /
expected_ratio`` a table is accepted when ``max(relative, 1/relative) <= 1 + tolerance``.
Results are cached for ``probe_cache_s`` seconds in ``<cache_dir>/probes.json``, keyed by the
table file's hash, this machine's fingerprint, the input shape, the space's content and the
protocol.
See ``ernas.latency.resolve`` for how the probe picks a table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from ernas.io import atomic_write_json
from ernas.latency.backends import Backend
from ernas.latency.cache import space_digest
from ernas.latency.measure import MeasureProtocol
from ernas.latency.settings import LatencySettings
from ernas.latency.table import LatencyTable

__all__ = ["PROBE_TOLERANCE", "cached_probe", "probe_arch", "probe_table", "probe_text",
           "record_baseline"]

PROBE_TOLERANCE = LatencySettings.__dataclass_fields__["probe_tolerance"].default
log = logging.getLogger(__name__)


def probe_arch(space, table: LatencyTable, input_shape, granularity: str):
    """The network the probe times: the space's reference, else its largest architecture."""
    ref = space.reference()
    if all(k in table for k in ref.op_keys(input_shape, granularity)):
        return ref
    return space.largest()


def probe_table(table: LatencyTable, space, backend: Backend, input_shape, granularity: str,
                protocol: MeasureProtocol | None = None,
                tolerance: float = PROBE_TOLERANCE) -> dict:
    """Time ``probe_arch`` end to end (protocol rounds, the table's statistic) and compare with
    the table: the record of the module docstring (``action`` is left to the caller)."""
    from dataclasses import replace

    from ernas import build_model, inference_model

    from ernas.space import arch_of, space_from_dict

    stat = table.metadata.get("statistic", "median")
    protocol = replace(protocol or MeasureProtocol(), statistic=stat)
    base = table.metadata.get("probe_baseline") or {}
    same = bool(base.get("network") and base.get("statistic") == stat and base.get("ratio"))
    # the network the baseline was taken on, whichever space asks now (an arch's own space, a
    # bigger one): the probe always compares like with like
    arch = arch_of(space_from_dict(base["network"], "probe baseline", base.get("arch"))) \
        if same else probe_arch(space, table, input_shape, granularity)
    predicted = float(table.lookup(arch.op_keys(input_shape, granularity)).sum())
    model = inference_model(build_model(arch))
    res = protocol.measure({"probe": backend.runner(model, torch.randn(*input_shape))})["probe"]
    return _judge({"arch": arch.name, "predicted_ms": predicted, "measured_ms": res["ms"],
                   "ratio": res["ms"] / predicted,
                   "expected_ratio": float(base["ratio"]) if same else 1.0,
                   "baseline": bool(same),
                   "spread": res["spread"], "statistic": stat}, tolerance)


def record_baseline(table: LatencyTable, space, backend: Backend,
                    protocol: MeasureProtocol | None = None) -> dict:
    """Probe a table just profiled here and store the result as ``probe_baseline`` in its
    metadata (the ratio later probes expect); returns the record."""
    meta = table.metadata
    rec = probe_table(table, space, backend, meta["input_shape"],
                      meta.get("granularity", "block"), protocol)
    arch = probe_arch(space, table, meta["input_shape"], meta.get("granularity", "block"))
    meta["probe_baseline"] = {**{k: rec[k] for k in ("arch", "predicted_ms", "measured_ms",
                                                     "ratio", "spread", "statistic")},
                              "network": arch.to_dict()}
    if abs(rec["ratio"] - 1) > PROBE_TOLERANCE:
        log.info("on this machine the sum of the table's keys predicts %s at %.3g ms, measured "
                 "%.3g ms (ratio %.2f): at this input size the keys are not additive (per-call "
                 "overhead, fusion across blocks); absolute predictions will be off, rankings "
                 "may hold. Check with ernas-profile mode=validate.", rec["arch"],
                 rec["predicted_ms"], rec["measured_ms"], rec["ratio"])
    return rec


def _judge(record: dict, tolerance: float) -> dict:
    q = record["ratio"] / record["expected_ratio"]
    return {**record, "relative": q, "tolerance": tolerance,
            "accepted": bool(max(q, 1 / q) <= 1 + tolerance)}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cached_probe(path: Path, table, space, backend, shape, gran, protocol, tolerance,
                 cache_file: Path, cache_s: float) -> dict:
    """``probe_table``, served from ``cache_file`` when a fresh enough result exists."""
    key = "|".join([_file_hash(path), backend.fingerprint()["digest"],
                    "x".join(map(str, shape)), gran, space_digest(space),
                    json.dumps(protocol.to_dict(), sort_keys=True)])
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if cache_s > 0 and isinstance(hit, dict) and time.time() - hit.get("time", 0) < cache_s:
        return {**_judge(hit["record"], tolerance), "cached": True}
    record = probe_table(table, space, backend, shape, gran, protocol, tolerance)
    if cache_s > 0:
        cache = {k: v for k, v in cache.items()
                 if isinstance(v, dict) and time.time() - v.get("time", 0) < cache_s}
        cache[key] = {"time": time.time(), "record": record}
        atomic_write_json(cache_file, cache)
    return {**record, "cached": False}


def probe_text(rec: dict) -> str:
    expected = (f", {rec['expected_ratio']:.2f} expected from when it was profiled"
                if rec.get("baseline") else ", 1 expected: the table records no baseline")
    return (f"the probe timed {rec['arch']} at {rec['measured_ms']:.3g} ms against a predicted "
            f"{rec['predicted_ms']:.3g} ms (ratio {rec['ratio']:.2f}{expected}; tolerance "
            f"±{100 * rec['tolerance']:.0f}%)")
