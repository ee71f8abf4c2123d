"""The custom ops and their ``torch.library.opcheck`` samples (tests/test_modules.py).

One op pair, ``norm_forward`` / ``norm_backward``, serves every norm, with the fused epilogue's
arguments (scale, shift, residual, activation, slope) as trailing defaults, then the statistics
across the channels at each position (per_position, centred: LayerNorm2d, RMSNorm2d): the samples
cover BN train/eval, IN, GN, LayerNorm2d, RMSNorm2d, channels last, the epilogues, and the backward
with several output masks."""

from __future__ import annotations

import torch

import tritonnorm.ops  # noqa: F401 (registers the ops)

OPS = [torch.ops.tritonnorm.norm_forward.default, torch.ops.tritonnorm.norm_backward.default]

BN, IN, GN = (True, 0), (False, 0), (False, 2)  # (reduce_batch, num_groups)
# (use_input_stats, reduce_batch, num_groups) of the norms across channels, and their
# (per_position, centred)
ACROSS = (True, False, 0)
LN2D, RMS2D = (True, True), (True, False)
NO_EPILOGUE = (None, None, None, 0, 0.01)
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
    # LayerNorm2d / RMSNorm2d: (N, H*W) statistics; contiguous and channels last, with and
    # without weight and bias, and with an epilogue
    out += [
        (fwd, (grad(x), w, b, None, None, *ACROSS, 0.0, 1e-6, *NO_EPILOGUE, *LN2D), {}),
        (fwd, (grad(x_cl), w, None, None, None, *ACROSS, 0.0, 1e-6, *NO_EPILOGUE, *RMS2D), {}),
        (fwd, (grad(x_cl), None, None, None, None, *ACROSS, 0.0, 1e-6, *NO_EPILOGUE, *LN2D), {}),
        (fwd, (grad(x), w, b, None, None, *ACROSS, 0.0, 1e-6, scale, shift, residual, GELU, 0.01,
               *LN2D), {}),
        (fwd, (grad(x_cl), w, None, None, None, *ACROSS, 0.0, 1e-6, None, None, residual, LEAKY,
               0.2, *RMS2D), {}),
    ]  # fmt: skip
    for settings, position, mask in ((LN2D, x, ALL[:3] + [False] * 3),
                                     (RMS2D, x_cl, [True, True, False, False, False, False])):  # fmt: skip
        bias = b if settings[1] else None
        y, mean, rstd, _, _ = fwd(position, w, bias, None, None, *ACROSS, 0.0, 1e-6,
                                  *NO_EPILOGUE, *settings)  # fmt: skip
        out.append((bwd, (torch.randn_like(y), position, w.detach(),
                          None if bias is None else bias.detach(), mean, rstd, *ACROSS, mask,
                          *NO_EPILOGUE, None, *settings), {}))  # fmt: skip
    y, mean, rstd, _, _ = fwd(x, w, b, None, None, *ACROSS, 0.0, 1e-6, scale, shift, residual,
                              SILU, 0.01, *LN2D)  # fmt: skip
    out.append((bwd, (torch.randn_like(y), x, w.detach(), b.detach(), mean, rstd, *ACROSS, ALL,
                      scale.detach(), shift.detach(), residual.detach(), SILU, 0.01, None,
                      *LN2D), {}))  # fmt: skip
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
                      [True, True, True, False, False, True], None, None, None, RELU, 0.01,
                      y.detach()), {}))  # fmt: skip
    return out
