"""``tritonnorm.convert``: swap a model's torch norm modules for tritonnorm's, in place."""

from __future__ import annotations

import itertools

from torch import nn

from .modules import REPLACEMENTS, TritonNormMixin
from .sync import SyncBatchNorm


def activation_of(module: nn.Module) -> str | tuple | None:
    """The epilogue activation equivalent to an activation module (exact type), or None."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if kind is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


def fold_activations(model: nn.Module) -> nn.Module:
    """Inside every nn.Sequential of ``model``: an activation module (ReLU, LeakyReLU, SiLU,
    GELU) directly after a tritonnorm norm module (SyncBatchNorm included) without one is folded into that module
    (``activation=``) and replaced by nn.Identity, so state_dict keys stay the same."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            norm, act = seq._modules[first], seq._modules[second]
            activation = activation_of(act)
            if (
                activation is not None
                and isinstance(norm, (TritonNormMixin, SyncBatchNorm))
                and getattr(norm, "activation", None) is None
            ):
                norm.activation = activation
                seq._modules[second] = nn.Identity()
    return model


def convert(model: nn.Module, sync: bool = False, fuse_activations: bool = False) -> nn.Module:
    """Swap every torch BatchNorm{1,2,3}d / InstanceNorm{1,2,3}d (and Lazy) / GroupNorm module of
    ``model`` (``model`` itself included) for its tritonnorm class, in place. The module objects
    stay the same, so parameters, buffers, hooks, device, dtype and train/eval state are kept;
    subclasses of those classes and SyncBatchNorm are left alone (without ``sync``).

    With ``sync=True``, BatchNorm layers instead become :class:`tritonnorm.SyncBatchNorm` through
    :meth:`tritonnorm.SyncBatchNorm.convert_sync_batchnorm` (default process group): torch's or
    tritonnorm's BatchNorm1d/2d/3d, their subclasses and torch's SyncBatchNorm, as torch's
    ``convert_sync_batchnorm`` does. Those are NEW module objects sharing the old parameters and
    buffers, with the same train/eval state (hooks are not carried over); the other layers are
    swapped in place as above.

    With ``fuse_activations=True``, an activation module (ReLU, LeakyReLU, SiLU, GELU, tanh GELU
    included) that directly follows a converted norm module inside an ``nn.Sequential`` is
    folded into it (its ``activation``) and replaced by ``nn.Identity`` (state_dict keys are
    unchanged, so a state_dict loads both ways); tritonnorm.SyncBatchNorm layers too.

    Returns the model: ``model`` itself, or with ``sync=True`` a new module when ``model`` is a
    BatchNorm layer, so always use the return value."""
    if sync:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        replacement = REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    if fuse_activations:
        fold_activations(model)
    return model
