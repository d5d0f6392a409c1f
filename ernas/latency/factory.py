"""Latency backends by name: ``make_backend({name: onnxruntime, threads: 1, ...})``."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ernas.errors import ErnasError
from ernas.latency.backends import Backend, OnnxRuntimeBackend, TorchBackend
from ernas.latency.command import COMMAND_PRESETS, CommandBackend
from ernas.latency.executorch import ExecutorchBackend
from ernas.latency.litert import LitertBackend
from ernas.latency.measure import plain_mapping

BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": OnnxRuntimeBackend, "torch": TorchBackend, "command": CommandBackend,
    "executorch_xnnpack": ExecutorchBackend, "litert": LitertBackend}


def make_backend(cfg: Mapping[str, Any]) -> Backend:
    """Build a backend from ``{name: onnxruntime, threads: 2, ...}`` (dict or DictConfig).

    The command backend also takes ``preset: <COMMAND_PRESETS key>``; explicit fields override
    the preset's, and a null field counts as not given (the preset's value or the default).
    """
    cfg = plain_mapping(cfg, "latency backend")
    name = cfg.pop("name", None)
    if name not in BACKENDS:
        raise ErnasError(f"Unknown latency backend name {name!r}; valid names are "
                         f"{sorted(BACKENDS)}. Fix the `name` field of the latency backend config.")
    cls = BACKENDS[name]
    if name == "command":  # null fields (declared in command_local.yaml) mean "not given"
        cfg = {k: v for k, v in cfg.items() if v is not None}
    if name == "command" and "preset" in cfg:
        preset = cfg.pop("preset")
        if preset not in COMMAND_PRESETS:
            raise ErnasError(f"Unknown command backend preset {preset!r}; valid presets are "
                             f"{sorted(COMMAND_PRESETS)}.")
        cfg = {**COMMAND_PRESETS[preset], **cfg}
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        extra = " (or `preset`)" if name == "command" else ""
        raise ErnasError(f"Unknown field(s) {unknown} for latency backend {name!r}; valid fields "
                         f"are {valid}{extra}. Fix the latency backend config.")
    missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
               and p not in cfg]
    if missing:
        raise ErnasError(f"Latency backend {name!r} needs field(s) {missing}"
                         + (f" or a `preset` (one of {sorted(COMMAND_PRESETS)})"
                            if name == "command" else "") + ".")
    return cls(**cfg)
