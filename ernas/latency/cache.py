"""Where cached latency tables live, named by what they measure, never replaced in place.

A cache file is named ``<space>_<backend>_<device>_<shape>_<granularity>[_tN][_spin]_<digest>
.csv``: the readable prefix is for people, the ``digest`` (``table_digest``) is a hash of the
space's content (family, geometry, candidate choices), the input shape, the granularity and the
backend's settings (its fingerprint and dtype). Two spaces that share a ``name`` but differ in
content therefore never share a file. The space's own digest (``space_digest``) is recorded in a
profiled table's metadata, so a table of another space is never resumed or re-baselined.

A finished cache table is never rewritten: when it is refused (by the probe, its fingerprint or
its consistency) a new profile goes to the next free sibling ``<stem>.2.csv``, ``<stem>.3.csv``
(``profile_target``) and ``latency.table=auto`` chooses among them by the probe. Only an
unfinished profile of the same request (rows missing, same settings and host) is resumed.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ernas.errors import ErnasError
from ernas.latency.backends import Backend
from ernas.latency.fingerprint import fingerprint_differences
from ernas.latency.table import LatencyTable
from ernas.paths import CACHE

__all__ = ["cache_candidates", "default_table_path", "profile_target", "space_digest",
           "table_digest"]

MAX_SIBLINGS = 1000


def _digest(obj) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _space_content(space) -> dict:
    """What decides a space's op keys and its probe network: family, geometry, choices (and
    the geometry alternatives, where the space has them)."""
    choices = {p: {d: list(c) for d, c in ch.items()} for p, ch in space.choices.items()}
    content = {"family": space.family, "geometry": space.geometry, "choices": choices}
    alternatives = getattr(space, "geometries", None)
    return {**content, "geometries": alternatives} if alternatives else content


def space_digest(space) -> str:
    """A short hash of the space's content (not its name or file)."""
    return _digest(_space_content(space))


def table_digest(space, backend: Backend, input_shape, granularity: str) -> str:
    """A short hash of everything a cache table's rows depend on (see the module docstring)."""
    return _digest({"space": _space_content(space), "shape": [int(s) for s in input_shape],
                    "granularity": granularity, "dtype": backend.dtype,
                    "backend": backend.name, "fingerprint": backend.fingerprint()["digest"]})


def default_table_path(space, backend: Backend, input_shape, granularity: str,
                       folder: Path | None = None) -> Path:
    """The cache file of this request: a readable prefix and the content ``table_digest``."""
    meta = backend.metadata()
    device = re.sub(r"[^A-Za-z0-9]+", "-", str(meta.get("device", "device"))).strip("-")
    shape = "x".join(str(int(s)) for s in input_shape)
    suffix = (f"_t{meta['threads']}" if meta.get("threads") else "") + \
             ("_spin" if meta.get("spinning") else "") + \
             (f"_{backend.dtype}" if backend.dtype != "float32" else "")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(space.name))[:60]
    digest = table_digest(space, backend, input_shape, granularity)
    return (folder or CACHE / "latency_tables") / \
        f"{name}_{backend.name}_{device[:40]}_{shape}_{granularity}{suffix}_{digest}.csv"


def _sibling(base: Path, n: int) -> Path:
    return base if n == 1 else base.with_name(f"{base.stem}.{n}{base.suffix}")


def _resumable(path: Path, keys: list[str], required: dict, backend: Backend,
               digest: str, finished_too: bool) -> bool:
    """Whether ``path`` may receive rows: an unfinished profile (or, with ``finished_too``,
    any table) of the same space, request and host."""
    try:
        table = LatencyTable.load(path)
        table.check_compatible(required, path)
    except ErnasError:
        return False
    meta = table.metadata
    if meta.get("space_digest") != digest:
        return False
    if fingerprint_differences(meta.get("fingerprint"), backend.fingerprint()):
        return False
    return finished_too or not all(k in table for k in keys)


def profile_target(base: Path, space, backend: Backend, keys: list[str], required: dict,
                   finished_too: bool = False) -> Path:
    """Where to profile ``keys`` for the request whose cache file is ``base``: ``base`` or its
    first sibling that is free or an unfinished profile of the same request (resumed). A
    finished table is never chosen (unless ``finished_too``: adding one network's keys)."""
    digest = space_digest(space)
    for n in range(1, MAX_SIBLINGS + 1):
        path = _sibling(base, n)
        if not path.exists() or _resumable(path, keys, required, backend, digest, finished_too):
            return path
    raise ErnasError(f"{MAX_SIBLINGS} latency tables named {base.stem}.N.csv are in "
                     f"{base.parent}, all refused or of other settings. Delete the ones you do "
                     f"not need (or set latency.cache_dir to another folder).")


def cache_candidates(folder: Path) -> list[Path]:
    """The cache's tables, newest first (a re-profile is tried before the table it replaced)."""
    paths = [p for p in Path(folder).glob("*.csv") if p.is_file()]
    return sorted(paths, key=lambda p: (-p.stat().st_mtime_ns, p.name))
