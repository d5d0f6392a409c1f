"""Find the latency table for a request: an explicit file, a shipped or cached table whose
metadata matches, or a fresh profile (cached for the next run)."""
from __future__ import annotations

import re
from pathlib import Path

from ernas.errors import ErnasError
from ernas.latency.backends import Backend, MeasureBudget, make_backend
from ernas.latency.ops import build_op
from ernas.latency.profile import profile_keys
from ernas.latency.table import COMPAT_FIELDS, LatencyTable
from ernas.paths import CACHE, LATENCY_TABLES
from ernas.space import SearchSpace


def required_metadata(backend: Backend, input_shape, granularity: str) -> dict:
    meta = backend.metadata()
    req = {f: meta.get(f) for f in COMPAT_FIELDS}
    req.update(input_shape=[int(s) for s in input_shape], granularity=granularity)
    return req


def profile_command(space: SearchSpace, input_shape, backend: Backend, granularity: str,
                    output: str | Path | None = None) -> str:
    shape = ",".join(str(int(s)) for s in input_shape)
    cmd = (f"ernas-profile space={space.source if space.source != '<memory>' else space.name} "
           f"input_shape=[{shape}] latency.granularity={granularity} "
           f"latency.backend.name={backend.name}")
    return cmd + (f" output={output}" if output else "")


def default_table_path(space: SearchSpace, backend: Backend, input_shape, granularity: str,
                       folder: Path | None = None) -> Path:
    device = re.sub(r"[^A-Za-z0-9]+", "-", str(backend.metadata().get("device", "device"))).strip("-")
    shape = "x".join(str(int(s)) for s in input_shape)
    threads = backend.metadata().get("threads")
    suffix = f"_t{threads}" if threads else ""
    return (folder or CACHE / "latency_tables") / \
        f"{space.name}_{backend.name}_{device[:40]}_{shape}_{granularity}{suffix}.csv"


def _usable(path: Path, required: dict, keys: list[str]) -> LatencyTable | None:
    try:
        table = LatencyTable.load(path)
        table.check_compatible(required, path)
    except ErnasError:
        return None
    return table if all(k in table for k in keys) else None


def resolve_table(space: SearchSpace, input_shape, backend_cfg, granularity: str = "block",
                  table: str | Path | None = "auto", cache_dir: str | Path | None = None,
                  budget: MeasureBudget | None = None, progress: bool = True,
                  shipped_dir: Path = LATENCY_TABLES) -> tuple[LatencyTable, Path]:
    """The table for ``space`` at ``input_shape`` on this backend.

    ``table='auto'``: the first shipped (``latency_tables/``) or cached table whose metadata
    matches (backend, provider, threads, device, input shape, dtype, granularity) and which holds
    every key of the space; otherwise profile the missing keys into the cache and use that.
    ``table=<path>``: that file, refused if its metadata does not match or keys are missing."""
    backend = backend_cfg if isinstance(backend_cfg, Backend) else make_backend(backend_cfg)
    required = required_metadata(backend, input_shape, granularity)
    keys = space.op_keys(input_shape, granularity)
    if table not in (None, "auto"):
        path = Path(table)
        t = LatencyTable.load(path)
        t.check_compatible(required, path)
        t.lookup(keys, fill_command=profile_command(space, input_shape, backend, granularity, path))
        return t, path
    cache = Path(cache_dir) if cache_dir else CACHE / "latency_tables"
    for path in sorted(Path(shipped_dir).glob("*.csv")) + sorted(cache.glob("*.csv")):
        t = _usable(path, required, keys)
        if t is not None:
            return t, path
    path = default_table_path(space, backend, input_shape, granularity, cache)
    t = profile_keys(keys, build_op, backend, path,
                     {"space": space.name, "input_shape": required["input_shape"],
                      "granularity": granularity}, budget, progress=progress)
    return t, path
