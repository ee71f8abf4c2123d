"""Plans: how one normalisation of one kind of tensor is launched, built once and cached.

A normalisation is described by a ``Norm`` (geometry.py: which axes are reduced, how many
channels share a statistic) and an optional :class:`Epilogue` (per-sample scale/shift, residual,
activation). For an input's sizes, strides, dtype and device, and those settings, a
:class:`ForwardPlan` or :class:`BackwardPlan` holds everything a call needs: the (N, C, S)
``Reduction`` (geometry.py; config.py chooses blocks and candidates from it), the
buffers' shapes, the chosen configs and the bound launches (launcher.py). It is looked up with a
flat tuple; a call then allocates its outputs and launches.

Forward: statistics partials (split over a (statistics x SPLIT) grid) -> apply (write y), which
combines the partials itself in a fixed order; or, when a whole reduction fits one tile, one
kernel normalising in registers; or, in eval, apply alone from the running statistics. Backward:
per-channel gradient-sum partials -> apply (write dx), or the fused single-tile kernel. A
finalize launch between them remains where a combination needs it (many partials, GroupNorm's
backward, InstanceNorm's running statistics, dweight/dbias over samples, the epilogue
backward). With an epilogue the backward recomputes the pre-activation from x and the saved
statistics instead of saving it. Each plan's docstring lists its launches.

The lower-level steps (:func:`stats_partials`, :func:`finalize_stats`, :func:`apply`,
:func:`grad_partials`, :func:`finalize_grad`) serve SyncBatchNorm, which puts collectives
between them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .. import activations
from . import apply as apply_
from . import config, grad, positions, stats, tuning
from .geometry import (  # noqa: F401  (Norm, Reduction, View, plan, grad_view: the callers' names)
    Norm,
    Reduction,
    View,
    acc_dtype,
    grad_view,
    is_dense,
    plan,
    reduction_of,
    result_dtype,
    same_offsets,
    view_or_copy,
)
from .launcher import (
    NO_EPILOGUE,
    Launch,
    current_device,
    current_stream,
    device_index,
    hooks_set,
    index_64,
    restore_device,
    switch_device,
)
from .lru import LRU

ACTIVATIONS = activations.CODES  # name -> the kernels' code
derivative_from_output = activations.derivative_from_output


class Epilogue(NamedTuple):
    """y = act((x_hat * w + b) * scale + shift + residual): ``scale`` and ``shift`` (N, C)
    contiguous, both or neither; ``residual`` of the input's shape, any layout; ``activation``
    a code of :data:`ACTIVATIONS` (0: none), ``slope`` leaky_relu's negative slope. (A named
    tuple: one is made per call, at a third of a frozen dataclass's cost.)"""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    activation: int = 0
    slope: float = 0.01

    @property
    def present(self) -> bool:
        return self.scale is not None or self.residual is not None or self.activation != 0


def _y_dtype(x: torch.Tensor, ep: Epilogue | None) -> torch.dtype:
    """The output's dtype: x's, promoted with the extras' (torch's composition's)."""
    return x.dtype if ep is None else result_dtype(x.dtype, ep.scale, ep.shift, ep.residual)


def _residual_view(ep: Epilogue | None, x_view: View) -> tuple[View | None, bool]:
    """The residual's view (None without one), and whether it must be copied into x's layout."""
    if ep is None or ep.residual is None:
        return None, False
    return view_or_copy(ep.residual, x_view)


_index_64 = index_64  # the name tests know


def _nan_stats(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    shape = norm.stats_shape(x.shape)
    return torch.full(shape, float("nan"), dtype=acc_dtype(x.dtype), device=x.device)


def _epilogue_constants(ep: Epilogue | None, res_view: View | None, force: bool = False) -> dict:
    """The kernels' epilogue arguments but the tensors (scale_ptr, shift_ptr, res_ptr).
    ``force``: EPILOGUE even when nothing of it is left to read (a residual without activation
    in the backward: g = dy)."""
    if ep is None or not (ep.present or force):
        return dict(NO_EPILOGUE)
    strides = res_view.strides if res_view is not None else (0, 0, 0)
    return dict(
        res_stride_n=strides[0], res_stride_c=strides[1], res_stride_s=strides[2],
        slope=float(ep.slope), EPILOGUE=True, ACTIVATION=ep.activation,
    )  # fmt: skip


def _fused(red: Reduction, backward: bool = False, epilogue: bool = False) -> bool:
    return config.fused_blocks(red, backward, epilogue) is not None


def _fold(num_partials: int) -> bool:
    """Whether the apply pass combines the partials itself (no finalize launch): each of its
    programs re-reads its channels' partials, cheap while there are few."""
    return num_partials <= config.FOLD_MAX_PARTIALS


# --- the cached plans --------------------------------------------------------------------------


def _meta(t: torch.Tensor | None):
    return None if t is None else t.dtype


class _Recorder:
    """What one run of a plan did, as straight-line Python: each allocation and launch with its
    tensors named by where they came from (the run's arguments ``a<i>``, earlier allocations
    ``b<j>``). A plan whose runs always do the same (every branch is fixed by the plan's key and
    its bound configs) replays the recording instead of running: allocations and launches, no
    dictionaries, closures or branches. Anything it cannot name (a copy, a tensor from
    elsewhere, two arguments that are one tensor) leaves the plan without a replay."""

    def __init__(self, args: tuple):
        self.names = {id(t): f"a{i}" for i, t in enumerate(args) if t is not None}
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        self.ok = len({id(t) for t in tensors}) == len(tensors)  # no aliased tensors
        self.args = tuple(None if t is None else f"a{i}" for i, t in enumerate(args))
        # the tensors' names (the others are runtime scalars: momentum, eps)
        self.tensor_args = tuple(f"a{i}" for i, t in enumerate(args) if isinstance(t, torch.Tensor))
        self.lines: list[str] = []
        self.scope: dict = {
            "empty_like": torch.empty_like, "hooks_set": hooks_set, "stream": current_stream
        }  # fmt: skip
        self.unguarded = False  # whether a launch is called without its own guards

    def name(self, t) -> str:
        if t is None:
            return "None"
        name = self.names.get(id(t))
        if name is None:
            self.ok = False
            return "None"
        return name

    def allocation(self, out: torch.Tensor, like, dtype: torch.dtype | None = None) -> None:
        """``out = empty_like(like)`` (of ``dtype``, if given); ``like`` a tensor of the run, or
        a plan's template."""
        name = f"b{len(self.lines)}"
        source = like if isinstance(like, str) else self.name(like)  # a template: its name
        if dtype is None:
            self.lines.append(f"{name} = empty_like({source})")
        else:
            self.scope[f"D_{name}"] = dtype
            self.lines.append(f"{name} = empty_like({source}, dtype=D_{name})")
        self.names[id(out)] = name

    def launch(self, step_name: str, step: Launch, tensors) -> None:
        """The launch ``step``; once it has a direct launcher (launcher.py), its unguarded
        form, with the chosen-config record the launch would have made: the replay checks the
        guards once, for all its launches (:meth:`replay`)."""
        args = ", ".join(self.name(t) for t in tensors)
        if step.unguarded is None:
            self.scope[f"S_{step_name}"] = step
            self.lines.append(f"S_{step_name}({args})")
            return
        self.unguarded = True
        self.scope[f"U_{step_name}"] = step.unguarded
        self.lines.append(f"U_{step_name}(st, {args})")
        if step.cfg is not None:
            self.scope.update(CHOSEN=config._chosen, **{f"C_{step_name}": step.cfg})
            self.lines.append(f"CHOSEN[{step.kernel.name!r}] = C_{step_name}")

    def replay(self, outputs: tuple):
        """The replay function, or None when the run was not fully named. With unguarded
        launches it first checks their guards for them, returning None (launching nothing) when
        one fails: each argument None where it was None at the recorded run, every tensor
        argument 16-byte aligned (what the launches allocate is), no launch hook set."""
        result = ", ".join(self.name(t) for t in outputs)
        if not self.ok:
            return None
        params = ", ".join(f"a{i}" for i in range(len(self.args)))
        head = ""
        if self.unguarded:
            tensors = self.tensor_args
            guards = [f"a{i} is {'' if a is None else 'not '}None" for i, a in enumerate(self.args)]
            if tensors:
                guards.append(f"not ({' | '.join(f'{a}.data_ptr()' for a in tensors)}) & 15")
            guards.append("not hooks_set()")
            head = f"    if not ({' and '.join(guards)}):\n        return None\n    st = stream()\n"
        body = "".join(f"    {line}\n" for line in self.lines)
        source = f"def replay({params}):\n{head}{body}    return ({result},)\n"
        exec(compile(source, "<tritonnorm plan replay>", "exec"), self.scope)
        return self.scope["replay"]


class _Plan:
    """Launches bound on a plan's first call (:meth:`_step`), then reused; from its first
    call on, a plan replays a recording of that call (:class:`_Recorder`) where it can."""

    def __init__(self):
        self.steps: dict[str, Launch] = {}
        self.templates: dict[str, torch.Tensor] = {}
        self.replays: dict = {}  # variant -> the recorded replay, or None (cannot)
        self._recording: _Recorder | None = None
        self.device: int | None = None  # launcher.device_index of its input: made current

    def run(self, *args, variant=()):
        """The plan's outputs for ``args`` (its ``_run``'s arguments; ``variant``: the keyword
        arguments that change what a run does), launched on the input's device (its current
        stream)."""
        if self.device is not None and current_device() != self.device:
            previous = switch_device(self.device)
            try:
                return self.run(*args, variant=variant)
            finally:
                restore_device(previous)
        replay = self.replays.get(variant, False)
        if replay:
            out = replay(*args)
            if out is not None:
                return out
            return self._run(*args, *variant)  # a guard failed: the launches decide
        if replay is None:
            return self._run(*args, *variant)
        if not self.recordable:
            self.replays[variant] = None
            return self._run(*args, *variant)
        self._recording = recording = _Recorder(args)
        try:
            out = self._run(*args, *variant)
        finally:
            self._recording = None
        self.replays[variant] = recording.replay(out)
        return out

    @property
    def recordable(self) -> bool:
        """Runs that copy (dy or a residual in another layout) or see an empty input are not
        recorded."""
        return not (
            self.empty or getattr(self, "res_copy", False) or getattr(self, "dy_copy", False)
            or getattr(self, "y_copy", False)
        )  # fmt: skip

    def _like(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new tensor of t's shape and layout (and dtype, unless ``dtype`` is another)."""
        if dtype is None or dtype == t.dtype:
            out = torch.empty_like(t)
            dtype = None
        else:
            out = torch.empty_like(t, dtype=dtype)
        if self._recording is not None:
            self._recording.allocation(out, t, dtype)
        return out

    def _per_sample_grads(self, scale: torch.Tensor) -> tuple:
        """dscale and dshift, in the plan's ``grad_dtypes`` (:func:`extra_grad_dtypes`)."""
        return self._like(scale, self.grad_dtypes[0]), self._like(scale, self.grad_dtypes[1])

    def _buffer(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A new tensor of a shape this plan always allocates under ``name``: ``empty_like`` of
        a kept template (one element, expanded: no memory) costs half of ``torch.empty`` with
        its keyword arguments."""
        template = self.templates.get(name)
        if template is None:
            template = torch.empty((), dtype=dtype, device=device).expand(shape)
            self.templates[name] = template
        out = torch.empty_like(template)
        if self._recording is not None:
            self._recording.scope[f"T_{name}"] = template
            self._recording.allocation(out, f"T_{name}")
        return out

    def _step(self, name: str, tensors: dict, bind) -> Launch:
        """Run step ``name`` with ``tensors``; ``bind()`` makes its launch the first time."""
        step = self.steps.get(name)
        if step is None:
            step = self.steps[name] = bind()
        step(*tensors.values())
        if self._recording is not None:
            self._recording.launch(name, step, tensors.values())
        return step


class ForwardPlan(_Plan):
    """The forward of one kind of call. Launches (apply.py's sources):

    - eval (running statistics): apply (RUNNING) - 1 launch;
    - a reduction that fits one tile: the statistics kernel normalises in registers and writes
      y, mean, rstd and a reduced batch's running statistics - 1 launch (+ finalize for
      InstanceNorm's running statistics, an average over samples);
    - streamed: statistics partials, then apply (STATS_PARTIALS), whose owner programs write
      mean, rstd and a reduced batch's running statistics - 2 launches; with many partials, or
      InstanceNorm's running statistics, a finalize between them (COEFFICIENTS) - 3."""

    def __init__(self, x: torch.Tensor, norm: Norm, epilogue: Epilogue | None, running: bool):
        super().__init__()
        ep = epilogue if epilogue is not None and epilogue.present else None
        self.norm, self.running = norm, running
        self.epilogue = ep
        self.empty = x.numel() == 0
        fold = norm.batch_reduced and (ep is None or ep.scale is None)
        self.red = red = reduction_of(tuple(x.shape), x.stride(), x.dtype, norm, fold)
        self.stats_shape = norm.stats_shape(tuple(x.shape))
        self.acc = red.acc_dtype
        self.y_dtype = _y_dtype(x, ep)
        self.res_view, self.res_copy = _residual_view(ep, red.view)
        self.extras = _epilogue_constants(ep, self.res_view)
        self.fused = norm.use_input_stats and _fused(red, epilogue=self.extras["EPILOGUE"])
        # The running statistics of InstanceNorm average the samples': a finalize launch.
        self.sample_running = running and not red.reduce_batch
        # A reduced batch's running statistics are updated by the kernel owning the channel.
        self.direct_running = running and red.reduce_batch
        self.max_split = config.max_split(red, self.fused, epilogue=self.fused and ep is not None)
        self.num_partials: int | None = None  # the statistics launch's split, once bound

    def _run(self, x, weight, bias, running_mean, running_var, scale, shift, residual, momentum,
             eps, want_stats=True):  # fmt: skip
        """y, mean, rstd (None without ``want_stats`` in eval), updating the running statistics
        in place. ``momentum`` and ``eps`` are the kernels' runtime arguments, not the plan's."""
        y = self._like(x, self.y_dtype)
        if self.empty:
            return y, _nan_stats(x, self.norm), _nan_stats(x, self.norm)
        if self.res_copy:
            residual = torch.empty_like(x, dtype=residual.dtype).copy_(residual)
        red, device = self.red, x.device
        mean = rstd = None
        if want_stats or self.norm.use_input_stats:
            mean = self._buffer("mean", self.stats_shape, self.acc, device)
            rstd = self._like(mean)
        ep = dict(scale_ptr=scale, shift_ptr=shift, res_ptr=residual) if self.epilogue else {}
        direct = {}
        if self.direct_running:
            direct = dict(running_mean_ptr=running_mean, running_var_ptr=running_var)
        if not self.norm.use_input_stats:
            tensors = dict(x_ptr=x, out_ptr=y, weight_ptr=weight, bias_ptr=bias,
                           running_mean_ptr=running_mean, running_var_ptr=running_var,
                           mean_ptr=mean, rstd_ptr=rstd, **ep, eps=eps)  # fmt: skip
            self._step("apply", tensors, lambda: apply_.bind_apply(
                red, tensors, source=apply_.RUNNING, extras=self.extras))  # fmt: skip
            return y, mean, rstd
        partials = None
        if not self.fused or self.sample_running:
            splits = self.max_split if not self.fused else 1
            partials = self._buffer("partials", (3, splits, red.rows, red.groups), self.acc,
                                    device)  # fmt: skip
        if self.fused:
            tensors = dict(x_ptr=x, y_ptr=y, weight_ptr=weight, bias_ptr=bias, mean_ptr=mean,
                           rstd_ptr=rstd, partial_ptr=partials, **direct, **ep, eps=eps,
                           momentum=momentum)  # fmt: skip
            self._step("stats", tensors, lambda: stats.bind_statistics(
                red, tensors, fused=True, extras=self.extras))  # fmt: skip
            if self.sample_running:
                self._finalize(partials, 1, mean, rstd, None, weight, bias, running_mean,
                               running_var, momentum, eps)  # fmt: skip
            return y, mean, rstd
        tensors = dict(x_ptr=x, partial_ptr=partials)
        launched = self._step("stats", tensors, lambda: stats.bind_statistics(
            red, tensors, fused=False, extras=NO_EPILOGUE))  # fmt: skip
        num_partials = launched.cfg.kwargs["SPLIT"]
        strides = (partials.stride(0), partials.stride(1))
        if _fold(num_partials) and not self.sample_running:
            tensors = dict(x_ptr=x, out_ptr=y, weight_ptr=weight, bias_ptr=bias,
                           partial_ptr=partials, mean_ptr=mean, rstd_ptr=rstd, **direct, **ep,
                           eps=eps, momentum=momentum)  # fmt: skip
            self._step("apply", tensors, lambda: apply_.bind_apply(
                red, tensors, source=apply_.STATS_PARTIALS, extras=self.extras,
                num_partials=num_partials, partial_strides=strides))  # fmt: skip
            return y, mean, rstd
        coef = self._buffer("coef", (4, red.rows, red.view.C), self.acc, device)
        self._finalize(partials, num_partials, mean, rstd, coef, weight, bias, running_mean,
                       running_var, momentum, eps)  # fmt: skip
        tensors = dict(x_ptr=x, out_ptr=y, coef_ptr=coef, **ep)
        self._step("apply", tensors, lambda: apply_.bind_apply(
            red, tensors, source=apply_.COEFFICIENTS, extras=self.extras))  # fmt: skip
        return y, mean, rstd

    def _finalize(self, partials, num_partials, mean, rstd, coef, weight, bias, running_mean,
                  running_var, momentum, eps) -> None:  # fmt: skip
        """Combine the partials (mean, rstd), update the running statistics (in place) and, with
        ``coef``, write the apply coefficients."""
        if not self.running:
            running_mean = running_var = None
        tensors = dict(
            partial_ptr=partials, mean_ptr=mean, rstd_ptr=rstd, coef_ptr=coef,
            weight_ptr=weight, bias_ptr=bias, running_mean_ptr=running_mean,
            running_var_ptr=running_var, new_running_mean_ptr=running_mean,
            new_running_var_ptr=running_var, momentum=momentum, eps=eps,
        )  # fmt: skip
        red = self.red
        self._step("finalize", tensors, lambda: stats.bind_finalize(
            red, tensors, num_partials, update=self.running,
            partial_strides=(partials.stride(0), partials.stride(1))))  # fmt: skip


def _cache_size() -> int:
    value = os.environ.get("TRITONNORM_PLAN_CACHE_SIZE", "")
    if not value:
        return 1024
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TRITONNORM_PLAN_CACHE_SIZE must be a positive integer, got {value!r}")
    return int(value)


# How many forward plans, and how many backward plans, are kept (each 10-20 kB of Python
# objects: bound launches, generated replays): 1024 by default, TRITONNORM_PLAN_CACHE_SIZE at
# import, set_plan_cache_size() at run time. A model's layers share the plans of equal shapes,
# so a model needs about twice its distinct norm input shapes.
PLAN_CACHE_SIZE = _cache_size()
_forward_plans = LRU(PLAN_CACHE_SIZE)
_backward_plans = LRU(PLAN_CACHE_SIZE)


def set_plan_cache_size(size: int) -> int:
    """Keep at most ``size`` forward and ``size`` backward plans (least recently used evicted
    first); returns the previous bound."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"the plan cache size must be a positive integer, got {size!r}")
    previous = _forward_plans.size
    for cache in (_forward_plans, _backward_plans):
        cache.size = size
        cache.shrink()
    return previous


def plan_counts() -> dict[str, int]:
    """How many plans are cached: {"forward": n, "backward": m}."""
    return {"forward": len(_forward_plans), "backward": len(_backward_plans)}


def clear_plans() -> None:
    """Forget every plan (after changing what the plans were built from: target_programs)."""
    _forward_plans.clear()
    _backward_plans.clear()


def _epilogue_key(ep: Epilogue | None) -> tuple:
    if ep is None or not ep.present:
        return ()
    scale, shift, res = ep.scale, ep.shift, ep.residual
    return (None if scale is None else scale.dtype, None if shift is None else shift.dtype,
            None if res is None else (res.dtype, res.stride()), ep.activation, ep.slope)  # fmt: skip


def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    norm: Norm,
    momentum: float,
    eps: float,
    epilogue: Epilogue | None = None,
    running_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    want_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y, mean, rstd for x of shape (N, C, *spatial); mean and rstd are ``norm.stats_shape``
    in the statistics' dtype (None in eval without ``want_stats``). With input statistics, the
    updated running statistics go to ``running_out`` (default: in place). An ``epilogue`` is
    applied where y is written. Weight, bias and the running statistics must be contiguous."""
    running = norm.use_input_stats and running_mean is not None and running_var is not None
    if running and running_out is not None:
        running_out[0].copy_(running_mean), running_out[1].copy_(running_var)
        running_mean, running_var = running_out
    key = (
        x.shape, x.stride(), x.dtype, x.device, norm,
        None if weight is None else weight.dtype, None if bias is None else bias.dtype,
        None if running_mean is None else running_mean.dtype, running, _epilogue_key(epilogue),
        config._overrides, tuning._enabled,
    )  # fmt: skip
    plan_ = _forward_plans.get(key)
    if plan_ is not None:
        if _forward_plans.crowded:
            _forward_plans.move_to_end(key)
    else:
        if not is_dense(x):  # other strides: one copy, then the plan of the dense layout
            return forward(
                x.contiguous(), weight, bias, running_mean, running_var, norm=norm,
                momentum=momentum, eps=eps, epilogue=epilogue, want_stats=want_stats,
            )  # fmt: skip
        kind = PositionForwardPlan if norm.per_position else ForwardPlan
        plan_ = _forward_plans[key] = kind(x, norm, epilogue, running)
        plan_.device = device_index(x)
    variant = () if want_stats else (False,)
    if plan_.epilogue is None:
        return plan_.run(x, weight, bias, running_mean, running_var, None, None, None, momentum,
                         eps, variant=variant)  # fmt: skip
    ep = epilogue
    return plan_.run(x, weight, bias, running_mean, running_var, ep.scale, ep.shift, ep.residual,
                     momentum, eps, variant=variant)  # fmt: skip


def _in_x_layout(plan_, x, dy, residual, output) -> tuple:
    """dy, the residual and the forward's output, copied into x's layout where a backward plan
    cannot read them as they are (``plan_.dy_copy``, ``plan_.res_copy``, ``plan_.y_copy``)."""
    if plan_.dy_copy:
        dy = torch.empty_like(x, dtype=dy.dtype).copy_(dy)
    if plan_.res_copy:
        residual = torch.empty_like(x, dtype=residual.dtype).copy_(residual)
    if plan_.y_copy:
        output = torch.empty_like(x, dtype=output.dtype).copy_(output)
    return dy, residual, output


def _output_copy(x: torch.Tensor, output: torch.Tensor | None) -> bool:
    """Whether the forward's output (read at x's offsets) must be copied into x's layout: it
    is written in x's layout, so only a caller's other layout (torch.compile) needs it."""
    return output is not None and not same_offsets(output, x)


def _empty_grads(x, scale, mask, param_dtype, grad_dtypes) -> tuple:
    """The gradients of an empty input: zero parameter gradients, empty dx."""
    C = x.shape[1]
    zeros = lambda: torch.zeros(C, dtype=param_dtype, device=x.device)
    dscale_dtype, dshift_dtype, dres_dtype = grad_dtypes
    dx = torch.empty_like(x)
    dw = zeros() if mask[1] else None
    db = zeros() if mask[2] else None
    dsc = torch.zeros_like(scale, dtype=dscale_dtype) if mask[3] and scale is not None else None
    dsh = torch.zeros_like(scale, dtype=dshift_dtype) if mask[4] and scale is not None else None
    dres = torch.empty_like(x, dtype=dres_dtype) if mask[5] else None
    return dx, dw, db, dsc, dsh, dres


def _extra_grad_dtypes(x, ep: Epilogue | None, output) -> tuple:
    if ep is None:
        return None, None, x.dtype
    return extra_grad_dtypes(x.dtype, ep.scale, ep.shift, ep.residual, output)


def extra_grad_dtypes(x_dtype: torch.dtype, scale, shift, residual, output) -> tuple:
    """The dtypes the kernels write dscale, dshift and dresidual in (the caller casts each to
    its tensor's): each its tensor's; the residual's gradient in the output's where the op kept
    the output instead of the residual (at least as wide); all float64 for float64 input
    (Triton's interpreter stores float64 into bfloat16 wrongly)."""
    if x_dtype == torch.float64:
        return torch.float64, torch.float64, torch.float64
    dscale = None if scale is None else scale.dtype
    dshift = dscale if shift is None else shift.dtype
    if residual is not None:
        return dscale, dshift, residual.dtype
    return dscale, dshift, x_dtype if output is None else output.dtype


def _z_inputs(ep: Epilogue, output, shift, residual) -> tuple:
    """shift and the residual as the backward kernels take them: only to recompute the
    pre-activation z, i.e. with an activation whose derivative is not read off the output."""
    if ep.activation and output is None:
        return shift, residual
    return None, None


class BackwardPlan(_Plan):
    """The backward of one kind of call: dx and, as ``output_mask`` asks, dweight, dbias,
    dscale, dshift, dresidual. Launches of the plain backward:

    - a reduction that fits one tile: the gradient kernel writes dx from registers, and with the
      batch reduced dweight and dbias - 1 launch (+ finalize: dweight and dbias summed over the
      samples of InstanceNorm and GroupNorm);
    - eval without parameter gradients: apply (dx = w rstd dy) - 1 launch; with them, the
      gradient sums write dx on the way, then finalize (dweight, dbias) - 2 launches, 3 passes;
    - streamed, one channel per statistic: gradient-sum partials, then apply (GRAD_PARTIALS),
      whose owner programs write dweight and dbias - 2 launches; GroupNorm's groups, or many
      partials, add a finalize between them - 3."""

    def __init__(self, x, dy, norm: Norm, epilogue: Epilogue | None, output_mask: tuple,
                 output, weight_dtype, has_bias: bool):  # fmt: skip
        super().__init__()
        ep = epilogue if epilogue is not None and epilogue.present else None
        self.norm, self.epilogue = norm, ep
        self.mask = output_mask
        self.param_grads = output_mask[1] or output_mask[2]
        self.empty = x.numel() == 0
        fold = norm.batch_reduced and ep is None
        self.red = red = reduction_of(tuple(x.shape), x.stride(), x.dtype, norm, fold)
        self.acc = red.acc_dtype
        self.param_dtype = weight_dtype or self.acc
        self.grad_dtypes = _extra_grad_dtypes(x, ep, output)
        if self.empty:
            return
        self.dy_view, self.dy_copy = view_or_copy(dy, red.view)
        self.res_view, self.res_copy = _residual_view(ep, red.view)
        self.y_copy = _output_copy(x, output)
        self.fused = norm.use_input_stats and _fused(red, backward=True)
        self.max_split = config.max_split(red, self.fused, backward=True)
        if ep is not None:
            # Sums per (sample, channel) even with the batch reduced: per-sample scale/shift.
            self.epi_red = Reduction(red.view, red.group_size, False, red.dtype)
            self.extras = _epilogue_constants(ep, self.res_view, force=True)
            # On chip when an instance or group fits one tile (not BatchNorm: its dx needs sums
            # over the batch).
            self.epi_fused = (
                norm.use_input_stats and not red.reduce_batch
                and _fused(red, backward=True, epilogue=True)
            )  # fmt: skip
            self.epi_max_split = config.max_split(self.epi_red, self.epi_fused, True, True)

    def _run(self, dy, x, weight, bias, mean, rstd, scale=None, shift=None, residual=None,
             output=None):  # fmt: skip
        if self.empty:
            return _empty_grads(x, scale, self.mask, self.param_dtype, self.grad_dtypes)
        dy, residual, output = _in_x_layout(self, x, dy, residual, output)
        if self.epilogue is not None:
            return self._run_epilogue(dy, x, weight, bias, mean, rstd, scale, shift, residual,
                                      output)  # fmt: skip
        return self._run_plain(dy, x, weight, mean, rstd)

    def _run_epilogue(self, dy, x, weight, bias, mean, rstd, scale, shift, residual, output):
        """y = act((x_hat * w + b) * scale + shift + residual), x_hat and the pre-activation z
        recomputed from x and the saved statistics. With g = dy * act'(z) and du = g * scale
        (the gradient of u = x_hat * w + b): dresidual = g; dshift[n, c] = sum_s g;
        dscale[n, c] = w sum_s(g x_hat) + b sum_s g; dx, dweight, dbias are the plain op's
        formulas applied to du. Launches: per-(sample, channel) sums of g and g x_hat (reads x,
        dy and, with an activation, the residual or the forward's ``output``), then finalize
        (dscale, dshift, dweight, dbias, the dx coefficients), then apply (reads them again;
        writes dx and dresidual); an instance or group that fits one program writes dx and
        dresidual in the first launch."""
        red, device, ep = self.epi_red, x.device, self.epilogue
        view = red.view
        dx = self._like(x)
        dres = self._like(x, self.grad_dtypes[2]) if self.mask[5] else None
        dweight = dbias = dscale = dshift = None
        if self.param_grads:
            dweight = self._buffer("dweight", view.C, self.param_dtype, device)
            dbias = self._like(dweight)
        if (self.mask[3] or self.mask[4]) and scale is not None:
            dscale, dshift = self._per_sample_grads(scale)
        fused = self.epi_fused
        sums = self._buffer("sums", (2, self.epi_max_split, view.N, view.C), self.acc, device)
        shift, residual_arg = _z_inputs(ep, output, shift, residual)
        tensors = dict(x_ptr=x, dy_ptr=dy, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
                       bias_ptr=bias, partial_ptr=sums, scale_ptr=scale, shift_ptr=shift,
                       res_ptr=residual_arg, y_ptr=output)  # fmt: skip
        if fused:
            tensors.update(dx_ptr=dx, dres_ptr=dres)
        launched = self._step("grad", tensors, lambda: grad.bind_gradient_sums(
            red, tensors, dy_view=self.dy_view, fused=fused, extras=self.extras,
            stats_shared=self.red.reduce_batch))  # fmt: skip
        if fused and dweight is None and dscale is None:
            return dx, None, None, None, None, dres
        num_partials = launched.cfg.kwargs["SPLIT"]
        coef = None
        if not fused:
            coef = self._buffer("coef", (4, self.red.rows, view.C), self.acc, device)
        tensors = dict(partial_ptr=sums, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
                       bias_ptr=bias, dweight_ptr=dweight, dbias_ptr=dbias, coef_ptr=coef,
                       scale_ptr=scale, dscale_ptr=dscale, dshift_ptr=dshift)  # fmt: skip
        self._step("finalize", tensors, lambda: grad.bind_finalize(
            red, tensors, num_partials, partial_strides=(sums.stride(0), sums.stride(1)),
            count=self.red.count, use_input_stats=self.norm.use_input_stats,
            param_grads=self.param_grads, epilogue=True,
            stats_shared=self.red.reduce_batch))  # fmt: skip
        if fused:
            return dx, dweight, dbias, dscale, dshift, dres
        with_z = ep.activation and output is None
        tensors = dict(x_ptr=x, dy_ptr=dy, out_ptr=dx, coef_ptr=coef, scale_ptr=scale,
                       shift_ptr=shift, res_ptr=residual_arg, dres_ptr=dres, y_ptr=output,
                       mean_ptr=mean if with_z else None, rstd_ptr=rstd if with_z else None,
                       weight_ptr=weight if with_z else None,
                       bias_ptr=bias if with_z else None)  # fmt: skip
        coef_red = Reduction(view, red.group_size, self.red.reduce_batch, red.dtype)
        self._step("apply", tensors, lambda: apply_.bind_apply(
            coef_red, tensors, source=apply_.COEFFICIENTS, dy_view=self.dy_view,
            extras=self.extras))  # fmt: skip
        return dx, dweight, dbias, dscale, dshift, dres

    def _run_plain(self, dy, x, weight, mean, rstd):
        red, norm, device = self.red, self.norm, x.device
        dx = self._like(x)
        dweight = dbias = None
        if self.param_grads:
            dweight = self._buffer("dweight", red.view.C, self.param_dtype, device)
            dbias = self._like(dweight)
        dy_view = self.dy_view
        if not norm.use_input_stats and not self.param_grads:  # dx = w rstd dy
            tensors = dict(dy_ptr=dy, out_ptr=dx, weight_ptr=weight, mean_ptr=mean, rstd_ptr=rstd)
            self._step("apply", tensors, lambda: apply_.bind_apply(
                red, tensors, source=apply_.GRAD_PARTIALS, dy_view=dy_view,
                use_input_stats=False))  # fmt: skip
            return dx, None, None, None, None, None
        if not norm.use_input_stats:  # eval with dweight/dbias: dx written by the sums' pass
            sums = self._buffer("sums", (2, self.max_split, red.rows, red.view.C), self.acc,
                                device)  # fmt: skip
            tensors = dict(x_ptr=x, dy_ptr=dy, dx_ptr=dx, mean_ptr=mean, rstd_ptr=rstd,
                           weight_ptr=weight, partial_ptr=sums)  # fmt: skip
            launched = self._step("grad", tensors, lambda: grad.bind_gradient_sums(
                red, tensors, dy_view=dy_view, fused=False))  # fmt: skip
            self._finalize(sums, launched.cfg.kwargs["SPLIT"], mean, rstd, weight, dweight, dbias,
                           None)  # fmt: skip
            return dx, dweight, dbias, None, None, None
        direct = self.fused and red.reduce_batch
        sums = None
        if not (self.fused and (direct or not self.param_grads)):
            splits = self.max_split
            sums = self._buffer("sums", (2, splits, red.rows, red.view.C), self.acc, device)
        tensors = dict(x_ptr=x, dy_ptr=dy, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
                       partial_ptr=sums)  # fmt: skip
        if self.fused:
            tensors.update(dx_ptr=dx)
            if direct:
                tensors.update(dweight_ptr=dweight, dbias_ptr=dbias)
        launched = self._step("grad", tensors, lambda: grad.bind_gradient_sums(
            red, tensors, dy_view=dy_view, fused=self.fused))  # fmt: skip
        if self.fused:
            if sums is not None:
                self._finalize(sums, 1, mean, rstd, weight, dweight, dbias, None)
            return dx, dweight, dbias, None, None, None
        num_partials = launched.cfg.kwargs["SPLIT"]
        strides = (sums.stride(0), sums.stride(1))
        x_in = x if norm.use_input_stats else None
        if red.group_size == 1 and _fold(num_partials):
            tensors = dict(x_ptr=x_in, dy_ptr=dy, out_ptr=dx, weight_ptr=weight, partial_ptr=sums,
                           mean_ptr=mean, rstd_ptr=rstd, dweight_ptr=dweight, dbias_ptr=dbias)  # fmt: skip
            self._step("apply", tensors, lambda: apply_.bind_apply(
                red, tensors, source=apply_.GRAD_PARTIALS, dy_view=dy_view, num_partials=num_partials,
                partial_strides=strides, use_input_stats=norm.use_input_stats))  # fmt: skip
            return dx, dweight, dbias, None, None, None
        coef = self._buffer("coef", (4, red.rows, red.view.C), self.acc, device)
        self._finalize(sums, num_partials, mean, rstd, weight, dweight, dbias, coef)
        tensors = dict(x_ptr=x_in, dy_ptr=dy, out_ptr=dx, coef_ptr=coef)
        self._step("apply", tensors, lambda: apply_.bind_apply(
            red, tensors, source=apply_.COEFFICIENTS, dy_view=dy_view))  # fmt: skip
        return dx, dweight, dbias, None, None, None

    def _finalize(self, sums, num_partials, mean, rstd, weight, dweight, dbias, coef) -> None:
        tensors = dict(partial_ptr=sums, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
                       dweight_ptr=dweight, dbias_ptr=dbias, coef_ptr=coef)  # fmt: skip
        red = self.red
        self._step("finalize", tensors, lambda: grad.bind_finalize(
            red, tensors, num_partials, partial_strides=(sums.stride(0), sums.stride(1)),
            count=red.count, use_input_stats=self.norm.use_input_stats,
            param_grads=self.param_grads))  # fmt: skip


class PositionForwardPlan(_Plan):
    """The forward across the channels at each position (LayerNorm2d, RMSNorm2d): one launch
    writes y, mean and rstd (positions.py); a program holds whole channel vectors."""

    def __init__(self, x: torch.Tensor, norm: Norm, epilogue: Epilogue | None,
                 running: bool = False):  # fmt: skip
        super().__init__()
        ep = epilogue if epilogue is not None and epilogue.present else None
        self.norm, self.epilogue = norm, ep
        self.empty = x.numel() == 0
        self.red = red = reduction_of(tuple(x.shape), x.stride(), x.dtype, norm, False)
        self.stats_shape = norm.stats_shape(tuple(x.shape))
        self.y_dtype = _y_dtype(x, ep)
        self.res_view, self.res_copy = _residual_view(ep, red.view)
        self.extras = _epilogue_constants(ep, self.res_view)

    def _run(self, x, weight, bias, running_mean, running_var, scale, shift, residual, momentum,
             eps, want_stats=True):  # fmt: skip
        y = self._like(x, self.y_dtype)
        if self.empty:
            return y, _nan_stats(x, self.norm), _nan_stats(x, self.norm)
        if self.res_copy:
            residual = torch.empty_like(x, dtype=residual.dtype).copy_(residual)
        mean = self._buffer("mean", self.stats_shape, self.red.acc_dtype, x.device)
        rstd = self._like(mean)
        ep = dict(scale_ptr=scale, shift_ptr=shift, res_ptr=residual) if self.epilogue else {}
        tensors = dict(x_ptr=x, y_ptr=y, weight_ptr=weight, bias_ptr=bias, mean_ptr=mean,
                       rstd_ptr=rstd, **ep, eps=eps)  # fmt: skip
        self._step("forward", tensors, lambda: positions.bind_forward(
            self.red, tensors, centred=self.norm.centred, extras=self.extras))  # fmt: skip
        return y, mean, rstd


class PositionBackwardPlan(_Plan):
    """The backward across the channels at each position: one launch writes dx (and
    dresidual), with per-channel partial sums when dweight, dbias, dscale or dshift are asked
    for; then grad.py's finalize adds them in a fixed order - 1 or 2 launches, 3 passes."""

    def __init__(self, x, dy, norm: Norm, epilogue: Epilogue | None, output_mask: tuple,
                 output, weight_dtype, has_bias: bool = True):  # fmt: skip
        super().__init__()
        ep = epilogue if epilogue is not None and epilogue.present else None
        self.norm, self.epilogue, self.mask = norm, ep, output_mask
        self.empty = x.numel() == 0
        self.red = red = reduction_of(tuple(x.shape), x.stride(), x.dtype, norm, False)
        self.param_dtype = weight_dtype or red.acc_dtype
        self.grad_dtypes = _extra_grad_dtypes(x, ep, output)
        self.param_grads = output_mask[1] or output_mask[2]
        # dscale and dshift are sums per sample: partials per sample
        self.per_sample = ep is not None and ep.scale is not None and any(output_mask[3:5])
        self.sums = self.param_grads or self.per_sample
        if self.empty:
            return
        self.dy_view, self.dy_copy = view_or_copy(dy, red.view)
        self.res_view, self.res_copy = _residual_view(ep, red.view)
        self.y_copy = _output_copy(x, output)
        self.extras = _epilogue_constants(ep, self.res_view, force=True) if ep else NO_EPILOGUE
        v = red.view
        candidates = config.position_configs(
            red, True, self.extras["EPILOGUE"], sums=True, per_sample=self.per_sample
        )
        self.max_split = max(c.kwargs["SPLIT"] for c in candidates.configs)
        # the partials as grad.py's finalize sees them: (rows, C), one channel per statistic
        rows = v.N if self.per_sample else 1
        self.sums_red = Reduction(View(rows, v.C, 1, v.C, 1, 1), 1, not self.per_sample, red.dtype)

    def _run(self, dy, x, weight, bias, mean, rstd, scale=None, shift=None, residual=None,
             output=None):  # fmt: skip
        if self.empty:
            return _empty_grads(x, scale, self.mask, self.param_dtype, self.grad_dtypes)
        dy, residual, output = _in_x_layout(self, x, dy, residual, output)
        ep, device, C = self.epilogue, x.device, x.shape[1]
        dx = self._like(x)
        dres = self._like(x, self.grad_dtypes[2]) if ep is not None and self.mask[5] else None
        sums = None
        if self.sums:
            rows = self.sums_red.rows
            sums = self._buffer("sums", (2, self.max_split, rows, C), self.red.acc_dtype,
                                device)  # fmt: skip
        tensors = dict(x_ptr=x, dy_ptr=dy, dx_ptr=dx, mean_ptr=mean, rstd_ptr=rstd,
                       weight_ptr=weight, partial_ptr=sums)  # fmt: skip
        if ep is not None:
            shift_arg, residual_arg = _z_inputs(ep, output, shift, residual)
            tensors.update(bias_ptr=bias, scale_ptr=scale, shift_ptr=shift_arg, dres_ptr=dres,
                           res_ptr=residual_arg, y_ptr=output)  # fmt: skip
        launched = self._step("backward", tensors, lambda: positions.bind_backward(
            self.red, tensors, centred=self.norm.centred, dy_view=self.dy_view,
            per_sample=self.per_sample, partial_strides=_strides(sums),
            extras=self.extras))  # fmt: skip
        if sums is None:
            return dx, None, None, None, None, dres
        dweight = dbias = dscale = dshift = None
        if self.param_grads:
            dweight = self._buffer("dweight", C, self.param_dtype, device)
            dbias = self._like(dweight)
        if self.per_sample:
            dscale, dshift = self._per_sample_grads(scale)
        tensors = dict(partial_ptr=sums, rstd_ptr=rstd, weight_ptr=weight, bias_ptr=bias,
                       dweight_ptr=dweight, dbias_ptr=dbias, scale_ptr=scale, dscale_ptr=dscale,
                       dshift_ptr=dshift)  # fmt: skip
        num_partials = launched.cfg.kwargs["SPLIT"]
        self._step("finalize", tensors, lambda: grad.bind_finalize(
            self.sums_red, tensors, num_partials, partial_strides=_strides(sums), count=1,
            use_input_stats=True, param_grads=self.param_grads, epilogue=ep is not None))  # fmt: skip
        return dx, dweight, dbias, dscale, dshift, dres


def _strides(partials: torch.Tensor | None) -> tuple[int, int]:
    return (partials.stride(0), partials.stride(1)) if partials is not None else (0, 0)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    norm: Norm,
    epilogue: Epilogue | None = None,
    output_mask: tuple[bool, ...] = (True, True, True, False, False, False),
    output: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """dx (x's layout), dweight, dbias (weight's dtype), dscale, dshift, dresidual of
    y = act((x_hat * w + b) * scale + shift + residual) (plain: y = x_hat * w + b), each None
    unless ``output_mask`` asks for it (dx is always computed). With an epilogue, x_hat and the
    pre-activation are recomputed from x and the saved statistics; or, given the forward's
    ``output`` y (ReLU or a leaky ReLU of slope >= 0, :func:`derivative_from_output`), act'(z)
    is read off y and the epilogue needs no residual (its gradient can still be asked for)."""
    ep = epilogue if epilogue is not None and epilogue.present else None
    key = (
        x.shape, x.stride(), x.dtype, x.device, dy.stride(), dy.dtype, norm,
        None if weight is None else weight.dtype, bias is not None, _epilogue_key(ep),
        output_mask, None if output is None else (output.stride(), output.dtype), config._overrides,
        tuning._enabled,
    )  # fmt: skip
    plan_ = _backward_plans.get(key)
    if plan_ is not None:
        if _backward_plans.crowded:
            _backward_plans.move_to_end(key)
    else:
        if not is_dense(x):  # as the forward: one copy, then the dense layout's plan
            return backward(
                dy, x.contiguous(), weight, bias, mean, rstd, norm=norm, epilogue=epilogue,
                output_mask=output_mask, output=output,
            )  # fmt: skip
        kind = PositionBackwardPlan if norm.per_position else BackwardPlan
        plan_ = _backward_plans[key] = kind(
            x, dy, norm, ep, output_mask, output, _meta(weight), bias is not None
        )
        plan_.device = device_index(x)
    # The kernels write dweight and dbias (dscale and dshift) together: return what was asked.
    if ep is None:
        dx, dw, db, *_ = plan_.run(dy, x, weight, bias, mean, rstd)
        return dx, dw if output_mask[1] else None, db if output_mask[2] else None, None, None, None
    dx, dw, db, dsc, dsh, dres = plan_.run(
        dy, x, weight, bias, mean, rstd, ep.scale, ep.shift, ep.residual, output
    )
    mask = output_mask
    return (dx, dw if mask[1] else None, db if mask[2] else None, dsc if mask[3] else None,
            dsh if mask[4] else None, dres)  # fmt: skip


# --- the steps one by one (SyncBatchNorm, the epilogue backward) ------------------------------


def stats_partials(x: torch.Tensor, red: Reduction) -> tuple[torch.Tensor, int]:
    """Partials (3, P, rows, groups) of (count, mean, M2), and P."""
    max_split = config.max_split(red, False)
    partials = _partials_buffer(red, 3, max_split, red.groups, x.device)
    tensors = dict(x_ptr=x, partial_ptr=partials)
    launch = stats.bind_statistics(red, tensors, fused=False, eps=0.0, momentum=0.0,
                         extras=NO_EPILOGUE)  # fmt: skip
    launch(*tensors.values())
    return partials, launch.cfg.kwargs["SPLIT"]


def _partials_buffer(red: Reduction, slots: int, splits: int, width: int, device) -> torch.Tensor:
    return torch.empty((slots, splits, red.rows, width), dtype=red.acc_dtype, device=device)


def finalize_stats(
    red: Reduction,
    partials: torch.Tensor | None,
    num_partials: int,
    *,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    momentum: float = 0.0,
    want_coef: bool = True,
    want_combined: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mean, rstd (rows, groups), the apply coefficients (4, rows, C) and the combined
    (count, mean, M2) (3, rows, groups) from partials (3, P, rows, groups); the given running
    statistics are updated in place."""
    running_mean, running_var = running
    update = running_mean is not None
    dtype, device = red.acc_dtype, partials.device
    mean = torch.empty((red.rows, red.groups), dtype=dtype, device=device)
    rstd = torch.empty_like(mean)
    coef = torch.empty((4, red.rows, red.view.C), dtype=dtype, device=device) if want_coef else None
    combined = torch.empty((3, *mean.shape), dtype=dtype, device=device) if want_combined else None
    tensors = dict(
        partial_ptr=partials, combined_ptr=combined, mean_ptr=mean, rstd_ptr=rstd, coef_ptr=coef,
        weight_ptr=weight, bias_ptr=bias, running_mean_ptr=running_mean,
        running_var_ptr=running_var, new_running_mean_ptr=running_mean,
        new_running_var_ptr=running_var,
    )  # fmt: skip
    stats.bind_finalize(
        red, tensors, num_partials, eps=eps, momentum=momentum, update=update,
        partial_strides=(partials.stride(0), partials.stride(1)),
    )(*tensors.values())  # fmt: skip
    return mean, rstd, coef, combined


def apply(
    out: torch.Tensor,
    red: Reduction,
    coef: torch.Tensor,
    *,
    x: torch.Tensor | None,
    dy: torch.Tensor | None = None,
    dy_view: View | None = None,
) -> None:
    """out = k_x * (x - mu) + k_dy * dy + k_c with (4, rows, C) coefficients; out has x's
    strides."""
    tensors = dict(x_ptr=x, dy_ptr=dy, out_ptr=out, coef_ptr=coef)
    apply_.bind_apply(red, tensors, source=apply_.COEFFICIENTS, dy_view=dy_view)(*tensors.values())


def grad_partials(
    dy: torch.Tensor,
    dy_view: View,
    x: torch.Tensor,
    red: Reduction,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Per-channel partials (2, P, rows, C) of sum(dy) and sum(dy * x_hat), and P."""
    max_split = config.max_split(red, False, backward=True)
    partials = _partials_buffer(red, 2, max_split, red.view.C, x.device)
    tensors = dict(x_ptr=x, dy_ptr=dy, mean_ptr=mean, rstd_ptr=rstd, partial_ptr=partials)
    launch = grad.bind_gradient_sums(red, tensors, dy_view=dy_view, fused=False)
    launch(*tensors.values())
    return partials, launch.cfg.kwargs["SPLIT"]


def finalize_grad(
    red: Reduction,
    partials: torch.Tensor | None,
    num_partials: int,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    use_input_stats: bool = True,
    want_dx_coef: bool,
    want_param_grads: bool,
    count: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dweight, dbias (C,) and the dx coefficients (4, rows, C) from gradient-sum partials.
    ``count``: elements per statistic, if not this reduction's own (SyncBatchNorm's global
    batch)."""
    C = red.view.C
    device = mean.device
    coef = None
    if want_dx_coef:
        coef = torch.empty((4, red.rows, C), dtype=mean.dtype, device=device)
    param_dtype = weight.dtype if weight is not None else mean.dtype
    dweight = dbias = None
    if want_param_grads:
        dweight = torch.empty(C, dtype=param_dtype, device=device)
        dbias = torch.empty(C, dtype=param_dtype, device=device)
    strides = (partials.stride(0), partials.stride(1)) if partials is not None else (0, 0)
    tensors = dict(partial_ptr=partials, mean_ptr=mean, rstd_ptr=rstd, weight_ptr=weight,
                   dweight_ptr=dweight, dbias_ptr=dbias, coef_ptr=coef)  # fmt: skip
    grad.bind_finalize(
        red, tensors, num_partials, partial_strides=strides, count=count or red.count,
        use_input_stats=use_input_stats, param_grads=want_param_grads,
    )(*tensors.values())  # fmt: skip
    return dweight, dbias, coef
