"""benchmarks/activation_range.py: BatchNorm lets the gate's output grow with the square of the
input's scale, LayerNorm does not; overflow is found and reported; the CLI on real images."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ernas.checkpoint import load_model
from ernas.space import arch_of, space_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import activation_range as ar  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "activation_range.py"


def _arch(norm: str):
    return arch_of(space_from_dict({
        "family": "nafnet", "name": f"tiny_{norm}",
        "geometry": {"img_channel": 3, "width": 8, "enc_blk_nums": [1, 1],
                     "middle_blk_num": 1, "dec_blk_nums": [1, 1]},
        "blocks": {"all": {"norm": norm, "attention": "sca", "kernel": 3, "dw_expand": 2,
                           "ffn_expand": 2, "keep": True}}}))


def _photo(side=32) -> np.ndarray:
    from skimage import data
    return (data.astronaut()[100:100 + side, 200:200 + side] / 255.0).astype(np.float32)


def test_batchnorm_gates_grow_with_the_square_of_the_input_scale_layernorm_gates_do_not():
    torch.manual_seed(0)
    feat = torch.randn(1, 8, 16, 16)
    k = 8.0
    ratio = {}
    for norm in ("batchnorm", "layernorm"):
        block = load_model(_arch(norm)).eval().encoders[0][0]
        gate = []
        h = block.sg.register_forward_hook(lambda _m, _i, out: gate.append(out.abs().amax()))
        with torch.no_grad():
            block(feat), block(k * feat)
        h.remove()
        ratio[norm] = float(gate[2] / gate[0])          # the first gate, input k·feat / feat
    # x₁ ⊙ x₂ after a fixed affine norm scales ~k² (conv biases aside), after a per-sample
    # norm not at all
    assert ratio["batchnorm"] > 0.5 * k * k
    assert ratio["layernorm"] == pytest.approx(1.0, rel=1e-3)


def test_overflow_is_reported_as_above_fp16_and_non_finite():
    model = load_model(_arch("batchnorm"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.fill_(1.0)                          # the blocks' residual branches on
            elif ".norm" in name and name.endswith("weight"):
                p.fill_(1e3)                          # each BatchNorm amplifies 1000x
    res = ar.activation_range(model, [("a", _photo()), ("b", _photo())], sigma=25)
    assert res["peak"] == float("inf") and res["nonfinite"] == ["a", "b"]
    assert res["over_fp16"] == ["a", "b"]
    tame = ar.activation_range(load_model(_arch("layernorm")), [("a", _photo())], sigma=25)
    assert tame["nonfinite"] == [] and tame["over_fp16"] == [] and 0 < tame["peak"] < 1e3


def test_cli_on_a_run_folder_and_real_images(tmp_path):
    run = tmp_path / "run" / "seed0"
    run.mkdir(parents=True)
    arch = _arch("layernorm")
    arch.save(run / "arch.yaml")
    torch.save({"model": load_model(arch).state_dict()}, run / "best.pt")
    imgs = tmp_path / "tiles"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray((_photo(48 + 16 * i) * 255).astype(np.uint8)).save(imgs / f"t{i}.png")
    out = subprocess.run([sys.executable, str(SCRIPT), "--images", str(imgs), str(run)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2 images" in out.stdout
    assert "above fp16's 65504 on 0 images; non-finite output on 0" in out.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--images", str(imgs), str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a retrain run folder" in bad.stderr
