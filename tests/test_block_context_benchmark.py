"""benchmarks/block_context.py: the networks it times and the costs it compares (no timing)."""
import sys
from pathlib import Path

import pytest

import ernas
from ernas.paths import SEARCH_SPACES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import block_context as bc  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

SHAPE = (1, 3, 32, 32)


def test_variants_change_one_block_and_costs_subtract_the_skipped_network():
    """Each variant differs from the reference only at its position, and a block's cost is its
    network minus the same network with that block skipped: an additive device gives key and
    in-network costs equal; a block 1 ms dearer in the network shows only in its own row.
    Fails if a variant changes another block or costs are taken against the wrong network."""
    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    nets = bc.variants_at(tiny, ["encoders.0.0", "decoders.1.0"])
    assert len(nets) == 2 * (len(bc.VARIANTS) + 1)
    ref = tiny.reference()
    for name, arch in nets.items():
        pos = name.split(":")[0]
        assert all(arch.values[p] == ref.values[p] for p in ref.values if p != pos), name
    assert not nets["decoders.1.0:keep=False"].values["decoders.1.0"]["keep"]
    assert nets["encoders.0.0:norm=none"].values["encoders.0.0"]["norm"] == "none"
    # a stand-in additive device: 1e-3 ms per parameter
    sums = {n: 1e-3 * sum(p.numel() for p in ernas.build_model(a).parameters())
            for n, a in nets.items()}
    rows = {n: (c_net, c_key) for n, c_net, c_key in bc.block_costs(nets, sums, sums)}
    assert len(rows) == 2 * len(bc.VARIANTS) and all(c > 0 for c, _ in rows.values())
    assert all(c_net == pytest.approx(c_key) for c_net, c_key in rows.values())
    dear = {**sums, "encoders.0.0:reference": sums["encoders.0.0:reference"] + 1.0}
    rows2 = {n: (c_net, c_key) for n, c_net, c_key in bc.block_costs(nets, dear, sums)}
    ref_row = "encoders.0.0:reference"
    assert rows2[ref_row][0] == pytest.approx(rows[ref_row][0] + 1)
    assert all(rows2[n] == pytest.approx(rows[n]) for n in rows if n != ref_row)


def test_block_keys_are_the_keys_a_variant_adds_to_the_skipped_network():
    """The keys timed alone for a variant are exactly its block's: one block key at its
    position's shape, nothing the rest of the network shares. Fails if shared keys leak in or
    a repeated key (the same block at two positions) is dropped."""
    tiny = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml")
    nets = bc.variants_at(tiny, ["encoders.0.0"])
    skip = nets["encoders.0.0:keep=False"]
    keys = bc.block_keys(nets["encoders.0.0:norm=none"], skip, SHAPE, "block")
    assert len(keys) == 1 and "norm=none" in keys[0] and "1x8x32x32" in keys[0]
    # the reference block's key also sits at decoders.1.0: still one extra copy
    ref_keys = bc.block_keys(nets["encoders.0.0:reference"], skip, SHAPE, "block")
    assert len(ref_keys) == 1 and "norm=layernorm" in ref_keys[0]
    assert sorted(skip.op_keys(SHAPE, "block") + ref_keys) == sorted(
        tiny.reference().op_keys(SHAPE, "block"))
