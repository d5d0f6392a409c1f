"""``benchmarks/pareto.py measure --passes N``: each pass profiles a fresh table and times every
network; the passes are combined (medians, rounds pooled) and every goal is judged per pass."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pareto_phases as pp  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

SPACE = ("family: nafnet\nname: tiny_passes\n"
         "geometry: {img_channel: 3, width: 8, enc_blk_nums: [1, 1], middle_blk_num: 1, "
         "dec_blk_nums: [1, 1]}\nblocks:\n  all: {norm: [layernorm, batchnorm], "
         "attention: [sca, none], kernel: 3, dw_expand: 2, ffn_expand: 2, keep: [true, false]}\n")
COLUMNS = [f"{m}_sigma{s}" for s in (15, 25, 50) for m in ("psnr", "ssim")]


def _run_dir(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A train-phase folder with real (untrained) checkpoints: the reference and a small network
    (scaled) and one searched network; their quality files are written, not evaluated (only
    latency is under test here)."""
    from ernas import build_model
    from ernas.space import find_space

    space_yaml = tmp_path / "tiny_passes.yaml"
    space_yaml.write_text(SPACE)
    space = find_space(str(space_yaml))
    out = tmp_path / "run"
    nets = []
    for i, (name, arch, series) in enumerate([("ref", space.reference(), "scaled"),
                                              ("small", space.sample(3), "scaled"),
                                              ("s1", space.sample(7), "searched")]):
        (out / "archs").mkdir(parents=True, exist_ok=True)
        arch.save(out / "archs" / f"{name}.yaml")
        run = out / "runs" / name / "seed0"
        (run / "eval").mkdir(parents=True)
        arch.save(run / "arch.yaml")
        torch.manual_seed(i)
        torch.save({"model": build_model(arch).state_dict()}, run / "best.pt")
        (run / "summary.json").write_text(json.dumps({"best_val_psnr": 30.0, "seconds": 1.0}))
        (run / "eval" / "summary.json").write_text(json.dumps({"columns": COLUMNS, "models": [
            {"params": 1000 * (3 - i), "macs": 10 ** 6, **{c: 30.0 - 0.01 * i for c in COLUMNS}}]}))
        pd.DataFrame({"set": ["sigma25"], "name": ["color-x"], "psnr": [30.0]}).to_csv(
            run / "eval" / "per_image.csv", index=False)
        nets.append({"name": name, "series": series, "reference": name == "ref", "init": "scratch",
                     "arch": str(out / "archs" / f"{name}.yaml")})
    (out / "networks.json").write_text(json.dumps({"networks": nets}))
    (out / "config.json").write_text(json.dumps({
        "seeds": [0], "steps": 10, "crop": 32, "batch": 2, "tile": 32, "threads": 1,
        "search_steps": 4, "input_shape": [1, 3, 32, 32], "space": str(space_yaml),
        "overrides": [], "command": "train tiny"}))
    return out, nets


def _measure(out: Path, passes: int, tmp_path: Path) -> None:
    over = ["input_shape=[1,3,32,32]", "latency.measure.rounds=2", "latency.measure.per_round=1",
            "latency.measure.warmup=1", "latency.measure.min_seconds=0",
            f"latency.cache_dir={tmp_path / 'cache'}"]
    pp.measure_phase(SimpleNamespace(out=str(out), threads=None, overrides=over, passes=passes))


def test_passes_profile_fresh_tables_and_are_combined(tmp_path, capsys):
    """Fails if a pass resumes a table an earlier measure left (its predictions would be that
    machine state's: here 1000x), if the combined figures are not the passes' medians and
    pooled rounds, or if the report does not judge the goals per pass."""
    from ernas.latency.table import LatencyTable

    out, nets = _run_dir(tmp_path)
    _measure(out, 1, tmp_path)
    one = json.loads((out / "latency.json").read_text())
    assert "passes" not in one and len(one["networks"]["ref"]["round_ms"]) == 2
    # a stale table where pass 1 of the next measure writes its own
    LatencyTable.load(out / "plot_table.csv").scaled(1000.0).save(out / "plot_table_pass1.csv")
    _measure(out, 2, tmp_path)
    lat = json.loads((out / "latency.json").read_text())
    p1, p2 = lat["passes"]
    assert p1["ref"]["predicted_ms"] < 5 * p2["ref"]["predicted_ms"]       # not the stale table
    for name in ("ref", "small", "s1"):
        c = lat["networks"][name]
        assert c["measured_ms"] == pytest.approx(np.median([p1[name]["measured_ms"],
                                                            p2[name]["measured_ms"]]))
        assert c["predicted_ms"] == pytest.approx(np.median([p1[name]["predicted_ms"],
                                                             p2[name]["predicted_ms"]]))
        assert c["round_ms"] == p1[name]["round_ms"] + p2[name]["round_ms"]
        assert c["pass_ms"] == [p1[name]["measured_ms"], p2[name]["measured_ms"]]
        assert c["tables"] == [str(out / "plot_table_pass1.csv"), str(out / "plot_table_pass2.csv")]
    printed = capsys.readouterr().out
    assert "each pass alone:" in printed and "of 2]" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["goals_passes_met"]["passes"] == 2
    s1 = next(n for n in summary["networks"] if n["network"] == "s1")
    assert len(s1["speedup_per_pass"]) == 2


def test_each_pass_is_judged_alone(tmp_path):
    """A network 2.5x faster than the reference in one pass and 1.5x in the other meets the ≥2x
    goal in 1 of 2 passes; its per-pass speed-ups are the paired ones of each pass. Fails if the
    passes are pooled before judging, or counted wrongly."""
    out, nets = _run_dir(tmp_path)

    def rec(ms):
        return {"measured_ms": ms, "measured_spread": 0.0, "predicted_ms": ms,
                "round_ms": [ms, ms]}

    passes = [{"ref": rec(100.0), "small": rec(60.0), "s1": rec(40.0)},
              {"ref": rec(100.0), "small": rec(60.0), "s1": rec(100 / 1.5)}]
    agg = pd.DataFrame({"network": ["ref", "small", "s1"],
                        "series": ["scaled", "scaled", "searched"],
                        "reference": [True, False, False], "psnr": [30.0, 29.0, 29.99],
                        **{c: 0.0 for c in pp.LATENCY_COLUMNS}})
    res = pp.per_pass(agg, nets, passes)
    assert res["n"] == 2
    assert res["goals"]["searched_speedup"] == 1
    assert res["speedups"]["s1"] == pytest.approx([2.5, 1.5])
    assert res["goals"]["agreement"] == 2           # predicted = measured in both


def test_session_variance_times_every_session_of_every_network(tmp_path):
    """``benchmarks/session_variance.py`` on two real runs: one line per network with as many
    session figures as asked and a max/min ≥ 1. Fails if the script cannot load a retrain run
    or drops sessions."""
    import re
    import subprocess

    out, _ = _run_dir(tmp_path)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "session_variance.py"
    r = subprocess.run([sys.executable, str(script), str(out / "runs" / "ref" / "seed0"),
                        str(out / "runs" / "s1" / "seed0"), "--sessions", "3", "--size", "32",
                        "--rounds", "2", "--threads", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines() if "max/min" in ln}
    assert set(lines) == {"ref", "s1"}
    for ln in lines.values():
        assert float(re.search(r"max/min ([0-9.]+)", ln)[1]) >= 1.0
        assert len(re.findall(r"[0-9.]+ \([0-9.]+\)", ln)) == 3
