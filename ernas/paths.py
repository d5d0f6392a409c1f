"""Where the shipped folders live: experiments/, search_spaces/, latency_tables/.

A regular install (wheel) carries them inside the package as ``ernas/_resources/<folder>``
(copied at build time by ``setup.py``), found with ``importlib.resources``; in a source checkout
or an editable install they are the top-level folders of the repository beside ``ernas/``.
The user cache (profiled tables, probe results) is ``$ERNAS_CACHE`` or ``~/.cache/ernas``.
Nothing ever writes into these shipped folders.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def _root() -> Path:
    packaged = Path(str(files("ernas"))) / "_resources"
    if (packaged / "experiments").is_dir():
        return packaged
    return Path(__file__).resolve().parents[1]


ROOT = _root()
SEARCH_SPACES = ROOT / "search_spaces"
LATENCY_TABLES = ROOT / "latency_tables"
EXPERIMENTS = ROOT / "experiments"
CACHE = Path(os.environ.get("ERNAS_CACHE", Path.home() / ".cache" / "ernas"))
