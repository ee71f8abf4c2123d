"""tritonnorm: BatchNorm and InstanceNorm as Triton kernels, drop-in for torch.

Layers: ``tritonnorm.kernels`` (Triton kernels and launchers) -> ``tritonnorm.ops`` (custom ops,
autograd) and ``tritonnorm.functional`` (torch.nn.functional signatures) -> ``tritonnorm.modules``
(torch.nn subclasses).
"""

from .functional import batch_norm, instance_norm
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
    convert,
)
from .sync import SyncBatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "instance_norm",
]
