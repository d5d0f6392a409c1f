"""Fixtures of the latency tests: the tiny NAFNet space and its table on ``CostBackend``."""
import pytest
from cost_device import load_tiny, profile_cost_table


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def cost_table(tiny, tmp_path_factory):
    """A correct CostBackend table of the tiny space, one per test module."""
    return profile_cost_table(tiny, tmp_path_factory.mktemp("cost_cache"))
