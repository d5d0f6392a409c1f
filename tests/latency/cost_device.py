"""A deterministic stand-in device for the latency tests: ``CostBackend`` and its variants.

``CostBackend``'s "latency" is a count of parameters (1e-3 ms each), additive, so a network
costs exactly the sum of its keys and no assertion depends on this machine's speed.
"""
import pytest

import ernas
from ernas.latency.backends import Backend
from ernas.latency.fingerprint import fingerprint, host_hardware
from ernas.latency.measure import MeasureProtocol
from ernas.latency.resolve import resolve_table
from ernas.latency.settings import LatencySettings
from ernas.paths import SEARCH_SPACES

SHAPE = (1, 3, 32, 32)
QUICK = MeasureProtocol(rounds=2, per_round=1, warmup=0, min_seconds=0)


class CostBackend(Backend):
    """A deterministic stand-in device: one run of a module "takes" 1e-3 ms per parameter."""
    name = "cost"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def runner(self, module, example_input):
        ms = 1e-3 * sum(p.numel() for p in module.parameters())
        return lambda: ms

    def fingerprint(self):
        return fingerprint(host_hardware(), {"runtime": "cost", "threads": self.threads})

    def metadata(self):
        return {**super().metadata(), "provider": "cost", "threads": self.threads}


def cost_settings(**kw) -> LatencySettings:
    """Latency settings on the ``CostBackend`` with the ``QUICK`` protocol (``kw`` override)."""
    return LatencySettings(**{"backend": CostBackend(), "measure": QUICK, **kw})


def load_tiny():
    """The tiny NAFNet search space."""
    return ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")


def profile_cost_table(tiny, cache):
    """A correct CostBackend table of the tiny space, profiled by resolve_table into ``cache``."""
    table, path = resolve_table(tiny, SHAPE, cost_settings(cache_dir=cache), False,
                                shipped_dir=cache / "none")
    assert table.probe["action"] == "profiled" and path.parent == cache
    assert table.metadata["probe_baseline"]["ratio"] == pytest.approx(1.0)
    return path


class OverheadCostBackend(CostBackend):
    """CostBackend on a device that runs 2x slower and adds 5 ms per network call (dispatch,
    copies): whole networks are an affine, not proportional, function of their key sums."""

    def runner(self, module, example_input):
        ms = super().runner(module, example_input)()
        return lambda: 2 * ms + 5
