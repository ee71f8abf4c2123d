"""Where a transform meets a path that has no rule for it: a clear error naming the op, or a
route that has one. Never a silently dropped tangent or gradient.

* torch.compile tracing a torch.func transform (jvp, vmap, grad) over tritonnorm's ops: the
  custom op has no forward-mode or batching rule (torch would drop jvp's tangent silently), so
  the traced call runs reference.py's torch ops; checked against torch's values;
* the custom op called directly with dual tensors (torch.autograd.forward_ad): refused, naming
  the op and forward-mode AD;
* tn.SyncBatchNorm while synchronising: torch.func transforms refused, naming SyncBatchNorm; its
  backward is once-differentiable (a double backward raises, as torch's SyncBatchNorm).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from tolerances import assert_close_to_reference

import tritonnorm as tn
from tritonnorm import sync

SHAPE = (2, 4, 3, 3)


def _ops():
    w = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
    b = torch.linspace(-0.5, 0.5, 4, dtype=torch.float64)
    s = torch.linspace(0.8, 1.2, 8, dtype=torch.float64).reshape(2, 4)
    ours = {
        "in": lambda x: tn.instance_norm(x, weight=w, bias=b),
        "gn-scale-shift-silu": lambda x: tn.group_norm(
            x, 2, w, b, scale=s, shift=s - 1, activation="silu"
        ),
    }
    ref = {
        "in": lambda x: F.instance_norm(x, weight=w, bias=b),
        "gn-scale-shift-silu": lambda x: F.silu(
            F.group_norm(x, 2, w, b) * s[..., None, None] + (s - 1)[..., None, None]
        ),
    }
    return ours, ref


TRANSFORMS = {
    "jvp": lambda f: lambda x, t: torch.func.jvp(f, (x,), (t,))[1],
    "vmap": lambda f: lambda x, t: torch.func.vmap(f)(torch.stack([x, t])),
    "grad": lambda f: lambda x, t: torch.func.grad(lambda u: (f(u) * t).sum())(x),
}


@pytest.mark.parametrize("op", ["in", "gn-scale-shift-silu"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_transforms_traced_by_torch_compile(device, op, transform):
    torch._dynamo.reset()
    ours, ref = _ops()
    x = torch.randn(SHAPE, dtype=torch.float64, device=device)
    t = torch.randn(SHAPE, dtype=torch.float64, device=device)
    to = lambda f: lambda u: f(u.to(device))
    compiled = torch.compile(TRANSFORMS[transform](to(ours[op])), backend="aot_eager")
    expected = TRANSFORMS[transform](to(ref[op]))(x, t)
    assert_close_to_reference(compiled(x, t), expected, name=f"compiled {transform}")


def test_custom_op_refuses_dual_tensors(device):
    x = torch.randn(SHAPE, device=device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match=r"tritonnorm::norm_forward: forward-mode AD"):
            torch.ops.tritonnorm.norm_forward(
                dual, None, None, None, None, True, False, 0, 0.1, 1e-5
            )
    # without a tangent the op runs
    torch.ops.tritonnorm.norm_forward(x, None, None, None, None, True, False, 0, 0.1, 1e-5)


def test_sync_batch_norm_refuses_transforms(device):
    x = torch.randn(3, *SHAPE, device=device)
    sync._check_no_transform(x[0])  # no transform: nothing to refuse
    for transform in (torch.func.vmap, torch.func.grad):
        fn = lambda u: (sync._check_no_transform(u), u.sum())[1]
        arg = x if transform is torch.func.vmap else x[0]
        with pytest.raises(RuntimeError, match=r"tritonnorm.SyncBatchNorm: torch.func"):
            transform(fn)(arg)


@pytest.fixture
def one_rank_group():
    """A gloo group of this process alone: the synchronised function runs (its collectives
    over one rank), which is all a double backward needs to meet it."""
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


def test_sync_batch_norm_backward_is_once_differentiable(device, one_rank_group):
    x = torch.randn(SHAPE, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.ones(4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.zeros(4, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.zeros(4, dtype=torch.float64, device=device)
    rv = torch.ones(4, dtype=torch.float64, device=device)
    y = sync._sync_batch_norm(x, w, b, rm, rv, 1e-5, 0.1, one_rank_group, 1)
    # first order: torch's values
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad((F.batch_norm(xr, None, None, w, b, True) ** 2).sum(), xr)
    assert_close_to_reference(g, gr, name="dx")
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.pow(2).sum().backward()
