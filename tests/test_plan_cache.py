"""The plan caches over a long run: runtime scalars (momentum, eps) share one plan, the caches
are bounded (least recently used evicted) and an evicted shape plans again, right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tritonnorm as tn
from tritonnorm.kernels import launch


@pytest.fixture
def fresh_plans():
    """No plans at the start; the default bound restored after."""
    size = launch._forward_plans.size
    launch.clear_plans()
    yield
    launch.set_plan_cache_size(size)
    launch.clear_plans()


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_momentum_none_plans_once_and_averages_like_torch(device, fresh_plans):
    """Cumulative-average BatchNorm (momentum=None, swa_utils.update_bn's setting): the factor
    1/num_batches_tracked changes every step, the plan does not."""
    ours = tn.BatchNorm2d(4, momentum=None).to(device)
    theirs = torch.nn.BatchNorm2d(4, momentum=None).to(device)
    for step in range(6):
        x = torch.randn(3, 4, 5, 2, device=device) * (step + 1) + step
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        ours(x1).square().sum().backward()
        theirs(x2).square().sum().backward()
        _close(x1.grad, x2.grad)
    assert launch.plan_counts() == {"forward": 1, "backward": 1}
    _close(ours.running_mean, theirs.running_mean)
    _close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 6


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda fn, x, i: fn.batch_norm(
                x, x.new_zeros(4), x.new_ones(4), training=True, momentum=(0.1, 0.7, 0.35)[i]
            ),
            id="bn-momentum",
        ),
        pytest.param(lambda fn, x, i: fn.group_norm(x, 2, eps=(1e-5, 0.5, 3.0)[i]), id="gn-eps"),
        pytest.param(
            lambda fn, x, i: fn.instance_norm(
                x,
                x.new_zeros(4),
                x.new_ones(4),
                use_input_stats=True,
                momentum=(0.2, 0.9, 0.5)[i],
                eps=(1e-5, 0.25, 2.0)[i],
            ),
            id="in-momentum-eps",
        ),
    ],
)
def test_runtime_scalars_share_a_plan(device, fresh_plans, call):
    """Each call with other momentum/eps values gives torch's output from the one plan,
    replayed from the second call on."""
    x = torch.randn(2, 4, 3, 3, device=device)
    for i in range(3):
        _close(call(tn.functional, x, i), call(F, x, i))
    assert launch.plan_counts()["forward"] == 1


def test_running_statistics_follow_each_calls_momentum(device, fresh_plans):
    rm_ours, rv_ours = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_torch, rv_torch = rm_ours.clone(), rv_ours.clone()
    for momentum in (0.1, 0.9, 0.0, 1.0, 0.33):
        x = torch.randn(3, 4, 2, 2, device=device) + momentum
        tn.functional.batch_norm(x, rm_ours, rv_ours, training=True, momentum=momentum)
        F.batch_norm(x, rm_torch, rv_torch, training=True, momentum=momentum)
        _close(rm_ours, rm_torch)
        _close(rv_ours, rv_torch)
    assert launch.plan_counts()["forward"] == 1


def test_caches_are_bounded_and_evicted_shapes_plan_again(device, fresh_plans):
    launch.set_plan_cache_size(3)
    norm = tn.GroupNorm(2, 4).to(device)
    hot = torch.randn(2, 4, 3, 3, device=device)
    for size in (1, 2, 4, 5, 6, 7):
        for x in (hot, torch.randn(2, 4, size, 3, device=device)):
            x = x.clone().requires_grad_()
            y = norm(x)
            y.sum().backward()
            ref_x = x.detach().clone().requires_grad_()
            ref = F.group_norm(ref_x, 2, norm.weight, norm.bias, norm.eps)
            ref.sum().backward()
            _close(y, ref)
            _close(x.grad, ref_x.grad)
        counts = launch.plan_counts()
        assert counts["forward"] <= 3 and counts["backward"] <= 3
    # the hot shape, used between every other one, was never evicted: still its first plan
    hot_keys = [k for k in launch._forward_plans if k[0] == hot.shape]
    assert len(hot_keys) == 1
    assert list(launch._forward_plans)[-1][0] == (2, 4, 7, 3)  # most recent last
    assert len(launch._forward_plans) == 3


def test_shrinking_the_bound_evicts_the_oldest(device, fresh_plans):
    for size in (1, 2, 3, 4):
        tn.functional.group_norm(torch.randn(1, 2, size, device=device), 1)
    assert launch.plan_counts()["forward"] == 4
    previous = launch.set_plan_cache_size(2)
    assert previous == launch.PLAN_CACHE_SIZE
    assert [k[0] for k in launch._forward_plans] == [(1, 2, 3), (1, 2, 4)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_cache_sizes_are_refused(bad, fresh_plans):
    with pytest.raises(ValueError, match="positive integer"):
        launch.set_plan_cache_size(bad)
    assert launch._forward_plans.size == launch.PLAN_CACHE_SIZE  # unchanged


@pytest.mark.parametrize(("value", "expected"), [("", 1024), ("64", 64), ("x", None), ("0", None)])
def test_plan_cache_size_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("TRITONNORM_PLAN_CACHE_SIZE", value)
    if expected is None:
        with pytest.raises(ValueError, match="TRITONNORM_PLAN_CACHE_SIZE"):
            launch._cache_size()
    else:
        assert launch._cache_size() == expected
