"""Resumable profiling: measure op keys with a backend into a LatencyTable file.

The table is saved atomically every ``save_every_s`` seconds, at the end, and when the run stops
early (Ctrl-C, an error); running the same command again measures only the keys still missing.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from ernas.latency.backends import Backend, MeasureBudget
from ernas.latency.table import COMPAT_FIELDS, LatencyTable

__all__ = ["profile_keys"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def profile_keys(keys: list[str], build: Callable[[str], tuple[nn.Module, Tensor]],
                 backend: Backend, out_path: str | os.PathLike | None, metadata: dict | None = None,
                 budget: MeasureBudget | None = None, save_every_s: float = 10.0,
                 progress: bool = True) -> LatencyTable:
    """Measure every key of ``keys`` not yet in the table at ``out_path``; return the table.

    ``build(key) -> (module, example_input)``. The table's metadata is ``date`` +
    ``backend.metadata()`` + ``metadata`` (the caller's fields win: input_shape, space,
    granularity, ...). An existing file is resumed if its metadata agrees on ``COMPAT_FIELDS``;
    otherwise ErnasError (nothing is overwritten). ``out_path=None`` keeps the table in memory.
    """
    budget = budget or MeasureBudget()
    meta = {"date": _now(), **backend.metadata(), **(metadata or {})}
    path = Path(out_path) if out_path is not None else None

    if path is not None and path.exists():
        table = LatencyTable.load(path)
        required = {f: meta[f] for f in COMPAT_FIELDS if f in meta}
        table.check_compatible(required, path, fix=(
            f"this file was profiled with different settings, so it cannot be resumed; pick "
            f"another output path, or delete {path} to start over"))
        table.metadata["date_updated"] = meta["date"]
    else:
        table = LatencyTable(metadata=meta, path=path)

    todo = [k for k in dict.fromkeys(keys) if k not in table]

    def save():
        if path is not None:
            table.save(path)

    last_save = time.monotonic()
    bar = tqdm(total=len(todo), disable=not progress, desc=f"profiling ({backend.name})",
               unit="op", dynamic_ncols=True)
    try:
        for key in todo:
            bar.set_postfix_str(key, refresh=False)
            module, example_input = build(key)
            table.add(key, backend.measure(module, example_input, budget))
            bar.update(1)
            if time.monotonic() - last_save >= save_every_s:
                save()
                last_save = time.monotonic()
    except BaseException:  # KeyboardInterrupt included: keep what is done, then re-raise
        save()
        raise
    finally:
        bar.close()
    if todo or (path is not None and not path.exists()):
        save()
    return table
