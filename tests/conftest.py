import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast and immune to other processes on a 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def bench_env(tmp_path_factory):
    """One latency cache for the bench runs of a session (the tiny space's table is profiled
    once)."""
    import os

    return {**os.environ, "ERNAS_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="session")
def tiny_protocol(tmp_path_factory, bench_env):
    """``tiny_bench.run_tiny_protocol``: the bench dir and the kept searches' digests."""
    from tiny_bench import run_tiny_protocol

    return run_tiny_protocol(tmp_path_factory.mktemp("bench"), bench_env)
