"""``tritonnorm.convert``: swap a model's norm modules for tritonnorm's, in place, and say what was
left alone.

torch's BatchNorm*/InstanceNorm*/GroupNorm become their tritonnorm subclasses (never
nn.LayerNorm / nn.RMSNorm: those normalise the last dimension); third-party norm layers (timm's
norm and norm-act layers, LayerNorm2d and RmsNorm2d included, torchvision's FrozenBatchNorm2d,
ConvNeXt's channels_first LayerNorm) are swapped by :mod:`tritonnorm.zoo`; with
``fuse_activations=True`` the activations next to a norm are folded into it, inside
``nn.Sequential`` (here) and inside known blocks (:mod:`tritonnorm.blocks`).
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from . import blocks, zoo
from .modules import NORM_MIXINS, REPLACEMENTS
from .sync import SyncBatchNorm
from .zoo import activation_of, class_name


@dataclass
class ConversionReport:
    """What :func:`convert` did, as counts by description.

    - ``converted``: norm layers that now run tritonnorm, by class name;
    - ``fused``: activations (and residuals, scale/shift) folded into a norm, by what was
      folded into what;
    - ``left``: what was left as it was, with the reason: norm layers of a class tritonnorm does
      not know, activations without a fused epilogue (kept as modules after the norm), blocks
      whose forward or configuration is not one tritonnorm reproduces.
    """

    converted: Counter = field(default_factory=Counter)
    fused: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = []
        for title, counts in (("converted", self.converted), ("fused", self.fused)):
            lines.append(f"{title}: {sum(counts.values())}")
            lines += [f"  {n} x {what}" for what, n in sorted(counts.items())]
        lines.append(f"left alone: {sum(self.left.values())}")
        lines += [f"  {n} x {what}" for what, n in sorted(self.left.items())]
        return "\n".join(lines)


# The elementwise activation modules of torch and timm (each output element a function of the
# input element at its place; PReLU's weight is per channel), by module and class name: what the
# report calls an activation. The rest of torch.nn.modules.activation is not: Softmax, Softmin,
# LogSoftmax and Softmax2d normalise along an axis, GLU halves one, MultiheadAttention attends.
ELEMENTWISE_ACTIVATIONS = {
    "torch.nn.modules.activation": frozenset({
        "CELU", "ELU", "GELU", "Hardshrink", "Hardsigmoid", "Hardswish", "Hardtanh", "LeakyReLU",
        "LogSigmoid", "Mish", "PReLU", "RReLU", "ReLU", "ReLU6", "SELU", "SiLU", "Sigmoid",
        "Softplus", "Softshrink", "Softsign", "Tanh", "Tanhshrink", "Threshold",
    }),
    "timm.layers.activations": frozenset({
        "GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "PReLU", "QuickGELU",
        "Sigmoid", "Swish", "Tanh",
    }),
    "timm.layers.activations_me": frozenset({
        "HardMishMe", "HardSigmoidMe", "HardSwishMe", "MishMe", "SwishMe",
    }),
}  # fmt: skip


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation module of torch or timm, by exact class
    (:data:`ELEMENTWISE_ACTIVATIONS`; folded or not)."""
    cls = type(module)
    return cls.__name__ in ELEMENTWISE_ACTIVATIONS.get(cls.__module__, ())


def runs_sequential_forward(seq: nn.Module) -> bool:
    """Whether ``seq`` is an nn.Sequential whose forward is nn.Sequential's (one module after
    the other): its class's, not overridden by a subclass nor replaced on the instance."""
    return (
        isinstance(seq, nn.Sequential)
        and type(seq).forward is nn.Sequential.forward
        and "forward" not in seq.__dict__
    )


def takes_activation(module: nn.Module) -> bool:
    """Whether ``fold_activations`` may give this module an activation: a tritonnorm norm (plain,
    synchronised or frozen) without one, whose output is the module's output."""
    return (
        isinstance(module, (*NORM_MIXINS, SyncBatchNorm, zoo.FrozenNormMixin))
        and not isinstance(module, zoo.NormActMixin)
        and getattr(module, "activation", None) is None
    )


def fold_activations(model: nn.Module, report: ConversionReport | None = None) -> nn.Module:
    """Inside every nn.Sequential of ``model`` that runs nn.Sequential's forward: an activation
    module (ReLU, LeakyReLU, SiLU, GELU) directly after a tritonnorm norm module (SyncBatchNorm
    and frozen BatchNorm included) without one is folded into that module (``activation=``) and
    replaced by nn.Identity, so state_dict keys stay the same. A Sequential subclass with a
    forward of its own (or one replaced on the instance) may not call its modules in order:
    nothing is folded there, and a norm + activation pair in it is reported."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            norm, act = seq._modules[first], seq._modules[second]
            activation = activation_of(act)
            if not takes_activation(norm):
                continue
            if not runs_sequential_forward(seq):
                if report is not None and (activation is not None or is_activation(act)):
                    why = f"not folded: {class_name(seq)} runs a forward of its own"
                    report.left[f"{class_name(act)} after {class_name(norm)} ({why})"] += 1
                continue
            if activation is not None:
                norm.activation = activation
                seq._modules[second] = nn.Identity()
                if report is not None:
                    report.fused[f"{class_name(norm)} + {class_name(act)} (Sequential)"] += 1
            elif report is not None and is_activation(act):
                what = f"{class_name(act)} after {class_name(norm)}"
                report.left[f"{what} (Sequential; no fused epilogue for it)"] += 1
    return model


def _left_norms(model: nn.Module, report: ConversionReport) -> None:
    """Norm layers still running something other than tritonnorm, into ``report.left``."""
    for module in model.modules():
        if isinstance(module, (*NORM_MIXINS, SyncBatchNorm, zoo.Converted)):
            continue
        name = class_name(module)
        if type(module) is nn.SyncBatchNorm:
            report.left["SyncBatchNorm (converted with sync=True only)"] += 1
        elif isinstance(module, (_NormBase, nn.GroupNorm)):
            report.left[f"{name} (a norm subclass tritonnorm does not know)"] += 1
        elif zoo.is_third_party_norm(module):
            report.left[f"{name} (no tritonnorm equivalent)"] += 1
        elif (found := zoo.channels_first_layer_norm(module)).reason is not None:
            report.left[f"{name} ({found.reason})"] += 1


def convert(
    model: nn.Module,
    sync: bool = False,
    fuse_activations: bool = False,
    report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Swap every torch BatchNorm{1,2,3}d / InstanceNorm{1,2,3}d (and Lazy) / GroupNorm module of
    ``model`` (``model`` itself included) for its tritonnorm class, in place. The module objects
    stay the same, so parameters, buffers, hooks, device, dtype and train/eval state are kept;
    SyncBatchNorm is left alone (without ``sync``).

    Third-party norm layers are swapped the same way (:mod:`tritonnorm.zoo`): timm's
    BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d, GroupNormAct, GroupNorm1Act,
    LayerNormAct2d, RmsNormAct2d, GroupNorm, GroupNorm1, LayerNorm2d and RmsNorm2d (the last
    four with tritonnorm.LayerNorm2d / RMSNorm2d's forward), torchvision's FrozenBatchNorm2d
    (eval-mode batch norm), and ConvNeXt's ``LayerNorm(C, data_format="channels_first")``
    (recognised by its attributes and by its forward's result on a probe input:
    :func:`tritonnorm.zoo.channels_first_layer_norm`). Each becomes an instance of a tritonnorm
    subclass of its class, named "Triton" + package + name (``TritonTimmLayerNorm2d``), with the
    original's ``repr``; ``isinstance`` checks against the original class stay true.
    torch's nn.LayerNorm and nn.RMSNorm (last dimension) are never swapped. A timm layer's
    ``act`` runs fused into the norm when the epilogue has it (ReLU, LeakyReLU,
    SiLU/Swish, GELU, tanh GELU) and its ``drop`` is an Identity; otherwise ``drop`` and ``act``
    run after the norm as in timm. Their ``act`` and ``drop`` stay submodules, so state_dict
    keys, ``repr`` and checkpoints are timm's. Other subclasses of torch's norms are left alone.

    With ``sync=True``, BatchNorm layers instead become :class:`tritonnorm.SyncBatchNorm` through
    :meth:`tritonnorm.SyncBatchNorm.convert_sync_batchnorm` (default process group): torch's or
    tritonnorm's BatchNorm1d/2d/3d, their subclasses and torch's SyncBatchNorm, as torch's
    ``convert_sync_batchnorm`` does; timm's BatchNormAct2d keeps its ``act`` and ``drop``
    (as timm's own conversion does). Those are NEW module objects sharing the old parameters and
    buffers, with the same train/eval state (hooks are not carried over); the other layers are
    swapped in place as above.

    With ``fuse_activations=True``, an activation module (ReLU, LeakyReLU, SiLU, GELU, tanh GELU
    included) that directly follows a converted norm module inside an ``nn.Sequential`` running
    Sequential's own forward (not a subclass's) is folded into it (its ``activation``) and
    replaced by ``nn.Identity`` (state_dict keys are unchanged, so a state_dict loads both
    ways); tritonnorm.SyncBatchNorm layers too. Known blocks (:mod:`tritonnorm.blocks`:
    torchvision's and timm's ResNet BasicBlock/Bottleneck, diffusers' ResnetBlock2D and
    AdaGroupNorm) run a forward that calls the fused ops (norm + residual + activation, norm +
    scale/shift + activation), numerically theirs; their parameters, buffers and state_dict are
    untouched.

    What was left alone (a norm subclass tritonnorm does not know, an elementwise activation
    without an epilogue, a block whose forward or configuration differs from the known one) is
    reported: with ``report=True`` the return value is ``(model, ConversionReport)``; otherwise
    one warning names the classes and counts.

    Returns the model: ``model`` itself, or with ``sync=True`` a new module when ``model`` is a
    BatchNorm layer, so always use the return value."""
    result = ConversionReport()
    if sync:
        model = zoo.convert_sync(model, SyncBatchNorm.convert_sync_batchnorm, result)
    for module in model.modules():
        replacement = REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
        if not zoo.convert_module(module, result) and isinstance(
            module, (*NORM_MIXINS, SyncBatchNorm)
        ):
            result.converted[class_name(module)] += 1
    if fuse_activations:
        fold_activations(model, result)
        blocks.fuse_blocks(model, result)
    _left_norms(model, result)
    if report:
        return model, result
    if result.left:
        listed = "; ".join(f"{n} x {what}" for what, n in sorted(result.left.items()))
        warnings.warn(
            f"tritonnorm.convert left alone: {listed} (convert(..., report=True) returns "
            "the full report)",
            stacklevel=2,
        )
    return model
