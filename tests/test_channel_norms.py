"""LayerNorm2d and RMSNorm2d (``tn.layer_norm_2d``, ``tn.rms_norm_2d``): statistics across the C
channels at every (sample, position), as timm's ``LayerNorm2d`` / ``RmsNorm2d`` compositions.

The shared checks of tests/test_norms.py and tests/test_epilogues.py run over their rows of
tests/norms.py ("ln2d", "rms2d": shapes, dtypes, layouts, strides, affine variants, empty
batches, epilogues); tests/test_accuracy.py checks their determinism, tests/test_errors.py their
bad inputs, tests/opcheck_samples.py their op arguments. Here what is theirs alone: channel counts
from 1 to 2048 in float64, one channel, gradcheck, a large per-position offset, NaN containment,
negative eps, empty batches and positions as torch, torch.compile, torch's composition above the
channels one program holds, and the backward's split dweight / dbias partials."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import check_norm, kernel_path, run_norm
from norms import CHANNEL_NORMS, NORMS, norm_params
from tolerances import assert_close_to_reference

import tritonnorm as tn
from tritonnorm.kernels import config

ROWS = norm_params(CHANNEL_NORMS)
LN, RMS = NORMS["ln2d"], NORMS["rms2d"]
CL = torch.channels_last


def _affine(norm, C, device, dtype=torch.float32):
    w = torch.rand(C, device=device, dtype=dtype) * 1.5 + 0.25
    b = torch.randn(C, device=device, dtype=dtype) if norm.bias else None
    return w, b


def _position_launches() -> dict[str, str]:
    """The kernels across channels launched since the last reset, with their configs."""
    return {k: v for k, v in config.chosen_configs().items() if k.startswith("_position")}


# --------------------------------------------------------------------------------------------
# Channel counts: one program holds whole channel vectors (BLOCK_C = C rounded up to a power of
# two), so C decides the tile. Float64 against float64 torch (1e-9: any float32 intermediate
# shows), and float32 by the suite's rule. Tiny spatial sizes for the big C.

CHANNEL_SHAPES = {
    "C1": (3, 1, 4, 5),  # one channel: LN gives y = bias (its float32 gradient: below)
    "C3-1d": (2, 3, 7),  # 1-D spatial, 3 channels
    "C96-3d": (2, 96, 2, 3, 2),  # 3-D spatial, 96 = 3 x 32 channels (BLOCK_C 128)
    "C768-1x1": (3, 768, 1, 1),  # positions of one element (ViT-like widths)
    "C2048": (2, 2048, 1, 3),  # BLOCK_C 2048: 8 positions a program forward (fp32), 4 backward
}


def _channel_params():
    out = []
    for p in ROWS:
        for sid, shape in CHANNEL_SHAPES.items():
            for dtype in (torch.float64, torch.float32):
                if p.values[0] is LN and sid == "C1" and dtype == torch.float32:
                    continue  # test_layer_norm_one_channel
                did = "f64" if dtype == torch.float64 else "f32"
                out.append(pytest.param(p.values[0], shape, dtype, id=f"{p.id}-{sid}-{did}"))
    return out


@pytest.mark.parametrize("norm,shape,dtype", _channel_params())
def test_channel_counts(device, norm, shape, dtype):
    ours = check_norm(norm, device, shape, dtype=dtype, eps=1e-6)
    assert ours["grad_weight"] is not None and ours["grad_input"] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_layer_norm_one_channel(device, dtype):
    # C = 1: x - mean is exactly 0, so y is the bias exactly and dweight is exactly 0. dx is 0
    # too, as the difference of w dy / sqrt(eps) and its mean over the one channel: zero up to
    # the rounding of those terms (torch's float32 gradient carries the same).
    eps = 1e-5
    x = torch.randn(3, 1, 4, 5, device=device, dtype=dtype) * 1.5 + 0.5
    w = torch.rand(1, device=device, dtype=dtype) + 0.5
    b = torch.randn(1, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    ours = run_norm(LN.ours, x, grad_out=dy, weight=w, bias=b, eps=eps)
    assert torch.equal(ours["out"], b.expand_as(x)), "y must be the bias exactly"
    assert torch.equal(ours["grad_weight"], torch.zeros_like(w))
    assert_close_to_reference(ours["grad_bias"], dy.double().sum().reshape(1), name="grad_bias")
    term = (w.double() * dy.double()).abs().max().item() / eps**0.5
    bound = 8 * torch.finfo(dtype).eps * term
    err = ours["grad_input"].double().abs().max().item()
    assert err <= bound, f"grad_input {err:.3e} from 0, more than {bound:.3e}"


# --------------------------------------------------------------------------------------------
# gradcheck (float64, tiny): the backward against finite differences of our own forward, both
# layouts, the default backward and one split over 2 programs.


@pytest.mark.parametrize(
    "shape,fmt,path",
    [
        pytest.param((2, 3, 2, 3), torch.contiguous_format, "auto", id="contiguous"),
        pytest.param((1, 5, 2, 3), CL, "split", id="channels_last-split"),
    ],
)
@pytest.mark.parametrize("norm", ROWS)
def test_gradcheck(device, norm, shape, fmt, path):
    dt = torch.float64
    x = torch.randn(shape, dtype=dt, device=device).contiguous(memory_format=fmt)
    w, b = _affine(norm, shape[1], device, dt)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(x, w, b=None):
        with kernel_path(path, split=2):
            return norm.ours(x, weight=w, bias=b, eps=1e-6)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# --------------------------------------------------------------------------------------------
# Numerical quality

ULP_1E4 = 2.0**-10  # spacing of float32 numbers in [8192, 16384)


@pytest.mark.parametrize("path", ["auto", "split"])
def test_large_offset_layer_norm(device, path):
    # Every position's channels: mean 1e4, variance exactly 1 (float64, before rounding to
    # float32). E[x^2] - E[x]^2 in float32 loses everything (1e8 has a spacing of 8); the
    # two-pass statistics on chip keep y within a few ulps of 1e4 (the float32 mean's own
    # rounding), and so the gradients, against float64 on the very same float32 values.
    C = 64
    z = torch.randn(2, C, 4, 5, dtype=torch.float64, device=device)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    x = (1e4 + z).float()
    dy = torch.randn_like(x)
    w, b = _affine(LN, C, device)
    with kernel_path(path):
        ours = run_norm(LN.ours, x, grad_out=dy, weight=w, bias=b, eps=1e-6)
    ref = run_norm(LN.torch, x, grad_out=dy, weight=w, bias=b, eps=1e-6, dtype=torch.float64)
    for k in ("out", "grad_input", "grad_weight", "grad_bias"):
        scale = max(1.0, ref[k].abs().max().item())
        err = (ours[k].double() - ref[k]).abs().max().item()
        assert err <= 8 * ULP_1E4 * scale, f"{k}: max abs error {err:.3e} (scale {scale:.3g})"


@pytest.mark.parametrize("norm", ROWS)
def test_nan_stays_in_its_position(device, norm):
    # A NaN at (sample 1, channel 2, position (1, 3)) makes that position's statistic NaN: its
    # outputs and input gradients are NaN for every channel, nothing else is (NaN positions
    # must equal float64 torch's; dweight / dbias sum over every position: NaN, as torch's).
    x = torch.randn(2, 4, 3, 5, device=device) + 0.5
    x[1, 2, 1, 3] = float("nan")
    ours = check_norm(norm, device, tuple(x.shape), x=x, eps=1e-6)
    nan = torch.zeros(2, 4, 3, 5, dtype=torch.bool, device=device)
    nan[1, :, 1, 3] = True
    for k in ("out", "grad_input"):
        assert torch.equal(torch.isnan(ours[k]), nan), f"{k}: NaN outside its position"


# Per-position variance across the channels (mean 0.3 everywhere): eps = -0.5 makes LN's
# var + eps and RMS's mean(x^2) + eps = var + 0.09 + eps negative at positions 0 and 2 only,
# by 0.1 or more.
EPS_VARIANCES = (0.1, 2.0, 0.3)


def _eps_input(device) -> torch.Tensor:
    """(2, 8, 3) float64: the 8 channels at position p have mean 0.3 and variance
    EPS_VARIANCES[p]."""
    x = torch.randn(2, 8, 3, dtype=torch.float64, device=device)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)
    var = torch.tensor(EPS_VARIANCES, dtype=torch.float64, device=device)
    return x * var.sqrt() + 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("eps", [-0.5, 0.0])
@pytest.mark.parametrize("norm", ROWS)
def test_eps_as_torch(device, norm, eps, dtype):
    # torch computes with any eps: NaN exactly where the statistic + eps < 0, values elsewhere.
    x = _eps_input(device)
    ours = check_norm(norm, device, tuple(x.shape), x=x.to(dtype), dtype=dtype, eps=eps)
    nan_positions = torch.isnan(ours["out"]).any(1).any(0).tolist()
    assert nan_positions == ([True, False, True] if eps < 0 else [False] * 3), nan_positions


@pytest.mark.parametrize(
    "shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (2, 3, 0, 4)], ids=["NC", "NCL", "NCHW", "S0"]
)
@pytest.mark.parametrize("norm", ROWS)
def test_empty_as_torch(device, norm, shape):
    # No samples, or no positions: an empty output of the input's shape and dtype, an empty
    # input gradient and zero weight / bias gradients, as torch's composition gives.
    C = shape[1]
    w, b = _affine(norm, C, device)
    results = []
    for fn in (norm.ours, norm.torch):
        x = torch.randn(shape, device=device, requires_grad=True)
        wi, bi = (t.clone().requires_grad_() if t is not None else None for t in (w, b))
        y = fn(x, weight=wi, bias=bi, eps=1e-6)
        y.sum().backward()
        grads = [t.grad for t in (x, wi, bi) if t is not None]
        results.append((y.detach(), *grads))
    names = ("out", "x", "w", "b")[: len(results[0])]
    for name, o, t in zip(names, *results, strict=True):
        assert o.shape == t.shape and o.dtype == t.dtype, (name, o.shape, t.shape)
        assert torch.equal(o, t), f"{name}: {o} != torch's {t}"


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the custom ops with per_position / centred, forward and
# backward, through AOTAutograd (the backward graph is traced with the ops' fake kernels).


def _position_args(node) -> tuple[bool, bool]:
    """(per_position, centred) of a traced call of the ops (defaults left out of the graph)."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        else:
            values[arg.name] = node.kwargs.get(arg.name, arg.default_value)
    return values["per_position"], values["centred"]


def test_compile_fullgraph(device):
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)

    def block(x, w, b, t_scale, t_shift, identity):
        h = tn.layer_norm_2d(x, w, b, scale=1 + t_scale, shift=t_shift, activation="gelu_tanh")
        h = tn.rms_norm_2d(h.contiguous(memory_format=CL), w, residual=identity)
        return tn.layer_norm_2d(h, None, b)

    N, C = 2, 6
    args = [torch.randn(N, C, 3, 4, device=device), torch.rand(C, device=device) + 0.5,
            torch.randn(C, device=device), torch.randn(N, C, device=device),
            torch.randn(N, C, device=device),
            torch.randn(N, C, 3, 4, device=device).contiguous(memory_format=CL)]  # fmt: skip
    eager = [a.clone().requires_grad_() for a in args]
    traced = [a.clone().requires_grad_() for a in args]
    dy = torch.randn(N, C, 3, 4, device=device)
    y_eager = block(*eager)
    y_eager.backward(dy)
    y_comp = torch.compile(block, backend=backend, fullgraph=True)(*traced)
    y_comp.backward(dy)
    calls = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    fwd, bwd = torch.ops.tritonnorm.norm_forward.default, torch.ops.tritonnorm.norm_backward.default
    forwards = [_position_args(n) for n in calls if n.target is fwd]
    backwards = [_position_args(n) for n in calls if n.target is bwd]
    assert len(forwards) == 3 and len(backwards) == 3, sorted({str(n.target) for n in calls})
    # (per_position, centred) of each call: LN, RMS, LN
    assert forwards == [(True, True), (True, False), (True, True)]
    assert sorted(backwards) == [(True, False), (True, True), (True, True)]
    assert not any("layer_norm" in str(n.target) or "rms_norm" in str(n.target) for n in calls)
    torch.testing.assert_close(y_comp, y_eager)
    for a, b in zip(traced, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Above the channels one program holds: torch's composition (functional._channels_beyond_chip).
# The limit comes from config.POSITION_TILE_WORDS (the backward's words: 4096 channels with fp32
# statistics, with or without extras; half in float64, a quarter in float64 with extras); smaller
# words here make small C exceed it.

SMALL_WORDS = {"forward": 128, "backward": 64, "backward_epilogue": 32}  # fp32: 64 / 32 channels


def _compose(y, scale, shift, residual):
    y = y * scale[:, :, None, None] + shift[:, :, None, None] + residual
    return F.silu(y)


def _run_with_extras(norm, x, w, b, extras, dy, ours: bool):
    """y (and its gradients) of ``norm`` with or without scale / shift / residual + SiLU:
    ours fused, or torch's composition."""
    leaves = {"x": x, "w": w, "b": b, **extras}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if v is not None}
    kw = dict(weight=leaves["w"], bias=leaves.get("b"), eps=1e-6)
    if not extras:
        y = (norm.ours if ours else norm.torch)(leaves["x"], **kw)
    elif ours:
        ep = {k: leaves[k] for k in ("scale", "shift", "residual")}
        y = norm.ours(leaves["x"], **kw, **ep, activation="silu")
    else:
        y = _compose(norm.torch(leaves["x"], **kw), leaves["scale"], leaves["shift"],
                     leaves["residual"])  # fmt: skip
    y.backward(dy.to(y.dtype))
    return {"out": y.detach(), **{f"grad_{k}": v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize(
    "words,C,dtype,extras,kernels",
    [
        pytest.param(SMALL_WORDS, 64, torch.float32, False, True, id="fp32-64-at-limit"),
        pytest.param(SMALL_WORDS, 65, torch.float32, False, False, id="fp32-65-beyond"),
        pytest.param(SMALL_WORDS, 33, torch.float32, True, False, id="fp32-33-extras-beyond"),
        pytest.param(SMALL_WORDS, 32, torch.float64, False, True, id="fp64-32-at-limit"),
        pytest.param(SMALL_WORDS, 33, torch.float64, False, False, id="fp64-33-beyond"),
        # the library's own limits (fp32, no extras): 4096 channels run the kernels
        pytest.param(None, 4096, torch.float32, False, True, id="default-4096"),
        pytest.param(None, 4097, torch.float32, False, False, id="default-4097-beyond"),
    ],
)
@pytest.mark.parametrize("norm", ROWS)
def test_beyond_the_chip_runs_torchs_composition(
    device, monkeypatch, norm, words, C, dtype, extras, kernels
):
    if words is not None:
        monkeypatch.setattr(config, "POSITION_TILE_WORDS", words)
    N = 1 if C > 1000 else 2
    shape = (N, C, 1, 2) if C > 1000 else (N, C, 2, 3)
    x = torch.randn(shape, device=device, dtype=torch.float64) * 1.5 + 0.5
    dy = torch.randn(shape, device=device, dtype=torch.float64)
    w, b = _affine(norm, C, device, torch.float64)
    ep = {}
    if extras:
        ep = dict(scale=1 + 0.5 * torch.randn(N, C, device=device, dtype=torch.float64),
                  shift=torch.randn(N, C, device=device, dtype=torch.float64),
                  residual=torch.randn(shape, device=device, dtype=torch.float64))  # fmt: skip
    cast = lambda t: None if t is None else t.to(dtype)
    config.reset_chosen_configs()
    ours = _run_with_extras(
        norm, x.to(dtype), cast(w), cast(b), {k: cast(v) for k, v in ep.items()}, dy, ours=True
    )
    launched = _position_launches()
    assert bool(launched) == kernels, f"kernels across channels launched: {launched}"
    ref = _run_with_extras(norm, x, w, b, ep, dy, ours=False)
    for k, r in ref.items():
        assert ours[k] is not None, f"{k}: no gradient"
        assert ours[k].dtype == dtype, (k, ours[k].dtype)
        assert_close_to_reference(ours[k], r, name=k)


# --------------------------------------------------------------------------------------------
# The backward's dweight / dbias: each program sums its tiles per channel into a row of
# partials, the finalize adds the rows in a fixed order. Several forced splits (programs per
# row, uneven or with programs left without tiles) must all give the right sums. C = 512: the
# backward holds 16 positions a tile, so (2, 512, 5, 7) has 3 tiles per sample, 6 in all.


@pytest.mark.parametrize(
    "split,extras",
    [(1, False), (4, False), (12, False), (7, True)],
    ids=["1", "4-uneven", "12-empty-programs", "7-per-sample-empty-programs"],
)
@pytest.mark.parametrize("norm", ROWS)
def test_forced_splits_give_the_weight_gradients(device, norm, split, extras):
    # With scale / shift the partials are per sample (dscale, dshift are per (n, c)), and the
    # backward with an epilogue holds 8 positions a tile: 5 tiles a row, 7 programs leave 2
    # empty.
    N, C, H, W = 2, 512, 5, 7
    x = torch.randn(N, C, H, W, device=device, dtype=torch.float64) + 0.5
    dy = torch.randn_like(x)
    w, b = _affine(norm, C, device, torch.float64)
    ep = {}
    if extras:
        ep = dict(scale=1 + 0.5 * torch.randn(N, C, device=device, dtype=torch.float64),
                  shift=torch.randn(N, C, device=device, dtype=torch.float64),
                  residual=torch.randn_like(x))  # fmt: skip
    cast = lambda t: None if t is None else t.float()
    config.reset_chosen_configs()
    with config.forced(split=split):
        ours = _run_with_extras(
            norm, x.float(), cast(w), cast(b), {k: cast(v) for k, v in ep.items()}, dy, ours=True
        )
    backward = _position_launches()["_position_norm_backward_kernel"]
    assert re.search(rf"\bSPLIT={split}\b", backward), (
        f"forced split {split} not launched: {backward}"
    )
    ref = _run_with_extras(norm, x, w, b, ep, dy, ours=False)
    for k, r in ref.items():
        assert_close_to_reference(ours[k], r, name=k)
