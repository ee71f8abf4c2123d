"""Running one normalisation forward + backward on private copies, and comparing three runs of it:
tritonnorm, torch in the same dtypes, and torch in float64 (the reference)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from norms import make_buffers
from tolerances import assert_bitwise_equal, assert_close_to_reference

# Under the interpreter the library decides fused-or-split by the same rule whether "fused" is
# forced or not, and launches the first (heuristic) candidate either way: "auto" launches what
# "fused" launches (tests/test_kernel_paths.py checks it). On CUDA "auto" may take a committed
# table's or an autotuned config instead.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def paths(*names: str) -> tuple[str, ...]:
    """``names`` without "auto" under the interpreter where "fused" is there too (its twin)."""
    if INTERPRET and "fused" in names:
        return tuple(n for n in names if n != "auto")
    return names


# The kernel paths every forward/backward test is run on:
#   auto  - whatever the library picks (on CUDA only: see paths())
#   fused - single tile held in registers (falls back to split when the reduction is too long)
#   split - statistics split over 3 programs per channel/instance, combined with Chan's formula
PATHS = paths("auto", "fused", "split")

FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}


def kernel_path(path: str, split: int = 3):
    """Context manager forcing one kernel path (``auto``: no forcing)."""
    if path == "auto":
        return contextlib.nullcontext()
    from tritonnorm.kernels.config import forced

    if path == "fused":
        return forced(fused=True)
    if path == "split":
        return forced(fused=False, split=split)
    if path == "lanes":  # split, with per-element accumulators (the LANES autotune choice)
        return forced(fused=False, split=split, lanes=True)
    raise ValueError(path)


def _copy(t: torch.Tensor | None, dtype: torch.dtype | None, grad: bool) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach().clone()  # preserve_format: keeps channels_last / transposed strides
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def run_norm(
    fn: Callable,
    x: torch.Tensor,
    *,
    grad_out: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
    input_grad: bool = True,
    **kwargs,
) -> dict[str, torch.Tensor | None]:
    """``fn(view(x), running_mean=..., ..., **kwargs)`` then backward with ``grad_out``.

    Everything is copied first (cast to ``dtype`` when given, else kept), so the caller's tensors
    are never touched. ``view`` lets the kernel see a non-contiguous view of the leaf ``x`` (the
    input gradient is then the leaf's). Returns output, gradients and the running buffers.
    """
    x_leaf = _copy(x, dtype, input_grad)
    w = _copy(weight, dtype, True)
    b = _copy(bias, dtype, True)
    rm = _copy(running_mean, dtype, False)
    rv = _copy(running_var, dtype, False)
    xin = view(x_leaf) if view is not None else x_leaf
    out = fn(xin, running_mean=rm, running_var=rv, weight=w, bias=b, **kwargs)
    if grad_out is not None and out.requires_grad:
        g = grad_out.detach().clone()
        g = g.to(out.dtype)
        out.backward(g)
    return {
        "out": out.detach(),
        "grad_input": x_leaf.grad if input_grad else None,
        "grad_weight": None if w is None else w.grad,
        "grad_bias": None if b is None else b.grad,
        "running_mean": rm,
        "running_var": rv,
    }


def compare_three(
    ours: dict, torch_same: dict, ref: dict, keys=None, check_grads: bool = True
) -> None:
    """Compare every tensor in ``ours`` with the float64 reference (see tolerances.py)."""
    keys = keys or list(ours)
    for k in keys:
        if not check_grads and k.startswith("grad"):
            continue
        o, t, r = ours[k], torch_same[k], ref[k]
        if r is None:
            assert o is None, f"{k}: expected None, got a tensor"
            continue
        assert o is not None, f"{k}: missing (None) but torch produced one"
        assert o.dtype == t.dtype, f"{k}: dtype {o.dtype}, torch gives {t.dtype}"
        assert_close_to_reference(o, r, torch_same_dtype=t, name=k)


def assert_same_format(ours: dict, memory_format) -> None:
    """Output and input gradient must come back in the input's memory format."""
    assert ours["out"].is_contiguous(memory_format=memory_format), (
        f"output strides {ours['out'].stride()} are not {memory_format}"
    )
    if ours["grad_input"] is not None:
        assert ours["grad_input"].is_contiguous(memory_format=memory_format), (
            f"grad_input strides {ours['grad_input'].stride()} are not {memory_format}"
        )


def rand_like_format(shape, dtype, device, memory_format=torch.contiguous_format, offset=0.0):
    """randn in ``memory_format`` (values drawn in float64 then rounded, so every dtype sees the
    same data up to rounding)."""
    t = torch.randn(shape, dtype=torch.float64, device=device) * 1.5 + offset
    return t.to(dtype).contiguous(memory_format=memory_format)


def check_norm(
    norm,
    device,
    shape,
    *,
    path="auto",
    dtype=torch.float32,
    param_dtype=None,
    weight=True,
    bias=True,
    momentum=0.1,
    eps=1e-5,
    memory_format=torch.contiguous_format,
    grad_format=None,
    x=None,
    view=None,
    input_grad=True,
):
    """Run ours, torch's (same dtypes) and torch's (float64) for one row of tests/norms.py
    (``norm``) on ``shape``: output, input / weight / bias gradients and running statistics.
    Returns ours."""
    if x is None:
        x = rand_like_format(shape, dtype, device, memory_format, offset=0.5)
    grad_out = rand_like_format(shape, dtype, device, grad_format or memory_format)
    C = shape[1]
    pdt = param_dtype or dtype
    w = (torch.rand(C, device=device) * 1.5 + 0.25).to(pdt) if weight else None
    b = torch.randn(C, device=device).to(pdt) if bias and norm.bias else None
    rm, rv = make_buffers(C, device, pdt) if norm.buffers else (None, None)
    common = dict(
        grad_out=grad_out,
        weight=w,
        bias=b,
        running_mean=rm,
        running_var=rv,
        view=view,
        input_grad=input_grad,
        momentum=momentum,
        eps=eps,
    )
    with kernel_path(path):
        ours = run_norm(norm.ours, x, **common)
    same = run_norm(norm.torch, x, **common)
    ref = run_norm(norm.torch, x, dtype=torch.float64, **common)
    assert ours["out"].dtype == dtype, f"output dtype {ours['out'].dtype}, input {dtype}"
    assert ours["out"].shape == torch.Size(shape)
    compare_three(ours, same, ref)
    if norm.buffers and not norm.updates_buffers:
        assert_bitwise_equal(ours["running_mean"], rm, "running_mean changed in eval")
        assert_bitwise_equal(ours["running_var"], rv, "running_var changed in eval")
    return ours


# --------------------------------------------------------------------------------------------
# Modules: ours (float32), torch (float32), torch (float64 reference), stepped in lockstep


def module_triplet(ours_cls, torch_cls, device, **kwargs):
    """(ours float32, torch float32, torch float64) with identical random affine parameters."""
    ref = torch_cls(**kwargs).to(device)
    if getattr(ref, "weight", None) is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.normal_()
    ours = ours_cls(**kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    ref64 = torch_cls(**kwargs).to(device).double()
    ref64.load_state_dict(ref.state_dict())
    return ours, ref, ref64


def step_modules(mods, x, g, dtypes=(torch.float32, torch.float32, torch.float64)):
    """One forward + backward of each module on ``x`` (cast per module); returns (out, grad_in)."""
    outs = []
    for m, dt in zip(mods, dtypes, strict=True):
        xi = x.detach().to(dt).clone().requires_grad_()
        y = m(xi)
        y.backward(g.to(y.dtype))
        outs.append((y.detach(), xi.grad))
    return outs


def compare_modules(ours, ref, ref64, step_outs):
    """Outputs, input grads, parameter grads and buffers of ``ours`` against the references."""
    (yo, go), (yt, gt), (yr, gr) = step_outs
    assert_close_to_reference(yo, yr, torch_same_dtype=yt, name="out")
    assert_close_to_reference(go, gr, torch_same_dtype=gt, name="grad_input")
    for (n, p), (n64, p64) in zip(ours.named_parameters(), ref64.named_parameters(), strict=True):
        assert n == n64
        assert_close_to_reference(p.grad, p64.grad, name=f"grad of {n}")
    for (n, bo), (n64, b64) in zip(ours.named_buffers(), ref64.named_buffers(), strict=True):
        assert n == n64
        if n == "num_batches_tracked":
            assert bo.item() == b64.item(), f"num_batches_tracked {bo.item()} != {b64.item()}"
        else:
            assert_close_to_reference(bo, b64, name=n)
