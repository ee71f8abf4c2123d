"""tritonnorm on PyTorch's own test inputs: every sample of torch's OpInfo for
``nn.functional.group_norm`` (CPU, float32 and float64: 42 samples, eps = -0.5 among them), forward
and backward on the on-chip (fused) and the split kernel paths, against torch's result on the same
sample (same NaN positions, values within the dtype's tolerance).

The samples come from ``torch.testing._internal`` (torch's private test package), generated in a
subprocess: importing it switches torch's global backend flags off for the importing process, and it
needs ``expecttest``, a package torch's tests use that the project does not install; the
subprocess gives it a stand-in (only its TestCase base class is touched by generating samples).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_path

import tritonnorm as tn

_GENERATE = textwrap.dedent(
    """
    import sys, types, unittest
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase, stub.ACCEPT = unittest.TestCase, False
        sys.modules["expecttest"] = stub
    import torch
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [o for o in op_db if o.name == "nn.functional.group_norm" and not o.variant_test_name]
    torch.manual_seed(0)
    samples = [
        (s.input, tuple(s.args), dict(s.kwargs))
        for dtype in (torch.float32, torch.float64)
        for op in ops
        for s in op.sample_inputs("cpu", dtype, requires_grad=False)
    ]
    torch.save(samples, sys.argv[1])
    """
)

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-9}  # tests/tolerances.py's rtol = atol


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("opinfo") / "group_norm.pt"
    done = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(path)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0 and "torch.testing._internal" in done.stderr:
        pytest.skip(f"torch's OpInfo database did not load: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    return torch.load(path)


def _run(fn, x, args, kwargs, grad, device):
    """fn(x, *args, **kwargs) and its backward with ``grad``: output and every gradient."""
    leaf = x.to(device).requires_grad_()
    kwargs = {
        k: v.to(device).requires_grad_() if isinstance(v, torch.Tensor) else v
        for k, v in kwargs.items()
    }
    y = fn(leaf, *args, **kwargs)
    y.backward(grad.to(device))
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return [y.detach(), leaf.grad, *(t.grad for t in tensors)]


@pytest.mark.parametrize("path", ["fused", "split"])
def test_group_norm_opinfo_samples(device, samples, path):
    assert len(samples) == 42, f"torch's group_norm OpInfo has {len(samples)} samples, not 42"
    negative_eps = [s for s in samples if s[2].get("eps", 1e-5) < 0]
    assert negative_eps, "no negative-eps sample left in torch's OpInfo"
    failures = []
    for i, (x, args, kwargs) in enumerate(samples):
        grad = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(i))
        expected = _run(F.group_norm, x, args, kwargs, grad, device)
        try:
            with kernel_path(path):
                got = _run(tn.group_norm, x, args, kwargs, grad, device)
            tol = TOLERANCE[x.dtype]
            names = ("out", "grad_input", "grad_weight", "grad_bias")[: len(expected)]
            for name, g, e in zip(names, got, expected, strict=True):
                torch.testing.assert_close(
                    g, e, rtol=tol, atol=tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
                )
        except Exception as e:
            shapes = tuple(x.shape), args, {k: getattr(v, "shape", v) for k, v in kwargs.items()}
            failures.append(f"sample {i} {x.dtype} {shapes}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)}/{len(samples)} samples differ:\n" + "\n".join(failures)
