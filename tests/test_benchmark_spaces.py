"""The search spaces the Pareto benchmark ships under ``benchmarks/spaces``."""
import sys
from pathlib import Path

import ernas

SPACES = Path(__file__).resolve().parents[1] / "benchmarks" / "spaces"


def test_every_benchmark_space_loads_on_the_small_geometry():
    files = sorted(SPACES.glob("*.yaml"))
    assert files
    ern_small = ernas.load_space(Path(__file__).resolve().parents[1]
                                 / "search_spaces" / "nafnet_ern_small.yaml")
    for f in files:
        space = ernas.load_space(f)
        assert space.name == f.stem
        assert space.geometry == ern_small.geometry, f
        assert space.searchable, f


def test_keep3_is_bnfix3_with_the_first_coarsest_block_kept():
    """runs/p20's pinned table (profiled for bnfix3) must cover keep3: every candidate of keep3
    is one of bnfix3's, and the only narrowing is encoders.3.0's keep."""
    bnfix3 = ernas.load_space(SPACES / "nafnet_ern_small_bnfix3.yaml")
    keep3 = ernas.load_space(SPACES / "nafnet_ern_small_bnfix3_keep3.yaml")
    assert keep3.positions == bnfix3.positions
    narrowed = {(p, d) for p, ch in keep3.choices.items() for d, cands in ch.items()
                if set(cands) != set(bnfix3.choices[p][d])}
    assert narrowed == {("encoders.3.0", "keep")}
    assert keep3.choices["encoders.3.0"]["keep"] == (True,)
    assert set(keep3.op_keys([1, 3, 64, 64])) <= set(bnfix3.op_keys([1, 3, 64, 64]))
    # the networks that overflowed skipped both encoders.3 blocks; keep3 has none of them
    assert not keep3.contains(bnfix3.smallest())
    assert keep3.contains(keep3.smallest()) and bnfix3.contains(keep3.smallest())


def test_bnlo_holds_the_hand_made_bnhi_network_and_only_keys_the_pinned_table_has():
    """bnlo offers BatchNorm only at levels 0-1 and, at level 2, the reference block or a skip:
    it must contain the hand-made bnhi network, and its keys must be bnfix3's or its
    reference's (the keys runs/p20's pinned table holds)."""
    sys.path.insert(0, str(SPACES.parent))
    from pareto_setup import scaled_archs

    bnfix3 = ernas.load_space(SPACES / "nafnet_ern_small_bnfix3.yaml")
    bnlo = ernas.load_space(SPACES / "nafnet_ern_small_bnlo.yaml")
    bnhi = scaled_archs(bnlo, [], ["bnhi"])["nafnet_w16_bnhi"]
    assert bnlo.contains(bnhi)
    shape = [1, 3, 64, 64]
    pinned = set(bnfix3.op_keys(shape)) | set(bnfix3.reference().op_keys(shape))
    assert set(bnlo.op_keys(shape)) <= pinned
    bn_at = {p for p, ch in bnlo.choices.items() if "batchnorm" in ch["norm"]}
    assert bn_at == {"encoders.0.0", "encoders.1.0", "decoders.2.0", "decoders.3.0"}
    level2 = [p for p in bnlo.positions if p.startswith(("encoders.2.", "decoders.1."))]
    assert level2 and all(len(bnlo.combos(p)) == 2 for p in level2)  # the reference, or skipped


def test_bnlo2_opens_level_2_of_bnlo_and_nothing_else():
    """bnlo2 (runs/p40, p42) is bnlo with every block choice open at level 2 under LayerNorm:
    the same positions, BatchNorm at the same four, wider only at encoders.2.* and decoders.1.0,
    so it holds every bnlo network (the hand-made bnhi one among them)."""
    bnlo = ernas.load_space(SPACES / "nafnet_ern_small_bnlo.yaml")
    bnlo2 = ernas.load_space(SPACES / "nafnet_ern_small_bnlo2.yaml")
    assert bnlo2.positions == bnlo.positions
    widened = {p for p, ch in bnlo2.choices.items()
               if any(set(c) != set(bnlo.choices[p][d]) for d, c in ch.items())}
    assert widened == {"encoders.2.0", "encoders.2.1", "decoders.1.0"}
    for p in widened:
        assert bnlo2.choices[p]["norm"] == ("layernorm",)
        assert all(set(bnlo.choices[p][d]) <= set(c) for d, c in bnlo2.choices[p].items())
        assert len(bnlo2.combos(p)) == 2 * 3 * 2 * 2 * 2  # 24 blocks, each kept or skipped
    assert bnlo2.contains(bnlo.smallest()) and bnlo2.contains(bnlo.largest())
