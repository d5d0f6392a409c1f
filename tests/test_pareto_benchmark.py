"""benchmarks/pareto.py (issue 14): its parts without training: test tiles, the fronts,
interpolation of the scaled front, the 0.5%-drop selection, the goals and the pinned table."""
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ernas.pareto import arch_digest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pareto as pb  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import pareto_analysis as pa  # noqa: E402
import pareto_setup as ps  # noqa: E402


def test_tiles_are_a_centred_non_overlapping_grid():
    img = np.arange(300 * 451).reshape(300, 451, 1)
    parts = ps.tiles(img, 128)
    assert len(parts) == 2 * 3
    r, c, t = parts[-1]
    assert (r, c, t.shape) == (1, 2, (128, 128, 1))
    top, left = (300 - 256) // 2, (451 - 384) // 2
    assert t[0, 0, 0] == img[top + 128, left + 256, 0]
    assert ps.tiles(img[:100], 128) == []


def test_front_keeps_non_dominated_points_sorted_by_latency():
    lat, q = pa.front([10, 5, 20, 7, 5, 30], [30.0, 29.0, 31.0, 28.0, 29.0, 30.5])
    assert lat.tolist() == [5, 10, 20] and q.tolist() == [29.0, 30.0, 31.0]
    assert pa.front([], [])[0].size == 0


def test_scaled_front_is_interpolated_in_log_latency_and_not_extrapolated():
    fr = (np.array([10.0, 40.0]), np.array([30.0, 31.0]))
    assert pa.quality_at(fr, 20.0) == pytest.approx(30.5)     # log-midpoint of 10 and 40
    assert pa.latency_at(fr, 30.5) == pytest.approx(20.0)
    assert pa.quality_at(fr, 40.0) == pytest.approx(31.0)
    assert math.isnan(pa.quality_at(fr, 9.0)) and math.isnan(pa.quality_at(fr, 41.0))
    assert math.isnan(pa.latency_at(fr, 31.5))


def test_faster_than_the_front():
    fr = (np.array([10.0, 40.0]), np.array([30.0, 31.0]))
    assert pa.faster_than(fr, 10.0, 30.5) == pytest.approx(2.0)
    # better than anything the front has: its best point's latency over ours, a lower bound,
    # so a hair above the best at nearly its latency is not a speed-up
    assert pa.faster_than(fr, 5.0, 31.2) == pytest.approx(8.0)
    assert pa.faster_than(fr, 39.0, 31.01) == pytest.approx(40 / 39)
    assert math.isnan(pa.faster_than(fr, 50.0, 31.2))          # slower than its slowest point
    assert math.isnan(pa.faster_than(fr, 5.0, 29.0))           # worse than its worst point


def _agg(rows):
    return pd.DataFrame(rows, columns=["network", "series", "reference", "measured_ms",
                                       "predicted_ms", "psnr"])


def test_fastest_within_the_allowed_drop():
    t = _agg([("ref", "scaled", True, 100, 100, 31.0), ("a", "searched", False, 40, 42, 30.9),
              ("b", "searched", False, 30, 30, 30.8), ("c", "searched", False, 60, 60, 31.1)])
    threshold = 31.0 * (1 - 0.005)                          # 30.845 dB
    assert pa.fastest_within(t, threshold)["network"] == "a"
    assert pa.fastest_within(t, 40.0) is None


def test_analyse_gaps_speedups_and_goals():
    t = _agg([("w16", "scaled", True, 100, 100, 31.0), ("w8", "scaled", False, 25, 25, 29.0),
              ("w12", "scaled", False, 50, 50, 30.0),
              ("s1", "searched", False, 45, 46, 30.9),          # 2.22x, within 0.5%
              ("s2", "searched", False, 30, 40, 29.9),          # predicted 2.5x vs measured 3.33x
              ("s3", "searched", False, 60, 60, 30.2)])         # dominated by s1
    res = pa.analyse(t)
    r = res["table"].set_index("network")
    assert res["threshold"] == pytest.approx(31.0 * 0.995)
    assert r.loc["s1", "speedup_measured"] == pytest.approx(100 / 45)
    # scaled front at 45 ms, between (25, 29.0) and (50, 30.0) in log latency
    expect = 29.0 + math.log(45 / 25) / math.log(2)
    assert r.loc["s1", "gap_db"] == pytest.approx(30.9 - expect)
    assert r.loc["s2", "faster_x"] == pytest.approx(25 * 2 ** 0.9 / 30)
    assert not r.loc["s3", "on_front"] and r.loc["w12", "on_front"]
    assert res["fastest"]["searched"]["network"] == "s1"
    assert res["fastest"]["scaled"]["network"] == "w16"
    g = res["goals"]
    assert g["searched_speedup"] and g["searched_above_scaled"]
    assert g["searched_above_scaled_count"] == [2, 2, 2]
    assert not g["agreement"]                                 # s2: 2.5 / 3.33 = 0.75
    t.loc[t["network"] == "s2", "predicted_ms"] = 31.0
    assert pa.analyse(t)["goals"]["agreement"]
    # a searched network faster and better than the whole scaled front counts as ahead
    t2 = t[t["network"].isin(["w16", "w8", "w12"])]
    t2 = pd.concat([t2, _agg([("s4", "searched", False, 20, 20, 31.2)])], ignore_index=True)
    g2 = pa.analyse(t2)["goals"]
    assert g2["searched_above_scaled"] and g2["searched_above_scaled_count"] == [1, 1, 1]


def test_merged_attempts_are_judged_on_their_joint_front():
    scaled = [("w16", "scaled", True, 100, 100, 31.0), ("w8", "scaled", False, 25, 25, 29.0),
              ("w12", "scaled", False, 50, 50, 30.0)]
    # a is ahead at 30 and 40 ms and behind at 70; b is behind at 40 and ahead at 60 ms. The
    # joint front drops a's 70 ms and b's 40 ms networks (dominated by the other attempt's)
    t = _agg(scaled + [("a1", "searched @a", False, 30, 30, 29.9),     # +0.64 dB
                       ("a2", "searched @a", False, 40, 40, 30.0),     # +0.32 dB
                       ("a3", "searched @a", False, 70, 70, 30.2),     # −0.29 dB, 0.82x
                       ("b1", "searched @b", False, 40, 40, 29.6),     # −0.08 dB, 0.95x
                       ("b2", "searched @b", False, 60, 60, 30.9)])    # +0.64 dB
    g = pa.analyse(t)["goals"]
    assert g["searched @a_above_scaled_count"] == [2, 3, 3]
    assert g["searched @b_above_scaled_count"] == [1, 2, 2]
    assert g["all_searched_front"] == ["a1", "a2", "b2"]
    assert g["all_searched_above_scaled"] and g["all_searched_above_scaled_count"] == [3, 3, 3]
    # one series alone: no joint verdict beside its own
    assert "all_searched_above_scaled" not in pa.analyse(t[t["series"] != "searched @b"])["goals"]


def test_anchored_speedups_follow_the_line_through_two_measured_networks():
    """Measured = 2·predicted − 10 ms: plain predicted speed-ups are off, the ones calibrated on
    the reference and the network predicted fastest (w8) are exact for the others; the anchor
    is left out of the count. Fails if the line goes through other points or is not applied."""
    t = _agg([("w16", "scaled", True, 190, 100, 31.0), ("w8", "scaled", False, 30, 20, 29.0),
              ("w12", "scaled", False, 90, 50, 30.0), ("s1", "searched", False, 70, 40, 30.5)])
    res = pa.analyse(t)
    r, an = res["table"].set_index("network"), res["anchored"]
    assert an["anchor"] == "w8" and an["scale"] == pytest.approx(2)
    assert an["offset_ms"] == pytest.approx(-10) and (an["within"], an["n"]) == (2, 2)
    assert r.loc["s1", "speedup_anchored"] == pytest.approx(190 / 70)
    assert r.loc["s1", "agreement"] == pytest.approx((100 / 40) / (190 / 70))   # 0.92: plain
    assert np.allclose(r["agreement_anchored"], 1.0)


def test_anchored_agreement_leaves_out_twins_and_untrustworthy_lines():
    """A network with the anchor's architecture (another init, the same timing) agrees
    trivially and is not counted; anchors measured in the wrong order draw no line. Fails if
    twins are counted or a line with a negative slope is used."""
    t = _agg([("w16", "scaled", True, 190, 100, 31.0), ("w8", "scaled", False, 30, 20, 29.0),
              ("w12", "scaled", False, 90, 50, 30.0), ("s1", "searched", False, 70, 40, 30.5),
              ("w8_supernet", "searched_supernet", False, 30, 20, 29.2)])
    t["digest"] = ["a16", "a8", "a12", "s1", "a8"]
    an = pa.analyse(t)["anchored"]
    assert an["anchor"] in ("w8", "w8_supernet") and (an["within"], an["n"]) == (2, 2)
    t.loc[t["network"].isin(["w8", "w8_supernet"]), "measured_ms"] = 200   # slower than w16
    res = pa.analyse(t)
    assert res["anchored"] is None and res["table"]["speedup_anchored"].isna().all()


def test_a_resumed_run_keeps_its_distillation_recipe():
    """Resuming with another --distill or --distill-feat would mix two recipes in the _kd
    series; adding distillation to a run without it, or an old config.json without the keys,
    is fine. Fails if a changed recipe passes or a legitimate resume is refused."""
    old = {"distill": 0.5, "distill_feat": 0.1}
    assert pb.distill_change(old, {"distill": 1.0, "distill_feat": 0.1}) == ["distill"]
    assert pb.distill_change(old, {"distill": 0.5, "distill_feat": 0.0}) == ["distill_feat"]
    assert pb.distill_change(old, {"distill": 0.5, "distill_feat": 0.1}) == []
    assert pb.distill_change({}, {"distill": 0.5, "distill_feat": 0.1}) == []
    assert pb.distill_change(old, {"distill": None, "distill_feat": 0.1}) == []


def test_a_distilled_network_waits_for_its_teacher_run(tmp_path):
    """teacher_of: nothing for a network without a teacher, nothing while the teacher's run of
    that seed is unfinished (or absent), then the teacher's arch, best checkpoint and weights."""
    import json

    import ernas
    from ernas.paths import SEARCH_SPACES

    ref = ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").reference()
    ref.save(tmp_path / "ref.yaml")
    n = {"name": "search_t0.5_kd", "teacher": "nafnet_w16"}
    assert pb.teacher_of({**n, "teacher": None}, 0, tmp_path, tmp_path / "ref.yaml", 1, 0) is None
    assert pb.teacher_of(n, 0, tmp_path, tmp_path / "ref.yaml", 1.0, 0.1) is None
    run = tmp_path / "runs" / "nafnet_w16" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"finished": False}))
    assert pb.teacher_of(n, 0, tmp_path, tmp_path / "ref.yaml", 1.0, 0.1) is None
    (run / "summary.json").write_text(json.dumps({"finished": True}))
    kd = pb.teacher_of(n, 0, tmp_path, tmp_path / "ref.yaml", 0.5, 0.2)
    assert kd.checkpoint == str(run / "best.pt") and (kd.w_out, kd.w_feat) == (0.5, 0.2)
    assert kd.arch.to_dict() == ref.to_dict()
    assert pb.teacher_of(n, 1, tmp_path, tmp_path / "ref.yaml", 1.0, 0.1) is None  # seed 1


def test_plot_draws_both_fronts_from_the_analysis(tmp_path):
    t = _agg([("w16", "scaled", True, 100, 100, 31.0), ("w8", "scaled", False, 25, 25, 29.0),
              ("s1", "searched", False, 45, 46, 30.9)]).assign(psnr_std=0.1)
    res = pa.analyse(t)
    pa.plot(res["table"], res["threshold"], tmp_path / "pareto.png", "title")
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    assert list(res["table"]["network"]) == ["w16", "w8", "s1"]  # names untouched by the plot


def test_scaled_archs_cover_widths_and_reductions():
    from ernas.space import find_space

    space = find_space("nafnet_ern_small")
    archs = ps.scaled_archs(space, [8], ps.REDUCTIONS)
    assert list(archs) == ["nafnet_w8", "nafnet_w16", "nafnet_w16_shallow", "nafnet_w16_noln",
                           "nafnet_w16_nosca", "nafnet_w16_noln_nosca", "nafnet_w16_bn",
                           "nafnet_w16_bnhi", "nafnet_w16_bnhi3"]
    assert space.contains(archs["nafnet_w16"])
    assert arch_digest(archs["nafnet_w16"]) == arch_digest(space.reference())
    g = archs["nafnet_w16_shallow"].geometry
    assert (g["enc_blk_nums"], g["middle_blk_num"], g["dec_blk_nums"]) == ([1] * 4, 1, [1] * 4)
    vals = archs["nafnet_w16_noln_nosca"].values.values()
    assert all(v["norm"] == "none" and v["attention"] == "none" for v in vals)
    assert all(v["norm"] == "none" and v["attention"] == "sca"
               for v in archs["nafnet_w16_noln"].values.values())
    assert all(v["norm"] == "batchnorm" and v["attention"] == "sca" and v["kernel"] == 3
               for v in archs["nafnet_w16_bn"].values.values())
    # BatchNorm at the two finest levels only: encoders.0/1 and the last two decoders
    hi = {p: v["norm"] for p, v in archs["nafnet_w16_bnhi"].values.items()}
    assert {p for p, n in hi.items() if n == "batchnorm"} == {
        "encoders.0.0", "encoders.1.0", "decoders.2.0", "decoders.3.0"}
    assert {n for p, n in hi.items() if n != "batchnorm"} == {"layernorm"}
    hi3 = {p: v["norm"] for p, v in archs["nafnet_w16_bnhi3"].values.items()}
    assert {p for p, n in hi3.items() if n == "batchnorm"} == {
        "encoders.0.0", "encoders.1.0", "encoders.2.0", "encoders.2.1", "decoders.1.0",
        "decoders.2.0", "decoders.3.0"}
    assert {n for p, n in hi3.items() if n != "batchnorm"} == {"layernorm"}



def test_reductions_compose_and_apply_at_other_widths():
    import argparse

    from ernas.space import find_space

    space = find_space("nafnet_ern_small")
    archs = ps.scaled_archs(space, [], ["bnhi", "shallow_bnhi"], [12])
    assert list(archs) == ["nafnet_w16", "nafnet_w16_bnhi", "nafnet_w16_shallow_bnhi",
                           "nafnet_w12_bnhi", "nafnet_w12_shallow_bnhi"]
    assert archs["nafnet_w12_bnhi"].geometry["width"] == 12
    assert archs["nafnet_w16_bnhi"].geometry["width"] == 16
    for name in ("nafnet_w12_bnhi", "nafnet_w12_shallow_bnhi"):
        # the same norms as the reference-width reduction, block for block
        ref = archs[name.replace("w12", "w16")].values
        assert archs[name].values == ref
    sb = archs["nafnet_w16_shallow_bnhi"]
    assert sb.geometry["enc_blk_nums"] == [1] * 4 and sb.geometry["middle_blk_num"] == 1
    assert {p for p, v in sb.values.items() if v["norm"] == "batchnorm"} == {
        "encoders.0.0", "encoders.1.0", "decoders.2.0", "decoders.3.0"}
    for bad in ("bnhi_bnhi3", "shallow_wide", "noln_bn", "bnhi_bnhi"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad):
            ps.reduction(bad)
    assert ps.reduction("noln_nosca") == "noln_nosca"

def test_measured_speedups_are_the_paired_ones_when_rounds_were_recorded():
    t = _agg([("w16", "scaled", True, 100, 100, 31.0), ("w8", "scaled", False, 25, 25, 29.0),
              ("s1", "searched", False, 45, 50, 30.9)])
    t["speedup_paired"] = [1.0, 4.0, 2.5]             # s1: predicted 2.0 vs paired 2.5
    r = pa.analyse(t)["table"].set_index("network")
    assert r.loc["s1", "speedup_measured"] == pytest.approx(2.5)       # the paired one
    assert r.loc["s1", "speedup_statistic"] == pytest.approx(100 / 45)
    assert r.loc["s1", "agreement"] == pytest.approx(2.0 / 2.5)
    assert r.loc["s1", "agreement_statistic"] == pytest.approx(2.0 / (100 / 45))
    assert r.loc["w8", "agreement"] == pytest.approx(1.0)


def _train_dir(root: Path, name: str, space, steps: int = 1000) -> Path:
    """A train-phase folder as ``pareto.py train`` leaves it: config, networks, archs, runs."""
    import json

    d = root / name
    scaled = ps.scaled_archs(space, [8], [])
    searched = space.sample(int(steps) + len(name))
    nets = []
    for n, arch, series in [(k, a, "scaled") for k, a in scaled.items()] + [
            ("search_t0.7", searched, "searched")]:
        (d / "archs").mkdir(parents=True, exist_ok=True)
        arch.save(d / "archs" / f"{n}.yaml")
        (d / "runs" / n / "seed0").mkdir(parents=True)
        (d / "runs" / n / "seed0" / "summary.json").write_text(json.dumps({"name": n}))
        nets.append({"name": n, "series": series, "reference": n == "nafnet_w16",
                     "arch": str(d / "archs" / f"{n}.yaml"), "init": "scratch"})
    (d / "networks.json").write_text(json.dumps({"reference_predicted_ms": 100.0,
                                                 "networks": nets}))
    (d / "config.json").write_text(json.dumps({
        "seeds": [0], "steps": steps, "crop": 64, "batch": 8, "tile": 128, "threads": 2,
        "input_shape": [1, 3, 256, 256], "space": "nafnet_ern_small", "command": f"train {name}"}))
    return d


def test_merge_puts_search_attempts_on_one_plot(tmp_path):
    import json
    from types import SimpleNamespace

    import pareto_phases as pp
    from ernas.space import find_space, load_arch

    space = find_space("nafnet_ern_small")
    a, b = _train_dir(tmp_path, "plain", space), _train_dir(tmp_path, "q0.5", space)
    out = tmp_path / "all"
    pp.merge_phase(SimpleNamespace(out=str(out), runs=[str(a), str(b)]))
    nets = {n["name"]: n for n in json.loads((out / "networks.json").read_text())["networks"]}
    assert sorted(nets) == ["nafnet_w16", "nafnet_w8", "search_t0.7@plain", "search_t0.7@q0.5"]
    assert nets["search_t0.7@q0.5"]["series"] == "searched @q0.5"
    assert nets["nafnet_w16"]["series"] == "scaled" and nets["nafnet_w16"]["reference"]
    # the run folders are hard links of the originals, under the merged names
    src = b / "runs" / "search_t0.7" / "seed0" / "summary.json"
    assert (out / "runs" / "search_t0.7@q0.5" / "seed0" / "summary.json").stat().st_ino == \
        src.stat().st_ino
    assert arch_digest(load_arch(nets["search_t0.7@q0.5"]["arch"])) == \
        arch_digest(load_arch(b / "archs" / "search_t0.7.yaml"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["merged_from"] == [str(a), str(b)] and "train q0.5" in cfg["command"]
    # another recipe cannot share the plot
    c = _train_dir(tmp_path, "long", space, steps=2500)
    with pytest.raises(SystemExit, match="steps"):
        pp.merge_phase(SimpleNamespace(out=str(tmp_path / "x"), runs=[str(a), str(c)]))


def test_networks_with_non_finite_quality_are_left_off_the_fronts():
    df = pd.DataFrame({"network": ["a", "a", "bn", "bn", "c"], "seed": [0, 1, 0, 1, 0],
                       "psnr_sigma25": [30.0, 30.2, float("nan"), 29.0, float("inf")]})
    kept, excluded = pa.split_finite(df)
    assert list(kept["network"]) == ["a", "a"]
    assert excluded == {"bn": [0], "c": [0]}


def test_networks_sharing_an_arch_share_its_measurement(tmp_path):
    """The supernet-init series of a search has the scratch series' arch: report uses that
    network's timing (marked), and still refuses a network whose arch was never timed."""
    import pareto_phases as pp
    from ernas.space import find_space

    space = find_space("nafnet_ern_small")
    a, b = space.sample(1), space.sample(2)
    assert arch_digest(a) != arch_digest(b)
    paths = {}
    for name, arch in (("s", a), ("s_supernet", a), ("other", b)):
        paths[name] = tmp_path / f"{name}.yaml"
        arch.save(paths[name])
    nets = [{"name": k, "arch": str(v)} for k, v in paths.items()]
    timed = pp.latencies_by_arch(nets, {"s": {"measured_ms": 42.0, "round_ms": [41.0, 43.0]}})
    assert timed["s"] == {"measured_ms": 42.0, "round_ms": [41.0, 43.0]}
    assert timed["s_supernet"] == {**timed["s"], "measured_as": "s"}
    assert "other" not in timed


def test_pinned_table_holds_the_reference_of_a_space_without_it(tmp_path):
    """A space fixing BatchNorm everywhere does not contain its LayerNorm reference, whose
    prediction sets the hinge targets: pinning must profile the reference's keys too."""
    from ernas.latency.predict import predict_ms
    from ernas.latency.table import LatencyTable
    from ernas.space import find_space

    space_yaml = tmp_path / "tiny_bnfix.yaml"
    space_yaml.write_text(
        "family: nafnet\nname: tiny_bnfix\n"
        "geometry: {img_channel: 3, width: 8, enc_blk_nums: [1, 1], middle_blk_num: 1, "
        "dec_blk_nums: [1, 1]}\nblocks:\n  all: {norm: batchnorm, attention: [sca, none], "
        "kernel: 3, dw_expand: 2, ffn_expand: 2, keep: [true, false]}\n")
    over = [f"space={space_yaml}", "input_shape=[1,3,32,32]", "latency.backend.threads=1",
            "latency.measure.rounds=2", "latency.measure.per_round=1",
            "latency.measure.min_seconds=0", f"latency.cache_dir={tmp_path / 'cache'}",
            "progress=false"]
    pinned = tmp_path / "pinned.csv"
    source = ps.pin_table(over, pinned)
    space = find_space(str(space_yaml))
    ref_keys = space.reference().op_keys((1, 3, 32, 32), "block")
    assert any("norm=layernorm" in k for k in ref_keys)
    assert not any("norm=layernorm" in k for k in space.op_keys((1, 3, 32, 32), "block"))
    table = LatencyTable.load(pinned)
    assert all(k in table for k in ref_keys), source
    assert "reference" in source
    assert predict_ms(table, space.reference(), (1, 3, 32, 32)) > 0


def test_equal_sample_steps_subtract_the_search_weight_steps_crops():
    # 500 search steps x batch 4 = 2000 crops = 250 steps at batch 8
    assert ps.equal_sample_steps(1000, 8, 500, 4) == 750
    assert ps.equal_sample_steps(1000, 8, 501, 4) == 749    # a partial step still counts
    assert ps.equal_sample_steps(2500, 8, 1000, 8) == 1500
    with pytest.raises(SystemExit, match="supernet_eq"):
        ps.equal_sample_steps(100, 8, 500, 4)
