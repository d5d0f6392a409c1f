"""HRNet-lite family: model, super-blocks, op keys, expected latency and the CLI end to end."""
import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import ernas
from ernas.errors import ErnasError
from ernas.latency.factory import make_backend
from ernas.latency.onnx_export import export_onnx
from ernas.latency.ops import build_op
from ernas.latency.predict import ExpectedLatency, predict_ms
from ernas.latency.table import LatencyTable
from ernas.paths import SEARCH_SPACES
from ernas.space import space_from_dict
from ernas.supernet import SuperNet

SHAPE = (1, 1, 37, 45)  # odd sizes: nothing divides, nothing is padded
GEOMETRY = {"in_channels": 1, "num_classes": 3, "width": 4, "stem_width": 8, "head_width": 8,
            "num_modules": [1, 1, 2], "num_blocks": [1, 2, 1]}
BLOCK = {"block": ["shuffle", "separable", "inverted", "basic"], "kernel": [3, 5],
         "width": [0.5, 1.0], "keep": [False, True]}
FUSE = {"keep": [False, True]}


def tiny_space(geometry=GEOMETRY, block=BLOCK, name="hrnet_test"):
    blocks = {"stage2": block, "stage3": block, "fuse2": FUSE, "fuse3": FUSE}
    if len(geometry["num_modules"]) == 3:
        blocks.update(stage4=block, fourth_branch=block, fuse4=FUSE)
    return space_from_dict({"family": "hrnet_lite", "name": name, "geometry": geometry,
                            "blocks": blocks})


def archs(space, n, seed=0):
    """``n`` sampled archs, alternating with and without the fourth branch."""
    out = [space.sample(seed + i) for i in range(n)]
    for i, a in enumerate(out):
        a.values["fourth_branch"]["keep"] = bool(i % 2)
    return out


def randomize_bn(net):
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.3, 0.3)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return net


def test_shipped_spaces_and_references():
    demo = ernas.load_space(SEARCH_SPACES / "hrnet_demo.yaml")
    big = ernas.load_space(SEARCH_SPACES / "hrnet_w18.yaml")
    assert demo.positions[:3] == ["stage2.0.0.0", "stage2.0.0.1", "stage2.0.1.0"]
    assert "fourth_branch" in demo.searchable and "fuse3.1" in demo.searchable
    assert len(demo.positions) == 27 and len(big.positions) == 41
    keys = set(demo.op_keys((1, 1, 96, 80)))
    for name in ("hrnet_w18_small", "hrnet_mini"):
        ref = ernas.load_arch(SEARCH_SPACES / "archs" / f"{name}.yaml")
        assert ref.spec.io_channels(ref.geometry) == (1, 3)
        assert set(ref.op_keys((1, 1, 96, 80))) <= keys  # the demo table predicts them
    os2 = ernas.load_space(SEARCH_SPACES / "hrnet_demo_os2.yaml")
    mini_os2 = ernas.load_arch(SEARCH_SPACES / "archs" / "hrnet_mini_os2.yaml")
    assert os2.geometry["output_stride"] == mini_os2.geometry["output_stride"] == 2
    assert set(mini_os2.op_keys((1, 1, 96, 80))) <= set(os2.op_keys((1, 1, 96, 80)))
    for key in demo.op_keys((1, 1, 19, 23)):  # every builder makes a module that runs
        module, x = build_op(key)
        with torch.no_grad():
            module(x)


@pytest.mark.parametrize("change, field", [({"width": 5}, "width"),
                                           ({"output_stride": 3}, "output_stride"),
                                           ({"num_modules": [1]}, "num_modules"),
                                           ({"num_blocks": [1, 1]}, "num_blocks")])
def test_bad_geometry_names_the_field(change, field):
    with pytest.raises(ErnasError, match=field):
        tiny_space({**GEOMETRY, **change})


def test_fuse_units_take_keep_only():
    space = space_from_dict({"family": "hrnet_lite", "geometry": GEOMETRY,
                             "blocks": {"all": {"kernel": [3, 5]}}})
    with pytest.raises(ErnasError, match="fuse unit"):
        SuperNet(space)


@pytest.mark.parametrize("num_modules", [[1, 1], [1, 1, 2]])
def test_any_input_size_gives_full_size_logits(num_modules):
    g = {**GEOMETRY, "num_modules": num_modules, "num_blocks": [1] * len(num_modules)}
    model = ernas.build_model(tiny_space(g).reference()).eval()
    for h, w in ((37, 45), (64, 20), (9, 9)):
        assert model(torch.randn(2, 1, h, w)).shape == (2, 3, h, w)


@pytest.mark.parametrize("output_stride", [4, 2, 1])
def test_output_stride_sets_the_head_resolution(output_stride):
    """Fails if branch 0 (and so the head) does not run at 1/output_stride of the input."""
    arch = tiny_space({**GEOMETRY, "output_stride": output_stride}).reference()
    model = ernas.build_model(arch).eval()
    seen = []
    hook = arch.spec.feature_modules(model)[-1].register_forward_hook(
        lambda m, i, o: seen.append(o.shape[-2:]))
    assert model(torch.randn(1, 1, 48, 40)).shape == (1, 3, 48, 40)
    hook.remove()
    assert tuple(seen[0]) == (48 // output_stride, 40 // output_stride)


def test_evaluate_reports_output_strides_and_says_when_they_differ(tmp_path, caplog):
    """Fails if results.csv or the report lacks the output stride of each network, or if a
    comparison across strides 2 and 4 is not flagged in the report and the log."""
    import logging

    import pandas as pd

    from ernas.evaluate import ModelEntry, evaluate, output_stride, stride_note
    from ernas.task import make_task

    g = {**GEOMETRY, "in_channels": 3, "num_classes": 5, "num_modules": [1, 1],
         "num_blocks": [1, 1]}
    entries = [ModelEntry(f"os{s}", tiny_space({**g, "output_stride": s}, name=f"os{s}")
                          .reference()) for s in (2, 4)]
    task = make_task({"name": "segment", "data": "shapes"})
    with caplog.at_level(logging.WARNING, logger="ernas.evaluate"):
        evaluate(entries, tmp_path, task, latency_cfg=None, input_shape=(1, 3, 32, 32),
                 progress=False)
    sentence = ("This evaluation compares networks at output strides 2 and 4: accuracy "
                "differences include resolution.")
    res = pd.read_csv(tmp_path / "results.csv")
    assert list(res["output_stride"]) == [2, 4]
    report = (tmp_path / "report.md").read_text()
    assert "| output stride |" in report and "| os2 |" in report.replace(" (untrained)", "")
    assert sentence in report and sentence in caplog.text
    assert output_stride(ernas.load_arch(SEARCH_SPACES / "archs" / "unet_demo_classic.yaml")) == 1
    assert stride_note([{"output_stride": 4}, {"output_stride": 4}, {"output_stride": None}]) \
        is None


def test_extracted_network_equals_onehot_supernet():
    space = tiny_space()
    torch.manual_seed(0)
    net = randomize_bn(SuperNet(space)).eval()
    x = torch.randn(2, 1, *SHAPE[2:])
    outs = []
    with torch.no_grad():
        for arch in archs(space, 6):
            net.set_onehot(arch)
            model = net.extract(arch).eval()
            y = net(x)
            assert (model(x) - y).abs().max() < 1e-5, arch.values["fourth_branch"]
            outs.append(y)
    assert (outs[0] - outs[1]).abs().max() > 1e-2  # different archs compute different things


def test_batchnorm_folding_keeps_outputs():
    space = tiny_space()
    for arch in archs(space, 2, seed=3):
        torch.manual_seed(0)
        model = randomize_bn(ernas.build_model(arch)).eval()
        x = torch.randn(1, 1, *SHAPE[2:])
        with torch.no_grad():
            y = model(x)
            fused = model.fuse()
            assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
            assert (fused(x) - y).abs().max() < 1e-5


def test_skipped_positions_leave_no_parameters():
    space = tiny_space()
    arch = space.reference()
    full = ernas.build_model(arch).state_dict()
    for p in ("stage3.0.1.1", "fuse2.0", "fourth_branch"):
        arch.values[p]["keep"] = False
    state = ernas.build_model(arch).state_dict()
    for p in ("stage3.0.1.1", "fuse2.0", "fourth_branch"):
        assert any(k.startswith(p + ".") for k in full)
        assert not any(k.startswith(p + ".") for k in state)
    assert all(space.position_keys(p, arch.values[p], SHAPE) == []
               for p in ("stage3.0.1.1", "fuse2.0", "fourth_branch"))


def _conv_calls(model, x) -> collections.Counter:
    calls = collections.Counter()

    def hook(m, inp, out):
        calls[(tuple(inp[0].shape), m.out_channels, m.kernel_size, m.stride, m.groups,
               m.bias is not None)] += 1

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return calls


def _onnx_ops(model, x, path) -> collections.Counter:
    export_onnx(model, x, path)
    c = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return collections.Counter({k: c[k] for k in ("Conv", "Add", "Resize", "Relu", "Transpose")})


@pytest.mark.parametrize("output_stride", [4, 2, 1])
def test_op_keys_are_the_ops_the_network_runs(tmp_path, output_stride):
    """Every conv (shape, kernel, stride, groups, bias) and every Add/Resize/ReLU/Transpose the
    fused network runs is run by exactly one of its op keys' modules, and nothing else (at every
    output stride: a key priced at the wrong resolution fails)."""
    space = tiny_space({**GEOMETRY, "output_stride": output_stride})
    for arch in archs(space, 2, seed=5):
        model = ernas.build_model(arch).eval().fuse()
        x = torch.randn(SHAPE)
        convs, ops = collections.Counter(), collections.Counter()
        for key in arch.op_keys(SHAPE):
            module, xi = build_op(key)
            convs += _conv_calls(module, xi)
            ops += _onnx_ops(module, xi, tmp_path / "key.onnx")
        assert _conv_calls(model, x) == convs
        assert _onnx_ops(model, x, tmp_path / "net.onnx") == ops


def test_onnx_parity_at_two_sizes(tmp_path):
    import onnxruntime as ort

    arch = archs(tiny_space(), 2, seed=7)[1]
    torch.manual_seed(0)
    model = randomize_bn(ernas.build_model(arch)).eval().fuse()
    path = export_onnx(model, torch.randn(SHAPE), tmp_path / "m.onnx", dynamic_hw=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for hw in (SHAPE[2:], (50, 33)):
        x = torch.randn(1, 1, *hw)
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(sess.run(None, {"input": x.numpy()})[0] - ref).max() < 1e-4


def synthetic_table(space, shape, seed=0, metadata=None):
    rng = random.Random(seed)
    table = LatencyTable(metadata={"input_shape": list(shape), "granularity": "block",
                                   **(metadata or {})})
    for key in space.op_keys(shape):
        table.add(key, [rng.uniform(0.01, 1.0)])
    return table


def test_expected_latency_is_the_mean_of_sampled_predictions():
    """E[LAT] under non-uniform independent probabilities equals a Monte Carlo mean of
    ``predict_ms`` over archs drawn from them (and one-hot probabilities give ``predict_ms``)."""
    space = tiny_space()
    table = synthetic_table(space, SHAPE)
    expected = ExpectedLatency(space, table, SHAPE)
    gen = torch.Generator().manual_seed(1)
    probs = {p: {d: torch.softmax(2 * torch.randn(len(c), generator=gen), 0)
                 for d, c in space.choices[p].items()} for p in space.searchable}
    probs["fourth_branch"]["keep"] = torch.tensor([0.3, 0.7])  # candidates (false, true)
    rng, n = np.random.default_rng(0), 2000
    draws = {}
    for p in space.searchable:
        for d, c in space.choices[p].items():
            q = probs[p][d].double().numpy()
            draws[p, d] = rng.choice(len(c), size=n, p=q / q.sum())
    samples = []
    for i in range(n):
        arch = space.reference()
        for (p, d), idx in draws.items():
            arch.values[p][d] = space.choices[p][d][idx[i]]
        samples.append(predict_ms(table, arch, SHAPE))
    mean, se = np.mean(samples), np.std(samples) / np.sqrt(len(samples))
    assert abs(float(expected(probs)) - mean) < 4 * se
    arch = space.sample(11)
    assert expected.of_arch(arch) == pytest.approx(predict_ms(table, arch, SHAPE))


# --------------------------------------------------------------------------- CLI end to end
FAST = ["latency.backend.threads=1", "latency.measure.rounds=2", "latency.measure.per_round=1",
        "latency.measure.warmup=1", "latency.measure.min_seconds=0", "progress=false"]
CLI_SHAPE = (1, 1, 32, 32)


def _cli(tool, tmp_path, run, *args):
    r = subprocess.run([sys.executable, "-m", f"ernas.cli.{tool}", "task=segment", *args,
                        f"hydra.run.dir={tmp_path / run}"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_cli_search_retrain_evaluate_export(tmp_path):
    """The real CLIs on a tiny HRNet-lite space (a synthetic table: no profiling)."""
    g = {**GEOMETRY, "num_modules": [1, 1, 1], "num_blocks": [1, 1, 1]}
    space = space_from_dict({"family": "hrnet_lite", "name": "hrnet_cli", "geometry": g,
                             "blocks": {"stage3": {"block": ["shuffle", "basic"],
                                                   "keep": [False, True]},
                                        "fourth_branch": {"keep": [False, True]},
                                        "fuse3": {"keep": [False, True]}}})
    (tmp_path / "space.yaml").write_text(json.dumps(space.to_dict()))
    backend = make_backend({"name": "onnxruntime", "threads": 1, "spinning": False})
    table = synthetic_table(space, CLI_SHAPE, metadata=backend.metadata())
    table.save(tmp_path / "table.csv")
    shape = f"input_shape=[{','.join(map(str, CLI_SHAPE))}]"
    out = _cli("search", tmp_path, "search", f"space={tmp_path / 'space.yaml'}", shape, *FAST,
               f"latency.table={tmp_path / 'table.csv'}", "latency.trust_table=true",
               "search.steps=4", "search.warmup_steps=2", "search.crop=32",
               "search.batch_size=2", "search.log_every=2", "search.device=cpu")
    assert "predicted latency" in out
    arch = ernas.load_arch(tmp_path / "search" / "arch.yaml")
    assert space.contains(arch)
    _cli("retrain", tmp_path, "retrain", f"arch={tmp_path / 'search'}", "init=supernet",
         f"source={tmp_path / 'search'}", "steps=2", "batch_size=2", "crop=32", "val_every=2",
         "device=cpu", "progress=false")
    out = _cli("evaluate", tmp_path, "evaluate", f"checkpoint={tmp_path / 'retrain'}", shape,
               *FAST, "predict_latency=false", "memory_runs=0")
    assert "miou" in out
    out = _cli("export", tmp_path, "export", f"checkpoint={tmp_path / 'retrain'}", shape, *FAST,
               "calibration.inputs=2", "qat.steps=1", "qat.batch_size=2", "qat.crop=32",
               "qat.calibration_batches=1", "memory_runs=0")
    s = json.loads((tmp_path / "export" / "summary.json").read_text())
    assert s["parity_ok"] and s["batchnorm_nodes"] == 0 and s["skipped_block_nodes"] == 0
    assert s["quantize_linear_nodes"] > 0 and "miou_int8" in s and "miou_qat" in s


@pytest.mark.slow
def test_cli_profile_and_validate_a_table(tmp_path):
    """``ernas-profile`` measures every key of a tiny space, then ``mode=validate`` times
    sampled networks end to end against it (the commands that ship the demo tables)."""
    space = tiny_space({**GEOMETRY, "num_modules": [1, 1, 1], "num_blocks": [1, 1, 1]},
                       {**BLOCK, "block": ["shuffle", "basic"], "kernel": [3]})
    (tmp_path / "space.yaml").write_text(json.dumps(space.to_dict()))
    args = ["-m", "ernas.cli.profile", f"space={tmp_path / 'space.yaml'}",
            f"input_shape=[{','.join(map(str, CLI_SHAPE))}]", f"output={tmp_path / 't.csv'}",
            f"latency.cache_dir={tmp_path / 'cache'}", "latency.recheck_rounds=2", *FAST]
    for mode, run in (("profile", "p"), ("validate", "v")):
        r = subprocess.run([sys.executable, *args, f"mode={mode}", "validate.n=3",
                            f"hydra.run.dir={tmp_path / run}"], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(tmp_path / "t.csv")
    assert set(space.op_keys(CLI_SHAPE)) <= set(table.keys())
    assert (tmp_path / "v" / "validation.csv").is_file() and "MAPE" in r.stdout

