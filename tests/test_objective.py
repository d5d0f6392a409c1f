"""Search objective: task losses, latency forms (values, exact gradients, independence of the task
loss's offset and scale), the per-decision entropy sum and its schedule."""
import math

import pytest
import torch
import torch.nn.functional as F

from ernas import ErnasError
from ernas.search.objective import EntropySchedule, LatencyLoss, SearchObjective, normalized_entropy
from ernas.task import make_task
from ernas.tasks.denoise import batch_psnr, psnr_loss
from ernas.tasks.denoise.metrics import psnr

S = 10 / math.log(10)  # PSNR loss = S·ln MSE
DENOISE = make_task({"name": "denoise"})
SEGMENT = make_task({"name": "segment", "data": "shapes"})


def test_psnr_loss_is_minus_psnr():
    torch.manual_seed(0)
    target = torch.rand(3, 3, 8, 8)
    pred = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    want = -sum(psnr(p, t) for p, t in zip(pred, target)) / 3
    assert float(psnr_loss(pred, target)) == pytest.approx(want, abs=1e-3)
    assert batch_psnr(pred, target) == pytest.approx(-want, abs=1e-3)
    # hand value: MSE 0.01 per image -> (10/ln10)·ln(0.01) = -20 dB
    assert float(psnr_loss(torch.full((1, 1, 2, 2), 0.1), torch.zeros(1, 1, 2, 2))) == \
        pytest.approx(-20.0, abs=1e-5)


def test_tasks_declare_how_their_loss_relates_to_a_positive_error():
    assert DENOISE.loss_log_scale == pytest.approx(S)
    assert make_task({"name": "denoise", "loss_fn": "l1"}).loss_log_scale is None
    assert SEGMENT.loss_log_scale is None
    logits, target = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
    assert float(SEGMENT.loss(logits, target)) > 0  # CE + Dice: positive, so L·r^β applies


def _grad(loss_fn, ms):
    e = torch.tensor(ms, dtype=torch.float64, requires_grad=True)
    value = loss_fn(e)
    value.backward()
    return float(value.detach()), float(e.grad)


def test_latency_forms_values_and_exact_gradients():
    v, g = _grad(LatencyLoss("additive", lam=0.5, target_ms=10.0), 20.0)
    assert v == pytest.approx(1.0) and g == pytest.approx(0.05)
    hinge = LatencyLoss("hinge", lam=0.5, target_ms=10.0)
    v, g = _grad(hinge, 15.0)
    assert v == pytest.approx(0.25) and g == pytest.approx(0.05)
    assert _grad(hinge, 8.0) == (0.0, 0.0)  # free below the target
    band = LatencyLoss("band", lam=0.5, target_ms=10.0)
    assert _grad(band, 15.0) == pytest.approx((0.25, 0.05))  # the hinge above the target
    assert _grad(band, 8.0) == pytest.approx((0.1, -0.05))  # and pulled up below it
    mult = LatencyLoss("multiplicative", target_ms=10.0, beta=0.6)
    v, g = _grad(mult, 20.0)
    assert mult.multiplicative and v == pytest.approx(math.log(2.0)) and g == pytest.approx(1 / 20)


# A toy choice between 4 candidates: error multiplier q (lower is better) and latency t (ms).
Q = torch.tensor([1.0, 0.7, 0.55, 0.5], dtype=torch.float64)
T = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)


def _toy(objective, sigma, alpha):
    """total and dtotal/dα when pred = target + σ·(Σ p q)·n and E = Σ p t, p = softmax(α)."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    a = alpha.clone().requires_grad_(True)
    p = torch.softmax(a, 0)
    total, parts = objective(target + sigma * (p @ Q) * noise, target, p @ T, torch.zeros(()), 0)
    total.backward()
    return float(total.detach()), a.grad, parts


@pytest.mark.parametrize("form,kw", [("multiplicative", {"beta": 0.5}), ("additive", {"lam": 1.0})])
def test_psnr_loss_trade_off_is_the_same_at_two_noise_levels(form, kw):
    """For the PSNR loss the latency forms add a term that does not depend on the PSNR itself,
    so the α gradient and the best candidate are the same at σ = 15 and σ = 50 (a form that
    scales with the loss, e.g. task/r^β, fails both)."""
    obj = SearchObjective(psnr_loss, LatencyLoss(form, target_ms=4.0, **kw),
                          log_scale=DENOISE.loss_log_scale)
    alpha = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    _, g15, p15 = _toy(obj, 15 / 255, alpha)
    _, g50, p50 = _toy(obj, 50 / 255, alpha)
    assert p50["task"] - p15["task"] == pytest.approx(S * 2 * math.log(50 / 15), abs=1e-3)
    torch.testing.assert_close(g15, g50, rtol=1e-3, atol=1e-6)  # up to the loss's 1e-8
    best = {s: min(range(4), key=lambda i: _toy(obj, s / 255, 1e3 * F.one_hot(
        torch.tensor(i), 4).double())[0]) for s in (15, 50)}
    assert best[15] == best[50]
    if form == "multiplicative":  # e·r^β: total = task + S·β·ln r, an interior optimum here
        assert p15["latency"] == pytest.approx(S * 0.5 * math.log(float(
            torch.softmax(alpha, 0) @ T) / 4.0))
        assert best[15] == 2


def test_multiplicative_on_a_positive_loss_is_scale_free():
    """L·r^β: multiplying L by c multiplies the whole α gradient by c (Adam ignores that), so the
    direction, and the latency pull relative to the task pull, are the same at any noise
    level."""
    obj = SearchObjective(F.l1_loss, LatencyLoss("multiplicative", target_ms=4.0, beta=0.5))
    alpha = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    tot15, g15, p15 = _toy(obj, 15 / 255, alpha)
    _, g50, p50 = _toy(obj, 50 / 255, alpha)
    r = float(torch.softmax(alpha, 0) @ T) / 4.0
    assert tot15 == pytest.approx(p15["task"] * r ** 0.5)
    assert p50["task"] / p15["task"] == pytest.approx(50 / 15, rel=1e-6)  # L1 ∝ σ here
    torch.testing.assert_close(g50, g15 * (50 / 15), rtol=1e-6, atol=1e-10)
    lat_only = SearchObjective(F.l1_loss, None)
    _, t15, _ = _toy(lat_only, 15 / 255, alpha)
    _, t50, _ = _toy(lat_only, 50 / 255, alpha)
    torch.testing.assert_close((g15 - r ** 0.5 * t15) / t15.norm(),
                               (g50 - r ** 0.5 * t50) / t50.norm(), rtol=1e-6, atol=1e-10)


def test_multiplicative_refuses_a_negative_loss_without_log_scale():
    obj = SearchObjective(psnr_loss, LatencyLoss("multiplicative", target_ms=4.0))
    with pytest.raises(ErnasError, match="loss_log_scale"):
        obj(torch.full((1, 1, 2, 2), 0.1), torch.zeros(1, 1, 2, 2), torch.tensor(8.0),
            torch.zeros(()), 0)


def test_halving_latency_is_worth_s_beta_ln2_db():
    obj = SearchObjective(psnr_loss, LatencyLoss("multiplicative", target_ms=10.0, beta=0.1),
                          log_scale=S)
    pred, target = torch.full((1, 3, 4, 4), 0.1), torch.zeros(1, 3, 4, 4)
    full, _ = obj(pred, target, torch.tensor(10.0), torch.zeros(()), 0)
    half, _ = obj(pred, target, torch.tensor(5.0), torch.zeros(()), 0)
    assert float(full - half) == pytest.approx(S * 0.1 * math.log(2), abs=1e-5)  # 0.301 dB


def test_additive_objective_parts():
    sched = EntropySchedule(max_weight=0.2, warmup_steps=0, ramp_steps=0)
    obj = SearchObjective(psnr_loss, LatencyLoss("additive", lam=0.1, target_ms=4.0), sched,
                          log_scale=S)
    pred, target = torch.full((2, 3, 4, 4), 0.1), torch.zeros(2, 3, 4, 4)
    total, parts = obj(pred, target, torch.tensor(8.0, dtype=torch.float64), torch.tensor(3.0), 7)
    assert parts["task"] == pytest.approx(-20.0, abs=1e-4)
    assert parts["latency"] == pytest.approx(0.2)
    assert parts["entropy_weight"] == pytest.approx(0.2)
    assert parts["total"] == pytest.approx(-20.0 + 0.2 + 0.2 * 3.0, abs=1e-4)
    assert float(total) == pytest.approx(parts["total"])
    assert set(parts) == {"task", "latency", "entropy", "entropy_weight", "expected_ms", "total"}


def test_entropy_schedule_linear_and_cosine():
    lin = EntropySchedule(max_weight=2.0, warmup_steps=10, ramp_steps=20, shape="linear")
    cos = EntropySchedule(max_weight=2.0, warmup_steps=10, ramp_steps=20, shape="cosine")
    for s in (0, 9):
        assert lin(s) == 0.0 and cos(s) == 0.0
    quarter = math.cos(math.pi / 4)  # cosine ramp at t = 1/4 and 3/4
    assert lin(15) == pytest.approx(0.5) and cos(15) == pytest.approx(2.0 * (1 - quarter) / 2)
    assert lin(25) == pytest.approx(1.5) and cos(25) == pytest.approx(2.0 * (1 + quarter) / 2)
    for s in (30, 31, 1000):
        assert lin(s) == pytest.approx(2.0) and cos(s) == pytest.approx(2.0)
    assert EntropySchedule(1.0, warmup_steps=3, ramp_steps=0)(3) == 1.0
    with pytest.raises(ErnasError, match="shape"):
        EntropySchedule(1.0, shape="square")


def test_entropy_is_a_sum_over_decisions():
    uniform = {"a": {"x": torch.full((3,), 1 / 3), "y": torch.full((2,), 0.5),
                     "fixed": torch.ones(1)}}
    assert float(normalized_entropy(uniform)) == pytest.approx(2.0)
    assert float(normalized_entropy([torch.tensor([0.0, 1.0, 0.0]),
                                     torch.tensor([1.0, 0.0])])) == pytest.approx(0.0)
    assert float(normalized_entropy([torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0, 0])])) == \
        pytest.approx(1.0)
    # the pull on one decision does not depend on how many other decisions the space has
    grads = []
    for others in (1, 143):
        a = torch.tensor([0.1, 0.0, -0.1], requires_grad=True)
        rest = [torch.softmax(torch.randn(2), 0) for _ in range(others)]
        normalized_entropy([torch.softmax(a, 0), *rest]).backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][0] < 0 < grads[0][2]  # descending H pushes towards the leading candidate


def test_bad_arguments():
    with pytest.raises(ErnasError, match="latency form"):
        LatencyLoss("quadratic")
    with pytest.raises(ErnasError, match="target_ms"):
        LatencyLoss("additive", target_ms=0)
    with pytest.raises(ErnasError, match="beta"):
        LatencyLoss("multiplicative", beta=-1)
    with pytest.raises(ErnasError, match="loss_fn"):
        make_task({"name": "denoise", "loss_fn": "ssim"})
