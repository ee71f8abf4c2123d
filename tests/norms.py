"""The norms the shared tests run over, one row each, the way tolerances.py tabulates dtypes.

A row knows how to call tritonnorm's function and torch's with the same arguments, whether it takes
running statistics and whether they must move (batch statistics with a momentum) or stay bitwise
unchanged (eval), which input shapes are legal for it, and what it takes (a bias or not) and which
kernel paths mean something for it. tests/test_norms.py and tests/test_epilogues.py run every
shared check (shapes, kernel paths, dtypes, layouts, strides, affine variants, epilogues, ...) over
these rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import tritonnorm as tn


def _prod(sizes) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


# What a row is called with when the caller does not say (the torch defaults).
DEFAULTS = dict(running_mean=None, running_var=None, weight=None, bias=None, momentum=0.1, eps=1e-5)


@dataclass(frozen=True)
class Norm:
    id: str
    # fn(lib, x, *, running_mean, running_var, weight, bias, momentum, eps, **extras): lib is tn
    # or F; extras are tritonnorm's fused-epilogue keywords (scale, shift, residual, activation)
    call: Callable
    # Running statistics are passed (running_mean / running_var tensors, else None).
    buffers: bool
    # With buffers: True when the call updates them (batch statistics + momentum); False when it
    # only reads them (eval), in which case they must come back bitwise unchanged.
    updates_buffers: bool
    # Number of values each statistic is computed from, for an input shape (0: no statistics
    # from the input, e.g. eval). Shapes where it is 1 are illegal (torch raises) except for GN.
    values_per_stat: Callable[[tuple[int, ...]], int]
    # Channels -> whether the row can run at all (GN: the group count must divide C).
    accepts_channels: Callable[[int], bool] = field(default=lambda c: True)
    # Torch raises when a statistic is computed from a single value (BN, IN; not GN, LayerNorm2d,
    # RMSNorm2d).
    needs_two_values: bool = True
    # The row takes a bias (RMSNorm2d: a weight only). Checks that pass a bias pass None instead
    # and expect no bias gradient.
    bias: bool = True
    # The kernel paths that differ for this row (tests/helpers.kernel_path). The reductions of
    # BN / IN / GN stream tiles with per-tile summaries or per-element lanes, on chip (fused) or
    # split over programs. LayerNorm2d / RMSNorm2d hold whole channel vectors in one program
    # (positions.py): "fused" is their only forward, and "split" sets the backward's programs per
    # row of dweight/dbias partials; "lanes" would be "split" again.
    paths: tuple[str, ...] = ("auto", "fused", "split", "lanes")

    def legal(self, shape: tuple[int, ...]) -> bool:
        if not self.accepts_channels(shape[1]):
            return False
        n = self.values_per_stat(shape)
        return not (self.needs_two_values and n == 1)

    def ours(self, x, **kw):
        """tritonnorm's function; ``kw`` may add the fused epilogue's keywords."""
        return self.call(tn, x, **{**DEFAULTS, **kw})

    def torch(self, x, **kw):
        return self.call(F, x, **{**DEFAULTS, **kw})


def _bn(training: bool):
    def call(lib, x, *, running_mean, running_var, weight, bias, momentum, eps, **extras):
        return lib.batch_norm(
            x, running_mean, running_var, weight, bias, training=training, momentum=momentum,
            eps=eps, **extras,
        )  # fmt: skip

    return call


def _in(use_input_stats: bool):
    def call(lib, x, *, running_mean, running_var, weight, bias, momentum, eps, **extras):
        return lib.instance_norm(
            x, running_mean, running_var, weight, bias, use_input_stats=use_input_stats,
            momentum=momentum, eps=eps, **extras,
        )  # fmt: skip

    return call


def _gn(groups: Callable[[int], int]):
    def call(lib, x, *, running_mean, running_var, weight, bias, momentum, eps, **extras):
        assert running_mean is None and running_var is None, "GroupNorm has no running statistics"
        if lib is F and weight is None and bias is not None:
            # torch's CPU group_norm backward fails with a bias but no weight ("tensor does not
            # have a device", torch 2.x): give torch the identical weight of ones instead.
            weight = torch.ones_like(bias)
        return lib.group_norm(x, groups(x.shape[1]), weight, bias, eps, **extras)

    return call


def _gn_row(id: str, groups: Callable[[int], int], accepts: Callable[[int], bool]) -> Norm:
    return Norm(
        id,
        _gn(groups),
        buffers=False,
        updates_buffers=False,
        values_per_stat=lambda s: s[1] // groups(s[1]) * _prod(s[2:]),
        accepts_channels=accepts,
        needs_two_values=False,
    )


def _channel_norm(centred: bool):
    """LayerNorm2d (``centred``) or RMSNorm2d: tritonnorm's function, or timm's composition in
    torch (normalise over C after moving it last, then move it back)."""

    def call(lib, x, *, running_mean, running_var, weight, bias, momentum, eps, **extras):
        assert running_mean is None and running_var is None, "no running statistics"
        if lib is tn:
            if centred:
                return tn.layer_norm_2d(x, weight, bias, eps, **extras)
            assert bias is None, "RMSNorm2d takes no bias"
            return tn.rms_norm_2d(x, weight, eps, **extras)
        assert lib is F and not extras, "torch's composition has no epilogue (compose it)"
        C = x.shape[1]
        if centred:
            return F.layer_norm(x.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)
        assert bias is None, "RMSNorm2d takes no bias"
        return F.rms_norm(x.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)

    return call


def _channel_norm_row(id: str, centred: bool) -> Norm:
    return Norm(
        id,
        _channel_norm(centred),
        buffers=False,
        updates_buffers=False,
        values_per_stat=lambda s: s[1],  # the C channels at one position
        needs_two_values=False,  # torch normalises a single channel (to the bias)
        bias=centred,
        paths=("auto", "fused", "split"),
    )


def _bn_values(shape):
    return shape[0] * _prod(shape[2:])


def _in_values(shape):
    return _prod(shape[2:])


NORMS: dict[str, Norm] = {
    n.id: n
    for n in [
        # BatchNorm, training: batch statistics over (N, *spatial) per channel, buffers updated.
        Norm("bn-train", _bn(True), buffers=True, updates_buffers=True, values_per_stat=_bn_values),
        # BatchNorm, training with no buffers (torch's track_running_stats=False): batch statistics
        # and nothing to update.
        Norm(
            "bn-train-nobuf",
            _bn(True),
            buffers=False,
            updates_buffers=False,
            values_per_stat=_bn_values,
        ),
        # BatchNorm, eval: normalises with the running statistics; any shape, even one value.
        Norm(
            "bn-eval", _bn(False), buffers=True, updates_buffers=False, values_per_stat=lambda s: 0
        ),
        # InstanceNorm: statistics per (sample, channel), no running statistics.
        Norm("in", _in(True), buffers=False, updates_buffers=False, values_per_stat=_in_values),
        # InstanceNorm with track_running_stats: buffers get the batch average of the instances'
        # means and unbiased variances.
        Norm(
            "in-running", _in(True), buffers=True, updates_buffers=True, values_per_stat=_in_values
        ),
        # InstanceNorm, use_input_stats=False: normalises with the running statistics (like BN eval).
        Norm(
            "in-running-eval",
            _in(False),
            buffers=True,
            updates_buffers=False,
            values_per_stat=lambda s: 0,
        ),
        # GroupNorm, one group: LayerNorm over (C, *spatial).
        _gn_row("gn-1", lambda c: 1, lambda c: True),
        # GroupNorm, C/2 groups of 2 channels.
        _gn_row("gn-half", lambda c: c // 2, lambda c: c % 2 == 0),
        # GroupNorm, C groups: InstanceNorm without running statistics.
        _gn_row("gn-C", lambda c: c, lambda c: True),
        # GroupNorm, 3 channels per group: a non-power-of-two group width (C=6, 2 groups -> 3).
        _gn_row("gn-3per", lambda c: c // 3, lambda c: c % 3 == 0),
        # LayerNorm2d (timm): statistics per (sample, position) over the C channels.
        _channel_norm_row("ln2d", centred=True),
        # RMSNorm2d (timm): x / sqrt(mean over C of x^2 + eps) * weight; no mean, no bias.
        _channel_norm_row("rms2d", centred=False),
    ]
}

GN = ("gn-1", "gn-half", "gn-C", "gn-3per")
# The norms across the channels at each position (tritonnorm/kernels/positions.py).
CHANNEL_NORMS = ("ln2d", "rms2d")


def norm_params(ids=None, *, shapes=None, extra=None):
    """pytest params: one per (norm, shape) where the shape is legal for the norm.

    ``ids``: row ids (default: all rows). ``shapes``: list of ``(id, shape)`` (None: norm only).
    ``extra``: a function ``norm -> bool`` filtering rows further.
    """
    out = []
    for nid in ids or NORMS:
        norm = NORMS[nid]
        if extra is not None and not extra(norm):
            continue
        if shapes is None:
            out.append(pytest.param(norm, id=nid))
            continue
        for sid, shape in shapes:
            if norm.legal(shape):
                out.append(pytest.param(norm, shape, id=f"{nid}-{sid}"))
    return out


def with_paths(params, paths):
    """``params`` (from norm_params, the norm first) times the kernel ``paths``, each kept only
    for the rows it means something for (Norm.paths); the path is the last value."""
    out = []
    for p in params:
        norm = p.values[0]
        for path in paths:
            if path in norm.paths:
                out.append(pytest.param(*p.values, path, id=f"{p.id}-{path}"))
    return out


def make_buffers(C, device, dtype):
    rm = (torch.randn(C, device=device) * 0.3).to(dtype)
    rv = (torch.rand(C, device=device) + 0.5).to(dtype)
    return rm, rv
