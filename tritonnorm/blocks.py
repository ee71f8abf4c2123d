"""Fused forwards for the blocks people train (the convention of Liger-Kernel's
``apply_liger_kernel_to_*``, applied per model by ``tritonnorm.convert(model,
fuse_activations=True)``): torchvision's and timm's ResNet ``BasicBlock``/``Bottleneck`` (norm +
residual + activation), diffusers' ``ResnetBlock2D`` (GroupNorm + SiLU; GroupNorm + the time
embedding's scale/shift + SiLU) and ``AdaGroupNorm`` (GroupNorm + scale/shift).

Each block's class gets a subclass (made by :mod:`tritonnorm.zoo`, same name) whose forward
computes what the original's does, in the same order, with the norm's epilogue carrying the
activation, residual and scale/shift; the module's ``__class__`` is swapped, so parameters,
buffers and state_dict are untouched. A block is fused only when it is exactly the known class,
its forward is the known one (the names it uses and its arguments, as in the version read:
torchvision 0.28, timm 1.0, diffusers 0.42), and its norms are tritonnorm norms without an
activation of their own; anything else is left alone and reported. At every call a part whose
tensors do not fit the epilogue (dtype, shape) runs as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import zoo
from .functional import group_norm
from .modules import NORM_MIXINS
from .zoo import Converted, activation_of, class_name


class _GroupNorm:
    """The functional group norm of AdaGroupNorm (no affine), as a norm that takes extras."""

    def __init__(self, num_groups: int, eps: float) -> None:
        self.num_groups, self.eps = num_groups, eps

    def __call__(self, x: Tensor, **extras) -> Tensor:
        return group_norm(x, self.num_groups, None, None, self.eps, **extras)


def takes_extras(norm) -> bool:
    """Whether a norm module's forward takes the epilogue extras: a tritonnorm norm (plain or
    frozen, not a timm norm-act layer) without an activation of its own."""
    return isinstance(norm, _GroupNorm) or (
        isinstance(norm, (*NORM_MIXINS, zoo.FrozenNormMixin))
        and not isinstance(norm, zoo.NormActMixin)
        and getattr(norm, "activation", None) is None
    )


def _fits(t: Tensor, x: Tensor, shape) -> bool:
    return tuple(t.shape) == tuple(shape) and t.dtype == x.dtype and t.device == x.device


def norm_act(norm, x: Tensor, act=None, *, scale=None, shift=None, residual=None) -> Tensor:
    """``act(norm(x) * scale + shift + residual)`` as a block computes it (``scale``/``shift``
    broadcast as (N, C, 1, ...), the residual added in place), each step fused into the norm's
    pass while the steps before it are: scale and shift of shape (N, C, 1, ...), a residual of
    x's shape, both of x's dtype; an activation the epilogue has. The rest runs in torch."""
    n, c = x.shape[:2]
    per_sample = (n, c) + (1,) * (x.dim() - 2)
    extras, fusing = {}, takes_extras(norm)
    if scale is not None or shift is not None:
        fusing = fusing and all(t is None or _fits(t, x, per_sample) for t in (scale, shift))
        if fusing:
            extras["scale"] = None if scale is None else scale.reshape(n, c)
            extras["shift"] = None if shift is None else shift.reshape(n, c)
    if residual is not None:
        fusing = fusing and _fits(residual, x, x.shape)
        if fusing:
            extras["residual"] = residual
    activation = None if act is None else activation_of(act)
    if fusing and activation is not None:
        extras["activation"] = activation
    y = norm(x, **extras)
    if scale is not None and "scale" not in extras:
        y = y * scale
    if shift is not None and "shift" not in extras:
        y = y + shift
    if residual is not None and "residual" not in extras:
        y += residual
    if act is not None and "activation" not in extras:
        y = act(y)
    return y


def _norm_drop_act(norm, x: Tensor, drop: nn.Module, act: nn.Module) -> Tensor:
    """timm's ``act(drop(norm(x)))``: fused when ``drop`` is an Identity."""
    if type(drop) is nn.Identity:
        return norm_act(norm, x, act)
    return act(drop(norm(x)))


class TorchvisionBasicBlock(Converted):
    def forward(self, x: Tensor) -> Tensor:
        out = norm_act(self.bn1, self.conv1(x), self.relu)
        out = self.conv2(out)
        identity = x if self.downsample is None else self.downsample(x)
        return norm_act(self.bn2, out, self.relu, residual=identity)


class TorchvisionBottleneck(Converted):
    def forward(self, x: Tensor) -> Tensor:
        out = norm_act(self.bn1, self.conv1(x), self.relu)
        out = norm_act(self.bn2, self.conv2(out), self.relu)
        out = self.conv3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return norm_act(self.bn3, out, self.relu, residual=identity)


def _timm_tail(block, x: Tensor, shortcut: Tensor, norm, act) -> Tensor:
    """timm's ResNet block end: act(drop_path(se(norm(x))) + downsample(shortcut)), with the
    residual and activation fused when there is no se nor drop_path between."""
    if block.se is None and block.drop_path is None:
        if block.downsample is not None:
            shortcut = block.downsample(shortcut)
        return norm_act(norm, x, act, residual=shortcut)
    x = norm(x)
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    x += shortcut
    return act(x)


class TimmBasicBlock(Converted):
    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = _norm_drop_act(self.bn1, self.conv1(x), self.drop_block, self.act1)
        x = self.conv2(self.aa(x))
        return _timm_tail(self, x, shortcut, self.bn2, self.act2)


class TimmBottleneck(Converted):
    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = norm_act(self.bn1, self.conv1(x), self.act1)
        x = _norm_drop_act(self.bn2, self.conv2(x), self.drop_block, self.act2)
        x = self.conv3(self.aa(x))
        return _timm_tail(self, x, shortcut, self.bn3, self.act3)


class DiffusersResnetBlock2D(Converted):
    def forward(self, input_tensor: Tensor, temb: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs.get("scale") is not None:  # deprecated, ignored: the original warns
            return self._tn_original.forward(self, input_tensor, temb, *args, **kwargs)
        hidden = norm_act(self.norm1, input_tensor, self.nonlinearity)
        resample = self.upsample if self.upsample is not None else self.downsample
        if resample is not None:
            if self.upsample is not None and hidden.shape[0] >= 64:  # as the original
                input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
            input_tensor, hidden = resample(input_tensor), resample(hidden)
        hidden = self.conv1(hidden)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    " `temb` should not be None when `time_embedding_norm` is scale_shift"
                )
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden = norm_act(
                self.norm2, hidden, self.nonlinearity, scale=1 + time_scale, shift=time_shift
            )
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden = hidden + temb
            hidden = norm_act(self.norm2, hidden, self.nonlinearity)
        hidden = self.conv2(self.dropout(hidden))
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor


class DiffusersAdaGroupNorm(Converted):
    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.act:
            emb = self.act(emb)
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return norm_act(_GroupNorm(self.num_groups, self.eps), x, scale=1 + scale, shift=shift)


@dataclass(frozen=True)
class Block:
    """A known block: its fused-forward mixin, the names and arguments of the forward it
    replaces, its norm attributes, and what it fuses in a given configuration."""

    mixin: type
    names: frozenset
    arguments: tuple
    norms: tuple
    fuses: object  # block -> list of what the fused forward folds (empty: nothing to gain)


def _act_name(act) -> str | None:
    return None if activation_of(act) is None else class_name(act)


def _resnet_fuses(block, first: list[tuple[str, str, str | None]], last: tuple[str, str]):
    """``first``: (norm, act, drop attribute or None) fused as norm + act; ``last``: (norm,
    act) fused with the residual when no se/drop_path sits between."""
    parts = []
    for norm, act, drop in first:
        name = _act_name(getattr(block, act))
        if name and (drop is None or type(getattr(block, drop)) is nn.Identity):
            parts.append(f"{norm} + {name}")
    norm, act = last
    if getattr(block, "se", None) is None and getattr(block, "drop_path", None) is None:
        name = _act_name(getattr(block, act))
        parts.append(f"{norm} + residual" + (f" + {name}" if name else ""))
    return parts


def _resnet_block2d_fuses(block) -> list[str]:
    name = _act_name(block.nonlinearity)
    parts = [f"norm1 + {name}"] if name else []
    if block.time_embedding_norm == "scale_shift":
        parts.append("norm2 + scale/shift" + (f" + {name}" if name else ""))
    elif name:
        parts.append(f"norm2 + {name}")
    return parts


def _names(*names: str) -> frozenset:
    return frozenset(names)


_RESNET_NAMES = ("bn1", "bn2", "conv1", "conv2", "downsample")
_TIMM_NAMES = ("aa", "act1", "act2", "drop_block", "drop_path", "se")
_RESNET_BLOCK2D_NAMES = frozenset(
    [
        "ValueError",
        "chunk",
        "contiguous",
        "conv1",
        "conv2",
        "conv_shortcut",
        "deprecate",
        "downsample",
        "dropout",
        "get",
        "len",
        "nonlinearity",
        "norm1",
        "norm2",
        "output_scale_factor",
        "shape",
        "skip_time_act",
        "time_emb_proj",
        "time_embedding_norm",
        "torch",
        "training",
        "upsample",
    ]
)
BLOCKS: dict[str, Block] = {
    "torchvision.models.resnet.BasicBlock": Block(
        TorchvisionBasicBlock,
        _names(*_RESNET_NAMES, "relu"),
        ("self", "x"),
        ("bn1", "bn2"),
        lambda b: _resnet_fuses(b, [("bn1", "relu", None)], ("bn2", "relu")),
    ),
    "torchvision.models.resnet.Bottleneck": Block(
        TorchvisionBottleneck,
        _names(*_RESNET_NAMES, "relu", "bn3", "conv3"),
        ("self", "x"),
        ("bn1", "bn2", "bn3"),
        lambda b: _resnet_fuses(b, [("bn1", "relu", None), ("bn2", "relu", None)], ("bn3", "relu")),
    ),
    "timm.models.resnet.BasicBlock": Block(
        TimmBasicBlock,
        _names(*_RESNET_NAMES, *_TIMM_NAMES),
        ("self", "x"),
        ("bn1", "bn2"),
        lambda b: _resnet_fuses(b, [("bn1", "act1", "drop_block")], ("bn2", "act2")),
    ),
    "timm.models.resnet.Bottleneck": Block(
        TimmBottleneck,
        _names(*_RESNET_NAMES, *_TIMM_NAMES, "act3", "bn3", "conv3"),
        ("self", "x"),
        ("bn1", "bn2", "bn3"),
        lambda b: _resnet_fuses(
            b, [("bn1", "act1", None), ("bn2", "act2", "drop_block")], ("bn3", "act3")
        ),
    ),
    "diffusers.models.resnet.ResnetBlock2D": Block(
        DiffusersResnetBlock2D,
        _RESNET_BLOCK2D_NAMES,
        ("self", "input_tensor", "temb"),
        ("norm1", "norm2"),
        _resnet_block2d_fuses,
    ),
    "diffusers.models.normalization.AdaGroupNorm": Block(
        DiffusersAdaGroupNorm,
        _names("F", "act", "chunk", "eps", "group_norm", "linear", "num_groups"),
        ("self", "x", "emb"),
        (),
        lambda b: ["group_norm + scale/shift"],
    ),
}
for _path, _block in BLOCKS.items():
    zoo.register(_path, _block.mixin)


def _forward_is_known(cls: type, block: Block) -> bool:
    code = getattr(cls.forward, "__code__", None)
    if code is None:
        return False
    arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return frozenset(code.co_names) == block.names and arguments == block.arguments


def _why_not(module: nn.Module, block: Block) -> str | None:
    """Why this block cannot run the fused forward (None: it can)."""
    if not _forward_is_known(type(module), block):
        return "its forward is not the one tritonnorm knows"
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance"
    for name in block.norms:
        norm = getattr(module, name, None)
        if not takes_extras(norm):
            return f"its {name} is a {class_name(norm)}, not a tritonnorm norm without activation"
    if not block.fuses(module):
        return "nothing to fuse in this configuration (activation without a fused epilogue)"
    return None


def fuse_blocks(model: nn.Module, report) -> None:
    """Give every known block of ``model`` its fused forward (class swap, in place); count what
    was fused, and which known blocks (or their subclasses) were left, in ``report``."""
    for module in model.modules():
        cls = zoo.original_class(type(module))
        block = BLOCKS.get(zoo.class_path(cls))
        name = class_name(module)
        if block is None:
            known = [b for b in cls.__mro__[1:] if zoo.class_path(b) in BLOCKS]
            if known:
                report.left[f"{name} (a subclass of {class_name(known[0])}: not fused)"] += 1
            continue
        if not isinstance(module, Converted):
            reason = _why_not(module, block)
            if reason is not None:
                report.left[f"{name} ({reason})"] += 1
                continue
            module.__class__ = zoo.converted_class(cls)
        report.fused[f"{name}: {', '.join(block.fuses(module))}"] += 1
