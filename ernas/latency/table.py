"""LatencyTable: per-op-key latency statistics plus the metadata of how they were measured.

On disk, one CSV file whose first line carries the metadata as one-line JSON::

    # ernas-latency-table v1 {"backend": "onnxruntime", "threads": 2, ...}
    key,ms,median_ms,p10_ms,p90_ms,mean_ms,count
    "dwconv2d[k=3]@1x64x256x256:float32",1.21,1.234,1.2,1.3,1.25,30

Never pickled. Columns: ``ms`` is the value predictions use — the statistic named by the
metadata's ``statistic`` (the 20th percentile of interleaved samples by default, see
``ernas.latency.measure``); ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms`` and ``count``
describe the samples; text columns a backend adds per key (``delegation``: which ops the
ExecuTorch backend delegated, ``ernas.latency.executorch``) follow them and are ignored by
readers that do not know them. ``lookup`` returns ``ms`` and falls back to ``median_ms`` for
rows without it (tables written before ``ms`` existed), so old tables read and predict as before.

``metadata`` is free-form JSON: device, backend, provider, threads, dtype, input_shape [N,C,H,W],
versions, date, space, granularity, ``fingerprint`` (``ernas.latency.fingerprint``),
``statistic``, ``measure`` (the protocol), ``consistency`` (the profiler's check) and an optional
``correction`` dict.
"""
from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ernas.errors import ErnasError
from ernas.io import atomic_write_text, json_default
from ernas.latency.measure import DEFAULT_STATISTIC, statistic

__all__ = ["COMPAT_FIELDS", "HEADER", "LatencyTable", "MissingKeysError"]

HEADER = "# ernas-latency-table v1 "
STAT_COLUMNS = ("median_ms", "p10_ms", "p90_ms", "count")  # required
OPTIONAL_COLUMNS = ("mean_ms", "ms")
LATENCY_COLUMNS = ("ms", "median_ms", "p10_ms", "p90_ms", "mean_ms")
# Metadata fields that must agree for two measurements to belong to one table.
COMPAT_FIELDS = ("backend", "provider", "threads", "device", "input_shape", "dtype", "granularity")
DEFAULT_FILL = "run ernas-profile for this space/backend"


class MissingKeysError(ErnasError):
    """Op keys asked of a table that has no row for them (``.missing`` lists all of them)."""

    def __init__(self, missing: list[str], table: str, fill_command: str | None = None):
        self.missing = list(missing)
        self.fill_command = fill_command or DEFAULT_FILL
        shown = "\n  ".join(self.missing[:10])
        more = f"\n  ... and {len(self.missing) - 10} more" if len(self.missing) > 10 else ""
        super().__init__(f"{len(self.missing)} op key(s) are missing from latency table {table}:"
                         f"\n  {shown}{more}\nFix: {self.fill_command} (profiling resumes and "
                         f"only measures the missing keys).")


def _jsonable(obj: Any) -> Any:
    """What ``obj`` becomes after a JSON round trip (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(obj, default=json_default))


def _read_text(path: Path) -> str:
    """The file's text, or one ErnasError when it is unreadable or not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ErnasError(f"Latency table {path} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r}); it is not an ernas latency table. "
                         f"Fix the path (latency.table=... or output=...), or re-profile the "
                         f"table with ernas-profile.") from None
    except OSError as e:
        raise ErnasError(f"Latency table {path} cannot be read ({e.strerror}). Fix the path or "
                         f"its permissions.") from None


def _empty_frame() -> pd.DataFrame:
    frame = pd.DataFrame({"median_ms": pd.Series(dtype="float64"),
                          "p10_ms": pd.Series(dtype="float64"),
                          "p90_ms": pd.Series(dtype="float64"),
                          "mean_ms": pd.Series(dtype="float64"),
                          "count": pd.Series(dtype="int64")})
    frame.index = pd.Index([], dtype=str, name="key")
    return frame


class LatencyTable:
    """Latency statistics indexed by op key (columns ms, median_ms, p10_ms, p90_ms, mean_ms,
    count; ``lookup`` returns ``ms``, else ``median_ms``)."""

    def __init__(self, frame: pd.DataFrame | None = None, metadata: dict | None = None,
                 path: str | os.PathLike | None = None):
        self._frame = _empty_frame() if frame is None else frame
        self.metadata: dict = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        self.source = self.path  # the file it came from (kept by in-memory copies)
        self.probe: dict | None = None  # set by ernas.latency.resolve: how it was accepted
        self._values: dict[str, float] | None = None

    # ------------------------------------------------------------------ basics
    def __contains__(self, key: object) -> bool:
        return key in self._frame.index

    def __len__(self) -> int:
        return len(self._frame)

    def __repr__(self) -> str:
        meta = {k: self.metadata.get(k) for k in ("backend", "device", "threads", "input_shape")}
        return f"LatencyTable({len(self)} keys, {meta})"

    def keys(self) -> list[str]:
        return list(self._frame.index)

    def get(self, key: str) -> dict:
        """The statistics row of one key as a dict (KeyError if absent)."""
        return self._frame.loc[key].to_dict()

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory table>"

    def to_frame(self) -> pd.DataFrame:
        """A copy of the statistics frame (index ``key``), metadata in ``.attrs['metadata']``."""
        frame = self._frame.copy()
        frame.attrs["metadata"] = copy.deepcopy(self.metadata)
        return frame

    # ------------------------------------------------------------------ edit
    def add(self, key: str, samples_ms: Iterable[float], stat: str = DEFAULT_STATISTIC,
            notes: dict[str, str] | None = None) -> None:
        """Add (or replace) the row of ``key`` from raw per-run latencies in ms; ``ms`` is the
        statistic ``stat`` of them (``ernas.latency.measure.statistic``); ``notes``: text
        columns of the row (e.g. ``{"delegation": ...}``)."""
        s = np.asarray(samples_ms, dtype=np.float64).ravel()
        if s.size == 0 or not np.all(np.isfinite(s)):
            raise ErnasError(f"Latency samples for op key {key!r} are empty or not finite "
                             f"({s[:5].tolist()}...); the backend produced no usable timing. "
                             f"Check the backend's output for this op.")
        p10, med, p90 = np.percentile(s, [10, 50, 90])
        self.add_summary(key, {"ms": statistic(s, stat), "median": float(med), "p10": float(p10),
                               "p90": float(p90), "mean": float(s.mean()), "n": int(s.size)},
                         notes)

    def add_summary(self, key: str, summary: dict, notes: dict[str, str] | None = None) -> None:
        """Add (or replace) the row of ``key`` from ``ernas.latency.measure.summarize`` output
        (``ms``, ``median``, ``p10``, ``p90``, ``mean``, ``n``); ``notes`` as in ``add``."""
        row = pd.DataFrame({"ms": [float(summary["ms"])], "median_ms": [float(summary["median"])],
                            "p10_ms": [float(summary["p10"])], "p90_ms": [float(summary["p90"])],
                            "mean_ms": [float(summary["mean"])],
                            "count": np.array([summary["n"]], dtype=np.int64),
                            **{str(k): [str(v)] for k, v in (notes or {}).items()}},
                           index=pd.Index([str(key)], dtype=str, name="key"))
        self._set_rows(row)

    def _set_rows(self, rows: pd.DataFrame) -> None:
        """Put ``rows`` in; a replaced row keeps its text columns that ``rows`` lacks."""
        kept = [c for c in self._frame.columns if c not in rows.columns
                and c not in STAT_COLUMNS + OPTIONAL_COLUMNS]
        if kept:
            rows = rows.join(self._frame[kept], how="left")
        base = self._frame.drop(index=[k for k in rows.index if k in self._frame.index])
        frame = rows if len(base) == 0 else pd.concat([base, rows])
        frame.index.name = "key"
        self._frame = frame.astype({"count": "int64"})
        self._values = None

    def merge(self, other: LatencyTable, overwrite: bool = False) -> LatencyTable:
        """Add ``other``'s rows (in place; returns self). Keys in both keep this table's row
        unless ``overwrite``. Metadata fields in ``COMPAT_FIELDS`` present in both must agree;
        fields only ``other`` has are copied over."""
        shared = {f: other.metadata[f] for f in COMPAT_FIELDS
                  if f in other.metadata and f in self.metadata}
        self.check_compatible(shared, fix=f"merge only tables measured the same way (other "
                                          f"table: {other._where})")
        rows = other._frame if overwrite else other._frame.drop(
            index=[k for k in other._frame.index if k in self._frame.index])
        if len(rows):
            self._set_rows(rows.copy())
        for k, v in other.metadata.items():
            self.metadata.setdefault(k, copy.deepcopy(v))
        return self

    # ------------------------------------------------------------------ query
    def lookup(self, keys: list[str], fill_command: str | None = None) -> np.ndarray:
        """Latency (ms) per key, float64: the ``ms`` column, or ``median_ms`` where a row has no
        ``ms`` (older tables); ``MissingKeysError`` if any key is absent."""
        if self._values is None:
            col = self._frame["median_ms"]
            if "ms" in self._frame.columns:
                col = self._frame["ms"].fillna(col)
            self._values = dict(zip(self._frame.index, col.to_numpy(float)))
        values = self._values
        try:
            return np.fromiter((values[k] for k in keys), dtype=np.float64, count=len(keys))
        except KeyError:
            missing = list(dict.fromkeys(k for k in keys if k not in values))
            raise MissingKeysError(missing, self._where, fill_command) from None

    def scaled(self, factor: float, note: dict | None = None) -> LatencyTable:
        """A copy (in memory, no path) with every latency column times ``factor``; ``note`` is
        recorded in the copy's metadata as ``rescaled``."""
        frame = self._frame.copy()
        cols = [c for c in LATENCY_COLUMNS if c in frame.columns]
        frame[cols] = frame[cols] * float(factor)
        meta = copy.deepcopy(self.metadata)
        meta["rescaled"] = {"factor": float(factor), **(note or {})}
        out = LatencyTable(frame, meta)
        out.source = self.source
        return out

    def check_compatible(self, required: dict, path: str | os.PathLike | None = None,
                         fix: str | None = None) -> None:
        """Raise ErnasError unless the metadata agrees with every non-None field of ``required``
        (compared after a JSON round trip, so tuples equal lists)."""
        where = str(path) if path is not None else self._where
        bad = []
        for field, want in required.items():
            if want is None:
                continue
            have = self.metadata.get(field, "<missing>")
            if _jsonable(have) != _jsonable(want):
                bad.append(f"{field}: table has {json.dumps(have, default=json_default)}, "
                           f"requested {json.dumps(want, default=json_default)}")
        if bad:
            raise ErnasError(f"Latency table {where} does not match the request: "
                             + "; ".join(bad) + ". Fix: " + (fix or "profile a new table for "
                             "this setup (ernas-profile with these settings) or change the "
                             "request to match the table.") )

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the table atomically (header line + CSV); returns the path."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("LatencyTable.save needs a path (the table has none yet)")
        meta = json.dumps(self.metadata, sort_keys=True, default=json_default)
        lead = [c for c in ("ms",) if c in self._frame.columns] + list(STAT_COLUMNS[:3])
        cols = lead + [c for c in self._frame.columns if c not in lead + ["count"]] + ["count"]
        body = self._frame[cols].to_csv(lineterminator="\n")
        atomic_write_text(path, HEADER + meta + "\n" + body)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by ``save``; ErnasError naming the problem and the fix."""
        path = Path(path)
        if path.is_dir():
            raise ErnasError(f"Latency table {path} is a folder, not a table file. Fix the path "
                             f"(a .csv file written by ernas-profile).")
        if not path.is_file():
            raise ErnasError(f"Latency table {path} does not exist. Fix the path, or profile the "
                             f"table first (ernas-profile writes it).")
        text = _read_text(path)
        first, _, body = text.partition("\n")
        if not first.startswith("# ernas-latency-table "):
            raise ErnasError(f"{path} is not an ernas latency table: its first line should start "
                             f"with '{HEADER}{{...json...}}' but is {first[:80]!r}. Fix the path, "
                             f"or re-profile the table.")
        if not first.startswith(HEADER):
            version = first.split()[2] if len(first.split()) > 2 else "?"
            raise ErnasError(f"Latency table {path} has format version {version!r}; this ernas "
                             f"reads v1. Re-profile the table or upgrade ernas.")
        try:
            metadata = json.loads(first[len(HEADER):])
        except json.JSONDecodeError as e:
            raise ErnasError(f"Latency table {path}: the metadata JSON on line 1 is invalid ({e})."
                             f" Fix the header line or re-profile the table.") from None
        if not isinstance(metadata, dict):
            raise ErnasError(f"Latency table {path}: the metadata on line 1 must be a JSON object,"
                             f" got {type(metadata).__name__}. Re-profile the table.")
        try:
            frame = pd.read_csv(io.StringIO(body), dtype={"key": str}, keep_default_na=False,
                                na_values=[""])
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            raise ErnasError(f"Latency table {path}: the CSV part is unreadable ({e}). Re-profile "
                             f"the table.") from None
        missing = [c for c in ("key",) + STAT_COLUMNS if c not in frame.columns]
        if missing:
            raise ErnasError(f"Latency table {path} lacks column(s) {missing}; it has "
                             f"{list(frame.columns)}. A table needs key, median_ms, p10_ms, "
                             f"p90_ms and count. Re-profile the table.")
        dup = frame["key"][frame["key"].duplicated()].tolist()
        if dup:
            raise ErnasError(f"Latency table {path} lists op key(s) more than once: {dup[:5]}. "
                             f"Remove the duplicate rows.")
        frame = frame.set_index("key")
        frame.index = pd.Index([str(k) for k in frame.index], dtype=str, name="key")
        numeric = [c for c in STAT_COLUMNS + OPTIONAL_COLUMNS if c in frame.columns]
        for c in numeric:
            values = pd.to_numeric(frame[c], errors="coerce")
            bad = frame.index[values.isna() & (frame[c].notna() | (c != "ms"))]
            if len(bad):
                raise ErnasError(f"Latency table {path}: column {c!r} must hold numbers, but row "
                                 f"{bad[0]!r} has {frame.at[bad[0], c]!r}"
                                 f"{f' ({len(bad)} such rows in all)' if len(bad) > 1 else ''}. "
                                 f"Fix those rows or re-profile the table.")
            frame[c] = values.astype("int64" if c == "count" else "float64")
        for c in (c for c in numeric if c != "count"):
            ok = np.isfinite(frame[c]) & (frame[c] >= 0)
            if c == "ms":  # rows of older profiles may leave it empty (median_ms is used)
                ok |= frame[c].isna()
            bad = frame.index[~ok]
            if len(bad):
                raise ErnasError(f"Latency table {path}: column {c!r} must hold finite latencies "
                                 f">= 0 ms, but row {bad[0]!r} has {frame.at[bad[0], c]!r}"
                                 f"{f' ({len(bad)} such rows in all)' if len(bad) > 1 else ''}. "
                                 f"Re-profile those keys (delete the rows, then run "
                                 f"ernas-profile with output={path}: it measures only what is "
                                 f"missing).")
        return cls(frame, metadata, path)
