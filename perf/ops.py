"""One declarative description per benchmarked op, and the inputs every runner builds from it.

A norm joins the report and the GPU sweep by adding one row to ``NORMS`` (which torch.nn.functional
/ tritonnorm function, with which keywords) and one ``OpSpec`` per stage set to ``OPS``. Every op
function takes ``(x, running_mean, running_var, weight, bias)``; ``None`` where unused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from perf.floors import floor_passes
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
}


def norm_fn(norm: str, tritonnorm: bool) -> Callable:
    """The op function of ``norm``: torch.nn.functional's, or tritonnorm's (imported on first
    call: TRITON_INTERPRET must be decided before tritonnorm is imported)."""
    name, kw, _ = NORMS[norm]

    if name == "group_norm":

        def fn(x, rm, rv, w, b):
            lib = __import__("tritonnorm") if tritonnorm else F
            return lib.group_norm(x, math.gcd(x.shape[1], 32), w, b, eps=1e-5)

    elif not tritonnorm:
        torch_fn = getattr(F, name)

        def fn(x, rm, rv, w, b):
            return torch_fn(x, rm, rv, w, b, momentum=0.1, eps=1e-5, **kw)

    else:

        def fn(x, rm, rv, w, b):
            import tritonnorm

            return getattr(tritonnorm, name)(x, rm, rv, w, b, momentum=0.1, eps=1e-5, **kw)

    fn.__name__ = f"{'tn' if tritonnorm else 'torch'}_{norm}"
    return fn


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
) -> Inputs:
    """Random (never zero) inputs; parameters and running stats in the input dtype, as a module
    converted with ``.to(dtype)`` has them. ``layout`` "strided": every other element of the last
    axis (a view no kernel reads natively)."""
    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used: fast
    c = shape[1]

    def rand(*s, scale=1.0, shift=0.0):
        return torch.randn(*s, generator=g, device=device).mul_(scale).add_(shift).to(dtype)

    def big():
        if layout == "strided":
            return rand(*shape[:-1], 2 * shape[-1], scale=2.0, shift=offset)[..., ::2]
        return rand(*shape, scale=2.0, shift=offset).contiguous(
            memory_format=memory_format(layout, len(shape))
        )

    x = big()
    weight, bias = rand(c, scale=0.1, shift=1.0), rand(c, scale=0.1)
    rm = rv = None
    if running_stats:
        rm = rand(c, scale=0.1)
        rv = (torch.rand(c, generator=g, device=device) + 0.5).to(dtype)
    dy = None
    if backward:
        for t in (x, weight, bias):
            t.requires_grad_(True)
        offset = 0.0
        dy = big()
    grad_inputs = (x, weight, bias) if backward else ()
    state = tuple(t for t in (rm, rv) if t is not None)
    return Inputs((x, rm, rv, weight, bias), grad_inputs, dy, state)


@dataclass(frozen=True)
class OpSpec:
    name: str
    norm: str  # NORMS key
    stages: tuple[str, ...]  # floors.FLOOR_PASSES keys; "bwd" means the op runs a backward
    shape_classes: tuple[str, ...]

    @property
    def backward(self) -> bool:
        return "bwd" in self.stages

    @property
    def torch_fn(self) -> Callable:
        return norm_fn(self.norm, tritonnorm=False)

    @property
    def tn_fn(self) -> Callable:
        return norm_fn(self.norm, tritonnorm=True)

    def group_numel(self, shape: Shape) -> int | None:
        """Elements of one reduction group (an instance, a group), which may stay on chip; None
        for batch_norm, whose channel spans N*HW elements over many programs: streamed."""
        if self.norm.startswith("bn"):
            return None
        per_group = shape[1] // math.gcd(shape[1], 32) if self.norm == "gn" else 1
        return per_group * math.prod(shape[2:])

    def stage_floor(self, stage: str, shape: Shape) -> int:
        return floor_passes(stage, self.group_numel(shape))

    def floor_passes(self, shape: Shape) -> int:
        return sum(self.stage_floor(s, shape) for s in self.stages)

    def inputs(self, shape: Shape, layout: str, dtype: torch.dtype, device: str, seed=0) -> Inputs:
        running = NORMS[self.norm][2]
        return make_inputs(shape, layout, dtype, device, running_stats=running,
                           backward=self.backward, seed=seed)  # fmt: skip


_BN, _IN = ("resnet50_bn", "small_c_bn"), ("style_in", "medical3d_in")
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
