"""A table that prices a cheaper choice far above its costlier neighbour (profiled while the
machine was busy) is never picked by ``latency.table=auto``, refused when named explicitly (unless
trusted), and flagged by ``ernas-profile``; the shipped tables pass the same check."""
import shutil

import pytest

from ernas.errors import ErnasError
from ernas.latency.consistency import MAX_INCONSISTENCY, inconsistency, worst_pair
from ernas.latency.resolve import resolve_table
from ernas.latency.table import LatencyTable
from ernas.paths import LATENCY_TABLES
from ernas.space import find_space
from cost_device import SHAPE, cost_settings


def _busy_copy(cost_table, dest, factor=3.0):
    """The table with one kernel=3 block key (every other decision at its costliest, so kernel is
    the only decision where it is the cheaper choice) at ``factor`` times its kernel=5 one."""
    t = LatencyTable.load(cost_table)
    k3 = next(k for k in t.keys() if "nafblock[attention=sca,dw_expand=2,ffn_expand=2,kernel=3"
              in k)
    row = t.get(k3.replace("kernel=3", "kernel=5"))
    t.add_summary(k3, {"ms": factor * row["ms"], "median": factor * row["median_ms"],
                       "p10": row["p10_ms"], "p90": row["p90_ms"], "mean": row["mean_ms"],
                       "n": int(row["count"])})
    dest.parent.mkdir(parents=True, exist_ok=True)
    t.save(dest)
    return dest


def _resolve(tiny, tmp_path, shipped_dir=None, **kw):
    where = {"shipped_dir": shipped_dir} if shipped_dir is not None else {}
    return resolve_table(tiny, SHAPE, cost_settings(cache_dir=tmp_path / "cache", **kw), False,
                         **where)


def test_worst_pair_names_the_inverted_choice(tiny, cost_table, tmp_path):
    assert worst_pair(LatencyTable.load(cost_table), tiny, SHAPE) is None  # counts are monotone
    busy = LatencyTable.load(_busy_copy(cost_table, tmp_path / "busy.csv"))
    w = worst_pair(busy, tiny, SHAPE)
    assert (w["decision"], w["cheaper"], w["costlier"]) == ("kernel", 3, 5)
    assert w["ratio"] == pytest.approx(3.0)
    why = inconsistency(busy, tiny, SHAPE)
    assert "kernel=3" in why and "3.00x slower than kernel=5" in why and "busy" in why
    assert inconsistency(busy, tiny, SHAPE, limit=3.5) is None


def test_auto_skips_a_busy_table_and_profiles(tiny, cost_table, tmp_path):
    shipped = _busy_copy(cost_table, tmp_path / "shipped" / cost_table.name).parent
    t, path = _resolve(tiny, tmp_path, shipped_dir=shipped)
    assert t.probe["action"] == "profiled" and path.parent == tmp_path / "cache"
    assert "max_inconsistency=2" in t.probe["refused"][0]["reason"]
    assert worst_pair(t, tiny, SHAPE) is None
    shutil.rmtree(tmp_path / "cache")
    t, path = _resolve(tiny, tmp_path, shipped_dir=shipped, max_inconsistency=4.0)
    assert t.probe["action"] == "used" and path.parent == shipped


def test_an_explicit_busy_table_is_refused_unless_trusted(tiny, cost_table, tmp_path):
    busy = _busy_copy(cost_table, tmp_path / "busy.csv")
    with pytest.raises(ErnasError, match="cannot price nafnet_tiny's choices") as e:
        _resolve(tiny, tmp_path, table=busy)
    assert str(busy) in str(e.value) and "trust_table=true" in str(e.value)
    with pytest.warns(UserWarning, match="used anyway"):
        t, path = _resolve(tiny, tmp_path, table=busy, trust_table=True)
    assert path == busy and t.probe["action"] == "trusted"


SHIPPED = sorted(LATENCY_TABLES.glob("*.csv"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_tables_price_their_space_sanely(path):
    table = LatencyTable.load(path)
    meta = table.metadata
    w = worst_pair(table, find_space(meta["space"]), meta["input_shape"], meta["granularity"])
    assert w is None or w["ratio"] <= MAX_INCONSISTENCY, w
