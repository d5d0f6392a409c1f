"""A run's ``log.csv`` that grows while the run goes, and stays consistent with its checkpoint.

Rows are appended one at a time (open, append, flush, close), so a run without a progress display
shows its progress in ``log.csv`` every log interval, not only at checkpoints. ``rewrite(rows)``
replaces the whole file atomically with the given rows: a run calls it when it starts (the rows
of the checkpoint it resumes from, none for a new run), which drops any row logged after that
checkpoint and so never leaves a step twice; and at each checkpoint. Every write formats values
the same way (``None`` and NaN as an empty field, floats as their shortest round-trip text), so a
file that was appended to and one that was rewritten hold the same bytes.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ernas.io import atomic_write_text

__all__ = ["CsvLog"]


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return v


class CsvLog:
    """``append(row)`` one row, ``rewrite(rows)`` the whole file; rows are mappings over
    ``columns`` (missing keys are empty). A no-op when not ``enabled`` (ranks > 0)."""

    def __init__(self, path: str | Path, columns: list[str], enabled: bool = True):
        self.path, self.columns, self.enabled = Path(path), list(columns), enabled

    def _text(self, rows: list[dict], header: bool) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(self.columns)
        w.writerows([_cell(r.get(c)) for c in self.columns] for r in rows)
        return buf.getvalue()

    def rewrite(self, rows: list[dict]) -> None:
        """The header and ``rows``, replacing the file atomically."""
        if self.enabled:
            atomic_write_text(self.path, self._text(rows, header=True))

    def append(self, row: dict) -> None:
        """One row at the end of the file (the header first if the file is missing)."""
        if not self.enabled:
            return
        text = self._text([row], header=not self.path.is_file())
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
