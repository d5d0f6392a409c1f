"""Where the shipped folders live: search_spaces/, latency_tables/, experiments/.

In a source checkout or an editable install they sit beside the ``ernas`` package; a regular
install places them under ``<prefix>/share/ernas``."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parents[1]


def _root() -> Path:
    for cand in (_HERE, Path(sys.prefix) / "share" / "ernas"):
        if (cand / "search_spaces").is_dir():
            return cand
    return _HERE


ROOT = _root()
SEARCH_SPACES = ROOT / "search_spaces"
LATENCY_TABLES = ROOT / "latency_tables"
EXPERIMENTS = ROOT / "experiments"
CACHE = Path(os.environ.get("ERNAS_CACHE", Path.home() / ".cache" / "ernas"))
