"""One declarative description per benchmarked op.

A new norm joins the report by adding one ``OpSpec`` to ``OPS``: how to build its inputs, the
torch function (the reference, also what torch.compile and FlagGems run), the tritonnorm
function, its stages (their floors come from ``perf/floors.py``), the shape classes it runs on,
and the reduction group that decides whether its floor is the on-chip one.

Every op function takes the same positional arguments ``(x, running_mean, running_var, weight,
bias)``; ops that do not use running statistics get ``None`` there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from perf.floors import floor_passes
from perf.shapes import Shape

LAYOUTS = ("contiguous", "channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tn():
    # Imported on first use: TRITON_INTERPRET must be set (or not) before tritonnorm is imported.
    import tritonnorm

    return tritonnorm


@dataclass
class Inputs:
    """One set of inputs. ``args`` is what every op function takes; ``dy`` is the backward seed."""

    args: tuple
    grad_inputs: tuple[torch.Tensor, ...]  # what the backward differentiates with respect to
    dy: torch.Tensor | None
    state: tuple[torch.Tensor, ...]  # tensors the op updates in place (running statistics)

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    def reference(self) -> Inputs:
        """The same values in float32 and contiguous layout, for the reference run: the math does
        not depend on the layout, and a layout-specific bug of eager (CPU instance_norm's
        channels_last backward in torch 2.13, for one) must not become the reference."""

        def conv(t):
            if t is None:
                return None
            r = t.detach().float().contiguous()
            return r.requires_grad_(t.requires_grad)

        args = tuple(conv(t) for t in self.args)
        index = {id(t): i for i, t in enumerate(self.args) if t is not None}
        grad_inputs = tuple(args[index[id(t)]] for t in self.grad_inputs)
        state = tuple(args[index[id(t)]] for t in self.state)
        return Inputs(args, grad_inputs, conv(self.dy), state)


def memory_format(layout: str, ndim: int) -> torch.memory_format:
    if layout == "contiguous":
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
) -> Inputs:
    """Random (never zero) inputs; parameters and running stats in the input dtype, as a module
    converted with ``.to(dtype)`` has them."""
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used: fast
    fmt = memory_format(layout, len(shape))
    c = shape[1]

    def rand(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device=device).mul_(scale).add_(shift).to(dtype)

    x = rand(*shape, scale=2.0, shift=0.5).contiguous(memory_format=fmt)
    weight = rand(c, scale=0.1, shift=1.0)
    bias = rand(c, scale=0.1)
    rm = rv = None
    if running_stats:
        rm = rand(c, scale=0.1)
        rv = (torch.rand(c, generator=g, device=device) + 0.5).to(dtype)
    dy = None
    if backward:
        x.requires_grad_(True)
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        dy = rand(*shape).contiguous(memory_format=fmt)
    grad_inputs = (x, weight, bias) if backward else ()
    state = tuple(t for t in (rm, rv) if t is not None)
    return Inputs((x, rm, rv, weight, bias), grad_inputs, dy, state)


@dataclass(frozen=True)
class OpSpec:
    name: str
    stages: tuple[str, ...]  # floors.FLOOR_PASSES keys; "bwd" means the op runs a backward
    shape_classes: tuple[str, ...]
    torch_fn: Callable  # (x, running_mean, running_var, weight, bias) -> y
    tn_fn: Callable  # same signature, tritonnorm
    running_stats: bool  # whether inputs carry running_mean / running_var
    group_numel: Callable[[Shape], int | None]  # reduction group held on chip, None: streamed
    check_shapes: tuple[Shape, ...] = ()  # small shapes for the interpreter pass
    description: str = ""
    peers: dict[str, Callable] = field(default_factory=dict)  # provider -> same-signature fn

    @property
    def backward(self) -> bool:
        return "bwd" in self.stages

    def stage_floor(self, stage: str, shape: Shape) -> int:
        return floor_passes(stage, self.group_numel(shape))

    def floor_passes(self, shape: Shape) -> int:
        return sum(self.stage_floor(s, shape) for s in self.stages)

    def floor_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        elsize = torch.empty((), dtype=dtype).element_size()
        return self.floor_passes(shape) * math.prod(shape) * elsize

    def inputs(
        self, shape: Shape, layout: str, dtype: torch.dtype, device: str, seed: int = 0
    ) -> Inputs:
        return make_inputs(
            shape,
            layout,
            dtype,
            device,
            running_stats=self.running_stats,
            backward=self.backward,
            seed=seed,
        )


# --- the functions ---------------------------------------------------------------------------


def torch_bn_train(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)


def tn_bn_train(x, rm, rv, w, b):
    return _tn().batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)


def torch_bn_eval(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5)


def tn_bn_eval(x, rm, rv, w, b):
    return _tn().batch_norm(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5)


def torch_in(x, rm, rv, w, b):
    return F.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)


def tn_in(x, rm, rv, w, b):
    return _tn().instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)


def _bn_group(shape: Shape) -> None:
    return None  # a channel spans N*HW elements over many programs: always streamed


def _in_group(shape: Shape) -> int:
    return math.prod(shape[2:])  # one (n, c) instance


_BN_CLASSES = ("resnet50_bn", "small_c_bn")
_IN_CLASSES = ("style_in", "medical3d_in")
# Interpreter shapes. BN: channels of 16384 elements (can be normalised on chip), then 40960
# (above the on-chip limit: the split reduction). IN: instances of 4096 elements (on chip in both
# kernels and layouts), then 40960 (streamed, floors 3/5).
_BN_CHECK = ((2, 3, 64, 128), (5, 3, 64, 128))
_IN_CHECK = ((2, 3, 64, 64), (2, 3, 160, 256))

_BN = dict(
    shape_classes=_BN_CLASSES, running_stats=True, group_numel=_bn_group, check_shapes=_BN_CHECK
)
_IN = dict(
    shape_classes=_IN_CLASSES,
    running_stats=False,
    group_numel=_in_group,
    check_shapes=_IN_CHECK,
    torch_fn=torch_in,
    tn_fn=tn_in,
)

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in (
        OpSpec("bn_train_fwd", ("fwd",), torch_fn=torch_bn_train, tn_fn=tn_bn_train, **_BN,
               description="batch_norm, training forward"),
        OpSpec("bn_train_fwd_bwd", ("fwd", "bwd"), torch_fn=torch_bn_train, tn_fn=tn_bn_train,
               **_BN, description="batch_norm, training forward + backward"),
        OpSpec("bn_eval_fwd", ("eval",), torch_fn=torch_bn_eval, tn_fn=tn_bn_eval, **_BN,
               description="batch_norm, eval forward (running statistics)"),
        OpSpec("in_fwd", ("fwd",), **_IN, description="instance_norm, forward"),
        OpSpec("in_fwd_bwd", ("fwd", "bwd"), **_IN,
               description="instance_norm, forward + backward"),
    )
}  # fmt: skip


def select(patterns: str | None) -> list[OpSpec]:
    """Ops whose name matches one of the comma-separated glob patterns (all when None)."""
    from fnmatch import fnmatch

    if not patterns:
        return list(OPS.values())
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [op for op in OPS.values() if any(fnmatch(op.name, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"--ops {patterns!r} matches none of: {', '.join(OPS)}")
    return chosen
