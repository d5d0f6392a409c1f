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


def _open_table(path: Path | None, meta: dict) -> LatencyTable:
    """The table at ``path`` to continue (it must agree with ``meta`` on ``COMPAT_FIELDS``, the
    statistic and the fingerprint), or a new one."""
    if path is None or not path.exists():
        return LatencyTable(metadata=meta, path=path)
    fix = (f"this file was profiled with different settings, so it cannot be resumed; pick "
           f"another output path, or delete {path} to start over")
    table = LatencyTable.load(path)
    required = {f: meta[f] for f in COMPAT_FIELDS + ("statistic",) if f in meta}
    table.check_compatible(required, path, fix=fix)
    check_fingerprint(table.metadata, meta["fingerprint"], str(path), fix=fix)
    table.metadata["date_updated"] = meta["date"]
    return table


class _Progress:
    """The table being filled, the samples of its unfinished keys and their sidecar file."""

    def __init__(self, table: LatencyTable, path: Path | None, settings: dict,
                 save_every_s: float):
        self.table, self.path, self.settings = table, path, settings
        self.side = sidecar_path(path) if path is not None else None
        self.samples = _load_sidecar(self.side, settings) if self.side is not None else {}
        self.dirty = path is not None and not path.exists()
        self.save_every_s, self.last_save = save_every_s, time.monotonic()

    def todo(self, keys: list[str]) -> list[str]:
        """The keys without a row, those with stored samples first."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.table]
        return [k for k in todo if k in self.samples] + [k for k in todo if k not in self.samples]

    def save(self) -> None:
        """Write the table (a new file only once it holds a row: a failing backend leaves no
        empty table behind) and the open samples to the sidecar (deleted when none is open)."""
        if self.path is not None:
            self._write()
        self.last_save = time.monotonic()

    def _write(self) -> None:
        if self.dirty and len(self.table):
            self.table.save(self.path)
            self.dirty = False
        open_samples = {k: v for k, v in self.samples.items() if v and k not in self.table}
        if open_samples:
            atomic_write_json(self.side, {"settings": self.settings, "samples": open_samples},
                              indent=None)
        else:
            self.side.unlink(missing_ok=True)

    def save_if_due(self) -> None:
        if time.monotonic() - self.last_save >= self.save_every_s:
            self.save()


def _prepare(keys_now: list[str], build, backend: Backend, state: _Progress,
             protocol: MeasureProtocol, bar) -> dict:
    """A warmed-up runner per key; the bar counts 1/2 key per preparation plus the rounds a
    key already has."""
    step = 0.5 / protocol.rounds
    runners = {}
    for key in keys_now:
        bar.set_postfix_str(f"preparing {key}", refresh=False)
        module, example_input = build(key)
        runners[key] = backend.runner(module, example_input)
        bar.update(0.5 + step * min(len(state.samples.get(key, [])), protocol.rounds))
    bar.set_postfix_str("measuring", refresh=True)
    warm_up(runners, protocol.warmup)
    return runners


def _measure_group(runners: dict, state: _Progress, protocol: MeasureProtocol, bar) -> None:
    """Interleaved shuffled rounds over the group's keys until ``rounds_left`` says done (a
    resume's laggards catch up first); then a row per key with the protocol's statistic."""
    keys_now, samples = list(runners), state.samples
    step = 0.5 / protocol.rounds
    started = time.perf_counter()
    while True:
        r = min(len(samples.setdefault(k, [])) for k in keys_now)
        if not rounds_left(r, protocol.rounds, started, protocol.min_seconds):
            break
        pending = [k for k in keys_now if len(samples[k]) == r]
        for key in round_order(pending, protocol.seed, r):
            run = runners[key]
            samples[key].append([float(run()) for _ in range(protocol.per_round)])
            bar.update(step if len(samples[key]) <= protocol.rounds else 0)
        state.save_if_due()
    for key in keys_now:
        state.table.add(key, [v for r in samples[key] for v in r], protocol.statistic,
                        getattr(runners[key], "notes", None))
    state.dirty = True


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
    state = _Progress(_open_table(path, meta), path, _resume_key(meta, protocol), save_every_s)
    todo = state.todo(keys)
    if group < 1:
        raise ErnasError(f"profile group={group} must be >= 1 (keys measured together).")
    # progress in keys: preparing a key counts 1/2, each of its rounds 1/(2·rounds)
    bar = progress_bar(len(todo), f"profiling ({backend.name})", unit="key", enabled=progress)
    try:
        for i in range(0, len(todo), group):
            runners = _prepare(todo[i:i + group], build, backend, state, protocol, bar)
            _measure_group(runners, state, protocol, bar)
            del runners
            state.save()
    except BaseException:  # KeyboardInterrupt included: keep what is done, then re-raise
        state.save()
        raise
    finally:
        bar.close()
    state.save()
    return state.table
