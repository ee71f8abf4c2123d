"""One declarative description per benchmarked op, and the inputs every runner builds from it.

A norm joins the report and the GPU sweep by adding one row to ``NORMS`` (which torch.nn.functional
/ tritonnorm function, with which keywords; the norms across channels, LayerNorm2d and RMSNorm2d,
have timm's composition on torch's side: ``Timm``) and one ``OpSpec`` per stage set to ``OPS``; a
fused epilogue (per-sample scale and shift, residual, activation) is an ``Epilogue`` of the
``OpSpec`` on one of those norms. Every op function takes ``(x, running_mean, running_var, weight,
bias, *extras)``: ``None`` where unused (RMSNorm2d's bias), then the epilogue's extra tensors
(``Epilogue.extras``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from perf.floors import NEGLIGIBLE_PASSES, POSITION_STATS, floor_passes, position_stats_passes
from perf.shapes import Shape

LAYOUTS = ("contiguous", "channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (function, keywords, whether it takes running statistics). Momentum 0.1, eps 1e-5.
NORMS: dict[str, tuple[str, dict, bool]] = {
    "bn_train": ("batch_norm", {"training": True}, True),
    "bn_eval": ("batch_norm", {"training": False}, True),
    "in": ("instance_norm", {"use_input_stats": True}, False),
    "in_running": ("instance_norm", {"use_input_stats": True}, True),  # track_running_stats
    "in_eval_running": ("instance_norm", {"use_input_stats": False}, True),
    "gn": ("group_norm", {}, False),  # num_groups = gcd(C, 32): 32 groups where C allows
    # across the channels at each position (timm's LayerNorm2d / RmsNorm2d), eps 1e-6 as timm's
    "ln2d": ("layer_norm_2d", {}, False),
    "rms2d": ("rms_norm_2d", {}, False),  # weight only: no bias
}
# The rows normalised across the channels at each position (statistics per (sample, position)).
PER_POSITION = ("ln2d", "rms2d")
POSITION_EPS = 1e-6


def has_bias(norm: str) -> bool:
    """Whether the op takes a bias (RMSNorm2d does not)."""
    return norm != "rms2d"


class Timm:
    """What timm's LayerNorm2d and RmsNorm2d compute (timm/layers/norm.py, fast_norm.py; timm is
    not imported): LayerNorm2d permutes to channels-last, ``F.layer_norm`` over C, permutes back
    (contiguous NCHW input: layer_norm copies the permuted view first, and the output keeps
    channels_last strides; channels_last input: no copy); RmsNorm2d (timm's default, not the
    apex "fast norm") reduces over dim 1 with eager ops in the input dtype (``rms_norm2d``).
    Written for any (N, C, *spatial) input (``movedim`` is timm's ``permute`` for 4-D)."""

    @staticmethod
    def layer_norm_2d(x, weight=None, bias=None, eps=POSITION_EPS):
        return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)

    @staticmethod
    def rms_norm_2d(x, weight=None, eps=POSITION_EPS):
        y = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + eps)
        if weight is not None:
            y = y * weight.reshape(1, -1, *[1] * (x.dim() - 2))
        return y


def launch_norm(norm: str, channels: int):
    """The ``tritonnorm.kernels.launch.Norm`` a ``NORMS`` row launches for ``channels`` channels
    (what perf.compile_check and perf.gpu's warm stage record without the public functions)."""
    from tritonnorm.kernels.launch import Norm

    name, kw, _ = NORMS[norm]
    if name == "group_norm":
        return Norm(False, num_groups=math.gcd(channels, 32))
    if norm in PER_POSITION:
        return Norm(False, per_position=True, centred=norm == "ln2d")
    return Norm(name == "batch_norm", use_input_stats=kw.get("training", kw.get("use_input_stats")))


# The epilogue's activations as torch composes them (the references, eager and torch.compile):
# tritonnorm.activations' compositions, imported when first called (perf.gpu sets
# TRITON_INTERPRET before anything imports tritonnorm).
def _torch_activation(name: str) -> Callable:
    def apply(y):
        from tritonnorm import activations

        return activations.apply(y, name)

    return apply


ACTIVATIONS: dict[str, Callable] = {
    name: _torch_activation(name) for name in ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
}
# Activations with a kink at 0: where the pre-activation z is within rounding error of 0, a float32
# result may fall on the other side than the float64 reference, and its gradient differs by all of
# dy (eager float32 does, once in the 25.7M elements of ResNet's (32, 256, 56, 56)). Inputs with a
# residual are kept at least KINK_CLEARANCE off it (OpSpec.inputs); values do not change timings.
KINKED = ("relu", "leaky_relu")
KINK_CLEARANCE = 1e-3


@dataclass(frozen=True)
class Epilogue:
    """A fused epilogue, y = act((x_hat * w + b) * scale + shift + residual). The op function
    takes its extra tensors positionally after ``bias``, in ``extras`` order: ``scale`` and
    ``shift`` of shape (N, C) (scale is the caller's ``1 + scale``, as a diffusion block passes
    it), ``residual`` of the input's shape and layout."""

    scale_shift: bool = False
    residual: bool = False
    activation: str | None = None

    @property
    def extras(self) -> tuple[str, ...]:
        return ("scale", "shift")[: 2 * self.scale_shift] + ("residual",)[: int(self.residual)]

    @property
    def tag(self) -> str:
        return "_".join([*self.extras, *([self.activation] if self.activation else [])])

    def keywords(self, *extras: torch.Tensor) -> dict:
        """tritonnorm's keyword arguments for the extra tensors."""
        return {**dict(zip(self.extras, extras, strict=True)), "activation": self.activation}

    def compose(self, y: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        """The same epilogue from torch ops, on the norm's output ``y``."""
        kw = dict(zip(self.extras, extras, strict=True))
        if self.scale_shift:  # scale[:, :, None, None] for 4-D inputs
            per_sample = (*y.shape[:2], *[1] * (y.dim() - 2))
            y = y * kw["scale"].reshape(per_sample) + kw["shift"].reshape(per_sample)
        if self.residual:
            y = y + kw["residual"]
        return ACTIVATIONS[self.activation](y) if self.activation else y


def norm_fn(norm: str, tritonnorm: bool, epilogue: Epilogue | None = None) -> Callable:
    """The op function of ``norm`` (and ``epilogue``): torch.nn.functional's, the epilogue
    composed after it, or tritonnorm's, the epilogue fused (tritonnorm is imported on first call:
    TRITON_INTERPRET must be decided before tritonnorm is imported)."""
    name, kw, _ = NORMS[norm]

    if name == "group_norm":

        def call(lib, x, rm, rv, w, b, **extra):
            return lib.group_norm(x, math.gcd(x.shape[1], 32), w, b, eps=1e-5, **extra)

    elif norm in PER_POSITION:  # torch's side: timm's composition (Timm)

        def call(lib, x, rm, rv, w, b, **extra):
            lib = Timm if lib is F else lib
            wb = (w, b) if has_bias(norm) else (w,)
            return getattr(lib, name)(x, *wb, eps=POSITION_EPS, **extra)

    else:

        def call(lib, x, rm, rv, w, b, **extra):
            return getattr(lib, name)(x, rm, rv, w, b, momentum=0.1, eps=1e-5, **kw, **extra)

    if tritonnorm:

        def fn(x, rm, rv, w, b, *extras):
            import tritonnorm

            extra = epilogue.keywords(*extras) if epilogue else {}
            return call(tritonnorm, x, rm, rv, w, b, **extra)

    else:

        def fn(x, rm, rv, w, b, *extras):
            y = call(F, x, rm, rv, w, b)
            return epilogue.compose(y, *extras) if epilogue else y

    tag = f"_{epilogue.tag}" if epilogue else ""
    fn.__name__ = f"{'tn' if tritonnorm else 'torch'}_{norm}{tag}"
    return fn


def bound_call(norm: str, epilogue: Epilogue | None, args: tuple) -> Callable[[], torch.Tensor]:
    """tritonnorm's public function of ``norm`` with ``args`` (as :func:`norm_fn` takes them)
    bound, keywords included: what a user's call costs, without :func:`norm_fn`'s glue
    (perf.hostcost)."""
    import tritonnorm

    x, rm, rv, w, b, *extras = args
    name, kw, _ = NORMS[norm]
    extra = epilogue.keywords(*extras) if epilogue else {}
    fn = getattr(tritonnorm, name)
    if name == "group_norm":
        return functools.partial(fn, x, math.gcd(x.shape[1], 32), w, b, eps=1e-5, **extra)
    if norm in PER_POSITION:
        wb = (w, b) if has_bias(norm) else (w,)
        return functools.partial(fn, x, *wb, eps=POSITION_EPS, **extra)
    return functools.partial(fn, x, rm, rv, w, b, momentum=0.1, eps=1e-5, **kw, **extra)


@dataclass
class Inputs:
    """One set of inputs. ``args`` is what every op function takes; ``dy`` is the backward seed."""

    args: tuple
    grad_inputs: tuple[torch.Tensor, ...]  # what the backward differentiates with respect to
    dy: torch.Tensor | None
    state: tuple[torch.Tensor, ...]  # tensors the op updates in place (running statistics)

    def copy(self, dtype: torch.dtype | None = None, contiguous: bool = False) -> Inputs:
        """Fresh copies (state included), cast to ``dtype``; ``contiguous`` for references: the
        math does not depend on the layout, and a layout bug of eager must not become the
        reference (CPU instance_norm's channels_last backward in torch 2.13, for one)."""

        def conv(t):
            if t is None:
                return None
            r = t.detach().to(dtype or t.dtype, copy=True)
            r = r.contiguous() if contiguous else r
            return r.requires_grad_(t.requires_grad)

        args = tuple(conv(t) for t in self.args)
        index = {id(t): i for i, t in enumerate(self.args) if t is not None}
        pick = lambda ts: tuple(args[index[id(t)]] for t in ts)
        return Inputs(args, pick(self.grad_inputs), conv(self.dy), pick(self.state))

    def step(self, fn: Callable, backward: bool) -> Callable[[], tuple]:
        """A callable running ``fn`` once (and its backward for ``dy``); returns the outputs,
        gradients and updated state."""

        def run():
            with torch.set_grad_enabled(backward):
                y = fn(*self.args)
                grads = torch.autograd.grad(y, self.grad_inputs, self.dy) if backward else ()
            return (y, *grads, *self.state)

        return run


def memory_format(layout: str, ndim: int) -> torch.memory_format:
    if layout != "channels_last" or ndim not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def make_inputs(
    shape: Shape,
    layout: str,
    dtype: torch.dtype,
    device: str,
    *,
    running_stats: bool,
    backward: bool,
    seed: int = 0,
    offset: float = 0.5,
    epilogue: Epilogue | None = None,
    bias: bool = True,
) -> Inputs:
    """Random (never zero) inputs; parameters and running stats in the input dtype, as a module
    converted with ``.to(dtype)`` has them. ``layout`` "strided": every other element of the last
    axis (a view no kernel reads natively). The ``epilogue``'s extras come after the rest (the
    other tensors are the same with or without them): scale 1 + 0.1 * randn and shift
    0.5 * randn of shape (N, C), a residual of unit variance in the input's layout; with
    ``backward`` the gradient is taken with respect to them too. ``bias=False``: None for the
    bias (an op without one, ``has_bias``), the random draws otherwise the same."""
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used: fast
    c = shape[1]

    def rand(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device=device).mul_(scale).add_(shift).to(dtype)

    def big(scale=2.0):
        if layout == "strided":
            return rand(*shape[:-1], 2 * shape[-1], scale=scale, shift=offset)[..., ::2]
        return rand(*shape, scale=scale, shift=offset).contiguous(
            memory_format=memory_format(layout, len(shape))
        )

    x = big()
    weight, bias_ = rand(c, scale=0.1, shift=1.0), rand(c, scale=0.1)
    bias_ = bias_ if bias else None
    rm = rv = None
    if running_stats:
        rm = rand(c, scale=0.1)
        rv = (torch.rand(c, generator=g, device=device) + 0.5).to(dtype)
    dy = None
    offset = 0.0  # dy and the residual are centred
    if backward:
        dy = big()
    extras = []
    if epilogue and epilogue.scale_shift:
        extras += [rand(shape[0], c, scale=0.1, shift=1.0), rand(shape[0], c, scale=0.5)]
    if epilogue and epilogue.residual:
        extras.append(big(scale=1.0))
    grad_inputs = tuple(t for t in (x, weight, bias_, *extras) if t is not None) if backward else ()
    for t in grad_inputs:
        t.requires_grad_(True)
    state = tuple(t for t in (rm, rv) if t is not None)
    return Inputs((x, rm, rv, weight, bias_, *extras), grad_inputs, dy, state)


@dataclass(frozen=True)
class OpSpec:
    name: str
    norm: str  # NORMS key
    stages: tuple[str, ...]  # "fwd", "eval", "bwd" ("bwd": the op runs a backward)
    shape_classes: tuple[str, ...]
    epilogue: Epilogue | None = None  # fused extras after the norm

    @property
    def backward(self) -> bool:
        return "bwd" in self.stages

    @property
    def per_position(self) -> bool:
        """Statistics across the channels at each position (LayerNorm2d, RMSNorm2d)."""
        return self.norm in PER_POSITION

    def small_passes(self, shape: Shape, dtype: torch.dtype) -> float:
        """What the byte count allows besides the input-sized passes: NEGLIGIBLE_PASSES, and for
        a per-position norm its statistics (floors.position_stats_passes: they grow with the
        input)."""
        if not self.per_position:
            return NEGLIGIBLE_PASSES
        stats = POSITION_STATS[NORMS[self.norm][0]]
        acc = 8 if dtype == torch.float64 else 4
        return NEGLIGIBLE_PASSES + position_stats_passes(stats, shape[1], dtype.itemsize, acc)

    @property
    def torch_fn(self) -> Callable:
        return norm_fn(self.norm, tritonnorm=False, epilogue=self.epilogue)

    @property
    def tn_fn(self) -> Callable:
        return norm_fn(self.norm, tritonnorm=True, epilogue=self.epilogue)

    def group_numel(self, shape: Shape) -> int | None:
        """Elements of one reduction group (an instance, a group, a position's channels), which
        may stay on chip; None for batch_norm, whose channel spans N*HW elements over many
        programs: streamed."""
        if self.norm.startswith("bn"):
            return None
        if self.per_position:
            return shape[1]
        per_group = shape[1] // math.gcd(shape[1], 32) if self.norm == "gn" else 1
        return per_group * math.prod(shape[2:])

    def floor_stage(self, stage: str) -> str:
        """The floors.FLOOR_PASSES key of one of the op's stages: an input-sized residual is a
        tensor of its own ("+residual"); scale, shift and the activation add nothing."""
        return f"{stage}+residual" if self.epilogue and self.epilogue.residual else stage

    def stage_floor(self, stage: str, shape: Shape) -> int:
        return floor_passes(self.floor_stage(stage), self.group_numel(shape))

    def floor_passes(self, shape: Shape) -> int:
        return sum(self.stage_floor(s, shape) for s in self.stages)

    def inputs(self, shape: Shape, layout: str, dtype: torch.dtype, device: str, seed=0) -> Inputs:
        running = NORMS[self.norm][2]
        inp = make_inputs(shape, layout, dtype, device, running_stats=running,
                          backward=self.backward, seed=seed, epilogue=self.epilogue,
                          bias=has_bias(self.norm))  # fmt: skip
        if self.epilogue and self.epilogue.residual and self.epilogue.activation in KINKED:
            self._clear_of_kink(inp)
        return inp

    def _clear_of_kink(self, inp: Inputs) -> None:
        """Move the residual, where the pre-activation z (in float64, as the reference computes
        it) is within KINK_CLEARANCE of 0, away from 0 on z's side, by enough to survive the
        rounding to the residual's dtype: then |z| > KINK_CLEARANCE everywhere (about 0.06% of
        the elements move, by at most 2 * KINK_CLEARANCE + eps * |r|)."""
        linear = dataclasses.replace(self.epilogue, activation=None)
        with torch.no_grad():
            z = norm_fn(self.norm, False, linear)(*inp.copy(torch.float64).args)
            r = inp.args[-1]
            r64 = r.double()
            side = torch.where(z >= 0, 1.0, -1.0).to(z)
            push = side * (2 * KINK_CLEARANCE + torch.finfo(r.dtype).eps * r64.abs())
            r.copy_(torch.where(z.abs() < KINK_CLEARANCE, r64 + push, r64))


_BN, _IN = ("resnet50_bn", "small_c_bn"), ("style_in", "medical3d_in")
# A diffusion ResBlock's GroupNorm, time-embedding scale (1 + scale) and shift, then SiLU; the
# end of a ResNet bottleneck: BatchNorm (training), + the identity, then ReLU.
GN_SILU = Epilogue(scale_shift=True, activation="silu")
BN_RES_RELU = Epilogue(residual=True, activation="relu")
OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (
        OpSpec("bn_train_fwd", "bn_train", ("fwd",), _BN),
        OpSpec("bn_train_fwd_bwd", "bn_train", ("fwd", "bwd"), _BN),
        OpSpec("bn_eval_fwd", "bn_eval", ("eval",), _BN),
        OpSpec("in_fwd", "in", ("fwd",), _IN),
        OpSpec("in_fwd_bwd", "in", ("fwd", "bwd"), _IN),
        OpSpec("gn_fwd", "gn", ("fwd",), ("diffusion_gn",)),
        OpSpec("gn_fwd_bwd", "gn", ("fwd", "bwd"), ("diffusion_gn",)),
        OpSpec("gn_silu_fwd", "gn", ("fwd",), ("diffusion_gn",), GN_SILU),
        OpSpec("gn_silu_fwd_bwd", "gn", ("fwd", "bwd"), ("diffusion_gn",), GN_SILU),
        OpSpec("bn_res_relu_fwd", "bn_train", ("fwd",), ("resnet50_bn",), BN_RES_RELU),
        OpSpec("bn_res_relu_fwd_bwd", "bn_train", ("fwd", "bwd"), ("resnet50_bn",), BN_RES_RELU),
        # ConvNeXt's LayerNorm2d (and timm's RmsNorm2d), against timm's composition
        OpSpec("ln2d_fwd", "ln2d", ("fwd",), ("convnext_ln",)),
        OpSpec("ln2d_fwd_bwd", "ln2d", ("fwd", "bwd"), ("convnext_ln",)),
        OpSpec("rms2d_fwd", "rms2d", ("fwd",), ("convnext_ln",)),
        OpSpec("rms2d_fwd_bwd", "rms2d", ("fwd", "bwd"), ("convnext_ln",)),
    )
}


def select(patterns: str | None) -> list[OpSpec]:
    """Ops whose name matches one of the comma-separated glob patterns (all when None)."""
    from fnmatch import fnmatch

    pats = [p.strip() for p in (patterns or "*").split(",") if p.strip()]
    chosen = [op for op in OPS.values() if any(fnmatch(op.name, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--ops {patterns!r} matches none of: {', '.join(OPS)}")
    return chosen
