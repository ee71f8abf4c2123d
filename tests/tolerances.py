"""How close is close enough: one tolerance per dtype, and the comparison helper every test uses.

The reference is always PyTorch computing in float64 on float64 copies of the very same values
(half-precision inputs are up-cast exactly), so the reference carries no rounding of its own worth
speaking of. Two kinds of rule:

* float64 / float32: elementwise ``|ours - ref| <= atol * scale + rtol * |ref|`` where ``scale`` is
  ``max(1, max|ref|)``. Normalisation outputs and their gradients are differences of O(scale)
  quantities (``x - mean``, ``dy - mean(dy) - xhat * mean(dy * xhat)``), so their absolute error is
  proportional to the tensor's overall scale, not to each element's own size.
* float16 / bfloat16: what matters is that we are no worse than PyTorch in the same dtype:
  ``max|ours - ref| <= vs_torch * max|torch_same_dtype - ref| + atol * scale``. The output is
  rounded to 11 (fp16) or 8 (bf16) significant bits, so an absolute bound would have to be either
  too loose to catch anything or flaky; "within twice torch's own error" is tight and stable.

The rule is chosen by the dtype of the tensor being compared, not of the input: the float32 running
statistics or float32 weight gradient produced from a float16 input are held to the float32 rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    # When set: compare the max abs error to this multiple of torch's own same-dtype max abs error.
    vs_torch: float | None
    reason: str


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(
        rtol=1e-9,
        atol=1e-9,
        vs_torch=None,
        reason="float64 inputs are computed in float64 (gradcheck needs it); 1e-9 leaves 1e6 ulps "
        "for reordered sums while still catching any float32 intermediate (~1e-7).",
    ),
    torch.float32: Tolerance(
        rtol=2e-5,
        atol=2e-5,
        vs_torch=None,
        reason="statistics and outputs in float32: eps = 1.2e-7; a normalised value carries a few "
        "ulps from mean, rstd and the affine step and sums over up to ~1e4 values add a few more; "
        "2e-5 is ~100 ulps of margin yet 100x below an error from float16 intermediates.",
    ),
    torch.float16: Tolerance(
        rtol=0.0,
        atol=1e-3,
        vs_torch=2.0,
        reason="output rounded to 11 bits (half-ulp 2.4e-4 relative); judged against torch's own "
        "float16 result: at most twice its max error, plus 1e-3 (about 2 ulps at 1.0) of slack "
        "for tensors where torch happens to be exact.",
    ),
    torch.bfloat16: Tolerance(
        rtol=0.0,
        atol=8e-3,
        vs_torch=2.0,
        reason="output rounded to 8 bits (half-ulp 2e-3 relative); twice torch's own bfloat16 "
        "max error, plus 8e-3 (about 2 ulps at 1.0) of slack.",
    ),
}


def _scale(ref: torch.Tensor) -> float:
    finite = ref[torch.isfinite(ref)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def _max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    mask = torch.isfinite(ref)
    if not mask.any():
        return 0.0
    return (a.double()[mask] - ref[mask]).abs().max().item()


def assert_close_to_reference(
    ours: torch.Tensor,
    ref: torch.Tensor,
    *,
    torch_same_dtype: torch.Tensor | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``ours`` is as close to the float64 ``ref`` as the table allows for ``ours.dtype``.

    NaN/inf must sit at exactly the same places as in ``ref``. ``torch_same_dtype`` (PyTorch's own
    result in ``ours.dtype``) is required for the half-precision dtypes.
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.device == ref.device, f"{name}: device {ours.device} != {ref.device}"
    ref = ref.detach().double()
    ours = ours.detach()
    if ours.numel() == 0:
        return
    ours64 = ours.double()
    nan_ours, nan_ref = torch.isnan(ours64), torch.isnan(ref)
    assert torch.equal(nan_ours, nan_ref), (
        f"{name}: NaN at {nan_ours.nonzero().tolist()[:8]} but reference NaN at "
        f"{nan_ref.nonzero().tolist()[:8]}"
    )
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(ours64), inf_ref), f"{name}: inf positions differ"
    assert torch.equal(ours64[inf_ref], ref[inf_ref]), f"{name}: inf signs differ"

    tol = TOLERANCES[ours.dtype]
    scale = _scale(ref)
    if tol.vs_torch is None:
        mask = torch.isfinite(ref)
        err = (ours64[mask] - ref[mask]).abs()
        bound = tol.atol * scale + tol.rtol * ref[mask].abs()
        bad = err > bound
        assert not bad.any(), (
            f"{name} ({ours.dtype}): {int(bad.sum())}/{err.numel()} elements off; max abs err "
            f"{err.max().item():.3e}, worst excess {(err - bound).max().item():.3e} over "
            f"atol={tol.atol}*{scale:.3g} + rtol={tol.rtol}*|ref|"
        )
    else:
        assert torch_same_dtype is not None, f"{name}: {ours.dtype} needs torch's same-dtype result"
        assert torch_same_dtype.dtype == ours.dtype, (
            f"{name}: torch's result is {torch_same_dtype.dtype}, ours is {ours.dtype}"
        )
        err_ours = _max_abs_err(ours, ref)
        err_torch = _max_abs_err(torch_same_dtype.detach(), ref)
        bound = tol.vs_torch * err_torch + tol.atol * scale
        assert err_ours <= bound, (
            f"{name} ({ours.dtype}): max abs err {err_ours:.3e} > {tol.vs_torch} x torch's "
            f"{err_torch:.3e} + {tol.atol}*{scale:.3g} = {bound:.3e}"
        )


def assert_bitwise_equal(a: torch.Tensor | None, b: torch.Tensor | None, name: str = "") -> None:
    """Same dtype, shape and bits (NaN-safe: compares the raw bytes)."""
    if a is None or b is None:
        assert a is None and b is None, f"{name}: one is None"
        return
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    ab = a.detach().contiguous().reshape(-1).view(torch.uint8)
    bb = b.detach().contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(ab, bb), f"{name}: not bitwise equal"
