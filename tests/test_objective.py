"""Search objective: task losses, latency forms (value and gradient sign), entropy schedule."""
import math

import pytest
import torch

import torch.nn.functional as F

from ernas import ErnasError
from ernas.task import make_task
from ernas.search.objective import EntropySchedule, LatencyLoss, SearchObjective, normalized_entropy
from ernas.tasks.denoise import batch_psnr, psnr_loss
from ernas.tasks.denoise.metrics import psnr

l1 = F.l1_loss


def test_psnr_loss_is_minus_psnr():
    torch.manual_seed(0)
    target = torch.rand(3, 3, 8, 8)
    pred = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    want = -sum(psnr(p, t) for p, t in zip(pred, target)) / 3
    assert float(psnr_loss(pred, target)) == pytest.approx(want, abs=1e-3)
    assert batch_psnr(pred, target) == pytest.approx(-want, abs=1e-3)
    assert float(l1(pred, target)) == pytest.approx(float((pred - target).abs().mean()))
    # hand value: MSE 0.01 per image -> (10/ln10)·ln(0.01) = -20 dB
    assert float(psnr_loss(torch.full((1, 1, 2, 2), 0.1), torch.zeros(1, 1, 2, 2))) == \
        pytest.approx(-20.0, abs=1e-5)


def _grad(loss_fn, ms):
    e = torch.tensor(ms, dtype=torch.float64, requires_grad=True)
    value = loss_fn(e)
    value.backward()
    return float(value.detach()), float(e.grad)


def test_latency_forms_value_and_gradient_sign():
    add = LatencyLoss("additive", lam=0.5, target_ms=10.0)
    v, g = _grad(add, 20.0)
    assert v == pytest.approx(0.5 * 2.0) and g == pytest.approx(0.05) and g > 0

    hinge = LatencyLoss("hinge", lam=0.5, target_ms=10.0)
    v, g = _grad(hinge, 15.0)
    assert v == pytest.approx(0.5 * 0.5) and g > 0
    v, g = _grad(hinge, 8.0)
    assert v == 0.0 and g == 0.0  # free below the target

    mult = LatencyLoss("multiplicative", target_ms=10.0, beta=0.6)
    assert mult.multiplicative
    v, g = _grad(mult, 20.0)
    assert v == pytest.approx(2.0 ** 0.6) and g > 0


@pytest.mark.parametrize("task_sign", [1.0, -1.0])
def test_multiplicative_objective_penalises_latency_for_either_task_sign(task_sign):
    """task·f for a positive task loss, task/f for a negative one (the PSNR loss): a higher
    latency always raises the objective."""
    task_loss = l1 if task_sign > 0 else psnr_loss  # l1 > 0; PSNR loss of MSE 0.25 < 0
    obj = SearchObjective(task_loss, LatencyLoss("multiplicative", target_ms=10.0, beta=1.0))
    target, pred = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5)
    e = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    total, parts = obj(pred, target, e, torch.tensor(0.5), step=0)
    total.backward()
    assert float(e.grad) > 0
    task = parts["task"]
    assert math.copysign(1, task) == task_sign
    assert parts["total"] == pytest.approx(task * 2.0 if task > 0 else task / 2.0, rel=1e-6)


def test_additive_objective_parts():
    sched = EntropySchedule(max_weight=0.2, warmup_steps=0, ramp_steps=0)
    obj = SearchObjective(psnr_loss, LatencyLoss("additive", lam=0.1, target_ms=4.0), sched)
    pred, target = torch.full((2, 3, 4, 4), 0.1), torch.zeros(2, 3, 4, 4)
    total, parts = obj(pred, target, torch.tensor(8.0, dtype=torch.float64), torch.tensor(0.5), 7)
    assert parts["task"] == pytest.approx(-20.0, abs=1e-4)
    assert parts["latency"] == pytest.approx(0.2)
    assert parts["entropy_weight"] == pytest.approx(0.2)
    assert parts["total"] == pytest.approx(-20.0 + 0.2 + 0.2 * 0.5, abs=1e-4)
    assert float(total) == pytest.approx(parts["total"])
    assert set(parts) == {"task", "latency", "entropy", "entropy_weight", "expected_ms", "total"}


def test_entropy_schedule_linear_and_cosine():
    lin = EntropySchedule(max_weight=2.0, warmup_steps=10, ramp_steps=20, shape="linear")
    cos = EntropySchedule(max_weight=2.0, warmup_steps=10, ramp_steps=20, shape="cosine")
    for s in (0, 9):
        assert lin(s) == 0.0 and cos(s) == 0.0
    assert lin(10) == 0.0 and cos(10) == pytest.approx(0.0)
    quarter = math.cos(math.pi / 4)  # cosine ramp at t = 1/4 and 3/4
    assert lin(15) == pytest.approx(0.5) and cos(15) == pytest.approx(2.0 * (1 - quarter) / 2)
    assert lin(20) == pytest.approx(1.0) and cos(20) == pytest.approx(1.0)
    assert lin(25) == pytest.approx(1.5) and cos(25) == pytest.approx(2.0 * (1 + quarter) / 2)
    for s in (30, 31, 1000):
        assert lin(s) == pytest.approx(2.0) and cos(s) == pytest.approx(2.0)
    assert EntropySchedule(1.0, warmup_steps=3, ramp_steps=0)(3) == 1.0
    with pytest.raises(ErnasError, match="shape"):
        EntropySchedule(1.0, shape="square")


def test_normalized_entropy_uniform_and_onehot():
    uniform = {"a": {"x": torch.full((3,), 1 / 3), "y": torch.full((2,), 0.5),
                     "fixed": torch.ones(1)}}
    assert float(normalized_entropy(uniform)) == pytest.approx(1.0)
    onehot = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0])]
    assert float(normalized_entropy(onehot)) == pytest.approx(0.0)
    mix = [torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0, 0.0])]
    assert float(normalized_entropy(mix)) == pytest.approx(0.5)
    # gradient pushes a near-uniform distribution further from uniform
    a = torch.tensor([0.1, 0.0], requires_grad=True)
    normalized_entropy([torch.softmax(a, 0)]).backward()
    assert a.grad[0] < 0 < a.grad[1]


def test_bad_arguments():
    with pytest.raises(ErnasError, match="latency form"):
        LatencyLoss("quadratic")
    with pytest.raises(ErnasError, match="target_ms"):
        LatencyLoss("additive", target_ms=0)
    with pytest.raises(ErnasError, match="loss_fn"):
        make_task({"name": "denoise", "loss_fn": "ssim"})
