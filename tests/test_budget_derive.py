"""ernas.search.budget: the knapsack within a latency budget, the supernet's one-hot scores and
``search.derive=budget`` run by a search.

The latency table is the synthetic one of test_search_loop (made-up numbers in a sensible order,
not measurements); the knapsack is checked against brute force over a space small enough to list.
"""
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from test_search_loop import TASK, SmoothImages, cfg, synthetic_table

from ernas import ErnasError, load_arch, load_space
from ernas.batches import step_batches
from ernas.latency.predict import ExpectedLatency
from ernas.search import run_search
from ernas.search.budget import best_within, block_values, changes, smallest_ms, supernet_scorer
from ernas.space import Arch, space_from_dict
from ernas.supernet import SuperNet

ROOT = Path(__file__).resolve().parents[1]

TINY = ROOT / "search_spaces" / "nafnet_tiny.yaml"


@pytest.fixture(scope="module")
def small():
    """nafnet_tiny with kernel and keep searched only: 6 blocks per position, 6^4 networks."""
    space = space_from_dict({
        "family": "nafnet", "name": "kernel_keep",
        "geometry": {"img_channel": 3, "width": 8, "enc_blk_nums": [1, 1],
                     "middle_blk_num": 1, "dec_blk_nums": [1, 1]},
        "blocks": {"all": {"norm": "layernorm", "attention": "sca", "kernel": [3, 5, 7],
                           "dw_expand": 2, "ffn_expand": 2, "keep": [True, False]}}})
    return space, ExpectedLatency(space, synthetic_table(space))


def networks(space):
    for combo in itertools.product(*(range(len(space.combos(p))) for p in space.searchable)):
        values = {p: dict(space.combos(p)[k]) for p, k in zip(space.searchable, combo)}
        values.update({p: {d: c[0] for d, c in ch.items()} for p, ch in space.choices.items()
                       if p not in space.searchable})
        yield combo, Arch(space.family, dict(space.geometry), values)


@pytest.mark.parametrize("fraction", [0.45, 0.7, 0.95])
def test_knapsack_matches_brute_force(small, fraction):
    """The answer is within the budget, and no network within it has a higher total value; a
    wrong backtrack, cost rounding the wrong way or a dropped position would break one of them."""
    space, expected = small
    rng = np.random.default_rng(0)
    values = {p: rng.normal(size=len(space.combos(p))) for p in space.searchable}
    cost = [getattr(expected, "lat_" + p.replace(".", "_")).flatten().numpy()
            for p in space.searchable]
    combos = np.array(list(itertools.product(*(range(len(c)) for c in cost))))
    ms = expected.scale * (expected.const + sum(c[combos[:, i]] for i, c in enumerate(cost))) \
        + expected.offset
    total = sum(values[p][combos[:, i]] for i, p in enumerate(space.searchable))
    some = list(itertools.islice(networks(space), 0, None, 97))
    assert [expected.of_arch(a) for _, a in some] == pytest.approx([ms[i * 97] for i in
                                                                    range(len(some))])
    lo, hi = smallest_ms(space, expected), expected.of_arch(space.largest())
    budget = lo + fraction * (hi - lo)
    got = best_within(space, expected, values, some[0][1], budget, "got")
    mine = sum(values[p][space.combos(p).index(got.values[p])] for p in space.searchable)
    assert expected.of_arch(got) <= budget
    assert mine == pytest.approx(total[ms <= budget].max())


def test_ties_keep_the_start_and_a_paying_block_fills_the_budget(small):
    space, expected = small
    start = next(a for _, a in networks(space) if all(
        a.values[p]["keep"] is True and a.values[p]["kernel"] == 5 for p in space.searchable))
    zero = {p: np.zeros(len(space.combos(p))) for p in space.searchable}
    big = expected.of_arch(space.largest())
    assert best_within(space, expected, zero, start, big, "same").values == start.values
    p0 = space.searchable[0]
    k7 = space.combos(p0).index({**start.values[p0], "kernel": 7})
    gain = {**zero, p0: np.where(np.arange(len(zero[p0])) == k7, 1.0, 0.0)}
    filled = best_within(space, expected, gain, start, big, "filled")
    assert filled.values[p0]["kernel"] == 7
    # at the start's own latency kernel 7 must be paid for by a cheaper block elsewhere: made
    # when that costs nothing, not when it costs more than 7 gains
    tight = expected.of_arch(start)
    traded = best_within(space, expected, gain, start, tight, "traded")
    assert traded.values[p0]["kernel"] == 7 and expected.of_arch(traded) <= tight
    dear = {p: np.where(np.arange(len(v)) == space.combos(p).index(start.values[p]), 0.0, -1.0)
            for p, v in zero.items()}
    dear[p0][k7] = 0.5
    assert best_within(space, expected, dear, start, tight, "kept").values == start.values


def test_budget_below_the_fastest_network_is_refused(small):
    space, expected = small
    zero = {p: np.zeros(len(space.combos(p))) for p in space.searchable}
    with pytest.raises(ErnasError, match=r"search\.target_ms\) above"):
        best_within(space, expected, zero, space.largest(), 0.99 * smallest_ms(space, expected),
                    "none")


def test_block_values_score_each_block_against_the_start(small):
    """v = 0 at the start's block and the same for every skipped block; the others are the
    scorer's differences."""
    space, _ = small
    start = space.largest()
    calls = []

    def score(arch):
        calls.append(arch)
        return sum(3.0 if not v["keep"] else v["kernel"] for v in arch.values.values())

    values = block_values(space, start, score)
    for p in space.searchable:
        for k, combo in enumerate(space.combos(p)):
            want = 0.0 if combo == start.values[p] else ((3.0 if not combo["keep"] else
                                                          combo["kernel"]) - 7)
            assert values[p][k] == want
    assert len(calls) == 1 + len(space.searchable) * 3  # the start, kernels 3 and 5, one skip


@pytest.fixture(scope="module")
def tiny():
    space = load_space(TINY)
    expected = ExpectedLatency(space, synthetic_table(space))
    return (space, expected, step_batches(SmoothImages(16, 0), 2, seed=0),
            step_batches(SmoothImages(8, 1), 2, seed=1))


def test_scorer_runs_the_supernet_one_hot(tiny):
    """The scorer's metric of a network equals the extracted network's metric on the same
    batches with batch statistics (the supernet one-hot computes what the network computes)."""
    space, _, _, val = tiny
    torch.manual_seed(0)
    net = SuperNet(space)
    with torch.no_grad():  # NAFNet starts as the identity (zero residual scales)
        for w in net.weight_parameters():
            w.add_(0.1 * torch.randn_like(w))
    arch = space.largest()
    score = supernet_scorer(net, val, 2, torch.device("cpu"), TASK)
    model = net.extract(arch).train()
    ev = TASK.evaluator()
    with torch.no_grad():
        for i in range(2):
            x, y = val(i)
            ev.update(model(x).float(), y, f"val{i}")
    assert score(arch) == pytest.approx(float(ev.compute()[TASK.metric]), abs=1e-4)
    assert score(arch) != pytest.approx(score(Arch(arch.family, dict(arch.geometry), {
        **arch.values, space.searchable[0]: {**arch.values[space.searchable[0]], "kernel": 3}})))


def test_changes_name_skipped_blocks_once(small):
    space, _ = small
    start = space.largest()
    p0, p1 = space.searchable[:2]
    after = Arch(start.family, dict(start.geometry), {
        **start.values, p0: {**start.values[p0], "keep": False, "kernel": 3},
        p1: {**start.values[p1], "kernel": 5}})
    assert changes(space, start, after) == [f"{p0}: skipped", f"{p1}.kernel: 7 -> 5"]
    assert changes(space, start, start) == []


def test_search_derives_within_its_target(tiny, tmp_path):
    """A search with derive=budget and a target below its argmax derives a network within the
    target, reports the argmax and what changed, and saves that network (arch.yaml, inherited
    weights) rather than the argmax; with derive=argmax the same search saves the argmax."""
    space, expected, train, val = tiny
    kw = dict(lam=0.0, weight_keep_rate=1.0)
    free = run_search(space, expected, train, val, cfg(**kw), tmp_path / "free", task=TASK,
                      progress=False)
    target = 0.5 * (free["predicted_latency_ms"] + smallest_ms(space, expected))
    out = tmp_path / "budget"
    s = run_search(space, expected, train, val, cfg(**kw, target_ms=target, derive="budget"),
                   out, task=TASK, progress=False)
    assert s["argmax_predicted_ms"] == pytest.approx(free["predicted_latency_ms"])
    assert s["predicted_latency_ms"] <= target < s["argmax_predicted_ms"]
    assert s["derive"] == "budget" and s["derive_changes"] and not free["derive_changes"]
    arch = load_arch(out / "arch.yaml")
    assert expected.of_arch(arch) == pytest.approx(s["predicted_latency_ms"])
    model = SuperNet(space).extract(arch)  # the saved weights are this network's
    model.load_state_dict(torch.load(out / "inherited.pt", weights_only=True), strict=True)


def test_budget_is_refused_before_searching_or_with_stochastic_depth(tiny, tmp_path):
    space, expected, train, val = tiny
    with pytest.raises(ErnasError, match="fastest network"):
        run_search(space, expected, train, val,
                   cfg(target_ms=1e-6, derive="budget", weight_keep_rate=1.0),
                   tmp_path / "x", task=TASK, progress=False)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    with pytest.raises(ErnasError, match="weight_keep_rate=1.0"):
        cfg(derive="budget", weight_keep_rate=0.5)


def test_a_checkpoint_from_before_the_derive_field_resumes(tiny, tmp_path):
    """A search checkpoint whose config lacks a field added since resumes as if it held the
    default (and a changed field is still refused)."""
    space, expected, train, val = tiny
    out = tmp_path / "old"
    run_search(space, expected, train, val, cfg(checkpoint_every=4), out, task=TASK,
               progress=False, stop_after=8)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    del ck["config"]["derive"]
    torch.save(ck, out / "checkpoint.pt")
    s = run_search(space, expected, train, val, cfg(), out, task=TASK, progress=False,
                   resume=True)
    assert s["steps"] == cfg().steps
    with pytest.raises(ErnasError, match="derive"):
        run_search(space, expected, train, val, cfg(derive="budget", weight_keep_rate=1.0,
                                                    target_ms=1e3), out, task=TASK,
                   progress=False, resume=True)
