"""Public functions with torch.nn.functional's exact signatures and semantics.

CUDA tensors run the Triton kernels. CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` (how the tests run without a GPU); otherwise they fall
back to torch's own op, so a model moved to the CPU keeps working.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import ops, validation
from .kernels.config import INTERPRET


def runs_triton(input: Tensor) -> bool:
    """Whether this input goes through the Triton kernels (else torch's own op)."""
    return input.is_cuda or (INTERPRET and input.device.type == "cpu")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation, as :func:`torch.nn.functional.batch_norm`: per-channel statistics
    over the batch and spatial axes (training), or the running statistics (eval)."""
    validation.check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    if not runs_triton(input) or input.dim() == 1:  # 1-D: only an empty input passes the checks
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return ops.normalize(
        input, weight, bias, running_mean, running_var, use_input_stats=training,
        reduce_batch=True, momentum=momentum, eps=eps,
    )  # fmt: skip


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalisation, as :func:`torch.nn.functional.instance_norm`: statistics per
    (sample, channel) over the spatial axes; given running buffers are updated with the batch
    average of the instance statistics. ``use_input_stats=False`` uses the running ones."""
    validation.check_instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, eps
    )
    if not runs_triton(input):
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    return ops.normalize(
        input, weight, bias, running_mean, running_var, use_input_stats=use_input_stats,
        reduce_batch=False, momentum=momentum, eps=eps,
    )  # fmt: skip


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalisation, as :func:`torch.nn.functional.group_norm`: statistics per (sample,
    group of C / num_groups consecutive channels) over the group's channels and the spatial axes;
    weight and bias per channel. ``num_groups=1`` is LayerNorm over (C, *spatial); ``num_groups=C``
    is InstanceNorm without running statistics."""
    num_groups = validation.check_group_norm(input, num_groups, weight, bias, eps)
    if not runs_triton(input):
        return F.group_norm(input, num_groups, weight, bias, eps)
    return ops.normalize(
        input, weight, bias, use_input_stats=True, reduce_batch=False, num_groups=num_groups,
        eps=eps,
    )  # fmt: skip
