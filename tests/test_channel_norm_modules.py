"""tn.LayerNorm2d and tn.RMSNorm2d (norms across the channels at every position) as modules, and
tn.convert on ConvNeXt-style layers, without third-party packages (timm's own classes:
tests/test_zoo.py).

The references are torch compositions written here: timm's LayerNorm2d (permute, F.layer_norm
over C, permute back), timm's RmsNorm2d (x * rsqrt(mean over C of x^2 + eps) * weight) and the
facebookresearch ConvNeXt ``LayerNorm(data_format="channels_first")``. Everything in float64, so
only the summation order differs: outputs, gradients, losses and parameters after SGD steps are
held to 1e-10 of the tensor's scale. Shapes are small (the interpreter runs one program at a time).
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from convnext import LayerNorm
from torch import nn

import tritonnorm as tn
from tritonnorm import zoo
from tritonnorm.modules import CHANNEL_MODULES, MODULES, REPLACEMENTS

# ---------------------------------------------------------------------------------------------
# References


class TorchLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d, as a torch composition (any number of spatial dimensions)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class TorchRMSNorm2d(nn.RMSNorm):
    """timm's RmsNorm2d (its rms_norm2d: a reduction over dim 1), as a torch composition."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        if self.weight is None:
            return y
        return y * self.weight.reshape(1, -1, *(1,) * (x.dim() - 2))


class VarLayerNorm(LayerNorm):
    """Looks like ConvNeXt's LayerNorm, but its forward is another one (unbiased variance)."""

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(x.var(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# kind -> (tritonnorm class, reference class, torch base class)
KINDS = {
    "layer_norm": (tn.LayerNorm2d, TorchLayerNorm2d, nn.LayerNorm),
    "rms_norm": (tn.RMSNorm2d, TorchRMSNorm2d, nn.RMSNorm),
}
C = 6
# input name -> (shape, memory format)
INPUTS = {
    "nchw": ((2, C, 3, 4), torch.contiguous_format),
    "nhwc": ((2, C, 3, 4), torch.channels_last),
    "ncl": ((3, C, 5), torch.contiguous_format),
    "ndhwc": ((2, C, 2, 3, 2), torch.channels_last_3d),
}


def _close(ours: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """float64, only the summation order differs: 1e-10 of the tensor's scale."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10 * scale, msg=msg or None)


def _x(shape, memory_format=torch.contiguous_format) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    return x.to(memory_format=memory_format)


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(1.0, 0.5)
    return module


def _pair(kind: str, affine: bool = True, eps: float = 1e-6):
    """(tritonnorm module, reference module) in float64 with the same random parameters."""
    tn_cls, ref_cls, _ = KINDS[kind]
    ref = _randomise(ref_cls(C, eps=eps, affine=affine).double())
    ours = tn_cls(C, eps=eps, affine=affine).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


# ---------------------------------------------------------------------------------------------
# Class layout, API, state_dict


@pytest.mark.parametrize("kind", KINDS)
def test_class_layout_and_exports(kind):
    tn_cls, _, base = KINDS[kind]
    assert issubclass(tn_cls, base) and tn_cls is not base
    assert tn_cls.__name__ in tn.__all__ and getattr(tn, tn_cls.__name__) is tn_cls
    assert tn_cls in CHANNEL_MODULES and tn_cls not in MODULES
    # convert never swaps torch's last-dimension norms
    assert base not in REPLACEMENTS and tn_cls not in REPLACEMENTS.values()


# (constructor kwargs of ours, of the torch base class)
API_VARIANTS = {
    "default": ({}, dict(eps=1e-6)),
    "eps": (dict(eps=1e-3), dict(eps=1e-3)),
    "plain": (dict(affine=False), dict(eps=1e-6, elementwise_affine=False)),
}


@pytest.mark.parametrize("variant", API_VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_same_api_as_torch_base(kind, variant):
    """timm's layout: the torch base class with normalized_shape=(C,): repr (but the name),
    attributes, state_dict keys and shapes, reset_parameters."""
    tn_cls, _, base = KINDS[kind]
    kwargs, base_kwargs = API_VARIANTS[variant]
    ours, ref = tn_cls(C, **kwargs), base(C, **base_kwargs)
    assert repr(ours) == repr(ref).replace(type(ref).__name__, tn_cls.__name__, 1)
    for a in ("normalized_shape", "eps", "elementwise_affine"):
        assert getattr(ours, a) == getattr(ref, a), a
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    _randomise(ours).reset_parameters()
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_constructor_activation_dtype_device(kind):
    tn_cls, _, _ = KINDS[kind]
    m = tn_cls(C, activation=("leaky_relu", 0.2), dtype=torch.float64, device="cpu")
    assert "activation=('leaky_relu', 0.2)" in repr(m) and m.activation == ("leaky_relu", 0.2)
    assert "activation" not in repr(tn_cls(C))
    assert list(m.state_dict()) == list(tn_cls(C).state_dict())
    assert m.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="relu"):
        tn_cls(C, activation="tanh")


def test_layer_norm_2d_without_bias():
    ours, ref = tn.LayerNorm2d(C, bias=False).double(), nn.LayerNorm(C, eps=1e-6, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    _randomise(ours)
    x = _x(INPUTS["nchw"][0])
    expected = F.layer_norm(x.movedim(1, -1), (C,), ours.weight, None, 1e-6).movedim(-1, 1)
    _close(ours(x), expected)


@pytest.mark.parametrize("direction", ["reference-to-tn", "tn-to-reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind, direction):
    ours, ref = _pair(kind)
    src, dst = (ref, ours) if direction == "reference-to-tn" else (ours, ref)
    _randomise(src)
    dst.load_state_dict(src.state_dict(), strict=True)
    for (k, a), (k2, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    x = _x(INPUTS["nhwc"][0])
    _close(ours(x), ref(x))


# ---------------------------------------------------------------------------------------------
# Forward and backward against the references


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", INPUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_match_reference(kind, layout, affine):
    ours, ref = _pair(kind, affine=affine, eps=1e-5)
    shape, memory_format = INPUTS[layout]
    x = _x(shape, memory_format).requires_grad_()
    y, y_ref = ours(x), ref(x)
    assert y.is_contiguous(memory_format=memory_format)  # the input's memory format
    _close(y, y_ref)
    dy = torch.randn_like(y_ref)
    inputs = (x, *ours.parameters())
    got = torch.autograd.grad(y, inputs, dy)
    want = torch.autograd.grad(y_ref, (x, *ref.parameters()), dy)
    assert len(got) == 1 + affine + (affine and kind == "layer_norm")
    for name, g, w in zip(("x", "weight", "bias"), got, want, strict=False):
        _close(g, w, name)


# epilogue -> the reference composition applied to the norm's output z
EPILOGUES = {
    "scale_shift_gelu": lambda z, s, t, r: F.gelu(z * s[..., None, None] + t[..., None, None]),
    "residual_relu": lambda z, s, t, r: torch.relu(z + r),
    "all_silu": lambda z, s, t, r: F.silu(z * s[..., None, None] + t[..., None, None] + r),
}
_EPILOGUE_KWARGS = {
    "scale_shift_gelu": lambda s, t, r: dict(scale=s, shift=t, activation="gelu"),
    "residual_relu": lambda s, t, r: dict(residual=r, activation="relu"),
    "all_silu": lambda s, t, r: dict(scale=s, shift=t, residual=r, activation="silu"),
}


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_epilogue_extras(kind, epilogue):
    ours, ref = _pair(kind)
    shape, memory_format = INPUTS["nhwc"]
    x = _x(shape, memory_format).requires_grad_()
    s, t = torch.randn(2, C, dtype=torch.float64), torch.randn(2, C, dtype=torch.float64)
    r = _x(shape, memory_format)
    y = ours(x, **_EPILOGUE_KWARGS[epilogue](s, t, r))
    y_ref = EPILOGUES[epilogue](ref(x), s, t, r)
    _close(y, y_ref)
    dy = torch.randn_like(y_ref)
    _close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_own_activation_and_errors(kind):
    tn_cls, ref_cls, _ = KINDS[kind]
    x = _x(INPUTS["nchw"][0])
    ours = tn_cls(C, activation="silu").double()
    _close(ours(x), F.silu(ref_cls(C).double()(x)))
    with pytest.raises(ValueError, match="its own activation"):
        ours(x, activation="relu")
    for affine in (True, False):  # without weight the functional could not tell
        with pytest.raises(RuntimeError, match=r"expected input of shape \(N, 6"):
            tn_cls(C, affine=affine).double()(_x((2, C + 1, 3)))


@pytest.mark.parametrize("kind", KINDS)
def test_compiles_without_graph_break(kind, device):
    tn_cls, ref_cls, _ = KINDS[kind]
    ours = tn_cls(C, activation="gelu").to(device)
    ref = ref_cls(C).to(device)
    x = torch.randn(2, C, 3, 3, device=device).to(memory_format=torch.channels_last)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.gelu(ref(x)), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# tn.convert: ConvNeXt's LayerNorm(channels_first), torch's last-dimension norms


def _convnext_stem(layer_norm=LayerNorm):
    """ConvNeXt's stem and a downsampling layer: conv, LayerNorm(channels_first)."""
    return nn.Sequential(
        nn.Conv2d(3, C, kernel_size=2, stride=2),
        layer_norm(C, eps=1e-6, data_format="channels_first"),
        layer_norm(C, eps=1e-6, data_format="channels_first"),
        nn.Conv2d(C, 2 * C, kernel_size=2, stride=2),
    )


def test_convert_convnext_channels_first_layer_norm():
    ref = _randomise(_convnext_stem()).double()
    ours = copy.deepcopy(ref)
    params = list(ours.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone: no warning
        assert tn.convert(ours) is ours
    assert all(p is q for p, q in zip(params, ours.parameters(), strict=True))  # kept
    report = tn.convert(copy.deepcopy(ref), report=True)[1]
    assert report.converted == {"convnext.LayerNorm": 2}
    assert not report.left and not report.fused
    norm = ours[1]
    assert isinstance(norm, LayerNorm) and isinstance(norm, tn.modules.LayerNorm2dMixin)
    assert type(norm).__name__ == "TritonLayerNorm" and repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert norm.eps == 1e-6 and norm.data_format == "channels_first"
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = _x((2, 3, 8, 8), memory_format).requires_grad_()
        y, y_ref = ours(x), ref(x)
        _close(y, y_ref)
        params = list(ours.parameters())
        got = torch.autograd.grad(y.square().sum(), [x, *params])
        want = torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()])
        for g, w in zip(got, want, strict=True):
            _close(g, w)
    # copies and pickles with its class; pickle finds the class by its (decodable) name, as in a
    # new process: the recognised classes are not registered by path
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(copied[1]) is type(norm)
        _close(copied(x), ours(x))
    assert zoo.__getattr__(type(norm).__qualname__) is type(norm)


def test_convert_folds_activation_after_channel_norms():
    """fuse_activations folds a GELU after tn.LayerNorm2d, and after a converted ConvNeXt
    LayerNorm, inside an nn.Sequential."""
    make = lambda: nn.Sequential(
        _randomise(LayerNorm(C, data_format="channels_first")), nn.GELU(),
        _randomise(TorchLayerNorm2d(C)), nn.SiLU(),
    ).double()  # fmt: skip
    ref = make()
    ours = make()
    ours[2] = tn.LayerNorm2d(C).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours, report = tn.convert(ours, fuse_activations=True, report=True)
    assert report.converted == {"convnext.LayerNorm": 1, "LayerNorm2d": 1}
    assert report.fused == {
        "convnext.LayerNorm + GELU (Sequential)": 1,
        "LayerNorm2d + SiLU (Sequential)": 1,
    }
    assert ours[0].activation == "gelu" and ours[2].activation == "silu"
    assert "activation='gelu'" in repr(ours[0])
    x = _x((2, C, 3, 3))
    _close(ours(x), ref(x))


class LayerNormWithBuffer(LayerNorm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.ones(1))


def _replaced_forward():
    m = LayerNorm(C, data_format="channels_first")
    m.forward = lambda x: x
    return m


# look-alikes left alone -> the reason the report gives
LOOK_ALIKES = {
    "channels_last": (
        lambda: LayerNorm(C),
        "data_format='channels_last': tritonnorm converts channels_first only",
    ),
    "other_forward": (
        lambda: VarLayerNorm(C, data_format="channels_first"),
        "its forward is not ConvNeXt's LayerNorm's",
    ),
    "replaced_forward": (_replaced_forward, "its forward is replaced on the instance"),
    "buffer": (
        lambda: LayerNormWithBuffer(C, data_format="channels_first"),
        "not a ConvNeXt LayerNorm: submodules, buffers or other parameters",
    ),
}


@pytest.mark.parametrize("case", LOOK_ALIKES)
def test_convnext_look_alikes_are_left_and_reported(case):
    make, reason = LOOK_ALIKES[case]
    module = make()
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    with pytest.warns(UserWarning, match="left alone: 1 x " + re.escape(name)):
        tn.convert(nn.Sequential(make()))
    model, report = tn.convert(nn.Sequential(module), report=True)
    assert type(model[0]) is cls
    assert report.left == {f"{name} ({reason})": 1} and not report.converted


def test_torch_last_dimension_norms_are_never_converted():
    """A transformer's nn.LayerNorm (and nn.RMSNorm): not swapped, not reported."""
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.LayerNorm(8), nn.RMSNorm(8)
    )
    classes = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, report = tn.convert(model, fuse_activations=True, report=True)
    assert [type(m) for m in model.modules()] == classes
    assert nn.LayerNorm in classes and nn.RMSNorm in classes
    assert not report.converted and not report.left and not report.fused


# ---------------------------------------------------------------------------------------------
# A ConvNeXt block trained beside the torch composition


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block with 1x1 convolutions (timm's conv_mlp=True): depthwise 7x7 conv, norm
    across channels, pointwise C -> 4C, GELU, 4C -> C, layer scale, residual."""

    def __init__(self, dim: int, norm_layer, layer_scale: float = 0.5) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = norm_layer(dim)
        self.fc1 = nn.Conv2d(dim, 4 * dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(4 * dim, dim, kernel_size=1)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x)))))
        return x + y * self.gamma.reshape(1, -1, 1, 1)


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_convnext_block_trains_like_torch(kind, layout):
    tn_cls, ref_cls, _ = KINDS[kind]
    memory_format = LAYOUTS[layout]
    torch.manual_seed(0)
    ref = ConvNeXtBlock(C, ref_cls).double().to(memory_format=memory_format)
    _randomise(ref.norm)
    ours = ConvNeXtBlock(C, tn_cls).double().to(memory_format=memory_format)
    ours.load_state_dict(ref.state_dict(), strict=True)
    initial = copy.deepcopy(ref.state_dict())
    formats = []
    ours.norm.register_forward_hook(
        lambda m, args, y: formats.append(y.is_contiguous(memory_format=memory_format))
    )
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    target = torch.randn(2, C, 6, 6, dtype=torch.float64)
    for step in range(3):
        x = _x((2, C, 6, 6), memory_format)
        losses = []
        for model, opt in zip((ref, ours), optimisers, strict=True):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        _close(losses[1], losses[0], f"loss at step {step}")
    assert formats == [True] * 3
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        assert not torch.equal(p, initial[name]), name  # the steps moved it
        _close(q, p, name)
