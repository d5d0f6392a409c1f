"""SuperNet: one-hot equivalence with extract(), derive/decisiveness/entropy, parameter counts."""
import math
from pathlib import Path

import pytest
import torch

from ernas import ErnasError, build_model, load_space
from ernas.complexity import count_params
from ernas.nn.batchnorm import batchnorms, frozen_bn_stats, recalibrate_bn
from ernas.supernet import SuperNet


@pytest.fixture(scope="module")
def space():
    return load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "nafnet_tiny.yaml")


def _archs(space):
    """Random archs plus hand-picked ones covering skipped blocks, batchnorm, kernel 5/7 and
    expansion 1 at every searchable position."""
    archs = [space.sample(s) for s in range(4)]
    for choice in ({"norm": "batchnorm", "kernel": 7, "dw_expand": 1, "ffn_expand": 1,
                    "attention": "sca", "keep": True},
                   {"norm": "batchnorm", "kernel": 5, "dw_expand": 2, "ffn_expand": 1,
                    "attention": "none", "keep": True},
                   {"norm": "none", "kernel": 5, "dw_expand": 1, "ffn_expand": 2,
                    "attention": "sca", "keep": True}):
        a = space.reference()
        for p in space.searchable:
            a.values[p] = dict(choice)
        archs.append(a)
    mixed = space.reference()
    for i, p in enumerate(space.searchable):
        mixed.values[p].update(keep=bool(i % 2), norm="batchnorm", kernel=7)
    return archs + [mixed]


def _trained(space, mode):
    """A supernet after a few training steps (non-trivial BN statistics, β, γ and α)."""
    torch.manual_seed(0)
    net = SuperNet(space, mode=mode)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.rand(2, 3, 16, 16)
        loss = (net(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("mode", ["shared", "darts"])
def test_onehot_matches_extract(space, mode):
    net = _trained(space, mode)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and any(float(m.running_mean.abs().max()) > 1e-3 for m in bn)
    x = torch.rand(2, 3, 16, 16) * 2 - 0.5
    outputs = []
    for arch in _archs(space):
        net.set_onehot(arch)
        with torch.no_grad():
            y = net(x)
            model = net.extract(arch).eval()
            ref = build_model(arch)
            assert [(n, p.shape) for n, p in model.state_dict().items()] == \
                   [(n, p.shape) for n, p in ref.state_dict().items()]
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        outputs.append(y)
    net.set_onehot(None)
    assert not torch.allclose(outputs[0], outputs[-1])  # the archs really differ


def test_names_mirror_official(space):
    names = dict(SuperNet(space).named_parameters())
    assert "net.encoders.0.0.conv1.weight" in names
    assert "net.middle_blks.0.sca.1.weight" in names
    assert "net.ups.0.0.weight" in names and "net.ending.weight" in names
    # shared conv1 holds the largest expansion: 2·c output channels (two gate banks of c)
    assert names["net.encoders.0.0.conv1.weight"].shape == (16, 8, 1, 1)
    assert names["net.encoders.0.0.conv2.weight"].shape == (16, 1, 7, 7)


def test_shared_is_far_smaller_than_darts(space):
    shared, darts = SuperNet(space, "shared"), SuperNet(space, "darts")
    ns, nd = count_params(shared), count_params(darts)
    assert ns < 0.5 * nd
    largest = count_params(build_model(space.largest()))
    assert ns < 1.3 * largest  # about one network at the largest candidates


def test_derive_decisiveness_entropy_hand_set(space):
    net = SuperNet(space)
    n_dec = len(net.alphas)
    assert net.entropy() == pytest.approx(1.0)
    # uniform: mean of 1/K over decisions (per position: norm, kernel have K=3; 4 have K=2)
    assert net.decisiveness() == pytest.approx((2 / 3 + 4 / 2) / 6)
    p = space.searchable[0]
    with torch.no_grad():
        net.alpha(p, "kernel").copy_(torch.tensor([0.0, 5.0, 5.0]))   # tie -> lower index (5)
        net.alpha(p, "norm").copy_(torch.tensor([0.0, 0.0, 2.0]))
        net.alpha(p, "keep").copy_(torch.tensor([-1.0, 1.0]))
    arch = net.derive()
    assert arch.values[p]["kernel"] == 5
    assert arch.values[p]["norm"] == "none"
    assert arch.values[p]["keep"] is False
    assert arch.values[space.searchable[1]] == {d: c[0] for d, c in
                                                space.choices[space.searchable[1]].items()}
    assert space.contains(arch)
    # hand computation over all decisions
    ps = [torch.softmax(a.detach(), 0) for a in net.alphas.values()]
    want_d = sum(float(q.max()) for q in ps) / n_dec
    want_h = sum(float(-(q * q.log()).sum()) / math.log(len(q)) for q in ps) / n_dec
    assert net.decisiveness() == pytest.approx(want_d)
    assert net.entropy() == pytest.approx(want_h)
    with torch.no_grad():
        for a in net.alphas.values():
            a.zero_()
            a[0] = 1e4
    assert net.decisiveness() == pytest.approx(1.0)
    assert net.entropy() == pytest.approx(0.0, abs=1e-6)


def test_probs_temperature_and_gumbel(space):
    torch.manual_seed(0)
    net = SuperNet(space, temperature=0.5, gumbel=True)
    p = space.searchable[0]
    with torch.no_grad():
        net.alpha(p, "kernel").copy_(torch.tensor([1.0, 0.0, 0.0]))
    net.eval()
    probs = net.probs()
    torch.testing.assert_close(probs[p]["kernel"], torch.softmax(torch.tensor([2.0, 0, 0]), 0))
    assert probs[p]["norm"].shape == (3,)
    assert set(probs) == set(space.searchable)
    net.train()
    g1, g2 = net.probs()[p]["kernel"], net.probs()[p]["kernel"]
    assert not torch.allclose(g1, g2)  # sampled
    assert float(g1.detach().sum()) == pytest.approx(1.0)
    # single-candidate decisions are fixed
    fixed = SuperNet(load_space_from(space, {"all": {"kernel": [3, 5]}}))
    q = fixed.probs()[fixed.searchable[0]]
    assert q["norm"].tolist() == [1.0] and q["kernel"].shape == (2,)
    assert fixed.alpha(fixed.searchable[0], "norm") is None


def load_space_from(space, blocks):
    from ernas.space import space_from_dict
    return space_from_dict({"family": "nafnet", "geometry": space.geometry, "blocks": blocks})


def test_gradients_reach_alpha(space):
    net = _trained(space, "shared").train()
    x = torch.rand(2, 3, 16, 16)
    net(x).pow(2).mean().backward()
    grads = {k: a.grad for k, a in net.alphas.items()}
    assert all(g is not None for g in grads.values())
    assert sum(float(g.abs().sum()) > 0 for g in grads.values()) >= len(grads) - 1


def test_errors(space):
    with pytest.raises(ErnasError, match="mode"):
        SuperNet(space, mode="nope")
    net = SuperNet(space)
    other = load_space_from(space, {"all": {"kernel": [3]}}).reference()
    other.geometry = dict(other.geometry, width=16)
    with pytest.raises(ErnasError, match="not in search space"):
        net.extract(other)


def _bn_state(net):
    return {k: v.clone() for k, v in net.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_frozen_bn_stats_uses_batch_statistics_and_updates_nothing(space):
    net = _trained(space, "shared").train()
    before = _bn_state(net)
    counter = "net.encoders.0.0.norm1.batchnorm.num_batches_tracked"
    assert before and int(before[counter]) == 3
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        with frozen_bn_stats(net):
            y = net(x)
        for k, v in _bn_state(net).items():
            assert torch.equal(before[k], v), k
        assert all(m.track_running_stats for m in batchnorms(net))  # restored
        assert torch.equal(y, net(x))  # a training-mode pass: the same batch statistics...
    assert int(_bn_state(net)[counter]) == 4  # ...but that one updates the running ones


def test_recalibrated_statistics_are_the_plain_average_over_the_batches(space):
    net = _trained(space, "shared")
    arch = _archs(space)[4]  # batchnorm, kernel 7, expansion 1 everywhere
    model = net.extract(arch)
    bns = batchnorms(model)
    seen = {m: [] for m in bns}
    hooks = [m.register_forward_hook(lambda m, i, o: seen[m].append(i[0].detach().clone()))
             for m in bns]
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(3, 3, 16, 16, generator=g) for _ in range(5)]
    model.train()
    assert recalibrate_bn(model, batches) == 5
    for h in hooks:
        h.remove()
    assert model.training  # mode restored
    for m in bns:
        xs = seen[m]
        assert len(xs) == 5
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(m.num_batches_tracked) == 5 and m.momentum == 0.1
    # later batches use the first ones' activations: the sub-network's own, not the mixture's
    assert not torch.allclose(bns[-1].running_mean,
                              net.net.get_submodule(space.searchable[-1]).norm2["batchnorm"]
                              .running_mean)


def test_recalibration_repairs_stale_statistics_of_a_far_sub_network(space):
    """A sub-network whose inherited BN statistics describe other activations (here: channels
    that were nearly constant in the supernet) explodes; recalibrated, it is a sane denoiser
    input-output map again."""
    net = _trained(space, "shared")
    model = net.extract(_archs(space)[4]).eval()
    with torch.no_grad():
        for m in batchnorms(model):
            m.running_var.fill_(1e-9)
            m.running_mean.add_(3.0)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g)

    def sane(y):
        return bool(torch.isfinite(y).all()) and float((y - x).abs().max()) < 5.0

    with torch.no_grad():
        assert not sane(model(x))
        recalibrate_bn(model, [torch.rand(4, 3, 16, 16, generator=g) for _ in range(8)])
        y = model(x)
    assert sane(y) and not model.training


def test_recalibrating_a_model_without_batchnorm_runs_nothing(space):
    model = build_model(space.reference())
    assert recalibrate_bn(model, iter(lambda: 1 / 0, None)) == 0


def _lean_to_skip(net):
    """α of every keep decision at p_keep ≈ 0.0025 (a supernet that has collapsed to skips)."""
    with torch.no_grad():
        for p in net.searchable:
            a = net.alpha(p, "keep")
            a.copy_(torch.tensor([6.0, 0.0]) if net.space.choices[p]["keep"][0] is False
                    else torch.tensor([0.0, 6.0]))


def test_drop_paths_draws_keep_at_its_rate_whatever_alpha(space):
    net = SuperNet(space)
    _lean_to_skip(net)
    probs = net.probs(sample=False)
    torch.manual_seed(0)
    kept, n = 0, 0
    for _ in range(200):
        drawn = net.drop_paths(probs, 0.7)
        for p in net.searchable:
            cands = space.choices[p]["keep"]
            k = drawn[p]["keep"]
            assert sorted(k.tolist()) == [0.0, 1.0]  # hard, one-hot
            kept += int(k[cands.index(True)] == 1)
            n += 1
            for d in space.choices[p]:
                if d != "keep":
                    assert drawn[p][d] is probs[p][d]  # other decisions keep their mixture
    assert 0.65 < kept / n < 0.75  # n = 200 x positions; independent of α's p_keep ≈ 0.0025
    always = net.drop_paths(probs, 1.0)
    assert all(always[p]["keep"][space.choices[p]["keep"].index(True)] == 1
               for p in net.searchable)


def test_drop_paths_trains_blocks_that_alpha_would_skip(space):
    """Mixed by α at p_keep ≈ 0.0025 a block's weights get ~0 gradient; drawn kept, full."""
    net = SuperNet(space)
    _lean_to_skip(net)
    with torch.no_grad():
        for name, w in net.named_parameters():
            if name.endswith(("beta", "gamma")):
                w.fill_(0.5)
    x = torch.rand(2, 3, 16, 16)
    conv = net.net.get_submodule(space.searchable[0]).conv1.weight

    def grad(probs):
        net.zero_grad()
        (net(x, probs) - x).pow(2).mean().backward()
        return float(conv.grad.abs().sum())

    mixed = grad(net.probs(sample=False))
    kept = grad(net.drop_paths(net.probs(sample=False), 1.0))
    assert kept > 50 * mixed > 0
