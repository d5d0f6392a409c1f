"""The size of a network estimated from its geometry, before anything is allocated.

:func:`estimate` builds the architecture on PyTorch's ``meta`` device (shapes, no storage) and
runs one forward pass there: the parameter count is exact and the activation memory is the sum
of every leaf module's output for one image of ``FOOTPRINT_HW`` pixels per side. :func:`check`
refuses a network whose estimate passes the limits, so a width typed with an extra zero is one
error paragraph instead of an out-of-memory crash minutes later. The limits are configurable with
the environment variables ``ERNAS_MAX_PARAMS`` and ``ERNAS_MAX_ACTIVATION_GIB``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ernas.errors import ErnasError

log = logging.getLogger(__name__)

FOOTPRINT_HW = 256                 # side of the image the activation estimate is made for
DEFAULT_MAX_PARAMS = 1_000_000_000
DEFAULT_MAX_ACTIVATION_GIB = 16.0


@dataclass(frozen=True)
class Footprint:
    params: int
    activation_bytes: int | None    # None when the family's forward cannot run on meta tensors

    def describe(self) -> str:
        act = ("" if self.activation_bytes is None else
               f", about {self.activation_bytes / 2**30:.2f} GiB of activations per "
               f"{FOOTPRINT_HW}x{FOOTPRINT_HW} image")
        return f"{self.params:,} parameters ({self.params * 4 / 2**30:.2f} GiB in float32){act}"


def _limit(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ErnasError(f"environment variable {name}={raw!r} is not a number; give a positive "
                         f"number (default {default:g}) or unset it.") from None
    if not value > 0:
        raise ErnasError(f"environment variable {name}={raw!r} must be a positive number "
                         f"(default {default:g}).")
    return value


def limits() -> tuple[float, float]:
    """(maximum parameters, maximum activation GiB), from the environment or the defaults."""
    return (_limit("ERNAS_MAX_PARAMS", DEFAULT_MAX_PARAMS),
            _limit("ERNAS_MAX_ACTIVATION_GIB", DEFAULT_MAX_ACTIVATION_GIB))


def _activation_bytes(model: torch.nn.Module, channels: int) -> int | None:
    total = 0

    def add(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(add) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(1, channels, FOOTPRINT_HW, FOOTPRINT_HW, device="meta"))
    except Exception as e:  # noqa: BLE001 - a family op without a meta kernel: params only
        log.debug("no activation estimate on the meta device: %s", e)
        return None
    finally:
        for h in hooks:
            h.remove()
    return total


_CACHE: dict[str, Footprint] = {}


def estimate(arch) -> Footprint:
    """The footprint of ``arch`` (an ``ernas.space.Arch``), computed without allocating it."""
    key = repr((arch.family, sorted(arch.geometry.items()), arch.values))
    if key not in _CACHE:
        with torch.device("meta"):
            model = arch.spec.build(arch)
        params = sum(p.numel() for p in model.parameters())
        channels = arch.spec.io_channels(arch.geometry)[0]
        _CACHE[key] = Footprint(params, _activation_bytes(model, channels))
    return _CACHE[key]


def check(arch, source: str, what: str = "network") -> Footprint:
    """``estimate(arch)``; an ErnasError naming ``source`` when it passes :func:`limits`."""
    fp = estimate(arch)
    max_params, max_gib = limits()
    too_big = fp.params > max_params or (
        fp.activation_bytes is not None and fp.activation_bytes > max_gib * 2**30)
    if too_big:
        raise ErnasError(
            f"{source}: the {what} of this geometry {arch.geometry} is too large to build: "
            f"{fp.describe()}, above the limits of {max_params:,.0f} parameters and "
            f"{max_gib:g} GiB of activations. Check the widths and block counts in 'geometry'; "
            f"if the size is intended, raise the limits with the environment variables "
            f"ERNAS_MAX_PARAMS and ERNAS_MAX_ACTIVATION_GIB.")
    return fp
