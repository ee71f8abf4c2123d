"""Third-party norm layers as tritonnorm layers: timm's norm-act layers (BatchNormAct2d,
SyncBatchNormAct, FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act, LayerNormAct2d,
RmsNormAct2d) and plain norms (GroupNorm, GroupNorm1, LayerNorm2d, RmsNorm2d), torchvision's
FrozenBatchNorm2d, and ConvNeXt's ``LayerNorm(..., data_format="channels_first")``.

Classes are matched by exact type, through their module path and name, so no package is imported
here; ConvNeXt's LayerNorm, copied into every repository that uses it, is recognised by its
attributes and by its behaviour on a probe input (:func:`channels_first_layer_norm`). Each known
class gets a tritonnorm subclass, made on first use: ``repr``, constructor, state_dict keys and
``_load_from_state_dict`` stay the original's, and only ``forward`` runs tritonnorm.
:func:`tritonnorm.convert` swaps a module's ``__class__`` to it (the same object: parameters,
buffers, hooks and train/eval state are kept).

Names: the subclass's ``__name__`` is its own, "Triton" + the package + the original's name
(:func:`converted_name`: ``TritonTimmLayerNorm2d``, never ``tritonnorm.LayerNorm2d``'s name),
while ``repr`` and reports show the original's. ``isinstance(m, timm.layers.LayerNorm2d)`` stays
true after convert; ``isinstance(m, Converted)`` says that a third-party layer or block runs
tritonnorm.

Pickling: a converted module pickles by reference to its original class (``__reduce_ex__``), and
is converted again when loaded; it pickles exactly when the unconverted module would (a class
defined inside a function fails at ``pickle.dumps``, as it does unconverted). ``copy.deepcopy``
works for every class. The subclasses are also attributes of this module (made again by name
when looked up), so the classes themselves, and pickles of earlier versions, load.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations
from .functional import batch_norm
from .modules import LayerNorm2dMixin, RMSNorm2dMixin, TritonNormMixin, epilogue_extras
from .sync import SyncBatchNorm

PACKAGES = ("timm", "torchvision", "diffusers")

# Activation modules of other packages with an epilogue equivalent (by module and class name).
_FOREIGN_ACTIVATIONS = {
    ("timm.layers.activations", "GELU"): "gelu",
    ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
    ("timm.layers.activations", "Swish"): "silu",  # x * sigmoid(x)
}


def activation_of(module: nn.Module) -> str | tuple | None:
    """The epilogue activation equivalent to an activation module (exact type), or None."""
    kind = type(module)
    found = activations.of_module(module)
    return (
        found if found is not None else _FOREIGN_ACTIVATIONS.get((kind.__module__, kind.__name__))
    )


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def original_class(cls: type) -> type:
    """The third-party class a tritonnorm subclass of this module stands for (else ``cls``)."""
    return cls.__dict__.get("_tn_original", cls) if issubclass(cls, Converted) else cls


def class_name(module_or_class) -> str:
    """A class's name as reports show it: torch's bare ("BatchNorm2d"), a known package's with
    the package in front ("timm.BatchNormAct2d"), any other by its full path."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    cls = original_class(cls)
    package = cls.__module__.split(".")[0]
    if package in ("torch", "tritonnorm"):
        return cls.__name__
    if package in PACKAGES:
        return f"{package}.{cls.__name__}"
    return class_path(cls)


def converted_name(cls: type) -> str:
    """The ``__name__`` of ``cls``'s tritonnorm subclass: "Triton", the package's name for a known
    package, and the class's name ("TritonTimmLayerNorm2d", "TritonTorchvisionBasicBlock"; a
    ConvNeXt LayerNorm copied into any other package: "TritonLayerNorm"). Its own name, so that
    it is never taken for tritonnorm's class of the same name (tritonnorm.LayerNorm2d)."""
    package = cls.__module__.split(".")[0]
    return "Triton" + (package.capitalize() if package in PACKAGES else "") + cls.__name__


def _reconvert(original: type, mixins: tuple[type, ...]) -> nn.Module:
    """An empty converted module of ``original`` (what pickle and copy rebuild one from: the
    state is set after). Pickles name this function: keep its name and arguments."""
    cls = converted_class(original, mixins)
    return cls.__new__(cls)


class Converted:
    """Base of every subclass made here (``_tn_original``: the class it stands for,
    ``_tn_mixins``: the classes placed before it)."""

    _tn_original: type
    _tn_mixins: tuple[type, ...]

    def __reduce_ex__(self, protocol: int):
        # By reference to the original class, not to the made one: the original is what pickle
        # can find (or reports, at dumps, that it cannot: a class defined inside a function)
        return _reconvert, (self._tn_original, self._tn_mixins), self.__getstate__()

    def _get_name(self) -> str:
        # nn.Module.__repr__ prints this: the original's name, so that repr stays the original's
        original = self._tn_original
        if original._get_name is nn.Module._get_name:
            return original.__name__
        return original._get_name(self)

    def __repr__(self) -> str:
        # a repr of the original's own may print type(self).__name__ (torchvision's
        # FrozenBatchNorm2d): its name there too
        text = self._tn_original.__repr__(self)
        return re.sub(rf"\b{re.escape(type(self).__name__)}\b", self._get_name(), text)

    def extra_repr(self) -> str:
        text = self._tn_original.extra_repr(self)
        activation = self.__dict__.get("activation")  # one folded by fuse_activations
        return text if activation is None else f"{text}, activation={activation!r}"


def folded_activation(module: nn.Module) -> str | tuple | None:
    """A timm norm-act layer's ``act`` as an epilogue activation, when it directly follows the
    norm (``drop`` absent or an Identity) and the epilogue has it; else None."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if act is None or (drop is not None and type(drop) is not nn.Identity):
        return None
    return activation_of(act)


class NormActMixin(Converted):
    """timm's norm -> drop -> act layers: the norm runs tritonnorm with ``act`` fused where
    :func:`folded_activation` finds it; otherwise ``drop`` and ``act`` run after the norm, as in
    timm. ``activation`` is read off ``act`` at every call (replace ``act`` to change it)."""

    @property
    def activation(self) -> str | tuple | None:
        return folded_activation(self)

    @activation.setter
    def activation(self, value) -> None:
        if value is not None:
            raise AttributeError(
                f"{class_name(self)}'s activation is its `act` module: set that instead"
            )

    def forward(self, input: Tensor) -> Tensor:
        y = super().forward(input)
        if self.activation is None:
            if hasattr(self, "drop"):
                y = self.drop(y)
            if hasattr(self, "act"):
                y = self.act(y)
        return y


class FrozenNormMixin(Converted):
    """torchvision's FrozenBatchNorm2d (and timm's FrozenBatchNormAct2d): eval-mode batch norm
    with fixed statistics and affine buffers, through :func:`tritonnorm.batch_norm` (gradients
    flow to the input only). Input (N, C, H, W), as the original expects; an ``activation``
    (set by ``fuse_activations``) and the forward's epilogue extras as tritonnorm's modules."""

    activation = None

    def forward(
        self,
        input: Tensor,
        *,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        residual: Tensor | None = None,
        activation: str | tuple | None = None,
    ) -> Tensor:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        # The original's arithmetic promotes (half input, float32 buffers: a float32 output).
        dtype = torch.promote_types(input.dtype, self.weight.dtype)
        cast = lambda t: t if t is None else t.to(dtype)
        extras = epilogue_extras(self, cast(scale), cast(shift), cast(residual), activation)
        return batch_norm(
            cast(input), cast(self.running_mean), cast(self.running_var), cast(self.weight),
            cast(self.bias), False, 0.0, self.eps, **extras,
        )  # fmt: skip


# class path -> the mixins of its tritonnorm subclass (placed before the original class)
NORMS: dict[str, tuple[type, ...]] = {
    "timm.layers.norm_act.BatchNormAct2d": (NormActMixin, TritonNormMixin),
    "timm.layers.norm_act.GroupNormAct": (NormActMixin, TritonNormMixin),
    "timm.layers.norm_act.GroupNorm1Act": (NormActMixin, TritonNormMixin),
    "timm.layers.norm_act.SyncBatchNormAct": (NormActMixin, SyncBatchNorm),
    "timm.layers.norm_act.FrozenBatchNormAct2d": (NormActMixin, FrozenNormMixin),
    "timm.layers.norm.GroupNorm": (Converted, TritonNormMixin),
    "timm.layers.norm.GroupNorm1": (Converted, TritonNormMixin),
    "timm.layers.norm.LayerNorm2d": (Converted, LayerNorm2dMixin),
    "timm.layers.norm.RmsNorm2d": (Converted, RMSNorm2dMixin),
    "timm.layers.norm_act.LayerNormAct2d": (NormActMixin, LayerNorm2dMixin),
    "timm.layers.norm_act.RmsNormAct2d": (NormActMixin, RMSNorm2dMixin),
    "torchvision.ops.misc.FrozenBatchNorm2d": (FrozenNormMixin,),
}
_MIXINS: dict[str, tuple[type, ...]] = dict(NORMS)  # and the blocks (tritonnorm.blocks)
_BY_ATTRIBUTE: dict[str, str] = {}
_SUBCLASSES: dict[type, type] = {}


def _attribute_name(path: str) -> str:
    return "tn_" + path.replace(".", "_")


def register(path: str, *mixins: type) -> None:
    """Give the class at ``path`` a tritonnorm subclass with these mixins before it."""
    _MIXINS[path] = mixins
    _BY_ATTRIBUTE[_attribute_name(path)] = path


for _path, _mixins in NORMS.items():
    register(_path, *_mixins)


# The subclasses of classes recognised by their attributes (not registered by path) are named
# this prefix + their class's module and qualified name, escaped ("_" -> "_u", "." -> "_d", and
# "_m" between the two), so that pickle finds them in a new process.
_RECOGNISED = "tn_channels_first_"
_ESCAPES = {"_": "_u", ".": "_d", ":": "_m"}


def _recognised_name(cls: type) -> str:
    text = f"{cls.__module__}:{cls.__qualname__}"
    return _RECOGNISED + "".join(_ESCAPES.get(c, c) for c in text)


def _recognised_class(name: str) -> type:
    """The class a :func:`_recognised_name` stands for (imported)."""
    unescape = {v[1]: k for k, v in _ESCAPES.items()}
    encoded, chars, i = name[len(_RECOGNISED) :], [], 0
    while i < len(encoded):
        if encoded[i] == "_":
            chars.append(unescape[encoded[i + 1]])
            i += 2
        else:
            chars.append(encoded[i])
            i += 1
    module_path, qualname = "".join(chars).split(":")
    found = importlib.import_module(module_path)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def converted_class(cls: type, mixins: tuple[type, ...] | None = None) -> type:
    """The tritonnorm subclass of a registered third-party class, or with ``mixins`` of a class
    recognised by its attributes (made once)."""
    made = _SUBCLASSES.get(cls)
    if made is None:
        path = class_path(cls)
        mixins = _MIXINS[path] if mixins is None else mixins
        name = _attribute_name(path) if path in _MIXINS else _recognised_name(cls)
        made = type(
            converted_name(cls),
            (*mixins, cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "_tn_original": cls,
                "_tn_mixins": mixins,
            },
        )
        _SUBCLASSES[cls] = made
    return made


def __getattr__(name: str) -> type:
    """The subclass of a registered or recognised class by attribute name (how pickle finds
    it)."""
    if name.startswith(_RECOGNISED):
        return converted_class(_recognised_class(name), CHANNELS_FIRST_MIXINS)
    path = _BY_ATTRIBUTE.get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_path, _, class_name_ = path.rpartition(".")
    return converted_class(getattr(importlib.import_module(module_path), class_name_))


# ConvNeXt's LayerNorm (facebookresearch/ConvNeXt, ConvNeXt-V2 and their copies):
#
#     def forward(self, x):
#         if self.data_format == "channels_last":
#             return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
#         elif self.data_format == "channels_first":
#             u = x.mean(1, keepdim=True)
#             s = (x - u).pow(2).mean(1, keepdim=True)
#             x = (x - u) / torch.sqrt(s + self.eps)
#             x = self.weight[:, None, None] * x + self.bias[:, None, None]
#             return x
#
# with (C,) parameters weight and bias, eps, normalized_shape == (C,) and data_format. Copies
# differ in their code (transformers' ConvNextLayerNorm computes in float32 and casts back, and
# later ones permute around nn.LayerNorm's forward), so the forward is checked by what it
# computes, not by how it is written.
CHANNELS_FIRST_MIXINS = (Converted, LayerNorm2dMixin)


class Recognition(NamedTuple):
    """What :func:`channels_first_layer_norm` found: ``ok``, convert it; otherwise ``reason``,
    why a look-alike is left alone (None: nothing like it, not worth a report). Its truth value
    is ``ok``."""

    ok: bool
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


# The probe: float64 input of shape (N, C, H, W) = (2, C, 3, 2) (N, H and W differ from one
# another, so a reduction over another axis shows), weight, bias and eps that change the output
# (weight not ones, bias not zeros, an eps that moves it by percents against the input's
# variance of 4), from a fixed seed. 1e-5: far above a float32 computation's rounding
# (transformers' older copy), below the change an unbiased variance makes (about 1/(2C) of
# each value) up to thousands of channels.
_PROBE_EPS = 0.25
_PROBE_TOLERANCE = 1e-5


def _probe(channels: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(shape, generator=generator, dtype=torch.float64)
    return draw(2, channels, 3, 2) * 2 + 0.5, 1 + 0.5 * draw(channels), 0.5 * draw(channels)


def _takes_one_input(forward) -> bool:
    """``forward(self, x)``: the converted forward takes one positional input (and keyword-only
    epilogue extras), so a forward with other arguments would lose them."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(parameters) == 1 and parameters[0].kind in positional


def _probe_mismatch(module: nn.Module) -> str | None:
    """Why the class's forward, run on a CPU float64 copy of ``module`` with probe parameters
    and eps, in training and in eval mode, is not a layer norm across dim 1 (None: it is). The
    module itself is not touched (its parameters may be on any device, meta included)."""
    (channels,) = module.normalized_shape
    x, weight, bias = _probe(channels)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), weight, bias, _PROBE_EPS)
    expected = expected.permute(0, 3, 1, 2)
    # the copy takes the probe parameters in place of the module's (never copied)
    memo = {
        id(module._parameters["weight"]): nn.Parameter(weight),
        id(module._parameters["bias"]): nn.Parameter(bias),
    }
    try:
        probe = copy.deepcopy(module, memo)
        probe.eps = _PROBE_EPS
        outputs = []
        with torch.no_grad():
            for training in (True, False):
                probe.training = training
                outputs.append(type(module).forward(probe, x.clone()))
    except Exception as error:  # its code, on an input it may not expect: any error says no
        message = str(error).splitlines()[0] if str(error) else ""
        return f"its forward fails on a CPU float64 probe input ({type(error).__name__}: {message})"
    for y in outputs:
        if not (
            isinstance(y, Tensor)
            and y.shape == x.shape
            and y.dtype == x.dtype
            and torch.allclose(y, expected, rtol=_PROBE_TOLERANCE, atol=_PROBE_TOLERANCE)
        ):
            return "its forward is not ConvNeXt's LayerNorm's"
    return None


def channels_first_layer_norm(module: nn.Module) -> Recognition:
    """Whether ``module`` is ConvNeXt's LayerNorm with ``data_format="channels_first"``, by what
    it is and by what it computes:

    - a class whose name contains "Norm", with ``data_format == "channels_first"``, parameters
      ``weight`` and ``bias`` of shape ``normalized_shape == (C,)`` and nothing else (no
      buffers, no submodules), an ``eps``, and its class's ``forward(self, x)`` (one input, not
      replaced on the instance);
    - that forward, run on a copy of the module on the CPU in float64 with probe parameters and
      eps (a fixed-seed (2, C, 3, 2) input, weight not ones, bias not zeros, eps 0.25; in
      training and in eval mode), returns torch's ``F.layer_norm`` across dim 1 of the probe,
      in its shape and dtype, to 1e-5. The module's own parameters are never touched.

    Returns ``Recognition(True)`` to convert it; ``Recognition(False)`` for a module that is
    nothing like it (not a norm class with a ``data_format``); for a look-alike that is not
    one, ``Recognition(False, reason)`` (reported)."""
    cls = type(module)
    data_format = getattr(module, "data_format", None)
    if issubclass(cls, Converted) or "Norm" not in cls.__name__ or not isinstance(data_format, str):
        return Recognition(False)
    if data_format != "channels_first":
        return Recognition(
            False, f"data_format={data_format!r}: tritonnorm converts channels_first only"
        )
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    shape = getattr(module, "normalized_shape", None)
    if (
        not isinstance(shape, tuple)
        or len(shape) != 1
        or any(p is None or tuple(p.shape) != shape for p in (weight, bias))
        or not isinstance(getattr(module, "eps", None), (int, float))
    ):
        reason = "not a ConvNeXt LayerNorm: weight, bias of shape normalized_shape = (C,), eps"
        return Recognition(False, reason)
    if "forward" in module.__dict__:
        return Recognition(False, "its forward is replaced on the instance")
    if module._modules or module._buffers or len(module._parameters) != 2:
        return Recognition(
            False, "not a ConvNeXt LayerNorm: submodules, buffers or other parameters"
        )
    if not _takes_one_input(cls.forward):
        return Recognition(False, "its forward takes other arguments than the input")
    reason = _probe_mismatch(module)
    return Recognition(reason is None, reason)


def _report_activation(module: nn.Module, report) -> None:
    name, act = class_name(module), getattr(module, "act", None)
    if module.activation is not None:
        report.fused[f"{name} + {class_name(act)}"] += 1
    elif act is not None and type(act) is not nn.Identity:
        drop = getattr(module, "drop", None)
        reason = (
            "no fused epilogue for it"
            if activation_of(act) is None
            else f"a {class_name(drop)} runs between them"
        )
        report.left[f"{class_name(act)} after {name} ({reason}; runs after the norm)"] += 1


def convert_module(module: nn.Module, report) -> bool:
    """Swap a known third-party norm layer for its tritonnorm subclass, in place; count it (and
    its folded or kept activation) in ``report``. False for any other module."""
    cls = type(module)
    if not issubclass(cls, Converted):
        if class_path(cls) in NORMS:
            module.__class__ = converted_class(cls)
        elif channels_first_layer_norm(module).ok:
            module.__class__ = converted_class(cls, CHANNELS_FIRST_MIXINS)
        else:
            return False
    report.converted[class_name(module)] += 1
    if isinstance(module, NormActMixin):
        _report_activation(module, report)
    return True


# Modules of timm's norm layers: a class of theirs that is not converted is reported.
_NORM_MODULES = frozenset(
    f"timm.layers.{name}"
    for name in ("norm", "norm_act", "evo_norm", "filter_response_norm", "inplace_abn")
)


def is_third_party_norm(module: nn.Module) -> bool:
    """A norm layer of timm or torchvision that tritonnorm does not convert (LayerNorm2dFp32,
    RmsNorm2dFp32, EvoNorm..., subclasses of the known classes)."""
    cls = type(module)
    if any(class_path(base) in NORMS for base in cls.__mro__[1:]):
        return True
    return cls.__module__ in _NORM_MODULES


def convert_sync(model: nn.Module, convert_sync_batchnorm, report) -> nn.Module:
    """``convert_sync_batchnorm(model)`` (tritonnorm.SyncBatchNorm's), keeping timm's
    BatchNormAct2d / SyncBatchNormAct layers norm-act layers: after it they are tritonnorm
    SyncBatchNorm layers with ``act`` and ``drop`` children, made timm SyncBatchNormAct
    subclasses (as timm's own conversion makes them SyncBatchNormAct)."""
    norm_act = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"}
    paths = [
        name for name, m in model.named_modules() if class_path(original_class(type(m))) in norm_act
    ]
    model = convert_sync_batchnorm(model)
    if paths:
        timm_sync = sys.modules["timm.layers.norm_act"].SyncBatchNormAct
        for path in paths:
            module = model.get_submodule(path)
            module.__dict__.pop("activation", None)  # the property reads `act`
            module.__class__ = converted_class(timm_sync)
    return model
