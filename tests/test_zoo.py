"""tn.convert on the model zoos people train, with the real packages (the `zoo` extra): timm's
norm-act layers and ResNet blocks, torchvision's FrozenBatchNorm2d and ResNet blocks, diffusers'
ResnetBlock2D and AdaGroupNorm. Models are built from their configs (random init, no
downloads), converted, counted (what was converted, fused, left alone), and trained beside the
unconverted original in float64: outputs at every step, every gradient, buffers, and state_dicts
loading both ways. Small configs and inputs (the interpreter runs one program at a time); the
counts are taken on the full-size models, which are only built.

torchvision on a CPU-only machine: its published wheel is a CUDA build whose C++ operators cannot
load beside torch's CPU wheel, and its import then stops at a registration that assumes they
did ("operator torchvision::nms does not exist"). timm imports torchvision, and diffusers does
when it is installed. In that case, and only then, the import is retried after declaring the
schemas of the two operators that registration needs: torchvision's pure-Python modules (models,
ops.misc) then import, its C++ operators stay unusable, and nothing here calls them. A package
that still cannot import skips its tests with the reason.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import pickle
import warnings

import pytest
import torch
from torch import nn

import tritonnorm as tn
from perf.models import torchvision_note
from tritonnorm.conversion import ConversionReport


@functools.cache
def _torchvision_note() -> str | None:
    """Import torchvision if installed (perf.models.torchvision_note: when its C++ operators
    cannot load, see the module docstring, it declares the two it needs); a warning says so."""
    note = torchvision_note()
    if note is not None:
        warnings.warn(note, stacklevel=1)
    return note


def _package(name: str):
    try:
        _torchvision_note()
        return importlib.import_module(name)
    except Exception as error:  # not installed, or installed and broken: say which
        pytest.skip(f"cannot import {name} ({type(error).__name__}: {error}); the zoo extra")


@pytest.fixture(scope="module")
def timm():
    return _package("timm")


@pytest.fixture(scope="module")
def torchvision():
    return _package("torchvision")


@pytest.fixture(scope="module")
def diffusers():
    return _package("diffusers")


# ---------------------------------------------------------------------------------------------
# Helpers


def _convert(model: nn.Module, **kwargs) -> tuple[nn.Module, ConversionReport]:
    return tn.convert(copy.deepcopy(model), fuse_activations=True, report=True, **kwargs)


def _close(ours: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """float64 on both sides, only the summation order differs; errors relative to the tensor's
    scale (normalised values and their gradients are differences of O(scale) terms), with room
    for the conditioning of batch norm over the few values per channel of tiny inputs."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7 * scale, msg=msg or None)


def _output(y):
    return y.sample if hasattr(y, "sample") else y  # diffusers' UNet returns a dataclass


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        _close(sb[key], sa[key], key)


def _train_beside(make, ref: nn.Module, ours: nn.Module, inputs, steps: int = 2) -> None:
    """``steps`` SGD steps of the original and the converted model on the same inputs:
    outputs, every gradient, then buffers and the state_dict; an eval forward; and state_dicts
    loading both ways (strict) into fresh models."""
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ours)]
    for step in range(steps):
        outs = []
        for model, opt in zip((ref, ours), optimisers, strict=True):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout masks
            y = _output(model(*inputs))
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).mean().backward()
            outs.append(y.detach())
        _close(outs[1], outs[0])
        for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
            if p.grad is not None or q.grad is not None:
                _close(q.grad, p.grad, name)
        for opt in optimisers:
            opt.step()
    _assert_same_state(ref, ours)
    ref.eval(), ours.eval()
    with torch.no_grad():
        _close(_output(ours(*inputs)), _output(ref(*inputs)))
    plain = make().to(torch.float64)
    plain.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(ours, plain)
    converted = tn.convert(make(), fuse_activations=True, report=True)[0].to(torch.float64)
    converted.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_state(ref, converted)


def _lockstep(make, inputs, steps: int = 2) -> ConversionReport:
    ref = make().to(torch.float64)
    ours, report = _convert(ref)
    _train_beside(make, ref, ours, inputs, steps)
    return report


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# timm: counts on full-size models (built, not run)

TIMM_COUNTS = {
    # 49 BN layers; 16 without an activation (the blocks' projections)
    "efficientnet_b0": ({"timm.BatchNormAct2d": 49}, {"timm.BatchNormAct2d + SiLU": 33}, {}),
    # Hardswish has no fused epilogue: it runs after the norm, and says so
    "mobilenetv3_small_050": (
        {"timm.BatchNormAct2d": 34},
        {"timm.BatchNormAct2d + ReLU": 5},
        {"Hardswish after timm.BatchNormAct2d (no fused epilogue for it; runs after the norm)": 18},
    ),
    # BiT: GroupNormAct(32 groups) + ReLU everywhere
    "resnetv2_50x1_bit": ({"timm.GroupNormAct": 49}, {"timm.GroupNormAct + ReLU": 49}, {}),
    # timm's own ResNet: plain BatchNorm2d, fused inside its Bottleneck blocks
    "resnet50": (
        {"BatchNorm2d": 53},
        {"timm.Bottleneck: bn1 + ReLU, bn2 + ReLU, bn3 + residual + ReLU": 16},
        {},
    ),
    # LayerNorm2d in the stem, downsampling layers, blocks (conv_mlp) and head
    "convnext_atto": ({"timm.LayerNorm2d": 17}, {}, {}),
    # conv_mlp=False: the blocks' norm is timm's last-dimension LayerNorm, not converted
    "test_convnext": (
        {"timm.LayerNorm2d": 5},
        {},
        {"timm.LayerNorm (no tritonnorm equivalent)": 9},
    ),
}


@pytest.mark.parametrize("name", TIMM_COUNTS)
def test_timm_counts(timm, name):
    model = timm.create_model(name, pretrained=False)
    keys = list(model.state_dict())
    reprs = repr(model)
    converted, fused, left = TIMM_COUNTS[name]
    model, report = tn.convert(model, fuse_activations=True, report=True)
    assert dict(report.converted) == converted
    assert dict(report.fused) == fused
    assert dict(report.left) == left
    assert list(model.state_dict()) == keys and repr(model) == reprs


# ---------------------------------------------------------------------------------------------
# timm: training beside the original


def test_timm_efficientnet_trains_beside_original(timm):
    # timm's test_efficientnet at half width: BatchNormAct2d + SiLU / Identity, SE, inverted
    # residuals
    make = functools.partial(
        timm.create_model, "test_efficientnet", pretrained=False, channel_multiplier=0.5
    )
    report = _lockstep(make, (_x(2, 3, 32, 32),))
    assert report.converted == {"timm.BatchNormAct2d": 13}
    assert report.fused == {"timm.BatchNormAct2d + SiLU": 9}


TIMM_RESNETS = {
    # BasicBlock and Bottleneck stages, a deep stem (Sequential BN + ReLU), all fused
    "plain": (
        {},
        {
            "BatchNorm2d + ReLU (Sequential)": 2,
            "timm.BasicBlock: bn1 + ReLU, bn2 + residual + ReLU": 3,
            "timm.Bottleneck: bn1 + ReLU, bn2 + ReLU, bn3 + residual + ReLU": 1,
        },
    ),
    # squeeze-excitation and drop-path between the last norm and the residual: not fused there
    "se+drop_path": (
        dict(block_args=dict(attn_layer="se"), drop_path_rate=0.5),
        {
            "BatchNorm2d + ReLU (Sequential)": 2,
            "timm.BasicBlock: bn1 + ReLU": 3,
            "timm.Bottleneck: bn1 + ReLU, bn2 + ReLU": 1,
        },
    ),
}


@pytest.mark.parametrize("variant", TIMM_RESNETS)
def test_timm_resnet_blocks_train_beside_original(timm, variant):
    # timm's test_resnet, narrower
    kwargs, fused = TIMM_RESNETS[variant]
    make = functools.partial(
        timm.create_model, "test_resnet", pretrained=False, stem_width=8,
        channels=(8, 16, 8, 16), num_classes=10, **kwargs,
    )  # fmt: skip
    report = _lockstep(make, (_x(2, 3, 16, 16),), steps=1)
    assert report.converted == {"BatchNorm2d": 16}
    assert report.fused == fused


def _timm_layers(timm):
    layers = timm.layers
    drop = functools.partial(nn.Dropout, 0.5)
    return {
        "bn_silu": lambda: layers.BatchNormAct2d(6, act_layer=nn.SiLU),
        "bn_hardswish": lambda: layers.BatchNormAct2d(6, act_layer=nn.Hardswish),
        "bn_drop_relu": lambda: layers.BatchNormAct2d(6, drop_layer=drop),
        "bn_identity_momentum_none": lambda: layers.BatchNormAct2d(6, momentum=None, apply_act=False),
        "gn_gelu_tanh": lambda: layers.GroupNormAct(6, 3, act_layer="gelu_tanh"),
        "gn_swish_timm": lambda: layers.GroupNormAct(6, 2, act_layer=layers.activations.Swish),
        "gn1_leaky": lambda: layers.GroupNorm1Act(6, act_layer=nn.LeakyReLU, act_kwargs=dict(negative_slope=0.2)),
        "gn_plain": lambda: layers.GroupNorm(6, 3),
        "sync_bn_gelu": lambda: layers.norm_act.convert_sync_batchnorm(
            layers.BatchNormAct2d(6, act_layer="gelu")
        ),
        "ln2d_plain": lambda: layers.LayerNorm2d(6),
        "ln2d_act_gelu": lambda: layers.LayerNormAct2d(6, act_layer=nn.GELU),
        "ln2d_act_hardswish": lambda: layers.LayerNormAct2d(6, act_layer=nn.Hardswish),
        "ln2d_act_drop_relu": lambda: layers.LayerNormAct2d(6, drop_layer=drop),
        "rms2d_plain": lambda: layers.RmsNorm2d(6),
        "rms2d_act_silu": lambda: layers.RmsNormAct2d(6, act_layer=nn.SiLU),
    }  # fmt: skip


LAYERS = [
    "bn_silu",
    "bn_hardswish",  # no epilogue: kept as a module after the norm
    "bn_drop_relu",  # a dropout between norm and act: both run after the norm
    "bn_identity_momentum_none",
    "gn_gelu_tanh",
    "gn_swish_timm",  # timm's own Swish class
    "gn1_leaky",
    "gn_plain",  # timm's GroupNorm (not an Act layer)
    "sync_bn_gelu",  # SyncBatchNormAct, distributed not initialised: plain batch norm
    "ln2d_plain",  # LayerNorm2d (ConvNeXt), RmsNorm2d: tritonnorm's LayerNorm2d / RMSNorm2d
    "ln2d_act_gelu",
    "ln2d_act_hardswish",
    "ln2d_act_drop_relu",
    "rms2d_plain",
    "rms2d_act_silu",
]


@pytest.mark.parametrize("name", LAYERS)
def test_timm_layer(timm, name):
    make = _timm_layers(timm)[name]
    ref = make().to(torch.float64)
    ours, report = _convert(ref)
    assert repr(ours) == repr(ref) and type(ours).__name__ == "TritonTimm" + type(ref).__name__
    assert isinstance(ours, type(ref))
    x = _x(3, 6, 4, 5)
    if name.startswith(("ln2d", "rms2d")):
        # timm's LayerNorm2d returns its permuted result, NHWC in memory, where tritonnorm's
        # keeps the input's memory format; dropout draws its mask in memory order, so the same
        # mask needs the same layout: channels_last input (both outputs are then channels_last)
        x = x.to(memory_format=torch.channels_last)
    outs = []
    for model in (ref, ours):  # same dropout mask
        torch.manual_seed(1)
        outs.append(model(x).detach())
    _close(outs[1], outs[0])
    assert sum(report.converted.values()) == 1
    folded = not any(word in name for word in ("hardswish", "drop", "identity", "plain"))
    assert sum(report.fused.values()) == folded
    # copies and pickles with its class; train/eval; one optimiser step beside the original
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(copied) is type(ours)
        torch.manual_seed(1)
        _close(copied(x), outs[1])
    make64 = lambda: make().to(torch.float64)
    _train_beside(make64, ref, ours, (x,), steps=1 + (name == "bn_silu"))


def _timm_channel_norms(timm):
    """timm class, tritonnorm class, one constructor argument list for both."""
    layers = timm.layers
    return {
        "layer_norm_2d": (layers.LayerNorm2d, tn.LayerNorm2d, dict(eps=1e-5)),
        "layer_norm_2d_no_affine": (layers.LayerNorm2d, tn.LayerNorm2d, dict(affine=False)),
        "rms_norm_2d": (layers.RmsNorm2d, tn.RMSNorm2d, dict(eps=1e-5)),
    }


CHANNEL_NORMS = ["layer_norm_2d", "layer_norm_2d_no_affine", "rms_norm_2d"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", CHANNEL_NORMS)
def test_timm_channel_norms_and_tritonnorm_modules(timm, name, layout):
    """tn.LayerNorm2d / tn.RMSNorm2d against timm's LayerNorm2d / RmsNorm2d: checkpoints load
    both ways (strict, same keys and shapes), forward and backward match (float64)."""
    timm_cls, tn_cls, kwargs = _timm_channel_norms(timm)[name]
    ref, ours = timm_cls(6, **kwargs).double(), tn_cls(6, **kwargs).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    back = timm_cls(6, **kwargs).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_state(ref, back)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _x(2, 6, 3, 4).to(memory_format=memory_format).requires_grad_()
    y, y_ref = ours(x), ref(x)
    assert y.is_contiguous(memory_format=memory_format)
    _close(y, y_ref)
    dy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, [x, *ours.parameters()], dy)
    want = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    assert len(got) == len(want) == 1 + len(list(ref.parameters()))
    for g, w in zip(got, want, strict=True):
        _close(g, w)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_timm_convnext_trains_beside_original(timm, layout):
    # timm's ConvNeXt (convnext_atto's conv_mlp blocks: 1x1 convs, LayerNorm2d everywhere), one
    # narrow block per stage: stem, 4 blocks, 3 downsampling layers, head
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    make = lambda: timm.create_model(
        "convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16),
        num_classes=5, ls_init_value=0.5,
    ).to(memory_format=memory_format)  # fmt: skip
    report = _lockstep(make, (_x(2, 3, 32, 32).to(memory_format=memory_format),))
    assert report.converted == {"timm.LayerNorm2d": 9}
    assert not report.left


def test_timm_frozen_norm_act(timm):
    layers = timm.layers
    ref = layers.freeze_batch_norm_2d(layers.BatchNormAct2d(6, act_layer=nn.SiLU)).double()
    with torch.no_grad():
        for buffer in ("weight", "bias", "running_mean"):
            getattr(ref, buffer).normal_()
        ref.running_var.uniform_(0.5, 2.0)
    ours, report = _convert(ref)
    assert report.converted == {"timm.FrozenBatchNormAct2d": 1}
    assert report.fused == {"timm.FrozenBatchNormAct2d + SiLU": 1}
    x = _x(2, 6, 3, 3).requires_grad_()
    y_ref, y = ref(x), ours(x)
    _close(y, y_ref)
    g = torch.randn_like(y)
    _close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_timm_sync_conversion_keeps_act(timm):
    # sync=True: BatchNormAct2d becomes a SyncBatchNormAct (as timm's own conversion) running
    # tritonnorm's SyncBatchNorm, act kept (torch's conversion alone would drop it)
    ref = nn.Sequential(timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)).double()
    ours, report = _convert(ref, sync=True)
    assert isinstance(ours[0], tn.SyncBatchNorm)
    assert type(ours[0]).__name__ == "TritonTimmSyncBatchNormAct"
    assert report.fused == {"timm.SyncBatchNormAct + SiLU": 1}
    x = _x(3, 6, 2, 2)
    _close(ours(x), ref(x))


def test_timm_direct_sync_conversion_keeps_act(timm):
    # tn.SyncBatchNorm.convert_sync_batchnorm called directly (not through tn.convert): torch's
    # method would make a plain SyncBatchNorm whose forward never calls act
    ref = nn.Sequential(timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)).double()
    ours = tn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(ours[0], tn.SyncBatchNorm)
    assert type(ours[0]).__name__ == "TritonTimmSyncBatchNormAct"
    x = _x(3, 6, 2, 2)
    _close(ours(x), ref(x))


def test_timm_left_alone_is_reported(timm):
    # the Fp32 variants (float32 statistics and output cast back) and subclasses are left alone
    layers = timm.layers

    class MyLayerNorm2d(layers.LayerNorm2d):
        pass

    model = nn.Sequential(
        layers.LayerNorm2dFp32(6), layers.RmsNorm2dFp32(6), layers.LayerNormAct2dFp32(6),
        MyLayerNorm2d(6), layers.LayerNormAct2d(6), layers.BatchNormAct2d(6),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="LayerNorm2dFp32 .no tritonnorm equivalent"):
        tn.convert(copy.deepcopy(model))
    report = tn.convert(model, report=True)[1]
    assert report.left == {
        "timm.LayerNorm2dFp32 (no tritonnorm equivalent)": 1,
        "timm.RmsNorm2dFp32 (no tritonnorm equivalent)": 1,
        "timm.LayerNormAct2dFp32 (no tritonnorm equivalent)": 1,
        "test_zoo.test_timm_left_alone_is_reported.<locals>.MyLayerNorm2d (no tritonnorm "
        "equivalent)": 1,
    }
    assert report.converted == {"timm.LayerNormAct2d": 1, "timm.BatchNormAct2d": 1}
    assert type(model[3]) is MyLayerNorm2d


def test_timm_layer_compiles_without_graph_break(timm, device):
    ref = timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU).to(device)
    ours = tn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 4, 3, 3, device=device)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x))


# ---------------------------------------------------------------------------------------------
# torchvision


def test_torchvision_resnet_trains_beside_original(torchvision):
    # torchvision's blocks, narrow: BasicBlock (with and without downsampling) and Bottleneck
    resnet = torchvision.models.resnet

    def make():
        down = nn.Sequential(resnet.conv1x1(8, 16, stride=2), nn.BatchNorm2d(16))
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            resnet.BasicBlock(8, 8), resnet.BasicBlock(8, 16, stride=2, downsample=down),
            resnet.Bottleneck(16, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    report = _lockstep(make, (_x(2, 3, 8, 8),))
    assert report.converted == {"BatchNorm2d": 9}
    assert report.fused == {
        "BatchNorm2d + ReLU (Sequential)": 1,
        "torchvision.BasicBlock: bn1 + ReLU, bn2 + residual + ReLU": 2,
        "torchvision.Bottleneck: bn1 + ReLU, bn2 + ReLU, bn3 + residual + ReLU": 1,
    }
    counts = tn.convert(torchvision.models.resnet50(), fuse_activations=True, report=True)[1]
    assert counts.converted == {"BatchNorm2d": 53}
    assert counts.fused == {
        "torchvision.Bottleneck: bn1 + ReLU, bn2 + ReLU, bn3 + residual + ReLU": 16
    }


def test_torchvision_frozen_batch_norm(torchvision):
    """A detection-style backbone: FrozenBatchNorm2d in ResNet blocks and in a
    Conv2dNormActivation (Sequential: the ReLU folds); gradients reach the input and convs."""
    resnet, misc = torchvision.models.resnet, torchvision.ops.misc
    frozen = torchvision.ops.FrozenBatchNorm2d

    def make():
        model = nn.Sequential(
            misc.Conv2dNormActivation(3, 8, norm_layer=frozen),
            resnet.BasicBlock(8, 8, norm_layer=frozen),
            resnet.Bottleneck(8, 2, norm_layer=frozen),
        )
        generator = torch.Generator().manual_seed(3)
        for m in model.modules():
            if isinstance(m, frozen):
                for buffer in (m.weight, m.bias, m.running_mean):
                    buffer.copy_(torch.randn(buffer.shape, generator=generator))
                m.running_var.uniform_(0.5, 2.0, generator=generator)
        return model

    report = _lockstep(make, (_x(2, 3, 6, 6).requires_grad_(),), steps=1)
    assert report.converted == {"torchvision.FrozenBatchNorm2d": 6}
    assert report.fused == {
        "torchvision.FrozenBatchNorm2d + ReLU (Sequential)": 1,
        "torchvision.BasicBlock: bn1 + ReLU, bn2 + residual + ReLU": 1,
        "torchvision.Bottleneck: bn1 + ReLU, bn2 + ReLU, bn3 + residual + ReLU": 1,
    }
    with pytest.raises(ValueError, match="expected 4D input"):
        tn.convert(frozen(3))(torch.randn(2, 3, 4))
    # half input, float32 buffers: the original's arithmetic promotes to float32, so does ours
    layer = make()[0][1]
    x = torch.randn(2, 8, 3, 3, dtype=torch.bfloat16)
    y, y_ref = tn.convert(copy.deepcopy(layer))(x), layer(x)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)


def test_blocks_left_alone_are_reported(torchvision, monkeypatch):
    resnet = torchvision.models.resnet

    class MyBlock(resnet.BasicBlock):
        pass

    patched = resnet.BasicBlock(4, 4)
    patched.forward = lambda x: x
    no_bn = resnet.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(1, c, affine=False))
    no_bn.bn1 = nn.Identity()
    model = nn.Sequential(MyBlock(4, 4), patched, no_bn, resnet.BasicBlock(4, 4))
    report = tn.convert(model, fuse_activations=True, report=True)[1]
    assert report.left == {
        "test_zoo.test_blocks_left_alone_are_reported.<locals>.MyBlock (a subclass of "
        "torchvision.BasicBlock: not fused)": 1,
        "torchvision.BasicBlock (its forward is replaced on the instance)": 1,
        "torchvision.BasicBlock (its bn1 is a Identity, not a tritonnorm norm without "
        "activation)": 1,
    }
    assert report.fused == {"torchvision.BasicBlock: bn1 + ReLU, bn2 + residual + ReLU": 1}
    # another version's forward (other names) is left alone
    monkeypatch.setattr(resnet.BasicBlock, "forward", lambda self, x: self.relu(self.bn1(x)))
    report = tn.convert(resnet.BasicBlock(4, 4), fuse_activations=True, report=True)[1]
    assert report.left == {
        "torchvision.BasicBlock (its forward is not the one tritonnorm knows)": 1
    }


def test_torchvision_block_compiles_without_graph_break(torchvision, device):
    ref = torchvision.models.resnet.BasicBlock(4, 4).to(device)
    ours = tn.convert(copy.deepcopy(ref), fuse_activations=True)
    x = torch.randn(2, 4, 3, 3, device=device)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x))


# ---------------------------------------------------------------------------------------------
# diffusers


def _unet(diffusers, **config):
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **config,
    )  # fmt: skip


def test_diffusers_unet_trains_beside_original(diffusers):
    # the time embedding's scale/shift fused into norm2, SiLU into norm1 and norm2
    make = functools.partial(_unet, diffusers, resnet_time_scale_shift="scale_shift")
    report = _lockstep(make, (_x(2, 3, 8, 8), torch.tensor([3, 500])), steps=1)
    assert report.converted == {"GroupNorm": 20}
    assert report.fused == {"diffusers.ResnetBlock2D: norm1 + SiLU, norm2 + scale/shift + SiLU": 8}


def test_diffusers_blocks(diffusers):
    from diffusers.models.normalization import AdaGroupNorm
    from diffusers.models.resnet import ResnetBlock2D

    block = lambda **kw: ResnetBlock2D(
        in_channels=8, out_channels=6, groups=2, **{"temb_channels": 5, **kw}
    )
    x, temb = _x(2, 8, 4, 4), _x(2, 5)
    cases = {
        "default+down": (lambda: block(down=True), "norm1 + SiLU, norm2 + SiLU"),
        "scale_shift+up": (lambda: block(up=True, time_embedding_norm="scale_shift"), "norm1 + SiLU, norm2 + scale/shift + SiLU"),
        "mish+scale_shift": (lambda: block(non_linearity="mish", time_embedding_norm="scale_shift"), "norm2 + scale/shift"),
        "no_temb+dropout": (lambda: block(temb_channels=None, dropout=0.0, output_scale_factor=2.0), "norm1 + SiLU, norm2 + SiLU"),
    }  # fmt: skip
    for name, (make, fused) in cases.items():
        report = _lockstep(make, (x, None if "no_temb" in name else temb), steps=1)
        assert report.fused == {f"diffusers.ResnetBlock2D: {fused}": 1}, name
    report = _lockstep(lambda: AdaGroupNorm(5, 8, 2, act_fn="silu"), (x, temb), steps=1)
    assert report.fused == {"diffusers.AdaGroupNorm: group_norm + scale/shift": 1}
    # default mode with Mish: nothing to fuse, left and reported
    report = _convert(block(non_linearity="mish"))[1]
    assert report.left == {
        "diffusers.ResnetBlock2D (nothing to fuse in this configuration (activation without a "
        "fused epilogue))": 1
    }


def test_diffusers_block_saves_less_for_backward(diffusers):
    from diffusers.models.resnet import ResnetBlock2D

    ref = ResnetBlock2D(in_channels=8, temb_channels=5, groups=2, time_embedding_norm="scale_shift")
    ours = _convert(ref)[0]
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 5)
    saved = [_saved_bytes(m, x, temb) for m in (ref, ours)]
    assert saved[1] < saved[0]


def _saved_bytes(model: nn.Module, *inputs) -> int:
    """Bytes autograd keeps for the backward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _output(model(*inputs))
    return sum(storages.values())


def test_diffusers_block_compiles_without_graph_break(diffusers, device):
    from diffusers.models.resnet import ResnetBlock2D

    ref = ResnetBlock2D(in_channels=4, temb_channels=6, groups=2, time_embedding_norm="scale_shift")
    ref = ref.to(device)
    ours = tn.convert(copy.deepcopy(ref), fuse_activations=True)
    x, temb = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 6, device=device)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, temb), ref(x, temb))


# ---------------------------------------------------------------------------------------------
# Reporting without third-party packages


def test_unknown_norm_subclass_is_reported():
    class MyBatchNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), MyBatchNorm(3), MyBatchNorm(3), nn.Hardswish())
    with pytest.warns(UserWarning, match=r"2 x .*MyBatchNorm \(a norm subclass"):
        assert tn.convert(copy.deepcopy(model)) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, report = tn.convert(model, report=True)
    assert out is model and report.converted == {"BatchNorm2d": 1}
    assert sum(report.left.values()) == 2
    ok = nn.Sequential(nn.BatchNorm2d(3), nn.Hardswish())
    report = tn.convert(ok, fuse_activations=True, report=True)[1]
    assert report.left == {"Hardswish after BatchNorm2d (Sequential; no fused epilogue for it)": 1}
    assert "left alone: 1" in str(report)


def test_module_forward_extras_match_the_functions(device):
    bn = tn.BatchNorm2d(3).to(device)
    x, r = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    y = bn(x, residual=r, activation="relu")
    expected = torch.relu(nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True) + r)
    torch.testing.assert_close(y, expected)
    assert int(bn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="residual"):
        bn(x, residual=r[:1])
    assert int(bn.num_batches_tracked) == 1  # checked before the counter moves
    with pytest.raises(ValueError, match="its own activation"):
        tn.BatchNorm2d(3, activation="silu").to(device)(x, activation="relu")
