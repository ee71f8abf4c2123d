"""SyncBatchNorm: batch normalisation whose statistics span every rank of a process group.

Built on ``torch.distributed`` (NCCL on GPUs, gloo on CPU) and the core's kernels:

* forward: each rank reduces its own batch to per-channel (count, mean, M2) with the statistics
  kernels; ONE all-gather exchanges these (3, C) triples; every rank combines the gathered
  triples with Chan's formula in rank order (the core's finalize kernel), which also updates the
  running statistics with the unbiased variance of the global batch. All ranks therefore hold
  bit-identical statistics and running buffers. The apply kernel then writes y.
* backward: each rank reduces sum(dy) and sum(dy * x_hat) locally; ONE all-gather exchanges the
  (2, C) sums, combined in rank order into the dx coefficients; the apply kernel writes dx.
  weight and bias gradients come from the LOCAL sums, as in torch.nn.SyncBatchNorm: data
  parallelism (DistributedDataParallel) then averages parameter gradients across ranks.

Communication per training step is therefore one O(C) all-gather forward and one backward. Like
torch's, the forward reads the global count on the host once (the dx pass takes it as a number), so
it synchronises with the device and cannot be captured in a CUDA graph.
Uneven batches and ranks with an empty batch work: an empty rank contributes a zero count (neutral
in Chan's combination) and still takes part in both collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import validation
from .functional import apply_activation, batch_norm, runs_triton
from .kernels import launch
from .modules import ActivationMixin, count_batch

_OP = "sync_batch_norm"
_BATCH_NORM = launch.Norm(reduce_batch=True)


class SyncBatchNorm(ActivationMixin, nn.SyncBatchNorm):
    """Drop-in :class:`torch.nn.SyncBatchNorm` (same constructor, ``process_group`` included,
    parameters, buffers, ``state_dict``) whose statistics and gradients run tritonnorm's kernels.

    As in torch, statistics are synchronised only in training mode with ``torch.distributed``
    initialised and more than one rank in the process group; otherwise (eval mode, distributed
    not initialised, world size 1) the module is plain :func:`tritonnorm.batch_norm`.
    Unlike torch's, CPU tensors are accepted when the kernels run on them (``TRITON_INTERPRET=1``,
    e.g. with the gloo backend), besides CUDA tensors.

    Inputs are validated before ``num_batches_tracked`` or the running statistics change.

    Use it inside :class:`~torch.nn.parallel.DistributedDataParallel` as torch's (one GPU per
    process). DDP itself refuses any ``nn.SyncBatchNorm`` in a CPU module, this one included.

    ``torch.compile`` graph-breaks around the synchronised forward (the collectives, and the
    host-side global count), as it does for torch's own SyncBatchNorm, whose autograd Function
    with collectives cannot be traced: the rest of the model is still compiled. The fallbacks go
    through tritonnorm's custom ops and trace without a break.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        activation = getattr(self, "activation", None)
        name, slope = validation.parse_activation(activation)
        # Mini-batch statistics in training mode, and in eval mode without buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are updated only when tracked and training; read when normalising with them.
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None

        # Statistics are not synchronised in eval mode (torch's rule).
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        process_group = world_size = None
        if need_sync:
            process_group = self.process_group if self.process_group else dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1

        # Every check before num_batches_tracked or the running statistics change.
        if need_sync:
            _check_no_transform(input)
            _check_sync_input(input, running_mean, running_var, self.weight, self.bias, self.eps)
        else:
            validation.check_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, self.eps
            )

        momentum = count_batch(self)

        if not need_sync:
            return batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
                self.eps, activation=activation,
            )  # fmt: skip
        y = _sync_batch_norm(
            input, self.weight, self.bias, running_mean, running_var, float(self.eps),
            float(momentum), process_group, world_size,
        )  # fmt: skip
        return apply_activation(y, name, slope)  # not fused on the synchronised path

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm layer of ``module`` (torch's or tritonnorm's BatchNorm1d/2d/3d,
        any ``_BatchNorm``, SyncBatchNorm included, as torch's method does) by a new
        :class:`tritonnorm.SyncBatchNorm` sharing its parameters and buffers (same tensor
        objects), ``training`` flag and ``qconfig``. Hooks of replaced modules are not carried
        over (as in torch). Returns ``module``, or the new module when ``module`` itself is a
        BatchNorm layer. Lazy BatchNorm layers must have run a forward first. timm's
        BatchNormAct2d keeps its ``act`` and ``drop`` (torch's method would silently drop them:
        the result is a SyncBatchNormAct, as timm's own conversion makes)."""
        from .zoo import convert_sync  # zoo imports this module

        return convert_sync(module, lambda m: cls._convert_sync(m, process_group), None)

    @classmethod
    def _convert_sync(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch's conversion, recursively (convert_sync_batchnorm)."""
        module_output = module
        if isinstance(module, _BatchNorm):
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                raise ValueError(
                    f"convert_sync_batchnorm: {type(module).__name__} has not inferred "
                    "num_features yet; run one forward pass before converting"
                )
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
            module_output.activation = getattr(module, "activation", None)
        for name, child in module.named_children():
            module_output.add_module(name, cls._convert_sync(child, process_group))
        del module
        return module_output


def _check_no_transform(input: Tensor) -> None:
    """torch.func transforms cannot see through the collectives (neither can torch's)."""
    if (
        torch._C._are_functorch_transforms_active()
        or torch._C._functorch.is_functorch_wrapped_tensor(input)
    ):
        raise RuntimeError(
            "tritonnorm.SyncBatchNorm: torch.func transforms (grad, vjp, jacrev, vmap, jvp) are "
            "not supported while statistics are synchronised across processes (training with "
            "more than one rank); torch's SyncBatchNorm does not support them either"
        )


def _check_sync_input(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> None:
    """The synchronised path's checks: those of batch_norm in training mode, except "more than
    one value per channel", which concerns the global batch (torch skips it there too); plus the
    device (torch's requires a GPU; ours any device the kernels run on)."""
    validation.check_input(_OP, input)
    if not runs_triton(input):
        raise ValueError(
            "SyncBatchNorm expected input tensor to be on GPU (CUDA), or on CPU with "
            f"TRITON_INTERPRET=1 set before tritonnorm is imported; got {input.device}"
        )
    validation.check_running_pair(running_mean, running_var)
    validation.check_eps(_OP, eps)
    validation.check_per_channel(
        _OP, input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )


def _all_gather(t: Tensor, process_group, world_size: int, single: bool | None = None) -> Tensor:
    """(world_size, *t.shape): every rank's ``t`` in rank order. Like torch's SyncBatchNorm, one
    single-tensor all-gather except on gloo, which older torch versions support only with a list
    (``single`` forces the choice, for tests)."""
    t = t.contiguous()
    if single is None:
        single = dist.get_backend(process_group) != "gloo"
    if single:
        out = t.new_empty((world_size * t.numel(),))
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(out, t.view(-1), group=process_group)
        return out.view(world_size, *t.shape)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t, group=process_group)
    return torch.stack(parts)


def _global_count(gathered: Tensor) -> int:
    """The global batch's values per channel, read on the host (a device sync, as torch's): the
    dx pass takes it as a number."""
    return round(gathered[:, 0, 0].double().sum().item())


def _as_partials(gathered: Tensor) -> Tensor:
    """(world, K, C) gathered summaries seen as the kernels' (K, P = world, rows = 1, C)
    partials: rank r is partial r, and each (rows, C) block is contiguous as the finalize kernels
    require."""
    return gathered.permute(1, 0, 2).unsqueeze(2)


@torch.compiler.disable
def _sync_batch_norm(
    input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size
) -> Tensor:
    # Opaque to torch.compile: a graph break here, as for torch's SyncBatchNorm.
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        momentum,
        process_group,
        world_size,
    ):
        weight = weight.contiguous() if weight is not None else None
        bias_c = bias.contiguous() if bias is not None else None
        x, red = launch.plan(input, _BATCH_NORM)
        if x.numel() > 0:
            partials, num_partials = launch.stats_partials(x, red)
            _, _, _, local = launch.finalize_stats(
                red, partials, num_partials, weight=None, bias=None, eps=eps, want_coef=False,
                want_combined=True,
            )  # fmt: skip
        else:  # an empty batch: count 0, neutral in Chan's combination; still gathered
            local = torch.zeros((3, 1, red.view.C), dtype=red.acc_dtype, device=input.device)
        gathered = _all_gather(local.view(3, -1), process_group, world_size)  # (world, 3, C)
        global_count = _global_count(gathered)

        update = global_count > 0  # a globally empty batch changes no running statistic
        rm = _contiguous_or_none(running_mean if update else None)
        rv = _contiguous_or_none(running_var if update else None)
        mean, rstd, coef, _ = launch.finalize_stats(
            red, _as_partials(gathered), world_size, weight=weight, bias=bias_c, eps=eps,
            running=(rm, rv), momentum=momentum,
        )  # fmt: skip
        if rm is not None and rm is not running_mean:
            running_mean.copy_(rm)
        if rv is not None and rv is not running_var:
            running_var.copy_(rv)

        y = torch.empty_like(x)
        if x.numel() > 0:
            launch.apply(y, red, coef, x=x)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.reduction = red
        ctx.process_group = process_group
        ctx.world_size = world_size
        ctx.global_count = global_count
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable  # as torch's: a gradient of this backward raises, never reads 0
    def backward(ctx, grad_output):
        x, weight, mean, rstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        red = ctx.reduction
        if x.numel() > 0:
            dy, dy_view = launch.grad_view(grad_output, x, red.view)
            partials, num_partials = launch.grad_partials(dy, dy_view, x, red, mean, rstd)
            # weight=None: the local sums in the statistics' dtype, summed in a fixed order.
            sum_dy_xhat, sum_dy, _ = launch.finalize_grad(
                red, partials, num_partials, mean, rstd, weight=None, want_dx_coef=False,
                want_param_grads=True,
            )  # fmt: skip
        else:  # still takes part in the collective, or the other ranks would wait forever
            dy = dy_view = None
            sum_dy_xhat = sum_dy = torch.zeros(red.view.C, dtype=mean.dtype, device=x.device)

        grad_input = None
        if needs_input:  # as torch: the collective only when the input gradient is wanted
            local = torch.stack([sum_dy, sum_dy_xhat])  # (2, C)
            gathered = _all_gather(local, ctx.process_group, ctx.world_size)  # (world, 2, C)
            grad_input = torch.empty_like(x)
            if x.numel() > 0:
                _, _, coef = launch.finalize_grad(
                    red, _as_partials(gathered), ctx.world_size, mean, rstd, weight=weight,
                    want_dx_coef=True, want_param_grads=False, count=ctx.global_count,
                )  # fmt: skip
                launch.apply(grad_input, red, coef, x=x, dy=dy, dy_view=dy_view)
        # Parameter gradients from the local sums (torch's semantics; DDP averages them).
        grad_weight = sum_dy_xhat.to(weight.dtype) if needs_weight and weight is not None else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if needs_bias and ctx.bias_dtype is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _contiguous_or_none(t: Tensor | None) -> Tensor | None:
    return t.contiguous() if t is not None else None
