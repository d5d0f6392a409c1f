"""``benchmarks/session_variance.py``: several onnxruntime sessions of one ONNX file per network,
timed interleaved. Real (untrained) retrain-style run folders, a 32x32 input, two rounds."""
import re
import subprocess
import sys
from pathlib import Path

import torch

from ernas import build_model, load_space

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "session_variance.py"
SPACE = ("family: nafnet\nname: tiny_sessions\n"
         "geometry: {img_channel: 3, width: 8, enc_blk_nums: [1, 1], middle_blk_num: 1, "
         "dec_blk_nums: [1, 1]}\nblocks:\n  all: {norm: [layernorm, batchnorm], "
         "attention: [sca, none], kernel: 3, dw_expand: 2, ffn_expand: 2, keep: [true, false]}\n")


def _retrain_run(folder: Path, arch, seed: int) -> Path:
    """A folder as ernas-retrain leaves it, as far as the script reads it: arch.yaml + best.pt."""
    run = folder / "seed0"
    run.mkdir(parents=True)
    arch.save(run / "arch.yaml")
    torch.manual_seed(seed)
    torch.save({"model": build_model(arch).state_dict()}, run / "best.pt")
    return run


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_every_session_of_every_network_is_timed(tmp_path):
    """One line per network (named after the folder above ``seed0``), with as many session
    figures as asked and a max/min ≥ 1. Fails if the script cannot load a retrain run, merges
    two networks or drops sessions."""
    space_yaml = tmp_path / "tiny_sessions.yaml"
    space_yaml.write_text(SPACE)
    space = load_space(space_yaml)
    ref = _retrain_run(tmp_path / "ref", space.reference(), 0)
    small = _retrain_run(tmp_path / "small", space.sample(7), 1)
    r = _script(ref, small, "--sessions", 3, "--size", 32, "--rounds", 2, "--threads", 1)
    assert r.returncode == 0, r.stderr
    lines = {ln.split(":")[0]: ln for ln in r.stdout.splitlines() if "max/min" in ln}
    assert set(lines) == {"ref", "small"}
    for ln in lines.values():
        assert float(re.search(r"max/min ([0-9.]+)", ln)[1]) >= 1.0
        assert len(re.findall(r"[0-9.]+ \([0-9.]+\)", ln)) == 3
