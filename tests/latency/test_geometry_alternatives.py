"""Spaces with geometry alternatives (``geometries``): one union of single-geometry spaces whose
keys, draws and size cover every alternative, searched one alternative at a time, and a protocol
that plans one search per alternative and seed."""
import random
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from cost_device import SHAPE, cost_settings
from ernas.errors import ErnasError
from ernas.latency.cache import space_digest
from ernas.latency.predict import predict_ms
from ernas.latency.resolve import resolve_table
from ernas.paths import SEARCH_SPACES
from ernas.space import find_space, load_space

TINY = yaml.safe_load((SEARCH_SPACES / "nafnet_tiny.yaml").read_text())


def _union(tmp_path, geometries, name="tiny_widths"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name, "geometries": geometries},
                                   sort_keys=False))
    return path


def test_the_union_covers_every_alternative_and_searches_name_one(tmp_path):
    path = _union(tmp_path, {"w8": {}, "w6": {"width": 6}})
    union, base = load_space(path), find_space("nafnet_tiny")
    w6 = find_space(f"{path}:w6")
    assert w6.geometry["width"] == 6 and not w6.geometries and w6.name == "tiny_widths_w6"
    assert union.size() == 2 * base.size()
    keys = set(union.op_keys(SHAPE))
    assert keys == set(base.op_keys(SHAPE)) | set(w6.op_keys(SHAPE)) > set(base.op_keys(SHAPE))
    rng = random.Random(0)
    draws = Counter(union.sample(rng).geometry["width"] for _ in range(400))
    assert set(draws) == {6, 8} and 150 < draws[6] < 250  # the alternative drawn uniformly
    assert all(union.contains(union.sample(rng)) for _ in range(20))
    assert not union.contains(_arch_of_width(base, 4))  # width 4 is no alternative
    assert union.smallest().geometry["width"] == 6 and union.largest().geometry["width"] == 8
    assert union.reference().geometry["width"] == 8  # the reference is of `geometry`
    # the w8 alternative is the plain space; the union's table is another space's
    assert space_digest(union.alternative("w8")) == space_digest(base) != space_digest(union)
    assert load_space(path).to_dict()["geometries"] == {"w8": {}, "w6": {"width": 6}}


def _arch_of_width(space, width):
    arch = space.reference()
    arch.geometry = {**arch.geometry, "width": width}
    return arch


@pytest.mark.parametrize("geometries, fragment", [
    ({"w8": {}, "deep": {"enc_blk_nums": [2, 1]}}, "keep the block counts"),
    ({"w8": {}, "bad": {"depth": 3}}, "geometries.bad must map geometry fields"),
    ({"w8": {}, "odd name": {}}, "must be plain"),
    ({}, "must map names to changes"),
    ({"w6": {"width": 6}, "w4": {"width": 4}}, "no entry of 'geometries' is 'geometry' itself"),
    ({"w8": {}, "same": {"width": 8}}, "the same geometry as another alternative"),
])
def test_a_bad_alternative_is_refused_naming_it(tmp_path, geometries, fragment):
    with pytest.raises(ErnasError, match=fragment):
        load_space(_union(tmp_path, geometries))


def test_an_architecture_file_with_alternatives_is_refused(tmp_path):
    from ernas.space import load_arch

    data = {**find_space("nafnet_tiny").reference().to_dict(),
            "geometries": {"w8": {}, "w6": {"width": 6}}}
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ErnasError, match="architecture file, so it has one geometry"):
        load_arch(path)


def test_an_unknown_alternative_is_refused_with_the_names(tmp_path):
    path = _union(tmp_path, {"w8": {}, "w6": {"width": 6}})
    with pytest.raises(ErnasError, match=f"no geometry alternative 'w4'; its alternatives are "
                                         f"w8, w6: use e.g. space={path}:w8"):
        find_space(f"{path}:w4")


def test_a_search_on_the_union_is_refused_before_it_runs(tmp_path):
    from ernas.supernet import SuperNet

    path = _union(tmp_path, {"w8": {}, "w6": {"width": 6}})
    with pytest.raises(ErnasError, match=f"space={path}:w8"):
        SuperNet(load_space(path))
    r = subprocess.run([sys.executable, "-m", "ernas.cli.search", f"space={path}",
                        "search.steps=2", "search.warmup_steps=0", "progress=false"],
                       cwd=tmp_path, capture_output=True, text=True)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "holds 2 geometry alternatives (w8, w6)" in said, r.stderr
    assert not list(tmp_path.glob("runs/search/*/*.log"))


def _plan(tmp_path, cache, overrides=()):
    from ernas.api import compose
    from ernas.bench.plan import build_plan, check_jobs

    path = _union(tmp_path, {"w8": {}, "w6": {"width": 6}})
    cfg = compose("bench", ["experiment=protocol_denoise_tiny", f"space={path}",
                            "random.tolerance=0.3", *overrides])
    table, _ = resolve_table(load_space(path), SHAPE, cost_settings(cache_dir=cache), False,
                             shipped_dir=cache / "none")
    plan, archs = build_plan(cfg, table, tmp_path / "bench")
    check_jobs(plan)
    return path, table, plan, archs


def test_a_protocol_searches_every_alternative_and_draws_from_the_union(tmp_path):
    path, table, plan, archs = _plan(tmp_path, tmp_path / "cache")
    nets, jobs = plan["networks"], plan["jobs"]
    searched = {n: r for n, r in nets.items() if r["arm"] == "searched"}
    assert sorted(searched) == ["searched_t0_w6_s0", "searched_t0_w6_s1", "searched_t0_w8_s0",
                                "searched_t0_w8_s1"]
    for name, rec in searched.items():
        job = jobs[name.replace("searched_", "search_")]
        assert job["overrides"]["space"] == f"{path}:{rec['geometry']}"
        assert job["overrides"]["seed"] == rec["search_seed"]
        assert job["run_dir"].endswith(name.replace("searched_", "search_"))
    assert nets["reference"]["geometry"] == "w8" and "geometry" not in nets["scaled_w4"]
    target = plan["targets"][0]["ms"]
    for rec in nets.values():
        if rec["arm"] == "random":
            arch = archs[rec["arch"]]
            assert {"w8": 8, "w6": 6}[rec["geometry"]] == arch.geometry["width"]
            assert abs(predict_ms(table, arch, SHAPE) / target - 1) <= 0.3


def test_tuning_lambda_with_alternatives_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from ernas.api import compose
    from ernas.bench.plan import hand_made

    path = _union(tmp_path, {"w8": {}, "w6": {"width": 6}})
    cfg = compose("bench", ["experiment=protocol_denoise_tiny", f"space={path}"])
    OmegaConf.set_struct(cfg, False)
    cfg.tune = OmegaConf.create({"lams": [0.1, 1.0], "seed": 100, "tolerance": 0.05})
    with pytest.raises(ErnasError, match="holds geometry alternatives"):
        hand_made(cfg, load_space(path))


def test_the_consistency_check_covers_every_alternative(tmp_path):
    """A table timed with the w6 keys inverted passes a check that looks at w8 alone."""
    from ernas.latency.consistency import inconsistent_pairs, single_decision_pairs
    from ernas.latency.table import LatencyTable

    union = load_space(_union(tmp_path, {"w8": {}, "w6": {"width": 6}}))
    pairs = single_decision_pairs(union, SHAPE)
    base = single_decision_pairs(find_space("nafnet_tiny"), SHAPE)
    assert len(pairs) > len(base)
    w6_only = set(union.alternative("w6").op_keys(SHAPE)) - set(find_space("nafnet_tiny")
                                                                 .op_keys(SHAPE))
    rng, table = random.Random(0), LatencyTable()
    for key in union.op_keys(SHAPE):  # w8 keys all equal (consistent), w6 keys scrambled
        table.add(key, [rng.uniform(0.1, 10.0) if key in w6_only else 1.0])
    assert inconsistent_pairs(table, pairs) and not inconsistent_pairs(table, base)
