"""Search loop: outputs, exact resume, NaN handling, BatchNorm statistics (frozen in α steps,
recalibrated before the inherited metric), the latency forms and the entropy term, on nafnet_tiny
at 16x16 with batch 2; and SearchConfig as the schema of experiments/search.yaml.

The latency table here is SYNTHETIC: per-key numbers made up from the op key's shape and
attributes (bigger kernels, expansions, LayerNorm and attention cost more), not measurements. The
tests check the search logic, which only needs a table with the right keys and a sensible order.
"""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from ernas import ErnasError, load_arch, load_space
from ernas.batches import step_batches
from ernas.latency.ops import parse_key
from ernas.latency.predict import ExpectedLatency
from ernas.latency.table import LatencyTable
from ernas.nn.batchnorm import recalibrate_bn
from ernas.search import SearchConfig, run_search
from ernas.search.loop import calibration_batches, val_metric
from ernas.supernet import SuperNet
from ernas.task import make_task

SHAPE = (1, 3, 16, 16)
TASK = make_task({"name": "denoise"})


def synthetic_table(space, shape=SHAPE) -> LatencyTable:
    """A made-up (synthetic, not profiled) table covering every op key of ``space``."""
    table = LatencyTable(metadata={"input_shape": list(shape), "granularity": "block",
                                   "backend": "synthetic", "note": "synthetic test numbers"})
    for key in space.op_keys(shape, "block"):
        k = parse_key(key)
        a, (_, c, h, w) = k.attr, k.shape
        base = c * h * w * 1e-4
        if k.op == "nafblock":
            ms = base * (1 + 0.5 * (a["norm"] == "layernorm") + 0.3 * (a["attention"] == "sca")
                         + int(a["dw_expand"]) * (0.5 + int(a["kernel"]) ** 2 / 49)
                         + 0.5 * int(a["ffn_expand"]))
        else:
            ms = 0.1 * base
        table.add(key, [ms])
    return table


class SmoothImages:
    """Tiny in-memory dataset: smooth random 16x16 images plus Gaussian noise."""

    def __init__(self, n: int, seed: int, sigma: float = 0.1):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            clean = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=16, mode="bilinear",
                                  align_corners=False)[0]
            self.items.append({"input": clean + sigma * torch.randn(3, 16, 16, generator=g),
                               "target": clean})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def setup():
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "nafnet_tiny.yaml")
    expected = ExpectedLatency(space, synthetic_table(space))
    train = step_batches(SmoothImages(16, 0), 2, seed=0)
    val = step_batches(SmoothImages(8, 1), 2, seed=1)
    return space, expected, train, val


def cfg(**kw) -> SearchConfig:
    base = dict(steps=16, warmup_steps=4, batch_size=2, lr_alpha=0.05, checkpoint_every=100,
                log_every=4, eval_batches=1, seed=0, device="cpu")
    return SearchConfig(**{**base, **kw})


def alphas_of(out_dir: Path) -> dict:
    ck = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    return {k: v for k, v in ck["model"].items() if k.startswith("alphas.")}


def test_end_to_end_outputs(setup, tmp_path):
    space, expected, train, val = setup
    s = run_search(space, expected, train, val, cfg(entropy_max=0.5), tmp_path, task=TASK, progress=False)
    for name in ("arch.yaml", "log.csv", "alphas.csv", "probs.png", "curves.png",
                 "checkpoint.pt", "summary.json", "inherited.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    arch = load_arch(tmp_path / "arch.yaml")
    assert space.contains(arch)
    assert arch.values == load_arch(s["arch_path"]).values
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("predicted_latency_ms", "baseline_latency_ms", "params", "baseline_params",
                "macs", "baseline_macs", "supernet_val_psnr", "inherited_val_psnr",
                "discretisation_gap", "decisiveness", "entropy",
                "search_seconds", "steps", "arch_name", "arch_path"):
        assert key in summary, key
    assert summary["steps"] == 16
    assert summary["predicted_latency_ms"] == pytest.approx(expected.of_arch(arch))
    assert summary["baseline_latency_ms"] == pytest.approx(expected.of_arch(space.reference()))
    assert math.isfinite(summary["supernet_val_psnr"]) and summary["supernet_val_psnr"] > 10
    assert 0 < summary["macs"] <= summary["baseline_macs"] * 2
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["step"]) == [0, 4, 8, 12, 15]
    for col in ("total", "task", "latency", "entropy_weight", "train_psnr", "expected_ms",
                "entropy", "decisiveness", "lr_w", "lr_alpha"):
        assert log[col].notna().all(), col
    alphas = pd.read_csv(tmp_path / "alphas.csv")
    assert list(alphas.columns) == ["step", "position", "decision", "choice", "probability"]
    last = alphas[alphas["step"] == 15].groupby(["position", "decision"])["probability"].sum()
    np.testing.assert_allclose(last.to_numpy(), 1.0, atol=1e-5)
    assert set(alphas["position"]) == set(space.searchable)
    from ernas import build_model
    build_model(arch).load_state_dict(torch.load(tmp_path / "inherited.pt", weights_only=True))


@pytest.mark.parametrize("gumbel, keep_rate", [(False, None), (True, 0.5)])
def test_resume_matches_uninterrupted(setup, tmp_path, gumbel, keep_rate):
    """Exact resume, also with the random draws of Gumbel-softmax and weight_keep_rate."""
    space, expected, train, val = setup
    c = cfg(checkpoint_every=5, gumbel=gumbel, entropy_max=0.3, weight_keep_rate=keep_rate)
    full, part = tmp_path / "full", tmp_path / "part"
    run_search(space, expected, train, val, c, full, task=TASK, progress=False)
    stopped = run_search(space, expected, train, val, c, part, task=TASK, progress=False, stop_after=12)
    assert stopped["stopped_at"] == 12
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 10  # "killed" at 12
    assert not (part / "arch.yaml").exists()
    run_search(space, expected, train, val, c, part, task=TASK, progress=False, resume=True)
    a, b = alphas_of(full), alphas_of(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert yaml.safe_load((full / "arch.yaml").read_text()) == \
        yaml.safe_load((part / "arch.yaml").read_text())
    pd.testing.assert_frame_equal(pd.read_csv(full / "log.csv"), pd.read_csv(part / "log.csv"),
                                  rtol=1e-6)


def test_resume_refuses_changed_config_or_missing_checkpoint(setup, tmp_path):
    space, expected, train, val = setup
    with pytest.raises(ErnasError, match="does not exist"):
        run_search(space, expected, train, val, cfg(), tmp_path, task=TASK, progress=False, resume=True)
    run_search(space, expected, train, val, cfg(checkpoint_every=4), tmp_path, task=TASK, progress=False,
               stop_after=4)
    with pytest.raises(ErnasError, match="lam"):
        run_search(space, expected, train, val, cfg(checkpoint_every=4, lam=1.0), tmp_path,
                   task=TASK, progress=False, resume=True)


def test_nonfinite_loss_stops_and_keeps_checkpoint(setup, tmp_path):
    space, expected, train, val = setup

    def poisoned(step):
        noisy, clean = train(step)
        return (noisy * math.inf if step == 7 else noisy), clean

    with pytest.raises(ErnasError, match=r"step 7.*not finite.*lr") as err:
        run_search(space, expected, poisoned, val, cfg(checkpoint_every=3), tmp_path,
                   task=TASK, progress=False)
    assert "task" in str(err.value)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (tmp_path / "arch.yaml").exists()


def test_huge_learning_rate_raises(setup, tmp_path):
    space, expected, train, val = setup
    with pytest.raises(ErnasError, match="Lower"):
        run_search(space, expected, train, val, cfg(lr_w=1e30, checkpoint_every=1), tmp_path,
                   task=TASK, progress=False)
    if (tmp_path / "checkpoint.pt").exists():
        ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values()
                   if v.is_floating_point())


def test_larger_lambda_never_raises_predicted_latency(setup, tmp_path):
    space, expected, train, val = setup
    lat = {}
    for lam in (0.0, 10.0):
        s = run_search(space, expected, train, val, cfg(lam=lam, entropy_max=0.0),
                       tmp_path / str(lam), task=TASK, progress=False)
        lat[lam] = s["predicted_latency_ms"]
    assert lat[10.0] <= lat[0.0]
    assert lat[10.0] < expected.of_arch(space.reference())


def test_entropy_term_raises_decisiveness(setup, tmp_path):
    space, expected, train, val = setup
    got = {}
    for w in (0.0, 1.0):
        s = run_search(space, expected, train, val,
                       cfg(lam=0.02, entropy_max=w, entropy_ramp=0), tmp_path / str(w),
                       task=TASK, progress=False)
        got[w] = (s["decisiveness"], s["entropy"])
    assert got[1.0][0] > got[0.0][0]
    assert got[1.0][1] < got[0.0][1]


def test_step_batches_pure_and_keyed_datasets(setup):
    from ernas.tasks.denoise.data import NoisyImageDataset

    _, _, train, _ = setup
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train(5)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    b = train(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(train(6)[0], a[0])

    rng = np.random.default_rng(0)
    images = [(f"im{i}", rng.random((24, 24, 3), dtype=np.float32)) for i in range(3)]

    def fresh():
        return step_batches(NoisyImageDataset(images, crop=16, sigma=25, seed=0), 2, seed=3)

    first, second = fresh(), fresh()
    second(0), second(1)  # a different history must not change batch 2
    torch.testing.assert_close(first(2), second(2), rtol=0, atol=0)


@pytest.fixture(scope="module")
def bn_setup(setup):
    """nafnet_tiny with norm fixed to batchnorm and every block kept, so every derived arch has
    BatchNorm."""
    from ernas.space import space_from_dict

    space = setup[0]
    d = space.to_dict()
    d["blocks"]["all"].update(norm=["batchnorm"], keep=[True])
    bn_space = space_from_dict(d)
    return bn_space, ExpectedLatency(bn_space, synthetic_table(bn_space))


@pytest.mark.parametrize("mode", ["shared", "darts"])
def test_batchnorm_statistics_frozen_in_alpha_steps_and_recalibrated(setup, bn_setup, tmp_path,
                                                                     mode):
    """16 steps, α trained from step 4: every BatchNorm has seen the 16 training batches only
    (not 16 + 12 validation batches). inherited.pt holds the extracted network with statistics
    recalibrated on training batches, and inherited_val_psnr judges that network."""
    from ernas import build_model

    _, _, train, val = setup
    space, expected = bn_setup
    c = cfg(mode=mode)
    s = run_search(space, expected, train, val, c, tmp_path, task=TASK, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    counters = {k: int(v) for k, v in ck.items() if k.endswith("num_batches_tracked")}
    assert counters and set(counters.values()) == {16}
    arch = load_arch(tmp_path / "arch.yaml")
    net = SuperNet(space, mode)
    net.load_state_dict(ck)
    want = net.extract(arch)
    assert recalibrate_bn(want, calibration_batches(train, c, "cpu")) == 16
    got = build_model(arch)
    got.load_state_dict(torch.load(tmp_path / "inherited.pt", weights_only=True))
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert s["bn_calibration_batches"] == 16
    assert s["inherited_val_psnr"] == pytest.approx(val_metric(got, val, 1, "cpu", TASK))


class OffsetTask:
    """The denoising task with a constant added to its loss (PSNR shifted by ``offset`` dB)."""

    def __init__(self, task, offset: float):
        self.task, self.offset = task, offset

    def loss(self, pred, target):
        return self.task.loss(pred, target) + self.offset

    def __getattr__(self, name):
        return getattr(self.task, name)


@pytest.mark.parametrize("form,kw", [("multiplicative", {"beta": 2.0}),
                                     ("additive", {"lam": 5.0})])
def test_latency_strength_does_not_depend_on_the_loss_offset(setup, tmp_path, form, kw):
    """The same search with the PSNR loss shifted by -30 dB (as if the data were 30 dB harder)
    trains the same α: the latency term's pull does not scale with the loss value. And it pulls:
    the predicted latency ends below that of the same search without a latency term."""
    space, expected, train, val = setup
    c = cfg(latency_form=form, entropy_max=0.0, **kw)
    run_search(space, expected, train, val, c, tmp_path / "plain", task=TASK, progress=False)
    run_search(space, expected, train, val, c, tmp_path / "shifted",
               task=OffsetTask(TASK, -30.0), progress=False)
    a, b = alphas_of(tmp_path / "plain"), alphas_of(tmp_path / "shifted")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    free = run_search(space, expected, train, val, cfg(lam=0.0, entropy_max=0.0),
                      tmp_path / "free", task=TASK, progress=False)
    s = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert s["predicted_latency_ms"] < free["predicted_latency_ms"]


def test_multiplicative_beta_zero_is_no_latency_term(setup, tmp_path):
    space, expected, train, val = setup
    run_search(space, expected, train, val, cfg(latency_form="multiplicative", beta=0.0,
                                                 entropy_max=0.0), tmp_path / "b0",
               task=TASK, progress=False)
    run_search(space, expected, train, val, cfg(lam=0.0, entropy_max=0.0), tmp_path / "l0",
               task=TASK, progress=False)
    a, b = alphas_of(tmp_path / "b0"), alphas_of(tmp_path / "l0")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_summary_says_whether_the_hinge_ever_bound(setup, tmp_path):
    """A hinge target above every expected latency never acts (fraction 0; the search is the
    λ=0 one, α for α); a target below the smallest network acts in every α step."""
    space, expected, train, val = setup
    loose = run_search(space, expected, train, val, cfg(latency_form="hinge", lam=5.0,
                                                         target_ms=1e6), tmp_path / "loose",
                       task=TASK, progress=False)
    free = run_search(space, expected, train, val, cfg(lam=0.0), tmp_path / "free", task=TASK,
                      progress=False)
    tight = run_search(space, expected, train, val, cfg(latency_form="hinge", lam=5.0,
                                                        target_ms=1e-6), tmp_path / "tight",
                       task=TASK, progress=False)
    assert loose["latency_active_fraction"] == 0.0 and tight["latency_active_fraction"] == 1.0
    assert free["max_expected_ms"] == pytest.approx(loose["max_expected_ms"])
    assert 0 < loose["max_expected_ms"] <= expected.of_arch(space.largest()) + 1e-6
    a, b = alphas_of(tmp_path / "loose"), alphas_of(tmp_path / "free")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)



def test_band_pulls_a_network_below_its_target_up_to_it(setup, tmp_path):
    """With a target the λ=0 search never reaches, the hinge is free (the λ=0 architecture) and
    the band pulls the expected latency up, so the derived network is slower; with a target
    below every network the band is the hinge, α for α."""
    space, expected, train, val = setup
    free = run_search(space, expected, train, val, cfg(lam=0.0), tmp_path / "free", task=TASK,
                      progress=False)
    top = expected.of_arch(space.largest())
    loose = 0.5 * (free["max_expected_ms"] + top)
    assert free["max_expected_ms"] < loose < top

    def run(form, target):
        out = tmp_path / f"{form}{target:g}"
        s = run_search(space, expected, train, val, cfg(latency_form=form, lam=5.0,
                                                        target_ms=target),
                       out, task=TASK, progress=False)
        return s, alphas_of(out), pd.read_csv(out / "log.csv")["expected_ms"].iloc[-1]

    (hinge, _, e_hinge), (band, _, e_band) = run("hinge", loose), run("band", loose)
    assert hinge["latency_active_fraction"] == 0.0 and band["latency_active_fraction"] == 1.0
    assert hinge["predicted_latency_ms"] == pytest.approx(free["predicted_latency_ms"])
    assert band["predicted_latency_ms"] > hinge["predicted_latency_ms"]
    assert e_hinge < e_band < loose
    (_, a, _), (_, b, _) = run("hinge", 1e-6), run("band", 1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_band_search_that_misses_its_target_says_when_alpha_was_decided(setup, tmp_path,
                                                                          caplog):
    """An entropy weight that makes α one-hot in the first α steps: the summary gives that step,
    and a band search whose network is far from its target (here above every network) warns
    with it; the hinge (a cap, not a target) and a network within 15% of T do not warn."""
    from ernas.search.finish import missed_target

    space, expected, train, val = setup
    target = 2 * expected.of_arch(space.largest())
    runs = {}
    for form in ("band", "hinge"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ernas.search.finish"):
            runs[form] = run_search(space, expected, train, val,
                                    cfg(latency_form=form, lam=5.0, target_ms=target,
                                        entropy_max=50.0, entropy_ramp=0, lr_alpha=0.5),
                                    tmp_path / form, task=TASK, progress=False)
        runs[form + "_log"] = caplog.text
    decided = runs["band"]["decisive_step"]
    assert decided is not None and 4 <= decided <= 8  # α steps start after 4 warm-up steps
    assert f"decided (decisiveness >= 0.95) at step {decided} of 16" in runs["band_log"]
    assert "search.entropy_max" in runs["band_log"] and runs["hinge_log"] == ""
    assert missed_target("band", 1.1, 1.0, 5, 16) is None
    assert "never became decisive" in missed_target("band", 0.5, 1.0, None, 16)


def test_search_yaml_is_typed_by_search_config():
    """experiments/search.yaml's search node has SearchConfig's schema and defaults: one source,
    unknown keys and wrong types refused at composition, every experiment composes."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from ernas.paths import EXPERIMENTS

    def search_node(*overrides):
        with initialize_config_dir(config_dir=str(EXPERIMENTS), version_base="1.3"):
            c = compose(config_name="search", overrides=list(overrides))
        return SearchConfig.from_dict(OmegaConf.to_container(c.search, resolve=True))

    assert search_node() == SearchConfig()
    assert search_node("seed=7", "search.lam=2").lam == 2.0
    assert search_node("seed=7").seed == 7
    for bad in ("search.lam_typo=1", "search.steps=many", "search.gumbel=maybe"):
        with pytest.raises(ConfigCompositionException):
            search_node(bad)
    with pytest.raises(ErnasError, match="lam_typo"):  # forced in with +: refused on reading
        search_node("+search.lam_typo=1")
    for exp in sorted((EXPERIMENTS / "experiment").glob("*.yaml")):
        if "\nprotocol: " in "\n" + exp.read_text():  # ernas-bench configs (test_bench.py,
            continue                                   # test_supernet_ranking.py)
        assert search_node(f"experiment={exp.stem}").steps > 0


@pytest.mark.parametrize("rate, trained", [(None, True), (1e-9, False)])
def test_weight_keep_rate_decides_which_blocks_the_weight_step_trains(setup, tmp_path, rate,
                                                                      trained):
    """With the α mixture every searchable block is trained; with weight_keep_rate ≈ 0 the
    weight step draws every block skipped, so its weights stay at their initialisation (the
    loop applies ``SuperNet.drop_paths``)."""
    space, expected, train, val = setup
    run_search(space, expected, train, val, cfg(weight_keep_rate=rate), tmp_path, task=TASK,
               progress=False)
    torch.manual_seed(0)
    init = SuperNet(space).state_dict()
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    keys = [f"net.{p}.conv1.weight" for p in space.searchable
            if len(space.choices[p]["keep"]) > 1]
    assert keys
    assert all(not torch.equal(init[k], final[k]) for k in keys) == trained
    assert all(torch.equal(init[k], final[k]) for k in keys) != trained
    fixed = [k for k in final if k.startswith("net.intro.")]  # outside the searched blocks
    assert fixed and not all(torch.equal(init[k], final[k]) for k in fixed)
