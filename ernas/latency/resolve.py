"""Find the latency table for a request, and make sure it is true on this machine.

``latency.table=auto`` walks the shipped tables (``latency_tables/``) and the cached ones
(``~/.cache/ernas/latency_tables``). A candidate is used only when

1. its metadata matches the request (backend, provider, threads, device, input shape, dtype,
   granularity) and it holds every op key of the space;
2. its **fingerprint** (``ernas.latency.fingerprint``: CPU, caches, ISA flags, runtime version and
   session options) equals this machine's — a table without one is "unknown host";
3. a quick **probe** agrees: the space's reference network (or its largest, when the reference
   is not in the table) is timed end to end under the measurement protocol, with the table's
   statistic, and compared with the table's prediction (the sum of its key latencies, before
   any fitted correction): ``ratio = measured / predicted``. A table profiled by ernas records
   the same probe, made right after profiling, as ``probe_baseline``; its ratio (the
   sum-of-parts error at this input size on the machine that made it) is the ``expected_ratio``
   (1 for tables without a baseline). With ``relative = ratio / expected_ratio`` the table is
   accepted when ``max(relative, 1/relative) ≤ 1 + probe_tolerance``. So the probe asks "does
   this machine run the network as the table's machine did", which holds at any input size,
   while at small inputs (where per-call overhead makes sums over-predict) a correct table is
   not refused and re-profiled on every run.

Default ``probe_tolerance = 0.25``: a correct table is off by the sum-of-parts error (1.00-1.04
at 1 thread, up to ~1.10 at 2 threads with spinning off, measured here) times the probe's own
noise (a few % with interleaved rounds and a low percentile), so it lands within ~1.16; tables
from another host were 1.4-2.4x off. 1.25 is about the geometric middle of 1.16 and 1.4: it
refuses every such table and does not refuse a correct one on a normally busy 2-core VM, where
0.05 would (the old protocol's pass-to-pass noise alone was 5-12%). Under heavy load from other
tenants this VM also has multi-second phases ~1.7x slower, which no tolerance can tell from
another host: a refusal then re-profiles (once per ``probe_cache_s``). Tighten it on a quiet
machine.

When no candidate passes, ``on_mismatch`` decides: ``profile`` (default) measures a table for
this machine into the cache (these need no probe: they were just made here), ``rescale`` uses the
first fingerprint-matching candidate with every row times the probe's ratio (with a warning), and
``error`` raises. An explicit ``latency.table=<path>`` is checked the same way, but never
replaced silently: a fingerprint or probe mismatch raises, unless ``trust_table`` (use it as is,
with a warning, without probing) or ``on_mismatch=rescale``.

The returned table carries ``table.probe`` (a dict: ``arch``, ``predicted_ms``,
``measured_ms``, ``ratio``, ``expected_ratio``, ``relative``, ``spread``, ``tolerance``,
``accepted``, ``cached``, ``action`` in used | rescaled (rows times ``relative``) | trusted |
profiled, plus ``refused``: why other candidates were not used) and ``table.source``;
neither is written to the file. Probe results are cached for ``probe_cache_s`` seconds (default
1 h; 0 disables) in ``<cache_dir>/probes.json``, keyed by the table file's hash, this machine's
fingerprint, the input shape and the protocol, so repeated runs and tests do not re-probe.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.latency.anchor import ANCHOR_SAMPLES, anchor_table, anchors_phrase
from ernas.latency.backends import Backend
from ernas.latency.factory import make_backend
from ernas.latency.consistency import (DEFAULT_TOLERANCE, MAX_INCONSISTENCY, RECHECK_ROUNDS,
                                       check_consistency, inconsistency)
from ernas.latency.fingerprint import check_fingerprint, fingerprint_differences
from ernas.latency.measure import MeasureProtocol, plain_mapping
from ernas.latency.ops import build_op
from ernas.latency.profile import as_protocol, profile_keys, sidecar_path
from ernas.latency.table import COMPAT_FIELDS, LatencyTable
from ernas.paths import CACHE, LATENCY_TABLES

__all__ = ["ON_MISMATCH", "default_table_path", "probe_arch", "probe_table", "profile_command",
           "profile_table", "record_baseline", "required_metadata", "resolve_from_config",
           "resolve_table"]

ON_MISMATCH = ("profile", "rescale", "error")
PROBE_TOLERANCE = 0.25
PROBE_CACHE_S = 3600.0


def _note(msg: str) -> None:
    print(f"ernas: {msg}", file=sys.stderr, flush=True)


def required_metadata(backend: Backend, input_shape, granularity: str) -> dict:
    meta = backend.metadata()
    req = {f: meta.get(f) for f in COMPAT_FIELDS}
    req.update(input_shape=[int(s) for s in input_shape], granularity=granularity)
    return req


def profile_command(space, input_shape, backend: Backend, granularity: str,
                    output: str | Path | None = None) -> str:
    shape = ",".join(str(int(s)) for s in input_shape)
    cmd = (f"ernas-profile space={space.source if space.source != '<memory>' else space.name} "
           f"input_shape=[{shape}] latency.granularity={granularity} "
           f"latency.backend.name={backend.name}")
    return cmd + (f" output={output}" if output else "")


def default_table_path(space, backend: Backend, input_shape, granularity: str,
                       folder: Path | None = None) -> Path:
    meta = backend.metadata()
    device = re.sub(r"[^A-Za-z0-9]+", "-", str(meta.get("device", "device"))).strip("-")
    shape = "x".join(str(int(s)) for s in input_shape)
    suffix = (f"_t{meta['threads']}" if meta.get("threads") else "") + \
             ("_spin" if meta.get("spinning") else "")
    return (folder or CACHE / "latency_tables") / \
        f"{space.name}_{backend.name}_{device[:40]}_{shape}_{granularity}{suffix}.csv"


# --------------------------------------------------------------------------- probe
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
        _note(f"on this machine the sum of the table's keys predicts {rec['arch']} at "
              f"{rec['predicted_ms']:.3g} ms, measured {rec['measured_ms']:.3g} ms (ratio "
              f"{rec['ratio']:.2f}): at this input size the keys are not additive (per-call "
              f"overhead, fusion across blocks); absolute predictions will be off, rankings may "
              f"hold. Check with ernas-profile mode=validate.")
    return rec


def _judge(record: dict, tolerance: float) -> dict:
    q = record["ratio"] / record["expected_ratio"]
    return {**record, "relative": q, "tolerance": tolerance,
            "accepted": bool(max(q, 1 / q) <= 1 + tolerance)}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _cached_probe(path: Path, table, space, backend, shape, gran, protocol, tolerance,
                  cache_file: Path, cache_s: float) -> dict:
    """``probe_table``, served from ``cache_file`` when a fresh enough result exists."""
    key = "|".join([_file_hash(path), backend.fingerprint()["digest"],
                    "x".join(map(str, shape)), gran, space.name,
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


def _probe_text(rec: dict) -> str:
    expected = (f", {rec['expected_ratio']:.2f} expected from when it was profiled"
                if rec.get("baseline") else ", 1 expected: the table records no baseline")
    return (f"the probe timed {rec['arch']} at {rec['measured_ms']:.3g} ms against a predicted "
            f"{rec['predicted_ms']:.3g} ms (ratio {rec['ratio']:.2f}{expected}; tolerance "
            f"±{100 * rec['tolerance']:.0f}%)")


def profile_table(space, input_shape, backend: Backend, granularity: str, path: str | Path | None,
                  protocol: MeasureProtocol | dict | None = None,
                  consistency_tolerance: float = DEFAULT_TOLERANCE, progress: bool = True,
                  keys: list[str] | None = None, group: int = 64,
                  recheck_rounds: int = RECHECK_ROUNDS) -> LatencyTable:
    """Profile (or resume) a table for ``space`` at ``path``: every key of the space, then the
    single-decision consistency check with its re-measurement (``metadata['consistency']``) and
    the probe baseline (``metadata['probe_baseline']``); saved. With ``keys`` (e.g. one
    architecture's) only those are profiled, without the space-wide check and baseline.
    ``group``: keys measured together (``profile_keys``); ``recheck_rounds``: rounds of the
    consistency re-check."""
    protocol = as_protocol(protocol)
    shape = [int(s) for s in input_shape]
    meta = {"space": space.name, "input_shape": shape, "granularity": granularity}
    t = profile_keys(space.op_keys(shape, granularity) if keys is None else keys, build_op,
                     backend, path, meta, protocol, progress=progress, group=group)
    if keys is None:
        check_consistency(space, t, backend, build_op, protocol, consistency_tolerance, progress,
                          recheck_rounds, group)
        record_baseline(t, space, backend, protocol)
        if path is not None:
            t.save(path)
    return t


# --------------------------------------------------------------------------- resolve
def resolve_table(space, input_shape, backend_cfg, granularity: str = "block",
                  table: str | Path | None = "auto", cache_dir: str | Path | None = None,
                  protocol: MeasureProtocol | dict | None = None, progress: bool = True,
                  shipped_dir: Path = LATENCY_TABLES, *,
                  probe_tolerance: float = PROBE_TOLERANCE, on_mismatch: str = "profile",
                  trust_table: bool = False, probe_cache_s: float = PROBE_CACHE_S,
                  max_inconsistency: float = MAX_INCONSISTENCY,
                  consistency_tolerance: float = DEFAULT_TOLERANCE, profile_group: int = 64,
                  recheck_rounds: int = RECHECK_ROUNDS) -> tuple[LatencyTable, Path]:
    """The table for ``space`` at ``input_shape`` on this backend, and its path (see the module
    docstring). ``table``: ``auto`` (or None) or a path. When it profiles, it uses
    ``profile_table`` with ``consistency_tolerance``, ``profile_group``, ``recheck_rounds``."""
    if on_mismatch not in ON_MISMATCH:
        raise ErnasError(f"latency.on_mismatch={on_mismatch!r}; use one of {list(ON_MISMATCH)}.")
    if probe_tolerance < 0:
        raise ErnasError(f"latency.probe_tolerance={probe_tolerance} must be >= 0 (0.25 = ±25%).")
    backend = backend_cfg if isinstance(backend_cfg, Backend) else make_backend(backend_cfg)
    protocol = as_protocol(protocol)
    shape = [int(s) for s in input_shape]
    required = required_metadata(backend, shape, granularity)
    want = backend.fingerprint()
    keys = space.op_keys(shape, granularity)
    cache = Path(cache_dir) if cache_dir else CACHE / "latency_tables"
    fill = profile_command(space, shape, backend, granularity)

    def probe(t, path):
        return _cached_probe(path, t, space, backend, shape, granularity, protocol,
                             probe_tolerance, cache / "probes.json", probe_cache_s)

    def rescaled(t, path, rec, why):
        warnings.warn(f"Latency table {path}: {why}; using it with every row scaled by "
                      f"{rec['relative']:.3f} (latency.on_mismatch=rescale).", stacklevel=3)
        out = t.scaled(rec["relative"], {"probe": rec})
        out.probe = {**rec, "action": "rescaled"}
        return out, path

    if table not in (None, "auto"):
        path = Path(table)
        t = LatencyTable.load(path)
        # trusted: a table of another machine, used knowingly (its hardware differences are
        # warned about and recorded below); the settings that change keys must still agree
        t.check_compatible({k: v for k, v in required.items()
                            if not (trust_table and k == "device")}, path, fix=(
            f"profile a table here ({fill} output=<new path>), use latency.table=auto, or, for "
            f"a table of another machine (another device), set latency.trust_table=true to use "
            f"it anyway; the other fields must match the request"))
        t.lookup(keys, fill_command=profile_command(space, shape, backend, granularity, path))
        why = inconsistency(t, space, shape, granularity, max_inconsistency)
        if why and not trust_table:
            raise ErnasError(f"Latency table {path} cannot price {space.name}'s choices: {why}. "
                             f"Fix: profile a table while nothing else runs ({fill} output=<new "
                             f"path>), or set latency.trust_table=true to use it anyway.")
        if why:
            warnings.warn(f"Latency table {path}: {why}; used anyway because "
                          f"latency.trust_table=true.", stacklevel=3)
        diffs = check_fingerprint(t.metadata, want, str(path), trust=trust_table)
        if trust_table:
            t.probe = {"action": "trusted", "accepted": None, "fingerprint_differences": diffs}
            return t, path
        rec = probe(t, path)
        if rec["accepted"]:
            t.probe = {**rec, "action": "used"}
            return t, path
        if on_mismatch == "rescale":
            return rescaled(t, path, rec, _probe_text(rec))
        raise ErnasError(f"Latency table {path} does not hold on this machine: {_probe_text(rec)}."
                         f" Fix: profile a table here ({fill} output=<new path>), use "
                         f"latency.table=auto, set latency.on_mismatch=rescale to scale it, or "
                         f"latency.trust_table=true to use it anyway.")

    refused: list[dict] = []
    probed = []
    for path in sorted(Path(shipped_dir).glob("*.csv")) + sorted(cache.glob("*.csv")):
        try:
            t = LatencyTable.load(path)
            t.check_compatible(required, path)
        except ErnasError:
            continue  # another space, shape, backend or setting: not a candidate
        if not all(k in t for k in keys):
            continue
        diffs = fingerprint_differences(t.metadata.get("fingerprint"), want)
        if diffs:
            refused.append({"table": str(path),
                            "reason": "fingerprint differs: " + "; ".join(diffs)})
            continue
        why = inconsistency(t, space, shape, granularity, max_inconsistency)
        if why:
            refused.append({"table": str(path), "reason": why})
            continue
        rec = probe(t, path)
        if rec["accepted"]:
            t.probe = {**rec, "action": "used", "refused": refused}
            return t, path
        refused.append({"table": str(path), "reason": _probe_text(rec), "probe": rec})
        probed.append((t, path, rec))
    for r in refused:
        _note(f"latency table {r['table']} not used: {r['reason']}.")
    if on_mismatch == "rescale" and probed:
        t, path, rec = probed[0]
        out, path = rescaled(t, path, rec, _probe_text(rec))
        out.probe["refused"] = refused
        return out, path
    if on_mismatch == "error":
        why = "; ".join(f"{r['table']}: {r['reason']}" for r in refused) or "none matched"
        raise ErnasError(f"No latency table for {space.name} at {shape} holds on this machine "
                         f"({why}). Fix: {fill}, or set latency.on_mismatch=profile to profile "
                         f"one automatically.")
    path = default_table_path(space, backend, shape, granularity, cache)
    if any(r["table"] == str(path) for r in refused):
        _note(f"re-profiling {path} (the cached table there was refused).")
        path.unlink(missing_ok=True)
        sidecar_path(path).unlink(missing_ok=True)
    _note(f"profiling a latency table for {space.name} at {shape} on this machine: {path}")
    t = profile_table(space, shape, backend, granularity, path, protocol, consistency_tolerance,
                      progress, group=profile_group, recheck_rounds=recheck_rounds)
    why = inconsistency(t, space, shape, granularity, max_inconsistency)
    if why:
        warnings.warn(f"The latency table just profiled at {path}: {why}. It is used, but "
                      f"delete it and run again when the machine is quiet.", stacklevel=3)
    t.probe = {"action": "profiled", "accepted": True, "refused": refused}
    return t, path


def resolve_from_config(space, input_shape, latency_cfg, progress: bool = True,
                        table: str | Path | None = None,
                        scored=()) -> tuple[LatencyTable, Path]:
    """``resolve_table`` from a latency config group (``experiments/latency/*.yaml``:
    backend, granularity, table, cache_dir, measure, probe_tolerance, on_mismatch, trust_table,
    probe_cache_s, max_inconsistency, consistency_tolerance, profile_group, recheck_rounds);
    ``table`` overrides the config's. With ``anchor: true`` the table is then calibrated on the day
    (``ernas.latency.anchor``), recorded in ``table.probe['anchor']``; ``scored``: the
    architectures whose predictions will be compared with measurements, never an anchor."""
    lat = plain_mapping(latency_cfg, "latency")
    gran = lat.get("granularity", "block")
    t, path = resolve_table(
        space, input_shape, lat["backend"], gran,
        table or lat.get("table", "auto"), lat.get("cache_dir"), lat.get("measure"), progress,
        probe_tolerance=float(lat.get("probe_tolerance", PROBE_TOLERANCE)),
        on_mismatch=lat.get("on_mismatch", "profile"),
        trust_table=bool(lat.get("trust_table", False)),
        probe_cache_s=float(lat.get("probe_cache_s", PROBE_CACHE_S)),
        max_inconsistency=float(lat.get("max_inconsistency", MAX_INCONSISTENCY)),
        consistency_tolerance=float(lat.get("consistency_tolerance", DEFAULT_TOLERANCE)),
        profile_group=int(lat.get("profile_group", 64)),
        recheck_rounds=int(lat.get("recheck_rounds", RECHECK_ROUNDS)))
    if lat.get("anchor"):
        shape = [int(s) for s in input_shape]
        rec = anchor_table(t, space, make_backend(lat["backend"]), shape, gran,
                           as_protocol(lat.get("measure")), probe_arch(space, t, shape, gran),
                           scored, int(lat.get("anchor_samples", ANCHOR_SAMPLES)))
        t.probe = {**(t.probe or {}), "anchor": rec}
        if "skipped" in rec:
            line = (f": predictions are {rec['scale']:.3f}·sum {rec['offset_ms']:+.3g} ms"
                    if "scale" in rec else "")
            _note(f"latency.anchor: {rec['skipped']}{line}.")
        else:
            m = rec["measured_ms"]
            drawn = [v for k, v in m.items() if k.startswith("sample_")]
            _note(f"latency.anchor: timed {anchors_phrase(len(drawn), rec['samples_requested'])}"
                  f" now: {rec['networks']['reference']} {m['reference']:.3g} ms, "
                  f"{rec['networks']['smallest']} {m['smallest']:.3g} ms"
                  + (f", sampled {min(drawn):.3g}-{max(drawn):.3g} ms" if drawn else "")
                  + f"; predictions are {rec['scale']:.3f}·sum {rec['offset_ms']:+.3g} ms.")
    return t, path
