"""profile_keys: interleaved rounds, resume from the samples file, saves on interrupt, refuses
incompatible files."""
import json

import numpy as np
import pytest
import torch

from ernas.errors import ErnasError
from ernas.latency.backends import Backend, OnnxRuntimeBackend
from ernas.latency.fingerprint import fingerprint, host_hardware
from ernas.latency.measure import MeasureProtocol
from ernas.latency.profile import profile_keys, sidecar_path
from ernas.latency.table import LatencyTable

KEYS = ["conv[k=1]@1x8x16x16:float32", "conv[k=1]@1x8x8x8:float32", "conv[k=1]@1x8x4x4:float32"]
A, B, C = KEYS
META = {"input_shape": [1, 3, 16, 16], "granularity": "op", "space": "test"}
# deterministic bookkeeping tests: no minimum duration, small rounds
PROTO = MeasureProtocol(rounds=4, per_round=2, warmup=1, min_seconds=0)


def build(key):
    side = int(key.split("x")[-1].split(":")[0])
    return torch.nn.Conv2d(8, 8, 1), torch.randn(1, 8, side, side)


class FakeBackend(Backend):
    """Deterministic timings (the input's side in ms) and a call log, so the tests are about
    bookkeeping, not clocks. ``kill_after``: raise KeyboardInterrupt at that timed call."""
    name = "fake"

    def __init__(self, threads=2, kill_after=None):
        self.threads, self.kill_after, self.log = threads, kill_after, []

    def runner(self, module, example_input):
        side = float(example_input.shape[-1])

        def run():
            if self.kill_after is not None and len(self.log) >= self.kill_after:
                raise KeyboardInterrupt
            self.log.append(side)
            return side
        return run

    def fingerprint(self):
        return fingerprint(host_hardware(), {"runtime": "fake", "threads": self.threads})

    def metadata(self):
        return {**super().metadata(), "provider": "fake", "threads": self.threads}


def test_rounds_are_interleaved(tmp_path):
    backend = FakeBackend()
    t = profile_keys(KEYS, build, backend, tmp_path / "t.csv", META, PROTO, progress=False)
    log = backend.log[3:]  # after one warm-up call per key
    assert len(log) == 4 * 3 * 2
    rounds = [log[i * 6:(i + 1) * 6:2] for i in range(4)]
    assert all(sorted(r) == [4.0, 8.0, 16.0] for r in rounds)  # every key in every round
    assert len({tuple(r) for r in rounds}) > 1  # in shuffled orders
    assert t.get(A)["count"] == 8 and t.get(A)["ms"] == 16.0
    assert t.metadata["statistic"] == "p20" and t.metadata["measure"]["rounds"] == 4
    assert t.metadata["fingerprint"] == backend.fingerprint()
    assert not sidecar_path(tmp_path / "t.csv").exists()


def test_interrupt_mid_round_then_resume(tmp_path):
    out = tmp_path / "tables" / "t.csv"
    proto = MeasureProtocol(rounds=4, per_round=2, warmup=0, min_seconds=0)
    # group 1 = {A, B}: 16 timed calls; group 2 = {C}: killed after 3 of its 8 calls
    with pytest.raises(KeyboardInterrupt):
        profile_keys(KEYS, build, FakeBackend(kill_after=16 + 3), out, META, proto,
                     save_every_s=3600, progress=False, group=2)
    first = LatencyTable.load(out)
    assert first.keys() == [A, B] and first.metadata["space"] == "test"
    side = json.loads(sidecar_path(out).read_text())
    assert list(side["samples"]) == [C] and side["samples"][C] == [[4.0, 4.0]]

    asked = []

    def recording(key):
        asked.append(key)
        return build(key)

    backend = FakeBackend()
    table = profile_keys(KEYS, recording, backend, out, META, proto, progress=True, group=2)
    assert asked == [C] and len(backend.log) == 3 * 2  # only C's 3 missing rounds
    second = LatencyTable.load(out)
    assert second.keys() == [A, B, C] and table.keys() == [A, B, C]
    assert second.get(C)["count"] == 8  # 1 round from the killed run + 3 now
    assert second.to_frame().loc[[A, B]].equals(first.to_frame())  # a, b untouched
    assert not sidecar_path(out).exists()

    asked.clear()  # a complete table is a no-op that does not touch the file
    before = out.read_bytes()
    profile_keys(KEYS, recording, backend, out, META, proto, progress=False, group=2)
    assert asked == [] and out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["t.csv"]


def test_interrupt_real_backend(tmp_path):
    out = tmp_path / "t.csv"
    proto = MeasureProtocol(rounds=2, per_round=2, warmup=1, min_seconds=0)

    def killed_at_c(key):
        if key == C:
            raise KeyboardInterrupt
        return build(key)

    with pytest.raises(KeyboardInterrupt):
        profile_keys(KEYS, killed_at_c, OnnxRuntimeBackend(threads=1), out, META, proto,
                     progress=False, group=1)
    t = LatencyTable.load(out)
    assert t.keys() == [A, B] and np.all(t.lookup([A, B]) > 0)
    assert t.metadata["backend"] == "onnxruntime" and t.metadata["threads"] == 1
    assert t.metadata["fingerprint"]["runtime"]["spinning"] is False
    t = profile_keys(KEYS, build, OnnxRuntimeBackend(threads=1), out, META, proto,
                     progress=False, group=1)
    assert t.keys() == [A, B, C] and t.get(C)["count"] == 4


def test_periodic_save_and_error_save(tmp_path):
    out = tmp_path / "t.csv"

    def broken_at_c(key):
        if key == C:
            raise RuntimeError("op build failed")
        return build(key)

    proto = MeasureProtocol(rounds=2, per_round=1, warmup=0, min_seconds=0)
    with pytest.raises(RuntimeError):
        profile_keys(KEYS, broken_at_c, FakeBackend(), out, META, proto, save_every_s=0,
                     progress=False, group=1)
    t = LatencyTable.load(out)
    assert t.keys() == [A, B] and t.get(A)["median_ms"] == 16


def test_incompatible_resume(tmp_path):
    out = tmp_path / "t.csv"
    profile_keys([A], build, FakeBackend(threads=2), out, META, PROTO, progress=False)
    before = out.read_bytes()
    for backend, meta, proto, field in [
            (FakeBackend(threads=4), META, PROTO, "threads"),
            (FakeBackend(threads=2), {**META, "input_shape": [1, 3, 32, 32]}, PROTO, "input_shape"),
            (FakeBackend(threads=2), META, MeasureProtocol(statistic="median"), "statistic")]:
        with pytest.raises(ErnasError) as e:
            profile_keys(KEYS, build, backend, out, meta, proto, progress=False)
        msg = str(e.value)
        assert str(out) in msg and "another output path" in msg and "delete" in msg
        assert field in msg
        assert out.read_bytes() == before
    other = FakeBackend(threads=2)
    other.fingerprint = lambda: fingerprint({**host_hardware(), "l3_cache_kib": 1},
                                            {"runtime": "fake", "threads": 2})
    with pytest.raises(ErnasError, match="hardware.l3_cache_kib"):
        profile_keys(KEYS, build, other, out, META, PROTO, progress=False)


def test_samples_file_from_other_settings_is_refused(tmp_path):
    out = tmp_path / "t.csv"
    with pytest.raises(KeyboardInterrupt):
        profile_keys(KEYS, build, FakeBackend(kill_after=5), out, META, PROTO, progress=False)
    assert sidecar_path(out).exists()
    with pytest.raises(ErnasError, match="per_round") as e:
        profile_keys(KEYS, build, FakeBackend(), out, META,
                     MeasureProtocol(rounds=4, per_round=3, min_seconds=0), progress=False)
    assert "delete" in str(e.value) and str(sidecar_path(out)) in str(e.value)


def test_in_memory(tmp_path):
    t = profile_keys(KEYS + [A], build, FakeBackend(), None, META, PROTO, progress=False)
    assert t.keys() == KEYS and t.path is None and t.metadata["granularity"] == "op"
