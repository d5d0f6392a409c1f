"""Search spaces and architectures: YAML schema, validation errors, sampling, size, round trip."""
import math
import random
import subprocess
import sys

import pytest
import ernas
from ernas.errors import ErnasError


def test_ern_space_geometry_and_decisions(root):
    space = ernas.load_space(root / "search_spaces/nafnet_ern.yaml")
    assert space.geometry["width"] == 32
    assert len(space.searchable) == (2 + 2 + 4 + 8) + (2 + 2 + 2 + 2)
    assert all(not p.startswith("middle") for p in space.searchable)
    c = space.choices["encoders.2.3"]
    assert c["norm"] == ("layernorm", "batchnorm", "none") and c["kernel"] == (3, 5, 7)
    assert space.choices["middle_blks.5"]["kernel"] == (3,)


def test_size_counts_skipped_blocks_once(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    per_block = 3 * 2 * 3 * 2 * 2 + 1  # 72 kept variants + one skipped
    assert space.size() == per_block ** len(space.searchable)
    ern = ernas.load_space(root / "search_spaces/nafnet_ern.yaml")
    assert ern.size() == per_block ** 24
    assert math.log10(ern.size()) > 44


def test_sampling_is_seeded_and_inside_space(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    a, b = space.sample(3), space.sample(3)
    assert a.values == b.values
    archs = [space.sample(random.Random(i)) for i in range(20)]
    assert all(space.contains(x) for x in archs)
    assert len({str(x.values) for x in archs}) > 10


def test_smallest_largest_reference(root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    small, large, ref = space.smallest(), space.largest(), space.reference()
    p = space.searchable[0]
    assert small.values[p]["keep"] is False and small.values[p]["norm"] == "none"
    assert large.values[p] == dict(norm="layernorm", attention="sca", kernel=7, dw_expand=2,
                                   ffn_expand=2, keep=True)
    assert ref.values[p]["kernel"] == 3


def test_arch_round_trip(tmp_path, root):
    space = ernas.load_space(root / "search_spaces/nafnet_tiny.yaml")
    arch = space.sample(7)
    arch.save(tmp_path / "a.yaml")
    back = ernas.load_arch(tmp_path / "a.yaml")
    assert back.values == arch.values and back.geometry == arch.geometry
    assert all(type(back.values[p]["keep"]) is bool for p in back.positions)


def _write(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return f


GOOD = """family: nafnet
geometry: {width: 8, enc_blk_nums: [1, 1], middle_blk_num: 1, dec_blk_nums: [1, 1]}
blocks:
  all: {kernel: [3, 5]}
"""


@pytest.mark.parametrize("text,needles", [
    (GOOD.replace("kernel: [3, 5]", "kernal: [3, 5]"), ["'all'", "'kernal'", "norm, attention"]),
    (GOOD.replace("kernel: [3, 5]", "kernel: [3, 4]"), ["'kernel'", "4", "3, 5, 7"]),
    (GOOD + "  encoders.0.3: {kernel: 3}\n", ["'encoders.0.3'", "enc_blk_nums"]),
    (GOOD.replace("dec_blk_nums: [1, 1]", "dec_blk_nums: [1]"), ["dec_blk_nums", "levels"]),
    (GOOD.replace("width: 8", "width: 7"), ["'width'", "even"]),
    (GOOD.replace("kernel: [3, 5]", "keep: [yes, 1]"), ["'keep'", "false, true"]),
])
def test_malformed_space_errors_name_file_position_field(tmp_path, text, needles):
    f = _write(tmp_path, text)
    with pytest.raises(ErnasError) as e:
        ernas.load_space(f)
    msg = str(e.value)
    assert str(f) in msg and "\n" not in msg
    for n in needles:
        assert n in msg


def test_arch_file_with_several_candidates_is_refused(tmp_path):
    f = _write(tmp_path, GOOD)
    ernas.load_space(f)
    with pytest.raises(ErnasError, match="single value"):
        ernas.load_arch(f)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ErnasError, match="does not exist"):
        ernas.load_space(tmp_path / "nope.yaml")
    with pytest.raises(ErnasError, match="not valid YAML"):
        ernas.load_space(_write(tmp_path, "family: [unclosed"))


def test_user_sees_one_paragraph_and_no_traceback(tmp_path):
    f = _write(tmp_path, GOOD.replace("kernel: [3, 5]", "kernel: [3, 4]"))
    r = subprocess.run([sys.executable, "-m", "ernas.cli.check", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and str(f) in r.stderr and "3, 5, 7" in r.stderr
    good = _write(tmp_path, GOOD)
    r = subprocess.run([sys.executable, "-m", "ernas.cli.check", str(good)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "distinct architectures" in r.stdout
