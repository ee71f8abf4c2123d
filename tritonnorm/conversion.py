"""``tritonnorm.convert``: swap a model's torch norm modules for tritonnorm's, in place."""

from __future__ import annotations

from torch import nn

from .modules import REPLACEMENTS
from .sync import SyncBatchNorm


def convert(model: nn.Module, sync: bool = False) -> nn.Module:
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

    Returns the model: ``model`` itself, or with ``sync=True`` a new module when ``model`` is a
    BatchNorm layer, so always use the return value."""
    if sync:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        replacement = REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
