"""Family unet: classic counts by hand, extraction = one-hot supernet, BN folding, ONNX parity,
op keys = what the model runs, E[LAT] = Monte Carlo mean, skipped blocks, geometry errors."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ernas import ErnasError, build_model, load_arch, load_space
from ernas.complexity import count_macs, count_params
from ernas.families.unet.model import make_up, mid_channels
from ernas.families.unet.super import MixedConv
from ernas.latency.ops import build_op, parse_key
from ernas.latency.predict import ExpectedLatency, predict_ms
from ernas.latency.table import LatencyTable
from ernas.paths import SEARCH_SPACES
from ernas.space import Arch, arch_of, space_from_dict
from ernas.supernet import SuperNet

CLASSIC = {"conv": "standard", "kernel": 3, "width_mult": 1.0, "attention": "none",
           "norm": "batchnorm", "keep": True}


@pytest.fixture(scope="module")
def tiny():
    return load_space(SEARCH_SPACES / "unet_tiny.yaml")


def classic(in_channels, num_classes, width, levels=4, norm="batchnorm", up="transpose"):
    g = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
         "enc_blk_nums": [1] * levels, "middle_blk_num": 1, "dec_blk_nums": [1] * levels,
         "up": up}
    return arch_of(space_from_dict({"family": "unet", "geometry": g,
                                    "blocks": {"all": {**CLASSIC, "norm": norm}}}))


def hand_params(cin, ncls, w, levels=4, bn=True, up="transpose"):
    """Classic U-Net parameters: double 3x3 convs (BN: no bias, γ and β per conv; else bias),
    2x2 transposed convs (or 1x1 convs for bilinear up) with bias, 1x1 head with bias."""
    def double(ci, co):
        return 9 * ci * co + 9 * co * co + (4 if bn else 2) * co

    taps = 4 if up == "transpose" else 1
    c = [w * 2 ** lv for lv in range(levels + 1)]
    enc = double(cin, c[0]) + sum(double(c[lv - 1], c[lv]) for lv in range(1, levels + 1))
    dec = sum(taps * c[lv + 1] * c[lv] + c[lv] + double(2 * c[lv], c[lv]) for lv in range(levels))
    return enc + dec + c[0] * ncls + ncls


def hand_macs(cin, ncls, w, h, wd, levels=4, up="transpose"):
    """Classic U-Net MACs at an input h x wd: 9·c_in·c_out per output pixel of each 3x3 conv;
    per input pixel of an up-sampling, c_in·c_out·4 (2x2 transposed conv) or c_in·c_out (1x1
    conv before the bilinear x2); c_0·classes per pixel for the head."""
    taps = 4 if up == "transpose" else 1
    c = [w * 2 ** lv for lv in range(levels + 1)]
    px = [(h >> lv) * (wd >> lv) for lv in range(levels + 1)]
    enc = 9 * px[0] * (cin * c[0] + c[0] * c[0]) + sum(
        9 * px[lv] * (c[lv - 1] * c[lv] + c[lv] * c[lv]) for lv in range(1, levels + 1))
    dec = sum(px[lv + 1] * c[lv + 1] * taps * c[lv]
              + 9 * px[lv] * (2 * c[lv] * c[lv] + c[lv] ** 2) for lv in range(levels))
    return enc + dec + px[0] * c[0] * ncls


def test_classic_counts_equal_the_hand_formulas():
    shipped = load_arch(SEARCH_SPACES / "archs" / "unet_classic.yaml")
    assert count_params(build_model(shipped)) == hand_params(1, 3, 64) == 31_036_611
    # the figure usually quoted for the BN U-Net (3 input channels, 3 classes)
    assert count_params(build_model(classic(3, 3, 64))) == hand_params(3, 3, 64) == 31_037_763
    # Ronneberger's configuration without BN (1 channel, 2 classes, convs with bias)
    assert count_params(build_model(classic(1, 2, 64, norm="none"))) == \
        hand_params(1, 2, 64, bn=False) == 31_030_658
    assert count_macs(build_model(shipped), (1, 1, 96, 80)) == hand_macs(1, 3, 64, 96, 80)
    demo = load_arch(SEARCH_SPACES / "archs" / "unet_demo_classic.yaml")
    space = load_space(SEARCH_SPACES / "unet_demo.yaml")
    assert (demo.geometry, demo.values) == (space.geometry, space.reference().values)
    assert count_params(build_model(demo)) == hand_params(1, 3, 16, up="bilinear") == 1_811_763
    assert count_macs(build_model(demo), (1, 1, 96, 80)) == \
        hand_macs(1, 3, 16, 96, 80, up="bilinear") == 341_606_400


def test_bilinear_up_runs_its_conv_before_the_upsampling_with_the_same_result():
    torch.manual_seed(0)
    up = make_up("bilinear", 8, 4)
    conv, upsample = up
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(up(x), conv(upsample(x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(32, 32), (37, 50), (3, 5)])
def test_any_input_size_gives_logits_of_that_size(tiny, hw):
    model = build_model(tiny.reference()).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, *hw)).shape == (2, 3, *hw)


def _archs(space):
    """Random archs plus hand-picked ones: every type, kernel, width, norm and attention, and
    the extra blocks skipped and kept."""
    archs = [space.sample(s) for s in range(5)]
    for conv, k, wm, att, norm, keep in (("dwsep", 5, 0.5, "se", "batchnorm", False),
                                         ("standard", 5, 0.5, "se", "none", True),
                                         ("dwsep", 3, 1.0, "none", "none", True)):
        a = space.reference()
        for p in space.positions:
            a.values[p] = {"conv": conv, "kernel": k, "width_mult": wm, "attention": att,
                           "norm": norm, "keep": keep or p.endswith(".0")}
        archs.append(a)
    return archs


def _trained(space):
    """A supernet after a few steps (non-trivial BN statistics and weights)."""
    torch.manual_seed(0)
    net = SuperNet(space)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.rand(2, 1, 16, 16)
        loss = F.cross_entropy(net(x), torch.randint(0, 3, (2, 16, 16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_extract_equals_onehot_supernet(tiny):
    net = _trained(tiny)
    x = torch.rand(2, 1, 20, 24)
    outputs = []
    for arch in _archs(tiny):
        net.set_onehot(arch)
        with torch.no_grad():
            y = net(x)
            model = net.extract(arch).eval()
            ref = build_model(arch)
            assert [(n, t.shape) for n, t in model.state_dict().items()] == \
                   [(n, t.shape) for n, t in ref.state_dict().items()]
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        outputs.append(y)
    net.set_onehot(None)
    assert not torch.allclose(outputs[0], outputs[-1])


def test_one_conv_with_mixed_weight_equals_the_branch_mix():
    torch.manual_seed(0)
    conv = MixedConv(6, 5, ("dwsep", "standard"), (3, 5), bias=False)
    x = torch.randn(2, 6, 9, 9)
    pt, pk = torch.tensor([0.3, 0.7]), torch.tensor([0.6, 0.4])
    one = torch.eye(2)
    mix = sum(pt[i] * pk[j] * conv(x, one[i], one[j]) for i in range(2) for j in range(2))
    torch.testing.assert_close(conv(x, pt, pk), mix, rtol=0, atol=1e-5)
    sep = F.conv2d(F.conv2d(x, conv.dw, padding=2, groups=6), conv.pw)  # dw then pw, kernel 5
    torch.testing.assert_close(conv(x, one[0], one[1]), sep, rtol=0, atol=1e-5)


def test_fuse_folds_batchnorm_and_keeps_outputs(tiny):
    torch.manual_seed(1)
    for arch in _archs(tiny)[:4] + [tiny.reference()]:
        model = build_model(arch)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
        model.eval()
        x = torch.rand(1, 1, 24, 16)
        with torch.no_grad():
            y = model(x)
            model.fuse()
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_onnx_export_of_an_extracted_network_matches_torch(tiny, tmp_path):
    import onnxruntime as ort

    from ernas.latency.onnx_export import export_onnx

    net = _trained(tiny)
    arch = _archs(tiny)[5]  # dwsep, kernel 5, SE, batchnorm, extra blocks skipped
    model = net.extract(arch).eval().fuse()
    x = torch.rand(1, 1, 40, 24)
    path = export_onnx(model, x, tmp_path / "m.onnx", opset=17)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=1e-4)


def _ran(model, arch):
    """(op, input shape, output shape) of every op key's part, recorded from a real forward."""
    g, runs = arch.geometry, []

    def record(op):
        return lambda m, i, o: runs.append((op, tuple(i[0].shape), tuple(o.shape)))

    hooks = [model.get_submodule(p).register_forward_hook(record("unet_block"))
             for p in arch.positions if arch.values[p]["keep"]]
    hooks.append(model.pool.register_forward_hook(record("unet_pool")))
    hooks += [up.register_forward_hook(record("unet_up")) for up in model.ups]
    hooks.append(model.head.register_forward_hook(record("conv2d")))
    levels = len(g["enc_blk_nums"])
    for k, dec in enumerate(model.decoders):  # concat(skip, up): skip = the encoder's output
        skip_c = g["width"] * 2 ** (levels - 1 - k)
        hooks.append(dec.register_forward_pre_hook(
            lambda m, i, c=skip_c: runs.append(
                ("unet_concat", (i[0].shape[0], c, *i[0].shape[2:]), tuple(i[0].shape)))))
    return runs, hooks


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_op_keys_are_what_the_model_runs(tiny, up):
    shape = (1, 1, 32, 48)
    for arch in _archs(tiny)[::2]:
        arch = Arch("unet", {**arch.geometry, "up": up}, arch.values)
        model = build_model(arch).eval().fuse()
        runs, hooks = _ran(model, arch)
        with torch.no_grad():
            model(torch.rand(*shape))
        for h in hooks:
            h.remove()
        keys = arch.op_keys(shape, "block")
        from_keys, macs, params = [], 0, 0
        for key in keys:
            op, x = build_op(key)
            with torch.no_grad():
                from_keys.append((parse_key(key).op, tuple(x.shape), tuple(op(x).shape)))
            macs += count_macs(op, tuple(x.shape))
            params += count_params(op)
        assert sorted(from_keys) == sorted(runs)
        assert macs == count_macs(model, shape)
        assert params == count_params(model)
        op_macs = sum(count_macs(op, tuple(x.shape))
                      for op, x in map(build_op, arch.op_keys(shape, "op")))
        assert op_macs == macs


def test_keys_hold_the_cost_decisions_but_not_folded_norm(tiny):
    arch = tiny.reference()
    p = "encoders.1.0"
    key = tiny.position_keys(p, arch.values[p], (1, 1, 32, 32))
    assert key == ["unet_block[att=none,conv=standard,cout=8,k=3,mid=8]@1x4x16x16:float32"]
    other = dict(arch.values[p], norm="none")
    assert tiny.position_keys(p, other, (1, 1, 32, 32)) == key
    other = dict(arch.values[p], width_mult=0.5, conv="dwsep", kernel=5, attention="se")
    assert tiny.position_keys(p, other, (1, 1, 32, 32)) == \
        ["unet_block[att=se,conv=dwsep,cout=8,k=5,mid=4]@1x4x16x16:float32"]
    skipped = dict(arch.values[p], keep=False)
    assert tiny.position_keys("encoders.1.1", skipped, (1, 1, 32, 32)) == []


def synthetic_table(space, shape) -> LatencyTable:
    """A made-up (not profiled) table covering every op key of ``space``."""
    table = LatencyTable(metadata={"input_shape": list(shape), "granularity": "block",
                                   "backend": "synthetic", "note": "synthetic test numbers"})
    for key in space.op_keys(shape, "block"):
        k = parse_key(key)
        a, (_, c, h, w) = k.attr, k.shape
        ms = c * h * w * 1e-4
        if k.op == "unet_block":
            ms *= (1 + int(a["k"]) ** 2 / 9 * (3 if a["conv"] == "standard" else 0.5)
                   * int(a["mid"]) / int(a["cout"]) + 0.4 * (a["att"] == "se"))
        table.add(key, [ms])
    return table


def test_expected_latency_equals_monte_carlo_mean(tiny):
    shape = (1, 1, 32, 32)
    table = synthetic_table(tiny, shape)
    expected = ExpectedLatency(tiny, table, shape, "block")
    g = torch.Generator().manual_seed(0)
    probs = {p: {d: torch.softmax(2 * torch.randn(len(c), generator=g), 0)
                 for d, c in tiny.choices[p].items()} for p in tiny.searchable}
    rng = random.Random(0)
    samples = []
    for _ in range(1500):
        values = {p: {d: rng.choices(c, weights=probs[p][d].tolist())[0] if p in probs else c[0]
                      for d, c in tiny.choices[p].items()} for p in tiny.positions}
        samples.append(predict_ms(table, Arch("unet", tiny.geometry, values), shape, "block"))
    mean, se = np.mean(samples), np.std(samples) / np.sqrt(len(samples))
    assert se > 0
    assert abs(float(expected(probs)) - mean) < 4 * se
    arch = tiny.sample(3)
    assert expected.of_arch(arch) == pytest.approx(predict_ms(table, arch, shape, "block"))


def test_skipped_blocks_leave_no_parameters(tiny):
    kept = tiny.reference()
    skipped = tiny.reference()
    extra = ["encoders.1.1", "middle.1", "decoders.0.1"]
    for p in extra:
        skipped.values[p]["keep"] = False
    names = build_model(skipped).state_dict()
    assert not [n for n in names if n.startswith(tuple(p + "." for p in extra))]
    full = build_model(kept)
    assert count_params(full) - count_params(build_model(skipped)) == sum(
        count_params(full.get_submodule(p)) for p in extra)
    shape = (1, 1, 32, 32)
    removed = [k for p in extra for k in tiny.position_keys(p, kept.values[p], shape)]
    remaining = list(kept.op_keys(shape))
    for k in removed:
        remaining.remove(k)
    assert sorted(skipped.op_keys(shape)) == sorted(remaining)
    assert len(removed) == 3


def test_first_blocks_cannot_be_skipped(tiny, tmp_path):
    arch = tiny.reference()
    arch.values["encoders.1.0"]["keep"] = False
    with pytest.raises(ErnasError, match="encoders.1.0.*cannot be skipped.*encoders.1.1"):
        build_model(arch)
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: unet\ngeometry: {width: 4, enc_blk_nums: [1, 1], "
                   "dec_blk_nums: [1, 1]}\nblocks:\n  all: {keep: [true, false]}\n")
    with pytest.raises(ErnasError, match="first block .* cannot be skipped"):
        SuperNet(load_space(bad))


@pytest.mark.parametrize("geometry, match", [
    ({"up": "nearest"}, "'up' must be one of transpose, bilinear"),
    ({"enc_blk_nums": [1, 1], "dec_blk_nums": [1]}, "'dec_blk_nums' must have as many levels"),
    ({"enc_blk_nums": [1, 0]}, "'enc_blk_nums' must be a non-empty list of positive"),
    ({"width": 0}, "'width' must be a positive integer"),
])
def test_bad_geometry_names_the_field(tmp_path, geometry, match):
    with pytest.raises(ErnasError, match=match):
        space_from_dict({"family": "unet", "geometry": geometry}, "x.yaml")


def test_demo_space_and_widths(tiny):
    demo = load_space(SEARCH_SPACES / "unet_demo.yaml")
    assert len(demo.positions) == 9 and demo.searchable == demo.positions
    assert demo.size() == 64 ** 9  # 2 conv x 2 kernel x 4 widths x 2 attention x 2 norm
    assert demo.geometry["up"] == "bilinear"
    assert demo.smallest().values["middle.0"] == {
        "conv": "dwsep", "kernel": 3, "width_mult": 0.25, "attention": "none", "norm": "none",
        "keep": True}
    assert [mid_channels(w, 16) for w in (0.25, 0.5, 0.75, 1.0)] == [4, 8, 12, 16]
    assert mid_channels(0.25, 4) == 1 and mid_channels(0.25, 6) == 2
    assert tiny.size() == 32 ** 5 * 33 ** 3  # three extra blocks: 32 kept choices + skipped
