"""The module layer: class hierarchy, repr, reset_parameters, state_dict compatibility with torch
(both ways), lazy modules, tn.convert on a small CNN and a diffusion-style GroupNorm block (identity
of parameters/buffers, flags, dtype, then SGD steps against an untouched torch copy),
torch.compile(fullgraph=True) and opcheck."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_bitwise_equal
from torch import nn

import tritonnorm as tn

NAMES = [f"{kind}Norm{d}d" for kind in ("Batch", "Instance") for d in (1, 2, 3)]
INPUT_SHAPES = {  # a small batched input per class
    "BatchNorm1d": (4, 3, 5),
    "BatchNorm2d": (2, 3, 4, 3),
    "BatchNorm3d": (2, 3, 2, 3, 2),
    "InstanceNorm1d": (2, 3, 5),
    "InstanceNorm2d": (2, 3, 4, 3),
    "InstanceNorm3d": (2, 3, 2, 3, 2),
}
# Constructor variants: every flag combination that changes parameters/buffers.
VARIANTS = [
    dict(),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=True, track_running_stats=True),
    dict(momentum=None, eps=1e-3),
]


@pytest.mark.parametrize("name", NAMES)
def test_subclasses_torch(name):
    assert issubclass(getattr(tn, name), getattr(nn, name))
    assert issubclass(getattr(tn, "Lazy" + name), getattr(nn, "Lazy" + name))
    assert getattr(tn, name) is not getattr(nn, name)


@pytest.mark.parametrize(
    "kwargs", VARIANTS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items())
)
@pytest.mark.parametrize("name", NAMES)
def test_same_repr_keys_and_reset(name, kwargs):
    ours, ref = getattr(tn, name)(3, **kwargs), getattr(nn, name)(3, **kwargs)
    attributes = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    _assert_same_module_api(ours, ref, attributes)


def _assert_same_module_api(ours, ref, attributes):
    """Same repr, state_dict keys and constructor attributes as torch's module, and
    reset_parameters restores torch's initial state after every tensor is disturbed."""
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a in attributes:
        assert getattr(ours, a) == getattr(ref, a), a
    for t in list(ours.parameters()) + list(ours.buffers()):
        with torch.no_grad():
            t.add_(3)
    ours.reset_parameters()
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        assert_bitwise_equal(a, b, k)


# GroupNorm(num_groups, num_channels, ...): constructor variants.
GN_VARIANTS = [
    pytest.param((2, 6), {}, id="2groups"),
    pytest.param((3, 6), dict(eps=1e-3), id="3groups-eps"),
    pytest.param((1, 4), dict(affine=False), id="1group-plain"),
    pytest.param((4, 4), {}, id="C-groups"),
]


def test_group_norm_subclasses_torch():
    assert issubclass(tn.GroupNorm, nn.GroupNorm)
    assert tn.GroupNorm is not nn.GroupNorm


@pytest.mark.parametrize("args,kwargs", GN_VARIANTS)
def test_group_norm_same_repr_keys_and_reset(args, kwargs):
    ours, ref = tn.GroupNorm(*args, **kwargs), nn.GroupNorm(*args, **kwargs)
    _assert_same_module_api(ours, ref, ("num_groups", "num_channels", "eps", "affine"))


def _train_one_step(m, shape, device):
    x = torch.randn(shape, device=device) * 2 + 1
    m.train()
    m(x).square().mean().backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.1 * p.grad


@pytest.mark.parametrize("direction", ["torch-to-tn", "tn-to-torch"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(device, name, direction):
    kw = dict(affine=True, track_running_stats=True)
    src_lib, dst_lib = (nn, tn) if direction == "torch-to-tn" else (tn, nn)
    src = getattr(src_lib, name)(3, **kw).to(device)
    _train_one_step(src, INPUT_SHAPES[name], device)
    dst = getattr(dst_lib, name)(3, **kw).to(device)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2
        assert_bitwise_equal(a, b, k)
    # ...and back again, strict, still identical.
    back = getattr(src_lib, name)(3, **kw).to(device)
    back.load_state_dict(dst.state_dict(), strict=True)
    for (k, a), (_, b) in zip(src.state_dict().items(), back.state_dict().items(), strict=True):
        assert_bitwise_equal(a, b, k)
    # Same eval outputs from the loaded state.
    src.eval()
    dst.eval()
    x = torch.randn(INPUT_SHAPES[name], device=device)
    torch.testing.assert_close(dst(x), src(x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("direction", ["torch-to-tn", "tn-to-torch"])
def test_group_norm_state_dict_round_trip(device, direction):
    src_lib, dst_lib = (nn, tn) if direction == "torch-to-tn" else (tn, nn)
    shape = (2, 6, 3, 4)
    src = src_lib.GroupNorm(3, 6).to(device)
    _train_one_step(src, shape, device)
    dst = dst_lib.GroupNorm(3, 6).to(device)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2
        assert_bitwise_equal(a, b, k)
    back = src_lib.GroupNorm(3, 6).to(device)
    back.load_state_dict(dst.state_dict(), strict=True)
    for (k, a), (_, b) in zip(src.state_dict().items(), back.state_dict().items(), strict=True):
        assert_bitwise_equal(a, b, k)
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(dst(x), src(x), rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Lazy modules


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(affine=True, track_running_stats=True), dict(affine=False)],
    ids=["default", "affine-tracked", "plain"],
)
@pytest.mark.parametrize("name", NAMES)
def test_lazy_materialises_into_tn_class(device, name, kwargs):
    ours = getattr(tn, "Lazy" + name)(**kwargs).to(device)
    ref = getattr(nn, "Lazy" + name)(**kwargs).to(device)
    shape = INPUT_SHAPES[name]
    for step in range(2):
        x = torch.randn(shape, device=device) + step
        g = torch.randn(shape, device=device)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        yo.backward(g)
        yr.backward(g)
        assert type(ours) is getattr(tn, name), f"materialised into {type(ours)}"
        assert ours.num_features == ref.num_features == shape[1]
        torch.testing.assert_close(yo, yr, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=2e-5, atol=2e-5)
        for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=k)
        for (k, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-5, msg=k)


# --------------------------------------------------------------------------------------------
# tn.convert


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


class Mixed(nn.Module):
    """Every convertible class (plus lazy ones, nesting, and SyncBatchNorm which must stay)."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2)
        self.in1 = nn.InstanceNorm1d(2)
        self.in2 = nn.InstanceNorm2d(2, affine=True)
        self.in3 = nn.InstanceNorm3d(2, track_running_stats=True)
        self.lazy_bn = nn.LazyBatchNorm2d()
        self.lazy_in = nn.LazyInstanceNorm1d(affine=True)
        self.nested = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2)))
        self.gn = nn.GroupNorm(2, 4)
        self.gn_plain = nn.Sequential(nn.GroupNorm(1, 2, affine=False))
        self.sync = nn.SyncBatchNorm(2)


def test_convert_swaps_every_class_and_keeps_state():
    m = Mixed()
    m.bn2.eval()  # a per-module flag that must survive
    m.in3.momentum = None
    before_params = dict(m.named_parameters())
    before_buffers = dict(m.named_buffers())
    before_training = {n: s.training for n, s in m.named_modules()}
    out = tn.convert(m)
    assert out is m
    expected = {
        "bn1": tn.BatchNorm1d,
        "bn2": tn.BatchNorm2d,
        "bn3": tn.BatchNorm3d,
        "in1": tn.InstanceNorm1d,
        "in2": tn.InstanceNorm2d,
        "in3": tn.InstanceNorm3d,
        "lazy_bn": tn.LazyBatchNorm2d,
        "lazy_in": tn.LazyInstanceNorm1d,
        "nested.1.0": tn.BatchNorm1d,
        "gn": tn.GroupNorm,
        "gn_plain.0": tn.GroupNorm,
    }
    mods = dict(m.named_modules())
    for n, cls in expected.items():
        assert type(mods[n]) is cls, f"{n}: {type(mods[n])}"
    assert type(m.sync) is nn.SyncBatchNorm, "SyncBatchNorm must not be converted"
    assert type(m.nested[0]) is nn.Linear
    # Same parameter and buffer objects, under the same names.
    after_params = dict(m.named_parameters())
    after_buffers = dict(m.named_buffers())
    assert after_params.keys() == before_params.keys()
    assert after_buffers.keys() == before_buffers.keys()
    for n, p in before_params.items():
        assert after_params[n] is p, f"parameter {n} replaced"
    for n, b in before_buffers.items():
        assert after_buffers[n] is b, f"buffer {n} replaced"
    assert {n: s.training for n, s in m.named_modules()} == before_training
    assert m.in3.momentum is None
    assert m.in2.affine and m.in3.track_running_stats
    assert (m.gn.num_groups, m.gn.num_channels, m.gn.affine) == (2, 4, True)
    assert not m.gn_plain[0].affine


def test_convert_is_idempotent():
    m = tn.convert(make_cnn())
    kinds = [type(s) for s in m.modules()]
    params = list(m.parameters())
    tn.convert(m)
    assert [type(s) for s in m.modules()] == kinds
    assert all(a is b for a, b in zip(params, m.parameters(), strict=True))


@pytest.mark.parametrize(
    "make,cls",
    [(lambda: nn.BatchNorm2d(4), tn.BatchNorm2d), (lambda: nn.GroupNorm(2, 4), tn.GroupNorm)],
    ids=["BatchNorm2d", "GroupNorm"],
)
def test_convert_root_module(make, cls):
    m = make()
    w = m.weight
    out = tn.convert(m)
    assert isinstance(out, cls)
    assert out.weight is w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_convert_keeps_dtype_device_and_eval(device, dtype):
    m = make_cnn().to(device=device, dtype=dtype).eval()
    tn.convert(m)
    assert not any(s.training for s in m.modules())
    for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
        assert t.dtype == dtype and t.device.type == torch.device(device).type
    assert isinstance(m[1], tn.BatchNorm2d) and isinstance(m[4], tn.InstanceNorm2d)


def test_convert_lazy_then_materialise(device):
    m = tn.convert(nn.Sequential(nn.LazyBatchNorm2d(), nn.LazyInstanceNorm2d(affine=True)))
    m.to(device)
    m(torch.randn(2, 3, 4, 4, device=device))
    assert type(m[0]) is tn.BatchNorm2d and type(m[1]) is tn.InstanceNorm2d


def _train_in_lockstep(reference, candidate, batch, loss_fn, tol, steps=3):
    """``steps`` optimiser steps of two (model, optimiser) pairs on the same batches; outputs
    at every step and the final state_dicts must agree within ``tol``."""
    for step in range(steps):
        x, target = batch()
        outs = []
        for model, opt in (reference, candidate):
            opt.zero_grad()
            y = model(x)
            loss_fn(y, target).backward()
            opt.step()
            outs.append(y.detach())
        torch.testing.assert_close(outs[1], outs[0], **tol, msg=f"output at step {step}")
    ref_state, our_state = reference[0].state_dict(), candidate[0].state_dict()
    for (k, a), (_, b) in zip(our_state.items(), ref_state.items(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=k)


@pytest.mark.parametrize(
    "fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"]
)
def test_converted_cnn_trains_like_torch(device, fmt):
    ref = make_cnn().to(device=device, memory_format=fmt)
    ours = tn.convert(copy.deepcopy(ref))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    # After 3 steps ours and torch float32 differ by the float32 noise of both, amplified by
    # the updates: compare at 1e-4 rather than the single-op float32 tolerance.
    tol = dict(rtol=1e-4, atol=1e-4)
    batch = lambda: (
        torch.randn(4, 3, 8, 8, device=device).contiguous(memory_format=fmt),
        torch.randint(0, 5, (4,), device=device),
    )
    _train_in_lockstep((ref, opt_ref), (ours, opt_ours), batch, F.cross_entropy, tol)
    assert ours[1].num_batches_tracked.item() == 3
    ref.eval()
    ours.eval()
    x = torch.randn(4, 3, 8, 8, device=device).contiguous(memory_format=fmt)
    torch.testing.assert_close(ours(x), ref(x), **tol)


class DiffusionBlock(nn.Module):
    """A small UNet-style residual block: GroupNorm, SiLU, Conv2d twice, plus the skip."""

    def __init__(self, channels=8, groups=4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Conv2d(channels, 3, 1)

    def forward(self, x):
        h = self.stem(x)
        r = self.conv1(F.silu(self.norm1(h)))
        r = self.conv2(F.silu(self.norm2(r)))
        return self.head(h + r)


def make_gn_block():
    return DiffusionBlock()


@pytest.mark.parametrize(
    "fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"]
)
def test_converted_diffusion_block_trains_like_torch(device, fmt):
    ref = make_gn_block().to(device=device, memory_format=fmt)
    ours = tn.convert(copy.deepcopy(ref))
    assert type(ours.norm1) is tn.GroupNorm and type(ours.norm2) is tn.GroupNorm
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    # As for the CNN above: after 3 steps both float32 models carry their own rounding noise
    # (~1e-6 per op), amplified by the updates (lr 0.05, momentum 0.9) and the convolutions; 1e-4
    # is well above that and far below any real difference (a wrong group or gradient moves the
    # parameters by ~lr * |grad| ~ 1e-2).
    tol = dict(rtol=1e-4, atol=1e-4)
    batch = lambda: (  # a denoising-style regression target
        torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=fmt),
        torch.randn(2, 3, 8, 8, device=device),
    )
    _train_in_lockstep((ref, opt_ref), (ours, opt_ours), batch, F.mse_loss, tol)
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=fmt)
    torch.testing.assert_close(ours(x), ref(x), **tol)


# --------------------------------------------------------------------------------------------
# torch.compile and custom ops


def _op_name(op) -> str:
    name = getattr(op, "_qualified_op_name", None) or getattr(op, "_qualname", None)
    if name is None and hasattr(op, "name"):
        name = op.name()
    return str(name).split(".")[0]


def test_ops_are_registered_custom_ops():
    from opcheck_samples import OPS

    assert OPS, "tritonnorm.ops.OPS is empty"
    for op in OPS:
        name = _op_name(op)
        assert name.startswith("tritonnorm::"), name
        assert hasattr(torch.ops.tritonnorm, name.split("::")[1]), name


def _argument(op, args, name):
    return args[[a.name for a in op._schema.arguments].index(name)]


def test_opcheck(device):
    from opcheck_samples import OPS
    from opcheck_samples import samples as opcheck_samples

    samples = opcheck_samples(device)
    assert samples, "no opcheck samples"
    covered = {_op_name(op) for op, _, _ in samples}
    missing = {_op_name(op) for op in OPS} - covered
    assert not missing, f"ops without an opcheck sample: {sorted(missing)}"
    # A GroupNorm sample (num_groups > 0) for every op, forward and backward.
    gn_covered = {_op_name(op) for op, args, _ in samples if _argument(op, args, "num_groups") > 0}
    assert gn_covered == covered, f"ops without a GroupNorm sample: {sorted(covered - gn_covered)}"
    failures = []
    for op, args, kwargs in samples:
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as e:  # collect all, report together
            failures.append(f"{_op_name(op)}: {type(e).__name__}: {str(e)[:300]}")
    assert not failures, "\n".join(failures)


MODELS = {"cnn": make_cnn, "gn-block": make_gn_block}  # BN + IN; GroupNorm


@pytest.mark.parametrize("model_name", list(MODELS))
def test_compiled_graph_calls_tritonnorm_ops(device, model_name):
    # fullgraph=True fails on any graph break; the captured graph must call our ops (not torch's
    # batch_norm, which would mean the module silently fell back).
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tn.convert(MODELS[model_name]()).to(device)
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    compiled(torch.randn(4, 3, 8, 8, device=device)).sum().backward()
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("tritonnorm" in t for t in targets), sorted(targets)
    assert not any("batch_norm" in t and "tritonnorm" not in t for t in targets), sorted(targets)
    assert not any("instance_norm" in t and "tritonnorm" not in t for t in targets), sorted(targets)
    assert not any("group_norm" in t and "tritonnorm" not in t for t in targets), sorted(targets)


@pytest.mark.parametrize(
    "model_name,mode",
    # GroupNorm has no running statistics: its eval step is its train step, compiled once.
    [("cnn", "train"), ("cnn", "eval"), ("gn-block", "train")],
    ids=["cnn-train", "cnn-eval", "gn-block-train"],
)
def test_compile_matches_eager(device, model_name, mode):
    torch._dynamo.reset()
    eager = tn.convert(MODELS[model_name]()).to(device).train(mode == "train")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=device)
    t0 = time.perf_counter()
    yc = compiled(x)
    yc.sum().backward()
    print(f"torch.compile (inductor) first call + backward: {time.perf_counter() - t0:.1f}s")
    ye = eager(x)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    for (k, a), (_, b) in zip(
        compiled_model.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)
    for (k, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
