"""Export: ONNX parity with BatchNorm and skipped blocks, int8 static quantisation, QAT."""
import json
import subprocess
import sys

import onnx
import pytest
import torch

from ernas.data import bundled_images
from ernas.export import (FakeQuant, QuantConv2d, export_model, export_qat, prepare_qat,
                          qat_finetune, quantize_int8)
from ernas.families.nafnet import official_arch
from ernas.latency.backends import MeasureBudget
from ernas.train import TrainConfig, load_model, retrain

TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
BUDGET = MeasureBudget(warmup=1, min_repeats=3, max_repeats=10, time_cap_s=0.3)
SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained tiny arch with BatchNorm blocks, a skipped block and kernel 5."""
    torch.set_num_threads(1)
    arch = official_arch(**TINY, name="tiny_bn_skip")
    arch.values["encoders.0.0"].update(norm="batchnorm", kernel=5)
    arch.values["decoders.1.0"]["norm"] = "batchnorm"
    arch.values["encoders.1.0"]["keep"] = False
    out = tmp_path_factory.mktemp("run")
    retrain(arch, out, TrainConfig(steps=60, batch_size=4, crop=48, val_every=60, val_crop=64,
                                   max_side=256), progress=False)
    return arch, out


def test_parity_without_batchnorm_or_skipped_nodes(tmp_path, trained):
    arch, run = trained
    model = load_model(arch, run / "best.pt")
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and float(bn[0].running_var.sub(1).abs().max()) > 1e-3  # real BN statistics
    s = export_model(arch, run / "best.pt", tmp_path, input_shape=SHAPE, threads=1)
    g = onnx.load(s["onnx"])
    ops = {n.op_type for n in g.graph.node}
    assert "BatchNormalization" not in ops and s["batchnorm_nodes"] == 0
    assert not any("encoders.1.0" in n.name for n in g.graph.node)
    assert s["skipped_blocks"] == ["encoders.1.0"] and s["skipped_block_nodes"] == 0
    assert s["max_abs_diff"] <= 1e-4 and s["parity_ok"]
    # the input module is not modified by the export (fuse works on a copy)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_dynamic_hw_parity_at_two_sizes(tmp_path, trained):
    arch, run = trained
    s = export_model(arch, run, tmp_path, input_shape=(1, 3, 32, 48), dynamic_hw=True,
                     threads=1)
    assert s["max_abs_diff"] <= 1e-4 and s["max_abs_diff_other_size"] <= 1e-4


def test_int8_static_quantisation(tmp_path, trained):
    arch, run = trained
    s = export_model(arch, run, tmp_path, input_shape=SHAPE, threads=1)
    q = quantize_int8(s["onnx"], bundled_images("train", max_side=256), tmp_path / "int8.onnx",
                      n_calibration=8, threads=1, budget=BUDGET)
    ops = [n.op_type for n in onnx.load(q["int8_onnx"]).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert q["quantize_linear_nodes"] == ops.count("QuantizeLinear")
    assert q["psnr_fp32"] > 20 and abs(q["psnr_delta"]) < 1.5
    assert q["fp32_ms"] > 0 and q["int8_ms"] > 0
    assert not list(tmp_path.glob("*_pre.onnx")) and not list(tmp_path.glob("augmented*"))


def test_fake_quant_grids():
    fq = FakeQuant()
    x = torch.linspace(-1, 3, 101)
    assert torch.equal(fq(x), x)  # calibrate: observe only
    assert float(fq.lo) == -1 and float(fq.hi) == 3
    fq.freeze()
    s, z = 4.0 / 255, round(1 / (4.0 / 255))
    assert torch.allclose(fq(x), (torch.round(x / s) + z).clamp(0, 255).sub(z) * s, atol=1e-6)
    assert float(fq(10 * x).max()) == pytest.approx((255 - z) * s)  # clamped at the range
    conv = QuantConv2d(torch.nn.Conv2d(2, 4, 3, padding=1))
    conv.freeze()
    w = conv.conv.weight.detach()
    assert torch.allclose(conv.w_scale, w.abs().amax(dim=(1, 2, 3)) / 127)


def test_qat_finetune_exports_qdq(tmp_path, trained):
    arch, run = trained
    model = load_model(arch, run / "best.pt")
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.fuse().modules())
    assert sum(isinstance(m, QuantConv2d) for m in prepare_qat(model).modules()) == n_convs
    fp32 = export_model(arch, run, tmp_path, input_shape=SHAPE, threads=1)
    q = qat_finetune(model, steps=5, batch_size=2, crop=32, calibration_batches=2)
    r = export_qat(q, tmp_path / "qat.onnx", SHAPE, threads=1, budget=BUDGET)
    ops = [n.op_type for n in onnx.load(r["qat_onnx"]).graph.node]
    assert r["qat_quantize_linear_nodes"] == ops.count("QuantizeLinear") >= 2 * n_convs
    # onnxruntime fuses every DQ -> Conv -> Q group into an int8 QLinearConv
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "qat_opt.onnx")
    ort.InferenceSession(r["qat_onnx"], so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(tmp_path / "qat_opt.onnx").graph.node]
    assert fused.count("QLinearConv") == n_convs and "Conv" not in fused
    from ernas.export import onnx_psnr, test_crops
    fp32_psnr = onnx_psnr(fp32["onnx"], test_crops(SHAPE[2:]), threads=1)
    assert abs(r["psnr_qat"] - fp32_psnr) < 2.0 and r["qat_ms"] > 0


def test_cli_export_fp32_int8_and_qat(tmp_path, trained):
    _, run = trained
    r = subprocess.run([sys.executable, "-m", "ernas.cli.export", f"checkpoint={run}",
                        f"hydra.run.dir={tmp_path / 'ex'}", "input_shape=[1,3,64,64]", "threads=1",
                        "calibration.crops=4", "qat.steps=3", "qat.batch_size=2", "qat.crop=32",
                        "qat.calibration_batches=1", "budget.time_cap_s=0.2",
                        "budget.min_repeats=3", "progress=false"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert s["arch"] == "tiny_bn_skip" and s["max_abs_diff"] <= 1e-4
    for k in ("psnr_fp32", "psnr_int8", "int8_ms", "fp32_ms", "psnr_qat", "qat_ms",
              "qat_psnr_delta", "psnr_qat_int8", "qat_int8_ms"):
        assert k in s, k
    for f in ("model.onnx", "model_int8.onnx", "model_qat.onnx", "model_qat_int8.onnx",
              "arch.yaml"):
        assert (tmp_path / "ex" / f).is_file(), f
