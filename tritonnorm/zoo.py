"""Third-party norm layers as tritonnorm layers: timm's norm-act layers (BatchNormAct2d,
SyncBatchNormAct, FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act) and plain norms (GroupNorm,
GroupNorm1), and torchvision's FrozenBatchNorm2d.

Classes are matched by exact type, through their module path and name, so no package is imported
here. Each known class gets a tritonnorm subclass, made on first use, with the original's name:
``repr``, constructor, state_dict keys and ``_load_from_state_dict`` stay the original's, and only
``forward`` runs tritonnorm. :func:`tritonnorm.convert` swaps a module's ``__class__`` to it (the
same object: parameters, buffers, hooks and train/eval state are kept). The subclasses are
attributes of this module (made again by name when looked up), so a converted model pickles as
well as it ``copy.deepcopy``s.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import Tensor, nn

from . import activations
from .functional import batch_norm
from .modules import TritonNormMixin, epilogue_extras
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


class Converted:
    """Base of every subclass made here (``_tn_original``: the class it stands for)."""

    _tn_original: type

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
                f"{type(self).__name__}'s activation is its `act` module: set that instead"
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


def converted_class(cls: type) -> type:
    """The tritonnorm subclass of a registered third-party class (made once)."""
    made = _SUBCLASSES.get(cls)
    if made is None:
        path = class_path(cls)
        made = type(
            cls.__name__,
            (*_MIXINS[path], cls),
            {"__module__": __name__, "__qualname__": _attribute_name(path), "_tn_original": cls},
        )
        _SUBCLASSES[cls] = made
    return made


def __getattr__(name: str) -> type:
    """The subclass of a registered class by attribute name (how pickle finds it)."""
    path = _BY_ATTRIBUTE.get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_path, _, class_name_ = path.rpartition(".")
    return converted_class(getattr(importlib.import_module(module_path), class_name_))


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
        if class_path(cls) not in NORMS:
            return False
        module.__class__ = converted_class(cls)
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
    """A norm layer of timm or torchvision that tritonnorm does not convert (LayerNorm2d,
    RmsNormAct2d, EvoNorm..., subclasses of the known classes)."""
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
