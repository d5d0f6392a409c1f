"""Optional extras (``pip install "ernas[<name>]"``): runtimes the core install leaves out.

An :class:`Extra` is found without importing it (``available``, for config validation before
anything runs) and required with one sentence naming the pip line (``require``, where it is
used); the two share one wording (``missing``).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from ernas.errors import ErnasError

INSTEAD = "choose another latency backend (latency=onnxruntime_cpu)"


@dataclass(frozen=True)
class Extra:
    name: str                   # the pip extra: pip install "ernas[<name>]"
    packages: tuple[str, ...]   # import names, all needed
    pins: str                   # the versions the extra installs
    what: str                   # what it provides, e.g. "the optional ExecuTorch runtime"

    @property
    def pip(self) -> str:
        return f'pip install "ernas[{self.name}]"'

    def available(self) -> bool:
        """Whether every package can be found (nothing is imported)."""
        try:
            return all(importlib.util.find_spec(p) is not None for p in self.packages)
        except (ImportError, ValueError):
            return False

    def missing(self, user: str) -> str:
        return (f"{user} needs {self.what}, which is not installed here; install the extra with "
                f"`{self.pip}` ({self.pins})")

    def require(self, user: str, instead: str = INSTEAD) -> None:
        """ErnasError naming the extra (or ``instead``) unless every package imports."""
        try:
            for p in self.packages:
                importlib.import_module(p)
        except ImportError:
            raise ErnasError(f"{self.missing(user)}, or {instead}.") from None


EXECUTORCH = Extra("executorch", ("executorch",), "executorch==1.5.1",
                   "the optional ExecuTorch runtime")
LITERT = Extra("litert", ("litert_torch", "ai_edge_litert.interpreter"),
               "litert-torch==0.10.0, ai-edge-litert==2.3.0",
               "the optional LiteRT converter and runtime")
