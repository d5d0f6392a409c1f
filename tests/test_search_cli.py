"""ernas-search end to end through the CLI on the tiny space, including a kill and a resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ernas
from ernas.latency.table import LatencyTable
from ernas.paths import SEARCH_SPACES

BASE = ["input_shape=[1,3,32,32]", "latency.backend.threads=1", "latency.measure.rounds=2",
        "latency.measure.per_round=1", "latency.measure.min_seconds=0", "search.crop=16",
        "task.max_side=128", "search.batch_size=2",
        "search.warmup_steps=4", "search.log_every=2", "search.checkpoint_every=3",
        "search.device=cpu", "progress=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _search(tmp_path, cache, run, *extra, check=True):
    args = [sys.executable, "-m", "ernas.cli.search", *BASE, f"latency.cache_dir={cache}",
            f"hydra.run.dir={tmp_path / run}", *extra]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_search_cli_writes_all_outputs(tmp_path, cache):
    """Every output, from a hinge search whose target is never reached: the CLI says so (the
    default additive searches of the tests below must not print that note). With
    latency.anchor=true its predictions are the line through the two networks it timed, and the
    run's copy of the table keeps that line."""
    # the anchors are timed over 8 rounds (p20): with BASE's 2, one disturbed call on a busy
    # machine could invert the tiny networks' order and the anchor is (rightly) refused
    r = _search(tmp_path, cache, "a", "search.steps=10", "search.latency_form=hinge",
                "search.target_ms=1000000", "latency.anchor=true", "latency.measure.rounds=8")
    out = tmp_path / "a"
    for f in ("arch.yaml", "alphas.csv", "log.csv", "probs.png", "curves.png", "checkpoint.pt",
              "summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    for k in ("predicted_latency_ms", "baseline_latency_ms", "params", "baseline_params", "macs",
              "supernet_val_psnr", "decisiveness", "search_seconds"):
        assert k in s
    arch = ernas.load_arch(out / "arch.yaml")
    assert ernas.load_space(SEARCH_SPACES / "nafnet_tiny.yaml").contains(arch)
    assert "predicted latency" in r.stdout and "baseline" in r.stdout
    assert s["latency_active_fraction"] == 0.0
    assert "hinge target 1000000.00 ms never bound" in r.stdout and "λ=0" in r.stdout
    anchor = s["table_probe"]["anchor"]
    assert anchor["networks"]["smallest"] and "latency.anchor:" in r.stdout
    copy = LatencyTable.load(out / "latency_table.csv")
    assert copy.metadata["correction"]["anchored"]["measured_ms"] == anchor["measured_ms"]
    keys = arch.op_keys((1, 3, 32, 32), "block")
    assert s["predicted_latency_ms"] == pytest.approx(
        anchor["scale"] * copy.lookup(keys).sum() + anchor["offset_ms"])
    # evaluating the search run predicts from its own table and line, as the search did
    ev = subprocess.run([sys.executable, "-m", "ernas.cli.evaluate", f"checkpoint={out}",
                         *BASE[:5], "task.max_side=128", "progress=false", "memory_runs=0",
                         f"latency.cache_dir={cache}",
                         f"hydra.run.dir={tmp_path / 'ev'}"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    e = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert e["latency_tables"][e["name"]] == str(out / "latency_table.csv")
    assert e["predicted_ms"] == pytest.approx(s["predicted_latency_ms"])
    assert "search's own table" in ev.stdout and "kept the anchoring" in ev.stdout


def test_killed_search_resumes_to_the_same_arch(tmp_path, cache):
    steps = ["search.steps=40"]
    r = _search(tmp_path, cache, "full", *steps)
    assert "never bound" not in r.stdout  # additive λ 0.5: the latency term acts
    # the killed run starts from the full run's table (a busy machine can fail a probe and
    # re-profile, which would change the objective); the resume must then keep that table
    first = tmp_path / "full" / "latency_table.csv"
    args = [sys.executable, "-m", "ernas.cli.search", *BASE, *steps, f"latency.cache_dir={cache}",
            f"latency.table={first}", "latency.trust_table=true",
            f"hydra.run.dir={tmp_path / 'killed'}"]
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run ended before the kill"
    # a run made before a setting existed resumes, the setting taking its current value
    saved = tmp_path / "killed" / ".hydra" / "config.yaml"
    text = saved.read_text()
    saved.write_text("".join(ln for ln in text.splitlines(True) if "anchor_samples" not in ln))
    assert "anchor_samples" in text and "anchor_samples" not in saved.read_text()
    empty = tmp_path / "empty_cache"  # cache_dir may change on resume; nothing is profiled there
    r = _search(tmp_path, empty, "resumed", *steps, f"resume={tmp_path / 'killed'}")
    assert "resuming with the latency table the run started with" in r.stdout
    assert "added to ernas since this run take their current values: " \
           "latency.anchor_samples=4" in r.stderr
    assert not list(empty.glob("*.csv"))
    s = json.loads((tmp_path / "killed/summary.json").read_text())
    assert s["latency_table"] == str(first) and s["table_probe"]["action"] == "resumed"
    assert (tmp_path / "killed/arch.yaml").read_text() == (tmp_path / "full/arch.yaml").read_text()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, cache):
    r = _search(tmp_path, cache, "x", "search.steps=2", f"resume={tmp_path / 'nothing'}",
                check=False)
    assert r.returncode == 2 and "checkpoint.pt" in r.stderr and "Traceback" not in r.stderr


def test_two_process_ddp_search_derives_the_same_arch_on_both_ranks(tmp_path, cache):
    _search(tmp_path, cache, "warm", "search.steps=5")  # profile the table once
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29533", "-m", "ernas.cli.search", *BASE, "search.steps=12",
            f"latency.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'ddp'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    digests = sorted(line.split()[-1] for line in r.stdout.splitlines()
                     if "derived architecture" in line and line.startswith("rank"))
    assert len(digests) == 2 and digests[0] == digests[1]
    s = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert s["world_size"] == 2 and s["ranks_agree"] is True
    assert ernas.load_arch(tmp_path / "ddp/arch.yaml")
