"""What tn.convert matches, and what the converted modules are: activations fold only into an
nn.Sequential running Sequential's own forward; the report calls only elementwise activation
modules activations; ConvNeXt's channels_first LayerNorm is recognised by what its forward
computes on a probe input (never touching the module); converted modules pickle by reference to
their original class; the converted classes have names of their own ("TritonTimmLayerNorm2d")
with the original's repr.

Small float64 inputs (the interpreter runs one program at a time); timm and torchvision are
imported as tests/test_zoo.py does (their tests skip where they cannot import).
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from convnext import LayerNorm
from test_zoo import _package
from torch import nn

import tritonnorm as tn
from tritonnorm import conversion, zoo
from tritonnorm.modules import LayerNorm2dMixin, RMSNorm2dMixin, TritonNormMixin

C = 6


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-10) -> None:
    """float64, only the summation order differs (``tol`` of the tensor's scale)."""
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * scale)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64) * 2 + 0.5


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(1.0, 0.5)
    return module


# ---------------------------------------------------------------------------------------------
# fold_activations: only inside Sequential's own forward


class PlainSequential(nn.Sequential):
    """A Sequential subclass that keeps Sequential's forward (as torchvision's
    Conv2dNormActivation): its activations fold."""


class ReversedSequential(nn.Sequential):
    """Runs its modules last to first: the ReLU runs before the norm, so folding it into the
    norm would change the output."""

    def forward(self, x):
        for module in reversed(self):
            x = module(x)
        return x


def _forward_on_instance():
    seq = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
    seq.forward = lambda x: seq[0](seq[1](x))  # the same reversal, set on the instance
    return seq


_NOT_FOLDED = "ReLU after BatchNorm2d (not folded: {} runs a forward of its own)"
# container -> (fused, left)
FOLDS = {
    "sequential": (
        lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()),
        {"BatchNorm2d + ReLU (Sequential)": 1},
        {},
    ),
    "subclass_keeping_forward": (
        lambda: PlainSequential(nn.BatchNorm2d(C), nn.ReLU()),
        {"BatchNorm2d + ReLU (Sequential)": 1},
        {},
    ),
    "subclass_with_own_forward": (
        lambda: ReversedSequential(nn.BatchNorm2d(C), nn.ReLU()),
        {},
        {_NOT_FOLDED.format("test_convert_matches.ReversedSequential"): 1},
    ),
    "forward_set_on_instance": (
        _forward_on_instance,
        {},
        {_NOT_FOLDED.format("Sequential"): 1},
    ),
}


@pytest.mark.parametrize("case", FOLDS)
def test_fold_only_into_sequential_forward(case):
    make, fused, left = FOLDS[case]
    ref = _randomise(make().double())
    ours = make().double()  # not a deepcopy: the instance's forward refers to its own modules
    ours.load_state_dict(ref.state_dict())
    report = tn.convert(ours, fuse_activations=True, report=True)[1]
    assert dict(report.fused) == fused and dict(report.left) == left
    assert isinstance(ours[1], nn.Identity if fused else nn.ReLU)
    assert getattr(ours[0], "activation", None) == ("relu" if fused else None)
    x = _x(2, C, 3, 3)
    _close(ours(x), ref(x))


# ---------------------------------------------------------------------------------------------
# Which modules the report calls activations

# The rest of torch.nn.modules.activation: not elementwise (a new class there fails
# test_activation_table_covers_torch until it is put on one side)
NOT_ELEMENTWISE = {"GLU", "LogSoftmax", "MultiheadAttention", "Softmax", "Softmax2d", "Softmin"}


def _classes_of(module) -> set[str]:
    return {
        name
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__
    }


def test_activation_table_covers_torch():
    listed = conversion.ELEMENTWISE_ACTIVATIONS["torch.nn.modules.activation"]
    assert not listed & NOT_ELEMENTWISE
    assert listed | NOT_ELEMENTWISE == _classes_of(torch.nn.modules.activation)


@pytest.mark.parametrize("package", ["timm.layers.activations", "timm.layers.activations_me"])
def test_activation_table_covers_timm(package):
    _package("timm")
    module = pytest.importorskip(package)
    assert conversion.ELEMENTWISE_ACTIVATIONS[package] == _classes_of(module)


# arguments for the classes whose constructors need some
_ARGUMENTS = {"Threshold": (0.1, 20.0)}


@pytest.mark.parametrize(
    "name", sorted(conversion.ELEMENTWISE_ACTIVATIONS["torch.nn.modules.activation"])
)
def test_listed_activations_are_elementwise(name):
    # one input element changed: only the output element at its place may change
    module = getattr(nn, name)(*_ARGUMENTS.get(name, ())).double().eval()
    x = _x(2, 3, 5)
    moved = x.clone()
    moved[1, 2, 3] += 0.7
    with torch.no_grad():
        y, y_moved = module(x), module(moved)
    assert y.shape == x.shape
    changed = y_moved != y
    changed[1, 2, 3] = False
    assert not changed.any()
    assert conversion.is_activation(module)


# modules after a norm -> reported as an activation without a fused epilogue
AFTER_A_NORM = {
    "Hardswish": (nn.Hardswish, True),
    "PReLU": (nn.PReLU, True),
    "ELU": (nn.ELU, True),
    "Tanh": (nn.Tanh, True),
    "Softmax": (lambda: nn.Softmax(dim=1), False),
    "Softmin": (lambda: nn.Softmin(dim=1), False),
    "LogSoftmax": (lambda: nn.LogSoftmax(dim=1), False),
    "Softmax2d": (nn.Softmax2d, False),
    "GLU": (lambda: nn.GLU(dim=1), False),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(C, 2), False),
    "ReLU subclass": (lambda: type("MyReLU", (nn.ReLU,), {})(), False),  # forward unknown
}


@pytest.mark.parametrize("name", AFTER_A_NORM)
def test_report_lists_only_elementwise_activations(name):
    make, reported = AFTER_A_NORM[name]
    model = nn.Sequential(nn.BatchNorm2d(C), make())
    report = tn.convert(model, fuse_activations=True, report=True)[1]
    left = {f"{name} after BatchNorm2d (Sequential; no fused epilogue for it)": 1}
    assert dict(report.left) == (left if reported else {})
    assert not report.fused and type(model[1]) is not nn.Identity


# ---------------------------------------------------------------------------------------------
# ConvNeXt's channels_first LayerNorm, recognised by behaviour


class Float32LayerNorm(LayerNorm):
    """transformers' older ConvNextLayerNorm: float32 statistics, cast back."""

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = ((x - u) / torch.sqrt(s + self.eps)).to(dtype)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PermutingLayerNorm(nn.LayerNorm):
    """transformers' later ConvNextLayerNorm: nn.LayerNorm's forward between permutes."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__(normalized_shape, eps=eps)
        self.data_format = data_format

    def forward(self, features):
        if self.data_format == "channels_first":
            return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(features)


class CountingLayerNorm(LayerNorm):
    """ConvNeXt's forward, counting its calls on the module."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


# Look-alikes, each with the names of ConvNeXt's forward (which is why names could not tell)
class OtherAxisLayerNorm(LayerNorm):
    def forward(self, x):
        u = x.mean(2, keepdim=True)
        s = (x - u).pow(2).mean(2, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class BiasSubtractedLayerNorm(LayerNorm):  # the same as ConvNeXt's while the bias is zero
    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x - self.bias[:, None, None]


class WeightDividesLayerNorm(LayerNorm):  # the same while the weight is one
    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return x / self.weight[:, None, None] + self.bias[:, None, None]


class EpsOutsideLayerNorm(LayerNorm):  # about the same while eps is tiny
    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / (torch.sqrt(s) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class DropoutLayerNorm(LayerNorm):  # the same in eval mode only
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


class Float32OutputLayerNorm(LayerNorm):  # float32 out for any input
    def forward(self, x):
        return super().forward(x).float()


class ExtraArgumentLayerNorm(LayerNorm):
    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


class Float32OnlyLayerNorm(LayerNorm):
    def forward(self, x):
        assert x.dtype == torch.float32, "float32 only"
        return super().forward(x)


_FORWARD = "its forward is not ConvNeXt's LayerNorm's"
# class (made with data_format="channels_first") -> None (converted) or the reason it is not
RECOGNITION = {
    LayerNorm: None,
    Float32LayerNorm: None,
    PermutingLayerNorm: None,
    CountingLayerNorm: None,
    OtherAxisLayerNorm: _FORWARD,
    BiasSubtractedLayerNorm: _FORWARD,
    WeightDividesLayerNorm: _FORWARD,
    EpsOutsideLayerNorm: _FORWARD,
    DropoutLayerNorm: _FORWARD,
    Float32OutputLayerNorm: _FORWARD,
    ExtraArgumentLayerNorm: "its forward takes other arguments than the input",
    Float32OnlyLayerNorm: "its forward fails on a CPU float64 probe input (AssertionError: "
    "float32 only)",
}


@pytest.mark.parametrize("cls", RECOGNITION, ids=lambda cls: cls.__name__)
def test_channels_first_layer_norm_recognised_by_behaviour(cls):
    reason = RECOGNITION[cls]
    module = cls(C, eps=1e-6, data_format="channels_first").double()
    found = zoo.channels_first_layer_norm(module)
    assert found == zoo.Recognition(reason is None, reason) and bool(found) is (reason is None)
    ref = _randomise(module)
    ours, report = tn.convert(copy.deepcopy(ref), report=True)
    name = f"{cls.__module__}.{cls.__name__}"
    if reason is not None:
        assert dict(report.left) == {f"{name} ({reason})": 1} and not report.converted
        assert type(ours) is cls
        return
    assert dict(report.converted) == {name: 1} and not report.left
    assert isinstance(ours, LayerNorm2dMixin) and isinstance(ours, cls)
    x = _x(2, C, 3, 4)
    _close(ours(x), ref(x), tol=1e-5 if cls is Float32LayerNorm else 1e-10)


def test_not_a_look_alike_is_not_probed_nor_reported():
    assert zoo.channels_first_layer_norm(nn.Conv2d(C, C, 1)) == zoo.Recognition(False, None)
    assert zoo.channels_first_layer_norm(nn.LayerNorm(C)) == zoo.Recognition(False, None)


# where the module's parameters live: the probe runs on CPU float64 copies of its own
PLACES = {
    "float64": lambda m: m.double(),
    "float16": lambda m: m.half(),
    "meta": lambda m: m.to("meta"),
    "eval": lambda m: m.eval(),
}


@pytest.mark.parametrize("place", PLACES)
def test_probe_leaves_the_module_untouched(place):
    module = PLACES[place](_randomise(CountingLayerNorm(C, eps=1e-5, data_format="channels_first")))
    params = dict(module.named_parameters())
    values = {k: p.detach().clone() for k, p in params.items() if not p.is_meta}
    training = module.training
    hooked = []
    module.register_forward_pre_hook(lambda *args: hooked.append("pre"))
    module.register_forward_hook(lambda *args: hooked.append("post"))
    assert zoo.channels_first_layer_norm(module) == zoo.Recognition(True, None)
    assert dict(module.named_parameters()) == params  # the same objects
    for key, value in values.items():
        assert params[key].dtype == value.dtype and torch.equal(params[key], value)
        assert params[key].grad is None
    assert module.calls == 0 and not hooked and module.eps == 1e-5
    assert module.training == training and type(module) is CountingLayerNorm


# ---------------------------------------------------------------------------------------------
# Pickling: by reference to the original class


def _convnext_stem() -> nn.Sequential:
    return _randomise(
        nn.Sequential(
            nn.Conv2d(3, C, kernel_size=2, stride=2), LayerNorm(C, data_format="channels_first")
        )
    ).double()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("new_process", [False, True], ids=["same_process", "classes_unmade"])
def test_converted_module_pickles_by_reference(protocol, new_process, monkeypatch):
    ref = _convnext_stem()
    ours = tn.convert(copy.deepcopy(ref))
    made = type(ours[1])
    data = pickle.dumps(ours, protocol=protocol)
    # the original class is what the pickle names; the made class is not
    assert made.__qualname__.encode() not in data
    if new_process:  # as in a new process: no converted class made yet
        monkeypatch.setattr(zoo, "_SUBCLASSES", {})
    loaded = pickle.loads(data)
    norm = loaded[1]
    assert type(norm) is zoo._SUBCLASSES[LayerNorm]
    assert (type(norm) is made) is not new_process
    assert type(norm)._tn_original is LayerNorm and type(norm).__name__ == "TritonLayerNorm"
    assert isinstance(norm, LayerNorm2dMixin) and norm.data_format == "channels_first"
    assert repr(loaded) == repr(ref)
    x = _x(2, 3, 8, 8)
    _close(loaded(x), ref(x))


def test_converted_module_torch_save_round_trip():
    ref = _convnext_stem()
    buffer = io.BytesIO()
    torch.save(tn.convert(copy.deepcopy(ref)), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded[1], LayerNorm2dMixin) and isinstance(loaded[1], LayerNorm)
    x = _x(2, 3, 4, 4)
    _close(loaded(x), ref(x))


def test_local_class_converts_and_fails_to_pickle_at_dumps():
    class LocalLayerNorm(LayerNorm):  # defined in a function: pickle cannot find it
        pass

    ref = _randomise(LocalLayerNorm(C, data_format="channels_first")).double()
    ours = tn.convert(copy.deepcopy(ref))
    assert isinstance(ours, LayerNorm2dMixin)  # converting works, as in an interactive session
    copied = copy.deepcopy(ours)
    assert type(copied) is type(ours)
    x = _x(2, C, 3, 3)
    _close(copied(x), ref(x))
    # fails at dumps, naming the class, exactly as the unconverted module does
    for module in (ref, ours):
        with pytest.raises((AttributeError, pickle.PicklingError), match="local object"):
            pickle.dumps(module)


# ---------------------------------------------------------------------------------------------
# Names: the converted classes' own, repr the original's


def _timm():
    return _package("timm").layers


def _torchvision():
    return _package("torchvision").ops


# case -> (make, the converted class's __name__, the report's name, the tritonnorm mixin)
NAMES = {
    "timm_layer_norm_2d": (
        lambda: _timm().LayerNorm2d(C),
        "TritonTimmLayerNorm2d",
        "timm.LayerNorm2d",
        LayerNorm2dMixin,
    ),
    "timm_rms_norm_2d": (
        lambda: _timm().RmsNorm2d(C),
        "TritonTimmRmsNorm2d",
        "timm.RmsNorm2d",
        RMSNorm2dMixin,
    ),
    "timm_batch_norm_act": (
        lambda: _timm().BatchNormAct2d(C),
        "TritonTimmBatchNormAct2d",
        "timm.BatchNormAct2d",
        TritonNormMixin,
    ),
    "torchvision_frozen_batch_norm": (
        lambda: _torchvision().FrozenBatchNorm2d(C),
        "TritonTorchvisionFrozenBatchNorm2d",
        "torchvision.FrozenBatchNorm2d",
        zoo.FrozenNormMixin,
    ),
    "convnext_layer_norm": (
        lambda: LayerNorm(C, data_format="channels_first"),
        "TritonLayerNorm",
        "convnext.LayerNorm",
        LayerNorm2dMixin,
    ),
}


@pytest.mark.parametrize("case", NAMES)
def test_converted_class_names(case, monkeypatch):
    make, name, reported, mixin = NAMES[case]
    module = make()
    original, text = type(module), repr(module)
    model, report = tn.convert(nn.Sequential(module), report=True)
    assert dict(report.converted) == {reported: 1}
    assert type(module).__name__ == name and zoo.class_name(module) == reported
    assert repr(module) == text and repr(model) == repr(nn.Sequential(make()))
    # isinstance: the original class still; tritonnorm's mixin for "runs tritonnorm"; never
    # tritonnorm's own classes of the same name
    assert isinstance(module, original) and isinstance(module, mixin)
    assert isinstance(module, zoo.Converted)
    assert not isinstance(module, (tn.LayerNorm2d, tn.RMSNorm2d))
    if mixin is LayerNorm2dMixin:
        assert type(module).__name__ != tn.LayerNorm2d.__name__
    monkeypatch.setattr(zoo, "_SUBCLASSES", {})  # loaded as in a new process
    loaded = pickle.loads(pickle.dumps(module))
    assert type(loaded).__name__ == name and repr(loaded) == text
    assert type(loaded)._tn_original is original
