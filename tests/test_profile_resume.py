"""profile_keys: saves on interrupt, resumes only the missing keys, refuses incompatible files."""
import numpy as np
import pytest
import torch

from ernas.errors import ErnasError
from ernas.latency.backends import Backend, MeasureBudget, OnnxRuntimeBackend
from ernas.latency.profile import profile_keys
from ernas.latency.table import LatencyTable

KEYS = ["conv[k=1]@1x8x16x16:float32", "conv[k=1]@1x8x8x8:float32", "conv[k=1]@1x8x4x4:float32"]
A, B, C = KEYS
META = {"input_shape": [1, 3, 16, 16], "granularity": "op", "space": "test"}
BUDGET = MeasureBudget(warmup=1, min_repeats=3, max_repeats=5, time_cap_s=1.0)


def build(key):
    side = int(key.split("x")[-1].split(":")[0])
    return torch.nn.Conv2d(8, 8, 1), torch.randn(1, 8, side, side)


class FakeBackend(Backend):
    """Deterministic timings so the test is about bookkeeping, not clocks."""
    name = "fake"

    def __init__(self, threads=2):
        self.threads = threads

    def measure(self, module, example_input, budget=None):
        return np.arange(1.0, 6.0) * example_input.shape[-1]

    def metadata(self):
        return {**super().metadata(), "provider": "fake", "threads": self.threads}


def test_interrupt_then_resume(tmp_path):
    out = tmp_path / "tables" / "t.csv"
    backend = OnnxRuntimeBackend(threads=1)

    def killed_at_c(key):
        if key == C:
            raise KeyboardInterrupt
        return build(key)

    with pytest.raises(KeyboardInterrupt):
        profile_keys(KEYS, killed_at_c, backend, out, META, BUDGET, save_every_s=3600,
                     progress=False)
    first = LatencyTable.load(out)
    assert first.keys() == [A, B]
    assert first.metadata["backend"] == "onnxruntime" and first.metadata["threads"] == 1
    assert first.metadata["space"] == "test" and "date" in first.metadata

    asked = []

    def recording(key):
        asked.append(key)
        return build(key)

    table = profile_keys(KEYS, recording, backend, out, META, BUDGET, progress=True)
    assert asked == [C]
    second = LatencyTable.load(out)
    assert second.keys() == [A, B, C] and table.keys() == [A, B, C]
    assert second.to_frame().loc[[A, B]].equals(first.to_frame())  # a, b untouched
    assert np.all(second.lookup(KEYS) > 0)

    asked.clear()  # a complete table is a no-op
    profile_keys(KEYS, recording, backend, out, META, BUDGET, progress=False)
    assert asked == []
    assert [p.name for p in out.parent.iterdir()] == ["t.csv"]


def test_periodic_save_and_error_save(tmp_path):
    out = tmp_path / "t.csv"

    def broken_at_c(key):
        if key == C:
            raise RuntimeError("op build failed")
        return build(key)

    with pytest.raises(RuntimeError):
        profile_keys(KEYS, broken_at_c, FakeBackend(), out, META, save_every_s=0, progress=False)
    t = LatencyTable.load(out)
    assert t.keys() == [A, B] and t.get(A)["median_ms"] == 3 * 16


def test_incompatible_resume(tmp_path):
    out = tmp_path / "t.csv"
    profile_keys([A], build, FakeBackend(threads=2), out, META, progress=False)
    before = out.read_bytes()
    for backend, meta in [(FakeBackend(threads=4), META),
                          (FakeBackend(threads=2), {**META, "input_shape": [1, 3, 32, 32]})]:
        with pytest.raises(ErnasError) as e:
            profile_keys(KEYS, build, backend, out, meta, progress=False)
        msg = str(e.value)
        assert str(out) in msg and "another output path" in msg and "delete" in msg
        assert ("threads" in msg) != ("input_shape" in msg)
        assert out.read_bytes() == before


def test_in_memory(tmp_path):
    t = profile_keys(KEYS + [A], build, FakeBackend(), None, META, progress=False)
    assert t.keys() == KEYS and t.path is None and t.metadata["granularity"] == "op"
