"""Drop-in modules: subclasses of torch's norm modules whose ``forward`` runs tritonnorm.

Constructor arguments, parameters, buffers, ``state_dict`` keys, ``repr`` and
``reset_parameters`` are torch's own; one mixin supplies the forward of the thirteen BatchNorm /
InstanceNorm / GroupNorm classes (``MODULES``, each replacing its torch class in
``tritonnorm.convert``), another the forward of ``LayerNorm2d`` and ``RMSNorm2d``
(``CHANNEL_MODULES``: normalisation across the channels at every position, timm's layers of those
names; subclasses of ``nn.LayerNorm`` / ``nn.RMSNorm`` that never replace them, as those
normalise the last dimension). Every class takes one extra keyword-only constructor argument,
``activation=None``: an activation ("relu", "leaky_relu" or ("leaky_relu", slope), "silu",
"gelu", "gelu_tanh") fused into the normalisation's output pass. It is a plain attribute (no
state_dict entry); ``repr`` shows it.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from . import validation
from .functional import batch_norm, group_norm, instance_norm, layer_norm_2d, rms_norm_2d


def count_batch(module: nn.Module) -> float:
    """Count a training batch in ``num_batches_tracked`` as torch's BatchNorm does, and return
    the momentum to use: the module's, or 1/num_batches_tracked (cumulative average) for None.
    Call it only after the input has been checked."""
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    return momentum


def epilogue_extras(module, scale, shift, residual, activation) -> dict:
    """A norm module's epilogue keywords: the forward's extras, and its own ``activation`` unless
    the call gives one (both is an error)."""
    own = getattr(module, "activation", None)
    if activation is not None and own is not None:
        raise ValueError(
            f"{type(module).__name__} has its own activation {own!r}; got activation="
            f"{activation!r} as well"
        )
    activation = own if activation is None else activation
    return dict(scale=scale, shift=shift, residual=residual, activation=activation)


class ActivationMixin:
    """The ``activation=None`` constructor argument of every tritonnorm norm module: checked,
    kept as a plain attribute, shown by ``repr``."""

    def __init__(self, *args, activation: str | tuple | None = None, **kwargs) -> None:
        validation.parse_activation(activation)
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        text = super().extra_repr()
        activation = getattr(self, "activation", None)  # absent on modules swapped by convert
        return text if activation is None else f"{text}, activation={activation!r}"


class TritonNormMixin(ActivationMixin):
    """Routes a torch BatchNorm*/InstanceNorm*/GroupNorm module's forward to tritonnorm, with
    torch's semantics; inputs are checked before num_batches_tracked or running statistics
    change."""

    def forward(
        self,
        input: Tensor,
        *,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        residual: Tensor | None = None,
        activation: str | tuple | None = None,
    ) -> Tensor:
        """torch's forward; the keyword-only extras are the functions' fused epilogue (what a
        block's fused forward passes, see tritonnorm.blocks). ``activation`` is for a module
        without one of its own."""
        extras = epilogue_extras(self, scale, shift, residual, activation)
        if isinstance(self, nn.GroupNorm):
            return group_norm(input, self.num_groups, self.weight, self.bias, self.eps, **extras)
        self._check_input_dim(input)
        if isinstance(self, _InstanceNorm):
            return self._instance_norm_forward(input, extras)
        return self._batch_norm_forward(input, extras)

    def _batch_norm_forward(self, input: Tensor, extras: dict) -> Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        validation.check_batch_norm(
            input, running_mean, running_var, self.weight, self.bias, bn_training, self.eps
        )
        validation.parse_activation(extras["activation"])
        if any(extras[k] is not None for k in ("scale", "shift", "residual")):
            validation.check_epilogue(
                "batch_norm", input, extras["scale"], extras["shift"], extras["residual"]
            )
        momentum = count_batch(self)
        return batch_norm(
            input, running_mean, running_var, self.weight, self.bias, bn_training, momentum,
            self.eps, **extras,
        )  # fmt: skip

    def _instance_norm_forward(self, input: Tensor, extras: dict) -> Tensor:
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=3,
            )
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched and extras["residual"] is not None:
            extras = {**extras, "residual": extras["residual"].unsqueeze(0)}
        y = instance_norm(
            input.unsqueeze(0) if unbatched else input,
            self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            **extras,
        )  # fmt: skip
        return y.squeeze(0) if unbatched else y


class GroupNorm(TritonNormMixin, nn.GroupNorm):
    pass


class BatchNorm1d(TritonNormMixin, nn.BatchNorm1d):
    pass


class BatchNorm2d(TritonNormMixin, nn.BatchNorm2d):
    pass


class BatchNorm3d(TritonNormMixin, nn.BatchNorm3d):
    pass


class InstanceNorm1d(TritonNormMixin, nn.InstanceNorm1d):
    pass


class InstanceNorm2d(TritonNormMixin, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(TritonNormMixin, nn.InstanceNorm3d):
    pass


# Lazy modules infer num_features on the first call, then become their tritonnorm counterpart.
class LazyBatchNorm1d(TritonNormMixin, nn.LazyBatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(TritonNormMixin, nn.LazyBatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(TritonNormMixin, nn.LazyBatchNorm3d):
    cls_to_become = BatchNorm3d


class LazyInstanceNorm1d(TritonNormMixin, nn.LazyInstanceNorm1d):
    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(TritonNormMixin, nn.LazyInstanceNorm2d):
    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(TritonNormMixin, nn.LazyInstanceNorm3d):
    cls_to_become = InstanceNorm3d


class ChannelNormMixin(ActivationMixin):
    """The forward of a norm across the channels at every position of (N, C, *spatial) input:
    ``normalized_shape == (C,)``, ``weight`` (and for LayerNorm ``bias``) of C values, ``eps``.
    Also the forward of the third-party layers :mod:`tritonnorm.zoo` converts (timm's
    LayerNorm2d / RmsNorm2d and their Act versions, ConvNeXt's channels_first LayerNorm)."""

    def forward(
        self,
        input: Tensor,
        *,
        scale: Tensor | None = None,
        shift: Tensor | None = None,
        residual: Tensor | None = None,
        activation: str | tuple | None = None,
    ) -> Tensor:
        """The norm of ``input`` (N, C, *spatial) across C, in its memory format; the keyword-only
        extras are the functions' fused epilogue. ``activation`` is for a module without one of
        its own."""
        extras = epilogue_extras(self, scale, shift, residual, activation)
        (channels,) = self.normalized_shape
        if isinstance(input, Tensor) and input.dim() >= 2 and input.shape[1] != channels:
            raise RuntimeError(
                f"{type(self).__name__}: expected input of shape (N, {channels}, *spatial) "
                f"(normalized_shape={tuple(self.normalized_shape)} across dim 1), got input of "
                f"shape {tuple(input.shape)}"
            )
        return self._normalize(input, extras)


class LayerNorm2dMixin(ChannelNormMixin):
    """LayerNorm across the channels: :func:`tritonnorm.layer_norm_2d`."""

    def _normalize(self, input: Tensor, extras: dict) -> Tensor:
        return layer_norm_2d(input, self.weight, self.bias, self.eps, **extras)


class RMSNorm2dMixin(ChannelNormMixin):
    """RMSNorm across the channels: :func:`tritonnorm.rms_norm_2d` (``eps=None``: the input
    dtype's machine epsilon, as torch's RMSNorm)."""

    def _normalize(self, input: Tensor, extras: dict) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(input.dtype).eps
        return rms_norm_2d(input, self.weight, eps, **extras)


class LayerNorm2d(LayerNorm2dMixin, nn.LayerNorm):
    """LayerNorm across the C channels at every position of (N, C, *spatial) input (statistics
    per sample and position), as timm's ``LayerNorm2d``: the same class layout (a
    ``nn.LayerNorm`` with ``normalized_shape=(C,)``), so ``state_dict`` (``weight``, ``bias`` of
    shape (C,)) and checkpoints load both ways. Contiguous and channels_last input are read in
    place; the output has the input's memory format."""

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        *,
        bias: bool = True,
        activation: str | tuple | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_channels, eps=eps, elementwise_affine=affine, bias=bias, activation=activation,
            device=device, dtype=dtype,
        )  # fmt: skip


class RMSNorm2d(RMSNorm2dMixin, nn.RMSNorm):
    """RMSNorm across the C channels at every position of (N, C, *spatial) input, as timm's
    ``RmsNorm2d`` (x * rsqrt(mean over C of x^2 + eps) * weight): a ``nn.RMSNorm`` with
    ``normalized_shape=(C,)``, ``weight`` of shape (C,) as timm's, so checkpoints load both
    ways. Output in the input's memory format."""

    def __init__(
        self,
        num_channels: int,
        eps: float | None = 1e-6,
        affine: bool = True,
        *,
        activation: str | tuple | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_channels, eps=eps, elementwise_affine=affine, activation=activation,
            device=device, dtype=dtype,
        )  # fmt: skip


# torch's norm classes' replacements (what `tritonnorm.convert` swaps in for them)
MODULES = (
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
    GroupNorm,
)
# Norms across the channels: no torch class to replace (nn.LayerNorm / nn.RMSNorm normalise the
# last dimension: convert never swaps them); convert swaps timm's and ConvNeXt's (tritonnorm.zoo).
CHANNEL_MODULES = (LayerNorm2d, RMSNorm2d)
# Every tritonnorm norm module runs one of these forwards.
NORM_MIXINS = (TritonNormMixin, ChannelNormMixin)
__all__ = [cls.__name__ for cls in (*MODULES, *CHANNEL_MODULES)]

# torch class -> its tritonnorm subclass (what `tritonnorm.convert` swaps)
REPLACEMENTS: dict[type, type] = {
    torch_cls: tn_cls
    for tn_cls in MODULES
    for torch_cls in tn_cls.__bases__
    if torch_cls is not TritonNormMixin
}
