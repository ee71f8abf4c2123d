"""tritonnorm: BatchNorm, InstanceNorm, GroupNorm and LayerNorm2d / RMSNorm2d as Triton kernels,
drop-in for torch.

Layers: ``tritonnorm.kernels`` (Triton kernels and launchers) -> ``tritonnorm.ops`` (custom ops,
autograd) and ``tritonnorm.functional`` (torch.nn.functional signatures) -> ``tritonnorm.modules``
(torch.nn subclasses), ``tritonnorm.sync`` (SyncBatchNorm) and ``tritonnorm.conversion``
(``convert``).
"""

from . import modules
from .conversion import convert
from .functional import batch_norm, group_norm, instance_norm, layer_norm_2d, rms_norm_2d
from .kernels.tuning import autotune
from .modules import *  # noqa: F403 (the module classes, listed in modules.__all__)
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    *modules.__all__,
    "SyncBatchNorm",
    "autotune",
    "batch_norm",
    "convert",
    "group_norm",
    "instance_norm",
    "layer_norm_2d",
    "rms_norm_2d",
]
