"""The custom ops and their ``torch.library.opcheck`` samples (tests/test_modules.py).

One op pair, ``norm_forward`` / ``norm_backward``, serves every norm, with the fused epilogue's
arguments (scale, shift, residual, activation, slope) as trailing defaults: the samples cover BN
train/eval, IN, GN, channels last, the epilogues, and the backward with several output masks."""

from __future__ import annotations

import torch

import tritonnorm.ops  # noqa: F401 (registers the ops)

OPS = [torch.ops.tritonnorm.norm_forward.default, torch.ops.tritonnorm.norm_backward.default]

BN, IN, GN = (True, 0), (False, 0), (False, 2)  # (reduce_batch, num_groups)
SILU, RELU, GELU, LEAKY = 3, 1, 4, 2
ALL = [True] * 6


def samples(device) -> list[tuple]:
    """(op, args, kwargs) for opcheck."""
    make = lambda *shape: torch.randn(*shape, device=device)
    x = make(3, 4, 5, 6)
    x_cl = x.to(memory_format=torch.channels_last)
    w, b = make(4).requires_grad_(), make(4).requires_grad_()
    running = lambda: (torch.zeros(4, device=device), torch.ones(4, device=device))
    scale, shift = make(3, 4).requires_grad_(), make(3, 4).requires_grad_()
    residual = make(3, 4, 5, 6).requires_grad_()
    grad = lambda t: t.clone().requires_grad_()
    fwd = torch.ops.tritonnorm.norm_forward.default
    bwd = torch.ops.tritonnorm.norm_backward.default
    out = [
        (fwd, (grad(x), w, b, *running(), True, *BN, 0.1, 1e-5), {}),
        (fwd, (grad(x_cl), w, b, *running(), True, *IN, 0.1, 1e-5), {}),
        (fwd, (grad(x), None, None, *running(), False, *BN, 0.1, 1e-5), {}),
        (fwd, (make(2, 4, 7).requires_grad_(), None, None, None, None, True, *IN, 0.1, 1e-5), {}),
        (fwd, (grad(x_cl), w, b, None, None, True, *GN, 0.0, 1e-5), {}),
        # the epilogues: GN + scale/shift + SiLU, BN + residual + ReLU (channels last), BN eval
        # + scale/shift + GELU, IN + leaky ReLU
        (fwd, (grad(x), w, b, None, None, True, *GN, 0.0, 1e-5, scale, shift, None, SILU), {}),
        (fwd, (grad(x_cl), w, b, *running(), True, *BN, 0.1, 1e-5, None, None, residual, RELU),
         {}),
        (fwd, (grad(x), w, b, *running(), False, *BN, 0.1, 1e-5, scale, shift, None, GELU), {}),
        (fwd, (grad(x), None, None, None, None, True, *IN, 0.1, 1e-5, None, None, residual,
               LEAKY, 0.2), {}),
    ]  # fmt: skip
    for settings in (BN, GN):
        y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, *settings, 0.1, 1e-5)
        out.append((bwd, (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, True,
                          *settings, ALL[:3] + [False] * 3), {}))  # fmt: skip
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, *GN, 0.0, 1e-5, scale, shift, residual,
                              SILU)  # fmt: skip
    out.append((bwd, (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, True, *GN, ALL,
                      scale.detach(), shift.detach(), residual.detach(), SILU), {}))  # fmt: skip
    # BN + residual + ReLU: the backward reads the derivative off the saved output
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, True, *BN, 0.1, 1e-5, None, None, residual,
                              RELU)  # fmt: skip
    out.append((bwd, (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, True, *BN,
                      [True, True, True, False, False, True], None, None, y.detach(), RELU, 0.01,
                      True), {}))  # fmt: skip
    return out
