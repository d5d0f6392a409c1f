"""Resumable profiling: measure op keys with a backend into a LatencyTable file.

Protocol (``MeasureProtocol``, see ``ernas.latency.measure``): the keys still missing from the
table are taken in groups of ``group`` (default 64, in the order given, so a block's variants are
usually measured together; every key of a group keeps a live session, ~50 MB for a 256x256
block). For each group every key is built, exported and given a session
once, warmed up, and then measured in ``rounds`` interleaved rounds: each round visits the
group's keys in a freshly shuffled order and times each ``per_round`` times (more rounds follow
until the group's rounds have lasted ``min_seconds``). A burst of contention thus lands on all
keys of the group alike instead of inflating one key. A key's row
is written when its group finishes; its ``ms`` column is the protocol's statistic (20th
percentile by default) of all its samples.

Resume: the samples of the group in progress live in a sidecar file ``<table>.samples.json``
beside the table, written atomically every ``save_every_s`` seconds, after every group and when
the run stops (Ctrl-C, an error). Running the same command again keeps the table's rows,
continues every key of the sidecar from the rounds it already has (with the shuffled orders it
would have used) and measures only what is missing. The sidecar is deleted once every key has
its row. A table or sidecar made with other settings (backend fields, fingerprint, statistic,
per_round) is never resumed or overwritten: ErnasError.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from ernas.progress import progress as progress_bar
from ernas.errors import ErnasError
from ernas.io import atomic_write_json
from ernas.latency.backends import Backend
from ernas.latency.fingerprint import check_fingerprint
from ernas.latency.measure import MeasureProtocol, round_order, rounds_left, warm_up
from ernas.latency.table import COMPAT_FIELDS, LatencyTable

__all__ = ["as_protocol", "profile_keys", "sidecar_path"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def as_protocol(protocol) -> MeasureProtocol:
    """A ``MeasureProtocol`` from a protocol, a config mapping or None (the defaults)."""
    if isinstance(protocol, MeasureProtocol):
        return protocol
    return MeasureProtocol.from_mapping(protocol)


def sidecar_path(table_path: str | os.PathLike) -> Path:
    """Where the samples of an unfinished profile of ``table_path`` are kept."""
    p = Path(table_path)
    return p.with_name(p.name + ".samples.json")


def _resume_key(meta: dict, protocol: MeasureProtocol) -> dict:
    """What must agree for stored samples to be continued."""
    return {**{f: meta.get(f) for f in COMPAT_FIELDS}, "statistic": protocol.statistic,
            "per_round": protocol.per_round, "fingerprint": meta["fingerprint"]["digest"]}


def _load_sidecar(path: Path, want: dict) -> dict[str, list[list[float]]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings, samples = data["settings"], data["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ErnasError(f"The profiling resume file {path} is unreadable. Delete it to start "
                         f"the unfinished keys over.") from None
    if json.loads(json.dumps(settings)) != json.loads(json.dumps(want)):
        diff = sorted(k for k in set(settings) | set(want) if settings.get(k) != want.get(k))
        raise ErnasError(f"The profiling resume file {path} was made with other settings "
                         f"(differs in {', '.join(diff)}), so it cannot be continued; pick another "
                         f"output path, or delete {path} to start the unfinished keys over.")
    return {k: [list(map(float, r)) for r in v] for k, v in samples.items()}


def profile_keys(keys: list[str], build: Callable[[str], tuple[nn.Module, Tensor]],
                 backend: Backend, out_path: str | os.PathLike | None, metadata: dict | None = None,
                 protocol: MeasureProtocol | dict | None = None, save_every_s: float = 10.0,
                 progress: bool = True, group: int = 64) -> LatencyTable:
    """Measure every key of ``keys`` not yet in the table at ``out_path``; return the table.

    ``build(key) -> (module, example_input)``. The table's metadata is ``date`` +
    ``backend.metadata()`` (with its ``fingerprint``) + ``metadata`` (the caller's fields win:
    input_shape, space, granularity, ...) + ``statistic`` and ``measure`` (the protocol). An
    existing file is resumed (see the module docstring) if it agrees on ``COMPAT_FIELDS``, the
    statistic and the fingerprint; otherwise ErnasError (nothing is overwritten).
    ``out_path=None`` keeps the table in memory (no resume file).
    """
    protocol = as_protocol(protocol)
    meta = {"date": _now(), **backend.metadata(), **(metadata or {}),
            "statistic": protocol.statistic, "measure": protocol.to_dict()}
    path = Path(out_path) if out_path is not None else None
    fix = (f"this file was profiled with different settings, so it cannot be resumed; pick "
           f"another output path, or delete {path} to start over")
    if path is not None and path.exists():
        table = LatencyTable.load(path)
        required = {f: meta[f] for f in COMPAT_FIELDS + ("statistic",) if f in meta}
        table.check_compatible(required, path, fix=fix)
        check_fingerprint(table.metadata, meta["fingerprint"], str(path), fix=fix)
        table.metadata["date_updated"] = meta["date"]
    else:
        table = LatencyTable(metadata=meta, path=path)

    side = sidecar_path(path) if path is not None else None
    settings = _resume_key(meta, protocol)
    samples = _load_sidecar(side, settings) if side is not None else {}
    todo = [k for k in dict.fromkeys(keys) if k not in table]
    todo = [k for k in todo if k in samples] + [k for k in todo if k not in samples]
    if group < 1:
        raise ErnasError(f"profile group={group} must be >= 1 (keys measured together).")
    groups = [todo[i:i + group] for i in range(0, len(todo), group)]
    last_save = time.monotonic()
    dirty = path is not None and not path.exists()

    def save():
        nonlocal dirty
        if path is None:
            return
        if dirty and len(table):  # a new file only once it holds a row: a failing backend
            table.save(path)       # leaves no empty table behind
            dirty = False
        open_samples = {k: v for k, v in samples.items() if v and k not in table}
        if open_samples:
            atomic_write_json(side, {"settings": settings, "samples": open_samples}, indent=None)
        else:
            side.unlink(missing_ok=True)

    # progress in keys: preparing a key counts 1/2, each of its rounds 1/(2·rounds)
    bar = progress_bar(len(todo), f"profiling ({backend.name})", unit="key", enabled=progress)
    step = 0.5 / protocol.rounds
    try:
        for keys_now in groups:
            runners = {}
            for key in keys_now:
                bar.set_postfix_str(f"preparing {key}", refresh=False)
                module, example_input = build(key)
                runners[key] = backend.runner(module, example_input)
                bar.update(0.5 + step * min(len(samples.get(key, [])), protocol.rounds))
            bar.set_postfix_str("measuring", refresh=True)
            warm_up(runners, protocol.warmup)
            started = time.perf_counter()
            while True:
                r = min(len(samples.setdefault(k, [])) for k in keys_now)
                if not rounds_left(r, protocol.rounds, started, protocol.min_seconds):
                    break
                pending = [k for k in keys_now if len(samples[k]) == r]  # a resume's laggards first
                for key in round_order(pending, protocol.seed, r):
                    run = runners[key]
                    samples[key].append([float(run()) for _ in range(protocol.per_round)])
                    bar.update(step if len(samples[key]) <= protocol.rounds else 0)
                if time.monotonic() - last_save >= save_every_s:
                    save()
                    last_save = time.monotonic()
            for key in keys_now:
                table.add(key, [v for r in samples[key] for v in r], protocol.statistic)
            dirty = True
            del runners
            save()
            last_save = time.monotonic()
    except BaseException:  # KeyboardInterrupt included: keep what is done, then re-raise
        save()
        raise
    finally:
        bar.close()
    save()
    return table
