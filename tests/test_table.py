"""LatencyTable: CSV round trip, atomic save, lookup (``ms``, else ``median_ms``), scaling,
old-format tables and compatibility errors."""
import numpy as np
import pandas as pd
import pytest

from ernas.errors import ErnasError
from ernas.io import atomic_torch_save, atomic_write_json, atomic_write_text
from ernas.latency.table import HEADER, LatencyTable, MissingKeysError

KEYS = [
    "dwconv2d[k=3]@1x64x256x256:float32",
    "nafblock[attention=sca,dw_expand=2,ffn_expand=2,kernel=3,norm=layernorm]@1x32x256x256:float32",
    'odd"quote,comma#hash@1x1x1x1:float32',
]
META = {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "threads": 2,
        "device": "AMD EPYC", "dtype": "float32", "input_shape": [1, 3, 256, 256],
        "granularity": "block", "space": "nafnet_tiny", "date": "2025-01-01T00:00:00+00:00",
        "versions": {"torch": "2.13.0", "onnxruntime": "1.31.1"},
        "correction": {"scale": 1.07, "offset_ms": 0.3, "note": "ünïcode\nnewline"}}


def make_table():
    rng = np.random.default_rng(0)
    t = LatencyTable(metadata=dict(META))
    for i, k in enumerate(KEYS):
        t.add(k, rng.random(7 + i) * (i + 1) + 1 / 3)
    return t


def test_add_stats():
    t = LatencyTable()
    t.add("a", [1.0, 2.0, 3.0, 4.0, 100.0])
    row = t.get("a")
    assert row["median_ms"] == 3.0 and row["count"] == 5 and row["mean_ms"] == 22.0
    assert row["p10_ms"] == pytest.approx(1.4) and row["p90_ms"] == pytest.approx(61.6)
    assert row["ms"] == pytest.approx(1.8)  # the default statistic: 20th percentile
    assert t.lookup(["a"]).tolist() == [pytest.approx(1.8)]
    assert "a" in t and len(t) == 1 and t.keys() == ["a"]
    t.add("a", [2.0])  # replaces
    assert len(t) == 1 and t.get("a")["count"] == 1
    with pytest.raises(ErnasError):
        t.add("b", [])
    t.add("m", [1.0, 2.0, 3.0, 4.0, 100.0], stat="median")
    assert t.get("m")["ms"] == 3.0


def test_round_trip(tmp_path):
    t = make_table()
    path = tmp_path / "sub" / "table.csv"
    t.save(path)
    assert path.read_text().startswith(HEADER + "{")
    assert path.read_text().splitlines()[1] == "key,ms,median_ms,p10_ms,p90_ms,mean_ms,count"
    u = LatencyTable.load(path)
    assert u.keys() == t.keys() and u.metadata == META
    pd.testing.assert_frame_equal(u.to_frame(), t.to_frame())  # exact floats, int counts
    assert u.to_frame()["count"].dtype == np.int64
    np.testing.assert_array_equal(u.lookup(KEYS[::-1]), t.lookup(KEYS[::-1]))
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]  # no temp files left


def test_load_errors(tmp_path):
    with pytest.raises(ErnasError, match="does not exist"):
        LatencyTable.load(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("key,median_ms\na,1\n")
    with pytest.raises(ErnasError, match="not an ernas latency table") as e:
        LatencyTable.load(bad)
    assert "bad.csv" in str(e.value)
    bad.write_text(HEADER + "{not json\nkey,median_ms\n")
    with pytest.raises(ErnasError, match="metadata JSON"):
        LatencyTable.load(bad)
    bad.write_text("# ernas-latency-table v9 {}\nkey,median_ms\n")
    with pytest.raises(ErnasError, match="v9"):
        LatencyTable.load(bad)
    bad.write_text(HEADER + "{}\nkey,median_ms,count\na,1,3\n")
    with pytest.raises(ErnasError, match="p10_ms") as e:
        LatencyTable.load(bad)
    assert "p90_ms" in str(e.value)


def test_empty_round_trip(tmp_path):
    LatencyTable(metadata={"backend": "torch"}).save(tmp_path / "e.csv")
    t = LatencyTable.load(tmp_path / "e.csv")
    assert len(t) == 0 and t.metadata == {"backend": "torch"}
    t.add("x", [1.0])
    assert t.lookup(["x"]).tolist() == [1.0]


def test_lookup_missing():
    t = make_table()
    missing = [f"conv[k={i}]@1x8x16x16:float32" for i in range(12)]
    with pytest.raises(MissingKeysError) as e:
        t.lookup([KEYS[0]] + missing + missing[:2], fill_command="ernas-profile space=tiny")
    msg = str(e.value)
    assert isinstance(e.value, ErnasError) and e.value.missing == missing
    assert "12 op key(s)" in msg and missing[9] in msg and missing[10] not in msg
    assert "ernas-profile space=tiny" in msg
    with pytest.raises(MissingKeysError, match="run ernas-profile"):
        t.lookup(["nope"])
    assert t.lookup([]).shape == (0,)
    assert t.lookup([KEYS[0]] * 3).tolist() == [t.get(KEYS[0])["ms"]] * 3


def test_check_compatible():
    t = make_table()
    t.check_compatible({"threads": 2, "input_shape": (1, 3, 256, 256), "dtype": None})
    with pytest.raises(ErnasError) as e:
        t.check_compatible({"threads": 4, "input_shape": [1, 3, 128, 128], "dtype": "float32",
                            "device": "Cortex-A76"}, path="latency_tables/x.csv")
    msg = str(e.value)
    assert "latency_tables/x.csv" in msg and "dtype" not in msg
    assert "threads: table has 2, requested 4" in msg
    assert "input_shape: table has [1, 3, 256, 256], requested [1, 3, 128, 128]" in msg
    assert "device" in msg and "profile a new table" in msg


def test_merge():
    a, b = make_table(), LatencyTable(metadata={"threads": 2, "extra": 1})
    b.add(KEYS[0], [99.0])
    b.add("new", [5.0])
    a.merge(b)
    assert a.get(KEYS[0])["median_ms"] != 99.0 and a.lookup(["new"]).tolist() == [5.0]
    assert a.metadata["extra"] == 1
    a.merge(b, overwrite=True)
    assert a.get(KEYS[0])["median_ms"] == 99.0
    with pytest.raises(ErnasError, match="threads"):
        a.merge(LatencyTable(metadata={"threads": 8}))


def test_io_helpers(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hi")
    atomic_write_json(tmp_path / "c.json", {"x": np.int64(3), "y": np.arange(2)})
    atomic_torch_save({"w": 1}, tmp_path / "d.pt")
    assert (tmp_path / "a" / "b.txt").read_text() == "hi"
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 3,\n  "y": [\n    0,\n    1\n  ]\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "e.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.txt", "c.json", "d.pt"]


def test_old_format_table_reads_medians(tmp_path):
    """Tables written before ``ms`` and fingerprints existed load and predict from medians;
    merged with new rows, each row uses what it has."""
    old = tmp_path / "old.csv"
    old.write_text(HEADER + '{"backend": "onnxruntime", "threads": 2}\n'
                   "key,median_ms,p10_ms,p90_ms,mean_ms,count\n"
                   '"a@1x1x1x1:float32",2.5,2.0,3.0,2.6,10\n')
    t = LatencyTable.load(old)
    assert t.lookup(["a@1x1x1x1:float32"]).tolist() == [2.5]
    assert "fingerprint" not in t.metadata and t.probe is None and t.source == old
    new = LatencyTable(metadata={"threads": 2})
    new.add("b@1x1x1x1:float32", [1.0] * 5 + [9.0] * 5)
    t.merge(new)
    assert t.lookup(["a@1x1x1x1:float32", "b@1x1x1x1:float32"]).tolist() == [2.5, 1.0]
    t.save(tmp_path / "mixed.csv")
    u = LatencyTable.load(tmp_path / "mixed.csv")
    assert u.lookup(["a@1x1x1x1:float32", "b@1x1x1x1:float32"]).tolist() == [2.5, 1.0]


def test_scaled_copy():
    t = make_table()
    t.path = t.source = "x.csv"
    s = t.scaled(3.0, {"why": "test"})
    np.testing.assert_allclose(s.lookup(KEYS), 3 * t.lookup(KEYS))
    np.testing.assert_allclose(s.to_frame()["p90_ms"], 3 * t.to_frame()["p90_ms"])
    assert (s.to_frame()["count"] == t.to_frame()["count"]).all()
    assert s.metadata["rescaled"] == {"factor": 3.0, "why": "test"} and "rescaled" not in t.metadata
    assert s.path is None and s.source == "x.csv"
