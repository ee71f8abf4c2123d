"""Double backward: the backward of every op is itself differentiable, through the eager path
(the public functions) and through the custom op ``torch.ops.tritonnorm.norm_forward``.

* ``gradgradcheck`` in float64 for BN train / eval, IN (plain, with running statistics, with
  ``use_input_stats=False``), GN, LayerNorm2d and RMSNorm2d, each plain and with every fused
  extra (scale, shift, residual, SiLU), and the ResNet block (residual + ReLU) on BN, over every
  differentiable argument (input, weight, bias, scale, shift, residual); ``gradcheck`` beside it
  on the rows without scale / shift (see the note at the test);
* the same double backward on the custom op for BN train, GN and LayerNorm2d;
* the real uses, each against torch: a WGAN-GP step on an InstanceNorm critic, an R1 penalty
  through GroupNorm, a second-order MAML step through training BN (``functional_call``);
* a Hessian-vector product, and first-order gradients that do not change with ``create_graph``.

Every test runs over ``lib`` (tests/twins.py): tritonnorm, or with ``TRITONNORM_TEST_LIBS`` the
pure-torch twin (all pass) or a broken twin (they fail).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_to_reference
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from twins import (
    CASES,
    OPS,
    TORCH,
    as_function,
    case_params,
    fresh,
    make_args,
    over_libs,
    split,
)

from tritonnorm.activations import CODES

pytestmark = over_libs


# --- gradcheck / gradgradcheck on the public functions ------------------------------------------

# gradcheck's fast mode: one random projection u^T J v per check, compared with central
# differences along v (two calls per argument), instead of the full Jacobian (two calls per
# element of every argument): the interpreter takes ~0.1 s per launch, and the full mode on
# every case would take an hour. A wrong derivative shows in a random projection with
# probability 1; test_gradgradcheck_full_jacobian runs the full Jacobians once on a tiny case.
#
# With every extra (six arguments, the dearest rows) only gradgradcheck, without
# check_undefined_grad (None for some gradients, as autograd passes for unused outputs; a third
# more calls; checked on the other rows): its numerical side
# differentiates the first-order backward, so a first order inconsistent with the second fails it
# too, and the first order itself is compared with torch in float64 with every extra by
# tests/test_epilogues.py (test_float64: all + GELU-tanh, scale / shift + SiLU).


#
# The suite's budget (15 minutes on 2 cores) decides the rest: the first order alone
# (``gradcheck``) and ``check_undefined_grad`` on the two cheapest rows only (the first order of
# every row is compared with torch in float64 by tests/test_properties.py and
# tests/test_epilogues.py), and InstanceNorm without input statistics plain only (its all-silu
# row is eval BatchNorm's kernels with per-sample extras, a row of its own above).
FIRST_ORDER_TOO = {("bn-train", "plain"), ("gn", "plain")}
HIGHER_ORDER_CASES = [c for c in CASES if c != ("in-eval", "all-silu")]


@pytest.mark.parametrize(("op", "extras"), case_params(HIGHER_ORDER_CASES))
def test_gradcheck_and_gradgradcheck(lib, device, op, extras):
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    f = as_function(lib, op, args, names)  # running statistics (if any) updated by every call
    inputs = tuple(t.detach().requires_grad_() for t in tensors)
    first_order_too = (op.id, extras) in FIRST_ORDER_TOO
    if first_order_too:
        assert gradcheck(f, inputs, fast_mode=True)
    assert gradgradcheck(f, inputs, fast_mode=True, check_undefined_grad=first_order_too)


# The full Jacobians once: training BN (the cheapest launches) on 2 x 2 x 2 values.
FULL_MODE = [("bn-train", "plain", (2, 2, 2, 1))]


@pytest.mark.parametrize(("op", "extras", "shape"), [
    pytest.param(OPS[o], e, s, id=f"{o}-{e}") for o, e, s in FULL_MODE
])  # fmt: skip
def test_gradgradcheck_full_jacobian(lib, device, op, extras, shape):
    args = make_args(op, extras, shape=shape, device=device)
    names, tensors, _ = split(args)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)
    assert gradgradcheck(as_function(lib, op, args, names), inputs)


# --- the custom op --------------------------------------------------------------------------------

# (op, extras, norm_forward's settings: use_input_stats, reduce_batch, num_groups, per_position,
# centred)
CUSTOM_OP = [
    ("bn-train", "plain", (True, True, 0, False, True)),
    ("gn", "all-silu", (True, False, 2, False, True)),
    ("ln2d", "all-silu", (True, False, 0, True, True)),
]


@pytest.mark.parametrize(("op", "extras", "settings"), [
    pytest.param(OPS[o], e, s, id=f"{o}-{e}") for o, e, s in CUSTOM_OP
])  # fmt: skip
def test_custom_op_gradgradcheck(lib, device, op, extras, settings):
    use_input_stats, reduce_batch, num_groups, per_position, centred = settings
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    activation = args.get("activation")

    def f(*ts):
        t = dict(zip(names, ts, strict=True))
        # running statistics None: the output of training BN does not depend on them, and the
        # op returns new ones instead of updating any
        return lib.norm_forward(
            t["input"], t["weight"], t.get("bias"), None, None, use_input_stats, reduce_batch,
            num_groups, 0.1, 1e-5 if not per_position else 1e-6, t.get("scale"), t.get("shift"),
            t.get("residual"), CODES[activation] if activation else 0, 0.01, per_position, centred,
        )[0]  # fmt: skip

    inputs = tuple(t.detach().requires_grad_() for t in tensors)
    # the op computes what the public function does (the same settings); its first order is
    # the eager path's kernels, checked by opcheck (tests/test_modules.py): the second order here
    assert_close_to_reference(f(*inputs), op.call(TORCH, **fresh(args)), name="y")
    # check_undefined_grad on the cheapest row: None cotangents through the custom ops' backward
    assert gradgradcheck(f, inputs, fast_mode=True, check_undefined_grad=extras == "plain")


# --- real uses --------------------------------------------------------------------------------------


class _Mean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3))


def _twins(build, lib, fuse):
    """The model from ``build`` twice from one seed: torch's, and ``lib``'s (converted, with
    ``fuse``: a following activation folded into the norm's epilogue), both float64."""
    torch.manual_seed(1)
    ref = build().double()
    torch.manual_seed(1)
    ours = lib.convert(build().double(), fuse_activations=fuse)
    return ref, ours


def _assert_same_grads(ours: nn.Module, ref: nn.Module):
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:  # e.g. the last bias under R1: no path from it to the penalty
            assert p.grad is None or not p.grad.any(), f"{name}: a gradient torch does not have"
            continue
        assert p.grad is not None, f"{name}: no gradient (torch has one)"
        assert_close_to_reference(p.grad, q.grad, name=f"{name}.grad")


def _assert_same_buffers(ours: nn.Module, ref: nn.Module):
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        if a.is_floating_point():
            assert_close_to_reference(a, b, name=name)
        else:
            assert torch.equal(a, b), name  # num_batches_tracked


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused-leaky-relu"])
def test_wgan_gp_step_instance_norm_critic(lib, device, fuse):
    def critic():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(4, 2, 3, padding=1), _Mean(),
        )  # fmt: skip

    real = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    fake = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    alpha = torch.rand(2, 1, 1, 1, dtype=torch.float64)
    losses = []
    models = _twins(critic, lib, fuse)
    for model in models:
        model.to(device)
        r, f = real.to(device), fake.to(device)
        interp = (alpha.to(device) * r + (1 - alpha.to(device)) * f).requires_grad_()
        (g,) = torch.autograd.grad(model(interp).sum(), interp, create_graph=True)
        penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = model(f).mean() - model(r).mean() + 10 * penalty
        loss.backward()
        losses.append(loss.detach())
    assert_close_to_reference(losses[1], losses[0], name="loss")
    _assert_same_grads(models[1], models[0])


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused-silu"])
def test_r1_penalty_through_group_norm(lib, device, fuse):
    def discriminator():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
            nn.Conv2d(4, 2, 3, padding=1), _Mean(),
        )  # fmt: skip

    real = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    penalties = []
    models = _twins(discriminator, lib, fuse)
    for model in models:
        model.to(device)
        x = real.to(device).requires_grad_()
        (r1,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        penalty = r1.pow(2).sum()
        penalty.backward()
        penalties.append(penalty.detach())
    assert_close_to_reference(penalties[1], penalties[0], name="r1")
    _assert_same_grads(models[1], models[0])


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused-relu"])
def test_maml_second_order_step_through_batch_norm(lib, device, fuse):
    def learner():
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        )  # fmt: skip

    support, query = torch.randn(2, 2, 3, 4, 4, dtype=torch.float64)
    y_support, y_query = torch.tensor([0, 2]), torch.tensor([1, 2])
    losses = []
    models = _twins(learner, lib, fuse)
    for model in models:
        model.to(device).train()  # batch statistics; the running ones move on both calls
        params = dict(model.named_parameters())
        inner = F.cross_entropy(
            functional_call(model, params, (support.to(device),)), y_support.to(device)
        )
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads, strict=True)}
        outer = F.cross_entropy(
            functional_call(model, adapted, (query.to(device),)), y_query.to(device)
        )
        outer.backward()
        losses.append(outer.detach())
    assert_close_to_reference(losses[1], losses[0], name="outer loss")
    _assert_same_grads(models[1], models[0])
    _assert_same_buffers(models[1], models[0])


# --- Hessian-vector product; first-order gradients with a graph -----------------------------------


@pytest.mark.parametrize(("op", "extras"), case_params([("gn", "all-silu"), ("bn-train", "plain")]))
def test_hessian_vector_product(lib, device, op, extras):
    args = make_args(op, extras, device=device)
    names, tensors, _ = split(args)
    weights = torch.randn(args["input"].shape, dtype=torch.float64, device=device)
    vectors = tuple(torch.randn_like(t) for t in tensors)

    def hvp(ns):
        f = as_function(ns, op, fresh(args), names)
        loss = lambda *ts: (f(*ts) * weights).sum()
        return torch.autograd.functional.hvp(loss, tensors, vectors)

    (value, products), (ref_value, ref_products) = hvp(lib), hvp(TORCH)
    assert_close_to_reference(value, ref_value, name="loss")
    for name, p, q in zip(names, products, ref_products, strict=True):
        assert_close_to_reference(p, q, name=f"hvp[{name}]")


@pytest.mark.parametrize(("op", "extras"), case_params([
    (o, "all-silu") for o in OPS
] + [("bn-train", "residual-relu")]))  # fmt: skip
def test_first_order_gradients_do_not_depend_on_create_graph(lib, device, op, extras):
    # The backward recorded for a double backward computes the plain backward's first-order
    # gradients, and records its graph. Not bitwise: torch's own SiLU backward takes another
    # formula with a graph (an ulp apart). In float32, where a path with other intermediates
    # would show.
    args = make_args(op, extras, device=device, dtype=torch.float32)
    names, tensors, _ = split(args)
    grad_y = torch.randn(args["input"].shape, device=device)
    results = []
    for create_graph in (False, True):
        inputs = tuple(t.detach().requires_grad_() for t in tensors)
        y = as_function(lib, op, fresh(args), names)(*inputs)
        results.append(torch.autograd.grad(y, inputs, grad_y, create_graph=create_graph))
    for name, plain, with_graph in zip(names, *results, strict=True):
        assert_close_to_reference(with_graph, plain, name=f"grad {name}")
        # and the graph is recorded: every gradient here depends on the input through x_hat or
        # the activation's derivative
        assert with_graph.requires_grad and not plain.requires_grad, f"grad {name}: no graph"
