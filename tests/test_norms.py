"""Every norm of tests/norms.py (BN train/eval, IN with and without running statistics, GN with
1, C/2, C and C/3 groups, LayerNorm2d and RMSNorm2d) against torch, float64 as the reference:
forward, input/weight/bias gradients and running statistics over odd shapes, the kernel paths
that exist for the row (single tile and split reduction), affine variants, dtypes, layouts,
strides and empty batches. Then the semantics that belong to one norm only: BN's momentum and
unbiased running variance, IN's running statistics, GN's definition, and the modules over several
steps (LayerNorm2d's and RMSNorm2d's own: tests/test_channel_norms.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    PATHS,
    assert_same_format,
    compare_modules,
    module_triplet,
    step_modules,
)
from helpers import check_norm as check
from norms import CHANNEL_NORMS, GN, NORMS, norm_params, with_paths
from tolerances import assert_bitwise_equal
from torch import nn

import tritonnorm as tn

CL = torch.channels_last
CL3 = torch.channels_last_3d
FUSED_SPLIT = ["fused", "split"]


# Shapes, each with the reason it is here. A row runs only on shapes legal for it (norms.py).
SHAPES = {
    "NC": (8, 5),  # (N, C): no spatial dim at all (BatchNorm1d on features; GN over features)
    "NCL": (5, 4, 3),  # a plain small 3-D input
    "NCL-primes": (3, 7, 11),  # primes: no dim a multiple of any block size
    "NCHW-primes": (2, 3, 5, 7),  # 4D, prime spatial extents
    "NCDHW": (2, 3, 3, 4, 5),  # 5D
    "C1": (4, 1, 9),  # a single channel (IN: instances are just the batch; GN: one group)
    "N1": (1, 4, 6),  # N=1: legal for BN in training with 6 values per channel
    "N1-C1": (1, 1, 13),  # a single instance / a single group
    "L1": (5, 3, 1),  # spatial size 1: BN has 5 values per channel; IN only with running stats
    "L2": (5, 3, 2),  # 2 values per instance: the least IN accepts
    "N2-1x1": (2, 3, 1, 1),  # 2 values per channel: the least BN accepts; GN-C: 1 value per group
    "1x2": (2, 3, 1, 2),  # 4D with a size-1 spatial dim
    "C6": (2, 6, 4, 5),  # 6 channels: GN with 2 groups of 3 (not a power of two) or 3 of 2
    # 12297 values/channel: more than one 4096-element streaming tile, so split programs loop
    # over several tiles and the last one is ragged; still fits the fused path's single tile.
    "multi-tile-L": (3, 2, 4099),
    # 4757 values/instance: more than one 4096-element streaming tile (ragged second tile).
    "multi-tile-HW": (2, 2, 67, 71),
    "many-channels": (3, 67, 2),  # 67 channels: more than one channel block
    "many-instances": (5, 67, 3),  # 335 instances: more than one instance block
    "many-groups": (2, 66, 3),  # GN: 33 groups of 2 / 22 groups of 3 per sample
    "1xC": (1, 4),  # one value per channel: illegal in training, fine in eval
    "1xCx1": (1, 3, 1),  # same, with a spatial dim
    # LayerNorm2d / RMSNorm2d: C values per statistic, BLOCK_C = 128 with 31 lanes masked off,
    # and positions (S = 15) that are not a power of two.
    "C97": (2, 97, 3, 5),
}

# Which shapes each row runs on: BN's and IN's are those their old test files used.
ROW_SHAPES = {
    "bn-train": [
        "NC", "NCL-primes", "NCHW-primes", "NCDHW", "C1", "N1", "L1", "N2-1x1", "multi-tile-L",
        "many-channels",
    ],
    "bn-train-nobuf": ["NCL"],
    "bn-eval": ["NC", "NCL-primes", "NCDHW", "1xC", "1xCx1"],
    "in": [
        "NCL-primes", "NCHW-primes", "NCDHW", "C1", "N1", "N1-C1", "L2", "1x2", "multi-tile-HW",
        "many-instances",
    ],
    "in-running": ["NCL-primes", "NCDHW", "N1", "multi-tile-HW"],
    "in-running-eval": ["NCL-primes", "NCDHW", "L1"],
    "gn-1": ["NC", "NCL-primes", "NCHW-primes", "C1", "N1-C1", "N2-1x1", "multi-tile-HW"],
    "gn-half": ["NCL", "N1", "C6", "many-groups"],
    "gn-C": ["NCL-primes", "NCDHW", "many-instances"],
    "gn-3per": ["NCHW-primes", "C6", "many-groups"],
    # (N, C): one position; one sample of one position; 3-D spatial; positions of 1; many
    # channels, and a channel count between powers of two. LN over C = 1 channel (y = bias, dx
    # = 0 from terms of size 1/sqrt(eps)) is ill-conditioned for this file's float32 rule:
    # tests/test_channel_norms.py checks it. RMS over one channel is y = w x / sqrt(x^2 + eps).
    "ln2d": ["NC", "NCL-primes", "NCHW-primes", "NCDHW", "L1", "1xC", "many-channels", "C97"],
    "rms2d": ["NC", "NCL-primes", "NCHW-primes", "C1", "1xCx1", "many-channels", "C97"],
}  # fmt: skip


def _forward_params():
    out = []
    for nid, sids in ROW_SHAPES.items():
        params = norm_params([nid], shapes=[(s, SHAPES[s]) for s in sids])
        assert len(params) == len(sids), f"{nid}: a listed shape is illegal for it"
        out += params
    assert set(ROW_SHAPES) == set(NORMS), "a row of tests/norms.py without shapes"
    # Per-element lanes change only the split statistics / gradient programs, which take one
    # channel each for BatchNorm: 67 channels (~6 s interpreted) repeat what every other
    # bn-train shape runs with lanes; the channel blocks of the finalize and apply passes,
    # shared with the plain split, stay checked by bn-train-many-channels-split.
    skip = {"bn-train-many-channels-lanes"}
    return [p for p in with_paths(out, [*PATHS, "lanes"]) if p.id not in skip]


@pytest.mark.parametrize("norm,shape,path", _forward_params())
def test_forward_backward_matches_torch(device, norm, shape, path):
    check(norm, device, shape, path=path)


def _affine_params():
    """(norm, weight, bias): without weight and bias, weight only, bias only (where the row
    takes a bias: for RMSNorm2d that is no affine again)."""
    variants = {
        "no-affine": (False, False),
        "weight-only": (True, False),
        "bias-only": (False, True),
    }
    return [
        pytest.param(p.values[0], weight, bias, id=f"{p.id}-{vid}")
        for p in norm_params([n for n in NORMS if n not in GN or n == "gn-3per"])
        for vid, (weight, bias) in variants.items()
        if p.values[0].bias or not bias
    ]


@pytest.mark.parametrize("path", FUSED_SPLIT)
@pytest.mark.parametrize("norm,weight,bias", _affine_params())
def test_affine_variants(device, norm, weight, bias, path):
    # bn-train / bn-train-nobuf and in-running / in are the old "buffers" / "no-buffers" variants.
    shape = (4, 6, 5) if norm.id in GN else (4, 3, 5)  # GN: 2 groups of 3 channels
    check(norm, device, shape, weight=weight, bias=bias, path=path)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.37])
@pytest.mark.parametrize("norm", norm_params(extra=lambda n: n.updates_buffers))
def test_momentum(device, norm, momentum):
    # momentum 0: buffers unchanged; 1: replaced by this batch's (unbiased) statistics.
    check(norm, device, (6, 3, 4), momentum=momentum, path="split")


@pytest.mark.parametrize("path", FUSED_SPLIT)
@pytest.mark.parametrize(
    "dtype,param_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),  # fp32 weight/buffers with a half input, as torch allows
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["f32", "f64", "f16", "f16-f32params", "bf16", "bf16-f32params"],
)
@pytest.mark.parametrize(
    "norm",
    norm_params(
        ["bn-train", "bn-eval", "in-running", "in-running-eval", "gn-1", "gn-3per", *CHANNEL_NORMS]
    ),
)
def test_dtypes(device, norm, dtype, param_dtype, path):
    # BN's and IN's shapes are those of their old files; C=6: GN with 1 group and 2 of 3.
    shape = (3, 4, 5, 3) if norm.id.startswith("in") else (4, 6, 5, 3)
    ours = check(norm, device, shape, dtype=dtype, param_dtype=param_dtype, path=path)
    assert ours["grad_input"].dtype == dtype
    assert ours["grad_weight"].dtype == param_dtype
    if norm.buffers:
        assert ours["running_mean"].dtype == param_dtype


LAYOUT_SHAPES = [
    ("channels_last", ((2, 5, 3, 4), CL)),
    ("channels_last_3d", ((2, 3, 3, 2, 5), CL3)),
    ("channels_last-C2-primes", ((3, 2, 7, 13), CL)),  # few channels, long rows
    ("channels_last-C6", ((2, 6, 3, 5), CL)),  # GN: groups of 2 and 3 channels at each position
]


def _layout_params(ids):
    out = []
    for nid in ids:
        norm = NORMS[nid]
        for sid, (shape, fmt) in LAYOUT_SHAPES:
            if (sid == "channels_last-C6") != (nid in GN) and nid != "gn-1":
                continue  # C6 is for GN only; GN runs on it, and gn-1 on every shape
            if norm.legal(shape):
                out.append(pytest.param(norm, shape, fmt, id=f"{nid}-{sid}"))
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "norm,shape,fmt",
    _layout_params(
        ["bn-train", "bn-eval", "in-running", "in-running-eval", "gn-1", "gn-3per", *CHANNEL_NORMS]
    ),
)
def test_channels_last(device, norm, shape, fmt, path):
    # Note torch itself returns a contiguous tensor for IN on channels_last_3d; we keep the format.
    ours = check(norm, device, shape, memory_format=fmt, path=path)
    assert_same_format(ours, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("norm", norm_params(["bn-train", "in", "gn-1", "gn-C", *CHANNEL_NORMS]))
def test_channels_last_half(device, norm, dtype):
    ours = check(norm, device, (2, 5, 3, 4), memory_format=CL, dtype=dtype, path="split")
    assert_same_format(ours, CL)


@pytest.mark.parametrize("path", FUSED_SPLIT)
@pytest.mark.parametrize(
    "x_fmt,g_fmt",
    [(CL, torch.contiguous_format), (torch.contiguous_format, CL)],
    ids=["cl-input-contig-grad", "contig-input-cl-grad"],
)
@pytest.mark.parametrize("norm", norm_params(["bn-train", "in", "gn-half", *CHANNEL_NORMS]))
def test_grad_output_in_another_format(device, norm, x_fmt, g_fmt, path):
    # autograd may hand the backward a grad_output whose layout differs from the input's.
    ours = check(norm, device, (2, 4, 3, 5), memory_format=x_fmt, grad_format=g_fmt, path=path)
    assert_same_format(ours, x_fmt)


# Non-standard strides: base tensor shape and the view the kernel sees.
VIEWS = {
    "transposed-NC": ((5, 3, 4), lambda t: t.transpose(0, 1)),  # (C,N,L) storage seen as (N,C,L)
    "transposed-HW": ((2, 3, 5, 4), lambda t: t.transpose(2, 3)),  # dense, but not a memory format
    "sliced-last": ((3, 4, 10), lambda t: t[..., ::2]),  # step 2 in the innermost dim
    "sliced-channels": ((3, 8, 5), lambda t: t[:, 1::2]),  # every other channel, offset 1
    "expanded-batch": ((1, 3, 6), lambda t: t.expand(4, 3, 6)),  # stride 0 along N
    "channels_last-sliced": ((2, 4, 6, 6), lambda t: t.contiguous(memory_format=CL)[..., 1:5, ::2]),
}


def _view_params(ids):
    """(norm, view name) pairs where the view's shape is legal for the norm (gn-half: C even)."""
    out = []
    for nid in ids:
        for name, (base_shape, view) in VIEWS.items():
            if NORMS[nid].legal(tuple(view(torch.empty(base_shape)).shape)):
                out.append(pytest.param(NORMS[nid], name, id=f"{nid}-{name}"))
    return out


@pytest.mark.parametrize("path", FUSED_SPLIT)
@pytest.mark.parametrize(
    "norm,name",
    _view_params(["bn-train", "bn-eval", "in-running", "gn-1", "gn-half", *CHANNEL_NORMS]),
)
def test_other_strides(device, norm, name, path):
    base_shape, view = VIEWS[name]
    base = torch.randn(base_shape, device=device)
    shape = tuple(view(base).shape)
    ours = check(norm, device, shape, x=base, view=view, path=path)
    assert ours["grad_input"].shape == base.shape


@pytest.mark.parametrize("path", FUSED_SPLIT)
@pytest.mark.parametrize("norm", norm_params(["bn-train", "in", "gn-half", *CHANNEL_NORMS]))
def test_weight_grad_without_input_grad(device, norm, path):
    # Only weight/bias require grad: the backward must still produce them (and no input grad).
    ours = check(
        norm, device, (4, 6, 5) if norm.id in GN else (4, 3, 5), input_grad=False, path=path
    )
    assert ours["grad_input"] is None
    assert ours["grad_weight"] is not None


@pytest.mark.parametrize("norm", norm_params())
def test_input_and_params_not_modified(device, norm):
    C = 6 if norm.id in GN else 3
    x = torch.randn(4, C, 5, device=device)
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    rm = rv = None
    if norm.buffers:
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    bias = b if norm.bias else None
    norm.ours(x, running_mean=rm, running_var=rv, weight=w, bias=bias, momentum=0.1, eps=1e-5)
    assert_bitwise_equal(x, x0, "input")
    assert_bitwise_equal(w, w0, "weight")
    assert_bitwise_equal(b, b0, "bias")


# N=0 in 2-D, 3-D and 4-D inputs (IN with batch statistics needs a spatial dim).
EMPTY_SHAPES = [("NC", (0, 3)), ("NCL", (0, 3, 4)), ("NCHW", (0, 2, 3, 3)), ("C6", (0, 6, 3))]


@pytest.mark.parametrize(
    "norm,shape",
    norm_params(
        ["bn-train", "bn-eval", "in-running", "in-running-eval", *GN, *CHANNEL_NORMS],
        shapes=EMPTY_SHAPES,
    ),
)
def test_empty_batch(device, norm, shape):
    # N=0: empty output of the right shape/dtype, buffers untouched, zero weight/bias gradients.
    # For IN this is a deliberate deviation from torch: its CPU instance_norm writes NaN into the
    # running buffers on an empty batch (and fails with affine parameters); we return an empty
    # output and leave the buffers exactly as they were.
    C = shape[1]
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.rand(C, device=device, requires_grad=True)
    b = torch.randn(C, device=device, requires_grad=True) if norm.bias else None
    rm, rv = (torch.randn(C, device=device), torch.rand(C, device=device) + 0.5)
    rm0, rv0 = rm.clone(), rv.clone()
    if not norm.buffers:
        rm = rv = None
    y = norm.ours(x, running_mean=rm, running_var=rv, weight=w, bias=b, momentum=0.1, eps=1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    if norm.buffers:
        assert_bitwise_equal(rm, rm0, "running_mean")
        assert_bitwise_equal(rv, rv0, "running_var")
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)), w.grad
    if b is not None:
        assert torch.equal(b.grad, torch.zeros_like(b)), b.grad


# --------------------------------------------------------------------------------------------
# BatchNorm only


def test_running_var_is_unbiased_and_output_uses_biased(device):
    # Direct check of the definition, independent of torch: momentum=1 puts the batch statistics
    # in the buffers: mean and the UNBIASED variance; the output is normalised with the BIASED one.
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    rm = torch.zeros(2, dtype=torch.float64, device=device)
    rv = torch.ones(2, dtype=torch.float64, device=device)
    y = tn.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=0.25)
    xs = x.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(rm, xs.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, xs.var(1, unbiased=True), rtol=1e-12, atol=1e-12)
    expected = (x - xs.mean(1)[:, None]) / torch.sqrt(xs.var(1, unbiased=False)[:, None] + 0.25)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_1d_empty_input(device, training):
    # torch accepts a 1-D empty input with (0,)-sized running statistics and returns an empty
    # tensor; so must we, and the backward must work.
    x = torch.randn(0, device=device, requires_grad=True)
    rm, rv = torch.zeros(0, device=device), torch.ones(0, device=device)
    y = tn.batch_norm(x, rm, rv, training=training)
    ref = F.batch_norm(x.detach(), rm.clone(), rv.clone(), training=training)
    assert y.shape == ref.shape == (0,) and y.dtype == ref.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0,)


def test_empty_batch_module_counts_batch(device):
    # The module still counts the (empty) batch in num_batches_tracked, as torch's does.
    ours, ref = tn.BatchNorm1d(3).to(device), nn.BatchNorm1d(3).to(device)
    x = torch.randn(0, 3, 4, device=device)
    ours(x)
    ref(x)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert_bitwise_equal(ours.running_mean, ref.running_mean, "running_mean")
    assert_bitwise_equal(ours.running_var, ref.running_var, "running_var")


BN_MODULE_CASES = [
    pytest.param("BatchNorm1d", (6, 4), id="1d-NC"),
    pytest.param("BatchNorm1d", (3, 4, 5), id="1d-NCL"),
    pytest.param("BatchNorm2d", (2, 4, 3, 5), id="2d"),
    pytest.param("BatchNorm3d", (2, 4, 2, 3, 3), id="3d"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("name,shape", BN_MODULE_CASES)
def test_bn_module_training_steps_then_eval(device, name, shape, momentum):
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, momentum=momentum
    )
    assert isinstance(ours, getattr(nn, name))
    for step in range(3):
        x = torch.randn(shape, device=device) * (1 + step) + step  # stats differ per step
        g = torch.randn(shape, device=device)
        for m in (ours, ref, ref64):
            m.zero_grad()
        outs = step_modules((ours, ref, ref64), x, g)
        compare_modules(ours, ref, ref64, outs)
    assert ours.num_batches_tracked.item() == 3
    for m in (ours, ref, ref64):
        m.eval()
    x = torch.randn(shape, device=device)
    g = torch.randn(shape, device=device)
    outs = step_modules((ours, ref, ref64), x, g)
    compare_modules(ours, ref, ref64, outs)
    assert ours.num_batches_tracked.item() == 3  # eval does not count


@pytest.mark.parametrize("name,shape", BN_MODULE_CASES)
def test_bn_module_without_running_stats(device, name, shape):
    # track_running_stats=False: no buffers, batch statistics in eval too.
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, track_running_stats=False
    )
    assert ours.running_mean is None and ours.running_var is None
    for m in (ours, ref, ref64):
        m.eval()
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))


@pytest.mark.parametrize("name,shape", BN_MODULE_CASES[1:3])
def test_bn_module_affine_false(device, name, shape):
    C = shape[1]
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=C, affine=False
    )
    assert ours.weight is None and ours.bias is None
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))


# --------------------------------------------------------------------------------------------
# InstanceNorm only


def test_in_running_stats_definition(device):
    # Independent of torch: momentum=1 puts the batch average of the instance means and of the
    # UNBIASED instance variances in the buffers; outputs use each instance's BIASED variance.
    x = torch.randn(3, 2, 5, dtype=torch.float64, device=device)
    rm = torch.zeros(2, dtype=torch.float64, device=device)
    rv = torch.ones(2, dtype=torch.float64, device=device)
    y = tn.instance_norm(x, rm, rv, momentum=1.0, eps=0.25)
    torch.testing.assert_close(rm, x.mean(2).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, x.var(2, unbiased=True).mean(0), rtol=1e-12, atol=1e-12)
    expected = (x - x.mean(2, keepdim=True)) / torch.sqrt(
        x.var(2, unbiased=False, keepdim=True) + 0.25
    )
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_in_empty_batch_module(device):
    ours = tn.InstanceNorm1d(3, track_running_stats=True).to(device)
    ref = nn.InstanceNorm1d(3, track_running_stats=True).to(device)
    x = torch.randn(0, 3, 4, device=device)
    assert ours(x).shape == (0, 3, 4)
    ref(x)
    assert torch.equal(ours.running_mean, torch.zeros(3, device=device))
    assert torch.equal(ours.running_var, torch.ones(3, device=device))
    # InstanceNorm never counts batches (torch's neither); ours must agree.
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 0


IN_MODULE_CASES = [
    pytest.param("InstanceNorm1d", (3, 4, 5), id="1d"),
    pytest.param("InstanceNorm1d", (4, 5), id="1d-unbatched"),  # (C, L)
    pytest.param("InstanceNorm2d", (2, 4, 3, 5), id="2d"),
    pytest.param("InstanceNorm2d", (4, 3, 5), id="2d-unbatched"),  # (C, H, W)
    pytest.param("InstanceNorm3d", (2, 4, 2, 3, 3), id="3d"),
    pytest.param("InstanceNorm3d", (4, 2, 3, 3), id="3d-unbatched"),  # (C, D, H, W)
]


def _steps_then_eval(ours, ref, ref64, shape, device, steps):
    """Train-mode steps on shifting data, then one eval step: every output, gradient and buffer
    of ``ours`` against the references (helpers.compare_modules)."""
    mods = (ours, ref, ref64)
    for step in range(steps):
        x = torch.randn(shape, device=device) * (1 + step) + step
        g = torch.randn(shape, device=device)
        for m in mods:
            m.zero_grad()
        compare_modules(ours, ref, ref64, step_modules(mods, x, g))
    for m in mods:
        m.eval()
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules(mods, x, g))


def _C(name, shape):
    unbatched = len(shape) == int(name[-2]) + 1
    return shape[0] if unbatched else shape[1]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("name,shape", IN_MODULE_CASES)
def test_in_module_track_running_stats_steps_then_eval(device, name, shape, momentum):
    # momentum=None: torch's InstanceNorm passes 0.0 (buffers never move); ours must agree.
    kw = dict(num_features=_C(name, shape), affine=True, track_running_stats=True)
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, momentum=momentum, **kw
    )
    assert isinstance(ours, getattr(nn, name))
    _steps_then_eval(ours, ref, ref64, shape, device, steps=3)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("name,shape", IN_MODULE_CASES)
def test_in_module_default_instance_stats_in_eval_too(device, name, shape, affine):
    # Without track_running_stats the module uses instance statistics in train and eval alike.
    ours, ref, ref64 = module_triplet(
        getattr(tn, name), getattr(nn, name), device, num_features=_C(name, shape), affine=affine
    )
    x, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))
    for m in (ours, ref, ref64):
        m.eval()
    compare_modules(ours, ref, ref64, step_modules((ours, ref, ref64), x, g))


# --------------------------------------------------------------------------------------------
# GroupNorm only


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_gn_definition(device, groups):
    # Independent of torch: statistics per (sample, group of C/G consecutive channels) over the
    # group's channels and all spatial positions, biased variance; weight and bias per channel.
    x = torch.randn(3, 6, 2, 5, dtype=torch.float64, device=device)
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    b = torch.randn(6, dtype=torch.float64, device=device)
    y = tn.group_norm(x, groups, w, b, eps=0.25)
    xg = x.reshape(3, groups, -1)
    mean = xg.mean(2, keepdim=True)
    var = xg.var(2, unbiased=False, keepdim=True)
    expected = ((xg - mean) / torch.sqrt(var + 0.25)).reshape_as(x)
    expected = expected * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_gn_with_c_groups_is_instance_norm_and_one_group_is_layer_norm(device):
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(tn.group_norm(x, 4), F.instance_norm(x), rtol=1e-12, atol=1e-12)
    ln = F.layer_norm(x, x.shape[1:])
    torch.testing.assert_close(tn.group_norm(x, 1), ln, rtol=1e-12, atol=1e-12)


GN_MODULE_CASES = [
    pytest.param(2, 6, (3, 6), True, id="NC-2groups"),  # (N, C): no spatial dim
    pytest.param(3, 6, (2, 6, 5), False, id="3groups-NCL-plain"),  # affine=False
    pytest.param(2, 6, (2, 6, 3, 4), True, id="2groups-NCHW"),  # 3 channels per group
    pytest.param(4, 4, (2, 4, 2, 3, 3), True, id="C-groups-NCDHW"),
]


@pytest.mark.parametrize("groups,C,shape,affine", GN_MODULE_CASES)
def test_gn_module_steps_then_eval(device, groups, C, shape, affine):
    # GroupNorm has no running statistics: the same (group) statistics in train and eval.
    ours, ref, ref64 = module_triplet(
        tn.GroupNorm, nn.GroupNorm, device, num_groups=groups, num_channels=C, affine=affine
    )
    assert isinstance(ours, nn.GroupNorm)
    _steps_then_eval(ours, ref, ref64, shape, device, steps=2)
