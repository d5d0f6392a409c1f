"""Find the latency table for a request, and make sure it is true on this machine.

``latency.table=auto`` walks the shipped tables (``latency_tables/``) and the cached ones
(``~/.cache/ernas/latency_tables``, newest first). A candidate is used only when

1. its metadata matches the request (backend, provider, threads, device, input shape, dtype,
   granularity) and it holds every op key of the space;
2. its **fingerprint** (``ernas.latency.fingerprint``: CPU, caches, ISA flags, runtime version and
   session options) equals this machine's — a table without one is "unknown host";
3. it prices no cheaper choice more than ``max_inconsistency`` times its costlier neighbour;
4. the **probe** (``ernas.latency.probe``) agrees: the space's reference network (or its
   largest) timed end to end is within ``probe_tolerance`` of what the table predicts, relative
   to what the table's own machine saw right after profiling (``probe_baseline``).

``probe_tolerance`` (default 0.25) sits between the error of a correct table (the sum-of-parts
error times the probe's noise) and that of a table from another host; a busy machine can still
be refused, and then a new table is profiled (once per ``probe_cache_s``).

When no candidate passes, ``on_mismatch`` decides: ``profile`` (default) measures a table for
this machine into the cache — into a **new** file (``ernas.latency.cache.profile_target``: a
cache table is never replaced in place; the probe chooses among them later); ``rescale`` uses
the first fingerprint-matching candidate with every row times the probe's ratio (with a
warning); ``error`` raises. An explicit ``latency.table=<path>`` is checked the same way, but
never replaced: a fingerprint or probe mismatch raises, unless ``trust_table`` (use it as is,
with a warning, without probing) or ``on_mismatch=rescale``.

The returned table carries ``table.probe`` (``arch``, ``predicted_ms``, ``measured_ms``,
``ratio``, ``expected_ratio``, ``relative``, ``spread``, ``tolerance``, ``accepted``,
``cached``, ``action`` in used | rescaled | trusted | profiled, and ``refused``: why other
candidates were not used) and ``table.source``; neither is written to the file. Every setting
comes from one ``LatencySettings`` (``ernas.latency.settings``). ``resolve_from_config`` logs
the table it chose and why (``table_choice``), the candidates it refused, and any profiling.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

from ernas.errors import ErnasError
from ernas.latency.anchor import anchor_table, anchors_phrase
from ernas.latency.backends import Backend
from ernas.latency.cache import cache_candidates, default_table_path, profile_target, space_digest
from ernas.latency.consistency import DEFAULT_TOLERANCE, RECHECK_ROUNDS, check_consistency, \
    inconsistency
from ernas.latency.factory import make_backend
from ernas.latency.fingerprint import check_fingerprint, fingerprint_differences
from ernas.latency.measure import MeasureProtocol
from ernas.latency.ops import build_op
from ernas.latency.probe import cached_probe, probe_arch, probe_table, probe_text, record_baseline
from ernas.latency.profile import as_protocol, profile_keys
from ernas.latency.settings import ON_MISMATCH, LatencySettings
from ernas.latency.table import COMPAT_FIELDS, LatencyTable
from ernas.paths import CACHE, LATENCY_TABLES

__all__ = ["ON_MISMATCH", "default_table_path", "probe_arch", "probe_table", "profile_command",
           "profile_path", "profile_table", "record_baseline", "required_metadata",
           "resolve_from_config", "resolve_table", "table_choice"]

log = logging.getLogger(__name__)


def required_metadata(backend: Backend, input_shape, granularity: str) -> dict:
    """The metadata a table must agree on to serve this request."""
    meta = backend.metadata()
    req = {f: meta.get(f) for f in COMPAT_FIELDS}
    req.update(input_shape=[int(s) for s in input_shape], granularity=granularity)
    return req


def profile_command(space, input_shape, backend: Backend, granularity: str,
                    output: str | Path | None = None) -> str:
    """The ``ernas-profile`` command line that fills a table for this request."""
    shape = ",".join(str(int(s)) for s in input_shape)
    cmd = (f"ernas-profile space={space.source if space.source != '<memory>' else space.name} "
           f"input_shape=[{shape}] latency.granularity={granularity} "
           f"latency.backend.name={backend.name}"
           + (f" latency.backend.dtype={backend.dtype}" if backend.dtype != "float32" else ""))
    return cmd + (f" output={output}" if output else "")


def _check_same_space(path: Path, space) -> None:
    """Refuse to add rows to, or re-baseline, a table profiled for another space's content."""
    if not path.is_file():
        return
    have = LatencyTable.load(path).metadata.get("space_digest")
    if have is not None and have != space_digest(space):
        raise ErnasError(f"Latency table {path} was profiled for another space (content digest "
                         f"{have}; {space.name} from {space.source} has {space_digest(space)}): "
                         f"its rows and probe baseline are left as they are. Fix: give another "
                         f"output path, or leave output unset to use this space's own cache "
                         f"file.")


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
    consistency re-check. A file holding another space's table is refused."""
    protocol = as_protocol(protocol)
    shape = [int(s) for s in input_shape]
    if path is not None:
        _check_same_space(Path(path), space)
    meta = {"space": space.name, "space_digest": space_digest(space), "input_shape": shape,
            "granularity": granularity}
    t = profile_keys(space.op_keys(shape, granularity) if keys is None else keys, build_op,
                     backend, path, meta, protocol, progress=progress, group=group)
    if keys is None:
        check_consistency(space, t, backend, build_op, protocol, consistency_tolerance, progress,
                          recheck_rounds, group)
        record_baseline(t, space, backend, protocol)
        if path is not None:
            t.save(path)
    return t


class _Request:
    """One resolution: the space, shape, backend and settings, and what follows from them."""

    def __init__(self, space, input_shape, settings: LatencySettings):
        self.space, self.s = space, settings
        self.backend = settings.backend if isinstance(settings.backend, Backend) \
            else make_backend(settings.backend)
        self.protocol = as_protocol(settings.measure)
        self.shape = [int(v) for v in input_shape]
        self.gran = settings.granularity
        self.required = required_metadata(self.backend, self.shape, self.gran)
        self.want = self.backend.fingerprint()
        self.keys = space.op_keys(self.shape, self.gran)
        self.cache = Path(settings.cache_dir) if settings.cache_dir else CACHE / "latency_tables"
        self.fill = profile_command(space, self.shape, self.backend, self.gran)

    def probe(self, t: LatencyTable, path: Path) -> dict:
        return cached_probe(path, t, self.space, self.backend, self.shape, self.gran,
                            self.protocol, self.s.probe_tolerance, self.cache / "probes.json",
                            self.s.probe_cache_s)

    def inconsistency(self, t: LatencyTable) -> str | None:
        return inconsistency(t, self.space, self.shape, self.gran, self.s.max_inconsistency)

    def rescaled(self, t: LatencyTable, path: Path, rec: dict) -> tuple[LatencyTable, Path]:
        warnings.warn(f"Latency table {path}: {probe_text(rec)}; using it with every row scaled "
                      f"by {rec['relative']:.3f} (latency.on_mismatch=rescale).", stacklevel=4)
        out = t.scaled(rec["relative"], {"probe": rec})
        out.probe = {**rec, "action": "rescaled"}
        return out, path


def _explicit(req: _Request, path: Path) -> tuple[LatencyTable, Path]:
    """An explicit ``latency.table=<path>``: checked, probed, never replaced."""
    s, trust = req.s, req.s.trust_table
    t = LatencyTable.load(path)
    # trusted: a table of another machine, used knowingly (its hardware differences are
    # warned about and recorded below); the settings that change keys must still agree
    t.check_compatible({k: v for k, v in req.required.items() if not (trust and k == "device")},
                       path, fix=(
        f"profile a table here ({req.fill} output=<new path>), use latency.table=auto, or, for "
        f"a table of another machine (another device), set latency.trust_table=true to use "
        f"it anyway; the other fields must match the request"))
    t.lookup(req.keys, fill_command=profile_command(req.space, req.shape, req.backend, req.gran,
                                                    path))
    why = req.inconsistency(t)
    if why and not trust:
        raise ErnasError(f"Latency table {path} cannot price {req.space.name}'s choices: {why}. "
                         f"Fix: profile a table while nothing else runs ({req.fill} output=<new "
                         f"path>), or set latency.trust_table=true to use it anyway.")
    if why:
        warnings.warn(f"Latency table {path}: {why}; used anyway because "
                      f"latency.trust_table=true.", stacklevel=3)
    diffs = check_fingerprint(t.metadata, req.want, str(path), trust=trust)
    if trust:
        t.probe = {"action": "trusted", "accepted": None, "fingerprint_differences": diffs}
        return t, path
    rec = req.probe(t, path)
    if rec["accepted"]:
        t.probe = {**rec, "action": "used"}
        return t, path
    if s.on_mismatch == "rescale":
        return req.rescaled(t, path, rec)
    raise ErnasError(f"Latency table {path} does not hold on this machine: {probe_text(rec)}. "
                     f"Fix: profile a table here ({req.fill} output=<new path>), use "
                     f"latency.table=auto, set latency.on_mismatch=rescale to scale it, or "
                     f"latency.trust_table=true to use it anyway.")


def _candidate(req: _Request, path: Path) -> LatencyTable | None:
    """The table at ``path`` if it serves this request (metadata and keys), else None."""
    try:
        t = LatencyTable.load(path)
        t.check_compatible(req.required, path)
    except ErnasError:
        return None  # another space, shape, backend or setting, or unreadable: not a candidate
    return t if all(k in t for k in req.keys) else None


def _auto(req: _Request, shipped_dir: Path, refused: list[dict]):
    """The first candidate that passes every check, or None; ``refused`` collects the others,
    and the probed ones are returned too (for ``rescale``)."""
    probed = []
    for path in sorted(Path(shipped_dir).glob("*.csv")) + cache_candidates(req.cache):
        t = _candidate(req, path)
        if t is None:
            continue
        diffs = fingerprint_differences(t.metadata.get("fingerprint"), req.want)
        why = ("fingerprint differs: " + "; ".join(diffs)) if diffs else req.inconsistency(t)
        if why:
            refused.append({"table": str(path), "reason": why})
            continue
        rec = req.probe(t, path)
        if rec["accepted"]:
            t.probe = {**rec, "action": "used", "refused": refused}
            return t, path, probed
        refused.append({"table": str(path), "reason": probe_text(rec), "probe": rec})
        probed.append((t, path, rec))
    return None, None, probed


def profile_path(space, backend: Backend, input_shape, granularity: str,
                 cache_dir: str | Path | None = None, keys: list[str] | None = None) -> Path:
    """Where a profile of ``space`` goes in the cache: its ``default_table_path``, or the first
    sibling free or unfinished (``ernas.latency.cache.profile_target``: a finished table is
    never rewritten). With ``keys`` (one network's), a finished table of the space may receive
    them."""
    shape = [int(v) for v in input_shape]
    base = default_table_path(space, backend, shape, granularity,
                              Path(cache_dir) if cache_dir else None)
    path = profile_target(base, space, backend, keys or space.op_keys(shape, granularity),
                          required_metadata(backend, shape, granularity),
                          finished_too=keys is not None)
    if path != base:
        log.info(f"profiling into {path} beside {base} (a cache table is never replaced).")
    return path


def _profile_new(req: _Request, refused: list[dict], progress: bool):
    """Profile a table for this machine into a new (or unfinished) cache file."""
    path = profile_path(req.space, req.backend, req.shape, req.gran, req.cache)
    log.info(f"profiling a latency table for {req.space.name} at {req.shape} on this machine: "
             f"{path}")
    s = req.s
    t = profile_table(req.space, req.shape, req.backend, req.gran, path, req.protocol,
                      s.consistency_tolerance, progress, group=s.profile_group,
                      recheck_rounds=s.recheck_rounds)
    why = req.inconsistency(t)
    if why:
        warnings.warn(f"The latency table just profiled at {path}: {why}. It is used this "
                      f"time; the next latency.table=auto run refuses it and profiles a new "
                      f"table beside it (run that while the machine is quiet).", stacklevel=3)
    t.probe = {"action": "profiled", "accepted": True, "refused": refused}
    return t, path


def resolve_table(space, input_shape, settings: LatencySettings | Mapping, progress: bool = True,
                  *, shipped_dir: Path = LATENCY_TABLES) -> tuple[LatencyTable, Path]:
    """The table for ``space`` at ``input_shape`` under ``settings`` (a ``LatencySettings`` or
    a latency config mapping), and its path (see the module docstring). ``shipped_dir``: where
    the shipped tables are looked for."""
    req = _Request(space, input_shape, LatencySettings.from_config(settings))
    if req.s.table not in (None, "auto"):
        return _explicit(req, Path(req.s.table))
    refused: list[dict] = []
    t, path, probed = _auto(req, shipped_dir, refused)
    if t is not None:
        return t, path
    for r in refused:
        log.info(f"latency table {r['table']} not used: {r['reason']}.")
    if req.s.on_mismatch == "rescale" and probed:
        out, path = req.rescaled(*probed[0])
        out.probe["refused"] = refused
        return out, path
    if req.s.on_mismatch == "error":
        why = "; ".join(f"{r['table']}: {r['reason']}" for r in refused) or "none matched"
        raise ErnasError(f"No latency table for {space.name} at {req.shape} holds on this machine"
                         f" ({why}). Fix: {req.fill}, or set latency.on_mismatch=profile to "
                         f"profile one automatically.")
    return _profile_new(req, refused, progress)


def _note_anchor(rec: dict) -> None:
    if "skipped" in rec:
        line = (f": predictions are {rec['scale']:.3f}·sum {rec['offset_ms']:+.3g} ms"
                if "scale" in rec else "")
        log.info(f"latency.anchor: {rec['skipped']}{line}.")
        return
    m = rec["measured_ms"]
    drawn = [v for k, v in m.items() if k.startswith("sample_")]
    log.info(f"latency.anchor: timed {anchors_phrase(len(drawn), rec['samples_requested'])}"
         f" now: {rec['networks']['reference']} {m['reference']:.3g} ms, "
         f"{rec['networks']['smallest']} {m['smallest']:.3g} ms"
         + (f", sampled {min(drawn):.3g}-{max(drawn):.3g} ms" if drawn else "")
         + f"; predictions are {rec['scale']:.3f}·sum {rec['offset_ms']:+.3g} ms.")


def resolve_from_config(space, input_shape, latency_cfg, progress: bool = True,
                        table: str | Path | None = None,
                        scored=()) -> tuple[LatencyTable, Path]:
    """``resolve_table`` from a latency config group (``experiments/latency/*.yaml``, or a
    ``LatencySettings``); ``table`` overrides the config's. With ``anchor: true`` the table is
    then calibrated on the day (``ernas.latency.anchor``), recorded in
    ``table.probe['anchor']``; ``scored``: the architectures whose predictions will be compared
    with measurements, never an anchor."""
    s = LatencySettings.from_config(latency_cfg)
    if table is not None:
        s = s.replace(table=table)
    t, path = resolve_table(space, input_shape, s.key_settings(), progress)
    if s.anchor:
        shape = [int(v) for v in input_shape]
        backend = s.backend if isinstance(s.backend, Backend) else make_backend(s.backend)
        rec = anchor_table(t, space, backend, shape, s.granularity, s.measure,
                           probe_arch(space, t, shape, s.granularity), scored, s.anchor_samples)
        t.probe = {**(t.probe or {}), "anchor": rec}
        _note_anchor(rec)
        if s.keys_elsewhere:
            _check_carried(s, t, rec, path)
    log.info("latency table %s: %s", path,
             table_choice(t, path, given=s.table not in (None, "auto")))
    return t, path


def _check_carried(s: LatencySettings, t: LatencyTable, rec: dict, path) -> None:
    """Refuse key sums timed at ``key_threads`` that no line anchored at the networks' thread
    count carries there (they would price the networks at the wrong thread count)."""
    line = (t.metadata.get("correction") or {}).get("anchored") or {}
    if line.get("threads") != s.backend["threads"]:
        raise ErnasError(
            f"Latency table {path}: its keys are timed at latency.key_threads={s.key_threads} "
            f"thread(s) and the networks run at latency.backend.threads="
            f"{s.backend['threads']}; only a line anchored at {s.backend['threads']} thread(s) "
            f"carries one to the other, and none was drawn ({rec.get('skipped')}). Fix: predict "
            f"from a search run's own table (ernas-evaluate checkpoint=<search run>), or set "
            f"latency.key_threads=null to use a table timed at {s.backend['threads']} thread(s).")


def table_choice(table: LatencyTable, path: str | Path, given: bool = False) -> str:
    """Why ``table`` (resolved from ``path``; ``given``: named by ``latency.table``, not found
    by ``auto``) is the one used, in words, from its probe record (``table.probe``): its kind
    (shipped, cached, given), the action (used after the probe agreed, profiled here now,
    trusted, rescaled, a resumed run's copy), the other candidates refused and the day's
    anchoring."""
    rec = table.probe or {}
    action = rec.get("action")
    kind = "given table" if given else "shipped table" if Path(path).resolve().is_relative_to(
        LATENCY_TABLES.resolve()) else "cached table"
    if action == "used" and "ratio" in rec:
        why = (f"{kind}, its fingerprint matches this machine and the probe agreed ({rec['arch']}"
               f" measured/predicted {rec['ratio']:.2f}, {rec['relative']:.2f}x the expected "
               f"ratio, tolerance ±{100 * rec['tolerance']:.0f}%"
               f"{', probe result cached' if rec.get('cached') else ''})")
    elif action == "profiled":
        why = "profiled on this machine now (no shipped or cached table held here)"
    elif action == "trusted":
        why = f"{kind} used as it is, not probed (latency.trust_table=true)"
    elif action == "rescaled":
        why = (f"{kind} with every row scaled by {rec['relative']:.3f} after the probe "
               f"disagreed (latency.on_mismatch=rescale)")
    elif action == "resumed":
        why = f"the copy this run started with ({rec.get('copy')}), as it was resolved then"
    else:
        why = kind
    refused = rec.get("refused") or []
    if refused and action != "resumed":
        why += f"; {len(refused)} other candidate(s) refused"
    anchor = rec.get("anchor") or {}
    if "scale" in anchor:
        kept = "skipped" in anchor or action == "resumed"
        when = "kept from the run's copy" if kept else "timed now"
        why += f"; anchored ({when}): ms = {anchor['scale']:.3f}·sum {anchor['offset_ms']:+.3g}"
        if anchor.get("key_threads") not in (None, anchor.get("threads")):
            why += (f" (keys timed at {anchor['key_threads']} thread(s), networks at "
                    f"{anchor['threads']})")
    elif "skipped" in anchor:
        why += f"; {anchor['skipped']}"
    return why
