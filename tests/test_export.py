"""Export: ONNX parity with BatchNorm and skipped blocks, int8 static quantisation (7-bit
weights, the measured op types), QAT whose exported QDQ graph is the fine-tuned model and has the
PTQ default's coverage."""
import json
import math
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml

from ernas import build_model
from ernas.checkpoint import load_model
from ernas.export import export_model, onnx_quality, qat_finetune, quantize_int8
from ernas.errors import ErnasError
from ernas.latency.qdq import CONV_RULE, int8_conv
from ernas.export.qat import FakeQuant, QuantConv2d
from ernas.families.nafnet import official_arch
from ernas.latency.onnx_export import export_onnx
from ernas.task import make_task
from ernas.train import TrainConfig, retrain

TINY = dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])
TASK = make_task({"name": "denoise", "max_side": 256, "eval_sigmas": [25]})
EXPORT_DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" /
                                  "export.yaml").read_text())
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
    retrain(arch, out, TASK, TrainConfig(steps=60, batch_size=4, crop=48, val_every=60,
                                         val_crop=64), progress=False)
    return arch, out


def test_parity_without_batchnorm_or_skipped_nodes(tmp_path, trained):
    arch, run = trained
    model = load_model(arch, run / "best.pt")
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and float(bn[0].running_var.sub(1).abs().max()) > 1e-3  # real BN statistics
    s = export_model(arch, model, TASK, tmp_path, input_shape=SHAPE)
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
    s = export_model(arch, load_model(arch, run / "best.pt"), TASK, tmp_path,
                     input_shape=(1, 3, 32, 48), dynamic_hw=True)
    assert s["max_abs_diff"] <= 1e-4 and s["max_abs_diff_other_size"] <= 1e-4


def _optimised(path, tmp_path, name):
    """Op types of the graph onnxruntime runs (extended optimisation: QDQ fusion, no layout
    changes), and the graph itself."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / name)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = onnx.load(tmp_path / name).graph
    return [n.op_type for n in g.node], g


def _int8_weights(path) -> list:
    """The int8 weight initialisers of a QDQ graph (inputs of DequantizeLinear)."""
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    return [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear"
            and n.input[0] in inits and inits[n.input[0]].dtype.name == "int8"
            and inits[n.input[0]].ndim == 4]


def _float_layernorm(graph) -> bool:
    """The LayerNorm blocks' nodes (``.../norm1/...``, ``.../norm2/...``) exist and none of
    them runs quantised."""
    norm = [n.op_type for n in graph.node if "/norm" in n.name]
    return "ReduceMean" in norm and not [o for o in norm if o.startswith("QLinear")]


def test_int8_static_quantisation(tmp_path, trained):
    """Every conv quantised (conv_rule None): 7-bit weights, LayerNorm float, small PSNR loss."""
    arch, run = trained
    s = export_model(arch, load_model(arch, run / "best.pt"), TASK, tmp_path, input_shape=SHAPE)
    q = quantize_int8(s["onnx"], TASK, tmp_path / "int8.onnx", n_calibration=8,
                      op_types=["Conv"], conv_rule=None)
    ops = [n.op_type for n in onnx.load(q["int8_onnx"]).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert q["quantize_linear_nodes"] == ops.count("QuantizeLinear")
    weights = _int8_weights(q["int8_onnx"])
    assert weights and max(abs(int(w.min())) for w in weights) <= 64  # 7-bit (reduce_range)
    fused, g = _optimised(q["int8_onnx"], tmp_path, "int8_opt.onnx")
    assert fused.count("QLinearConv") == ops.count("Conv") and "Conv" not in fused
    assert _float_layernorm(g)
    fp32 = onnx_quality(s["onnx"], TASK, (64, 64))["psnr"]
    int8 = onnx_quality(q["int8_onnx"], TASK, (64, 64))["psnr"]
    assert fp32 > 20 and abs(int8 - fp32) < 0.5
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
    for reduce_range, qmax in ((True, 63), (False, 127)):
        conv = QuantConv2d(torch.nn.Conv2d(2, 4, 3, padding=1), reduce_range)
        conv.freeze()
        w = conv.conv.weight.detach()
        scale = w.abs().amax(dim=(1, 2, 3)) / qmax
        assert torch.allclose(conv.w_scale, scale)
        wq = torch.fake_quantize_per_channel_affine(w, conv.w_scale, conv.w_zero, 0, -128, 127)
        assert float((wq / scale.view(-1, 1, 1, 1)).abs().max()) == pytest.approx(qmax)


def _quantised_conv_shapes(path, tmp_path, name) -> list:
    """Sorted weight shapes of the convs onnxruntime runs as QLinearConv."""
    from onnx import numpy_helper

    _, g = _optimised(path, tmp_path, name)
    inits = {i.name: numpy_helper.to_array(i).shape for i in g.initializer}
    return sorted(tuple(inits[n.input[3]]) for n in g.node if n.op_type == "QLinearConv")


def test_conv_rule_and_qat_share_the_ptq_coverage(tmp_path):
    """The export default quantises exactly the convs with K = C_in/groups·k² >= 64 and
    C_out >= 16 (never a depthwise conv, nor the 3-channel stem/head), in PTQ and in QAT alike."""
    assert int8_conv(64, 64) and int8_conv(16, 144)
    assert not int8_conv(128, 9) and not int8_conv(16, 27) and not int8_conv(3, 144)
    assert not int8_conv(64, 32) and int8_conv(3, 27, None)
    with pytest.raises(ErnasError, match="min_depth"):
        int8_conv(16, 64, {"depth": 64})
    cal = EXPORT_DEFAULTS["calibration"]
    assert cal["conv_rule"] == CONV_RULE and cal["op_types"] == ["Conv"] and cal["reduce_range"]
    arch = official_arch(width=16, enc_blk_nums=[1, 1, 1], middle_blk_num=1,
                         dec_blk_nums=[1, 1, 1], name="w16")
    torch.manual_seed(0)
    model = build_model(arch).eval()
    want = sorted(tuple(m.weight.shape) for m in model.modules()
                  if isinstance(m, torch.nn.Conv2d)
                  and int8_conv(m.weight.shape[0], math.prod(m.weight.shape[1:])))
    assert len(want) >= 8 and all(w[1] > 1 for w in want)  # pointwise at 64+ channels, downs
    s = export_model(arch, model, TASK, tmp_path, input_shape=SHAPE)
    ptq = quantize_int8(s["onnx"], TASK, tmp_path / "int8.onnx", n_calibration=2,
                        op_types=cal["op_types"], reduce_range=cal["reduce_range"],
                        conv_rule=cal["conv_rule"])
    assert ptq["float_convs"] == s["op_types"]["Conv"] - len(want)
    assert _quantised_conv_shapes(ptq["int8_onnx"], tmp_path, "ptq_opt.onnx") == want
    q = qat_finetune(model, TASK, steps=0, batch_size=1, crop=32, calibration_batches=1)
    assert len([m for m in q.modules() if isinstance(m, QuantConv2d)]) == len(want)
    path = export_onnx(q, torch.zeros(SHAPE), tmp_path / "qat.onnx")
    assert _quantised_conv_shapes(path, tmp_path, "qat_opt.onnx") == want


def test_qat_export_is_the_fine_tuned_model(tmp_path, trained):
    """With every conv quantised (conv_rule None), the QDQ file exported from QAT runs, in
    onnxruntime, what the fake-quantised PyTorch model computes (its ranges, its grids),
    quantises each conv input once, and matches PTQ's coverage: every conv int8, LayerNorm
    float."""
    arch, run = trained
    model = load_model(arch, run / "best.pt")
    fused_model = load_model(arch, run / "best.pt").fuse()
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in fused_model.modules())
    kept = [p for p, v in arch.values.items() if not arch.spec.inactive(v)]
    q = qat_finetune(model, TASK, steps=5, batch_size=2, crop=32, calibration_batches=2,
                     conv_rule=None)
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == n_convs and all(m.frozen for m in convs)
    # direct conv -> conv edges share one quantiser: conv1 -> conv2 in each of the 4 kept
    # blocks, intro -> conv1 of encoders.0.0 (its BatchNorm is folded away) and downs.0 ->
    # downs.1 across the skipped encoders.1.0
    shared = sum(isinstance(m.q_in, torch.nn.Identity) for m in convs)
    assert len(kept) == 4 and shared == 6
    path = export_onnx(q, torch.zeros(SHAPE), tmp_path / "qat.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 3 * n_convs - shared  # inputs, outputs, weights
    qat_fused, g = _optimised(path, tmp_path, "qat_opt.onnx")
    assert qat_fused.count("QLinearConv") == n_convs and "Conv" not in qat_fused
    producer = {o: n.op_type for n in g.node for o in n.output}
    assert not [n for n in g.node if n.op_type == "QuantizeLinear"
                and producer.get(n.input[0]) == "DequantizeLinear"]  # no re-quantisation
    fp32 = export_model(arch, model, TASK, tmp_path, input_shape=SHAPE)
    ptq = quantize_int8(fp32["onnx"], TASK, tmp_path / "int8.onnx", n_calibration=4,
                        op_types=["Conv"], conv_rule=None)
    ptq_fused, ptq_g = _optimised(ptq["int8_onnx"], tmp_path, "int8_opt.onnx")
    assert ptq_fused.count("QLinearConv") == n_convs and "Conv" not in ptq_fused
    assert _float_layernorm(g) and _float_layernorm(ptq_g)
    # onnxruntime (the backend's session) computes the fake-quantised model
    from ernas.export.onnx import real_input, session

    x = real_input(TASK, SHAPE[2:])
    with torch.no_grad():
        want = q(x).numpy()
    got = session(path).run(None, {"input": x.numpy()})[0]
    # 8-bit weights (no reduce_range) on this non-VNNI CPU: ~44 dB apart, max 0.04
    assert -10 * math.log10(float(((got - want) ** 2).mean())) > 55
    assert abs(got - want).max() < 0.02
    fp32_psnr = onnx_quality(fp32["onnx"], TASK, (64, 64))["psnr"]
    assert abs(onnx_quality(path, TASK, (64, 64))["psnr"] - fp32_psnr) < 1.0


def test_cli_export_fp32_int8_and_qat(tmp_path, trained):
    _, run = trained
    r = subprocess.run([sys.executable, "-m", "ernas.cli.export", f"checkpoint={run}",
                        f"hydra.run.dir={tmp_path / 'ex'}", "input_shape=[1,3,64,64]", "threads=1",
                        "calibration.inputs=4", "qat.steps=3", "qat.batch_size=2", "qat.crop=32",
                        "qat.calibration_batches=1", "latency.backend.threads=1",
                        "latency.measure.rounds=2", "latency.measure.per_round=1",
                        "latency.measure.min_seconds=0", "task.eval_sigmas=[25]", "progress=false",
                        "memory_runs=1"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert s["arch"] == "tiny_bn_skip" and s["max_abs_diff"] <= 1e-4
    assert all(s[f"peak_mem_mib_{k}"] > 0 for k in ("fp32", "int8", "qat"))
    for k in ("psnr_fp32", "psnr_int8", "int8_ms", "fp32_ms", "psnr_qat", "qat_ms",
              "psnr_delta_qat", "psnr_delta_int8"):
        assert k in s, k
    assert s["psnr_delta_int8"] == pytest.approx(s["psnr_int8"] - s["psnr_fp32"])
    for f in ("model.onnx", "model_int8.onnx", "model_qat.onnx", "arch.yaml"):
        assert (tmp_path / "ex" / f).is_file(), f
    verdict = "faster" if s["int8_speedup"] >= 1 else "slower"
    assert f"x {verdict} than fp32" in r.stdout


def test_an_input_shape_whose_channels_do_not_fit_the_arch_is_refused():
    """Every export format prepares its model through ``deployable``: a 3-channel input for a
    1-channel U-Net is refused with the shape to give, before anything is exported."""
    import ernas
    from ernas.export.onnx import deployable

    arch = ernas.load_arch("unet_demo_searched")
    with pytest.raises(ErnasError, match=r"set input_shape=\[1,1,96,80\]"):
        deployable(arch, ernas.build_model(arch), [1, 3, 96, 80])
    model, shape = deployable(arch, ernas.build_model(arch).train(), [1, 1, 96, 80])
    assert shape == [1, 1, 96, 80] and not model.training
