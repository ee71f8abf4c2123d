"""The one launch seam: every tritonnorm kernel launch goes through a :class:`Kernel`.

A launch is bound once per plan (kernel, grid, config and every argument that is not a tensor)
into a :class:`Launch`, which a call then runs with its tensors:

- under the interpreter, or whenever the fast path does not apply, ``fn[grid](**arguments)``:
  Triton's JIT path (argument binding, specialisation, kernel cache, launch);
- natively, after the first run, the compiled kernel's launcher directly, with the argument list
  built once (as inductor's generated launchers do): a cached launch through ``JITFunction.run``
  costs several times the launcher itself.

The fast path is taken only while it launches exactly what the JIT path would:
- the specialisation cannot have changed: the integer arguments, None pointers, constexprs and
  dtypes are fixed by the plan, so what is left is each pointer's 16-byte alignment (Triton
  specialises on it): the fast path is recorded from a run where every pointer was aligned and
  used only while every pointer still is;
- no launch hooks are set (profilers, proton);
- the Triton release's launcher signature is one this code was written against (3.6 - 3.9).

Perf harnesses (interpreter byte counts, meta-tensor recordings, stubbed launches) hook
:func:`Kernel.run_jit` (every first launch) or Triton's launcher (every later one).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from typing import ClassVar

import torch
import triton

from . import config, tuning

try:  # the knobs module exists from Triton 3.4 on
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])
# Releases whose CompiledKernel.run takes (grid x 3, stream, function, packed metadata, launch
# metadata, enter hook, exit hook, *every argument including constexprs).
_DIRECT_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))
DIRECT = (
    not config.INTERPRET
    and _VERSION in _DIRECT_VERSIONS
    and os.environ.get("TRITONNORM_DIRECT_LAUNCH", "1") != "0"
)


_RUNTIME = getattr(_knobs, "runtime", None)


def current_stream():
    """The stream Triton launches on (the current device's current stream). Plans and launches
    make their tensors' device the current one first (:func:`switch_device`)."""
    driver = triton.runtime.driver.active
    return driver.get_current_stream(driver.get_current_device())


def device_index(t: torch.Tensor) -> int | None:
    """The CUDA device a launch on ``t`` must run on (None: the current one, e.g. CPU tensors
    under the interpreter or the host-cost emulation)."""
    return t.device.index if t.is_cuda else None


def current_device() -> int:
    """The driver's current device (torch.cuda.current_device on a GPU)."""
    return triton.runtime.driver.active.get_current_device()


def switch_device(index: int | None) -> int | None:
    """Make device ``index`` current for the launches that follow (Triton compiles for, loads
    its kernels on and launches on the current device's current stream, and a kernel loaded on
    one device cannot launch on another); returns the device to restore, None when it already
    was current (the usual case: one ``int`` comparison)."""
    if index is None:
        return None
    driver = triton.runtime.driver.active
    current = driver.get_current_device()
    if current == index:
        return None
    driver.set_current_device(index)
    return current


def restore_device(previous: int | None) -> None:
    if previous is not None:
        triton.runtime.driver.active.set_current_device(previous)


def hooks_set() -> bool:
    """Whether a launch hook is installed (Triton 3.6+ keep them in HookChain objects, empty by
    default; the direct path passes no hooks, so any installed one sends launches to the JIT).
    Every direct launch asks: spelled out, no loop."""
    if _RUNTIME is None:
        return False
    enter, exit_ = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return bool(
        (enter is not None and getattr(enter, "calls", True))
        or (exit_ is not None and getattr(exit_, "calls", True))
    )


class Kernel:
    """A ``@triton.jit`` kernel as tritonnorm launches it: :meth:`bind` a launch, then call it."""

    instances: ClassVar[list[Kernel]] = []

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        signature = inspect.signature(fn.fn)
        self.params = tuple(signature.parameters)
        self.defaults = {
            name: p.default
            for name, p in signature.parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        Kernel.instances.append(self)

    def bind(
        self,
        grid: tuple[int, ...],
        cfg: triton.Config | None,
        tensors: tuple[str, ...],
        owned: tuple[str, ...] = (),
        device: int | None = None,
        **constants,
    ) -> Launch:
        """A launch of this kernel with ``grid``, the config's meta-parameters and warps, and
        ``constants`` (every other argument, None pointers included); ``tensors`` names the
        arguments a call passes (in that order), ``owned`` those among them that are always
        tritonnorm's own scratch buffers (aligned by allocation); every other pointer can come
        from a caller, and its alignment is checked at every direct launch. ``device``: the
        CUDA device it runs on (:func:`device_index`)."""
        return Launch(self, grid, cfg, tensors, owned, constants, device)

    def run_jit(self, grid, kwargs: dict):
        """Triton's JIT path; returns the CompiledKernel (None under the interpreter or when a
        recording hook skipped the launch)."""
        return self.fn[grid](**kwargs)


class Launch:
    """One bound launch of a :class:`Kernel`, called with its tensors in the order they were
    named (see the module docstring)."""

    __slots__ = ("_direct", "_unguarded", "cfg", "checked", "constants", "device", "empty_grid",
                 "grid", "kernel", "tensors")  # fmt: skip

    def __init__(self, kernel, grid, cfg, tensors, owned, constants, device=None):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.empty_grid = self.grid[0] * self.grid[1] * self.grid[2] == 0
        self.cfg = cfg
        self.tensors = tuple(tensors)
        # the slots whose alignment a direct launch checks: all but the owned scratch buffers
        self.checked = tuple(i for i, name in enumerate(self.tensors) if name not in owned)
        self.constants = dict(constants)
        if cfg is not None:
            self.constants.update(cfg.all_kwargs())
        self.constants.update(config.LAUNCH_OPTIONS)
        self.device = device  # device_index() of its tensors: made current around each call
        self._direct = None  # the generated direct launcher (_generate), after a first run
        self._unguarded = None

    @property
    def unguarded(self) -> Callable[..., None] | None:
        """The generated direct launcher without its guards (after a first run that could make
        one), called with the current stream (:func:`current_stream`) and the tensors, by a
        caller that has checked the guards itself: every tensor passed is None exactly where it
        was at that run, every user tensor 16-byte aligned (those a plan allocates always are),
        no launch hook set (:func:`hooks_set`). The plans' replays check once for all their
        launches, and ask for the stream once."""
        return self._unguarded

    def __call__(self, *tensors) -> None:
        """Launch with the tensors named at binding, in that order, on their device."""
        previous = switch_device(self.device)
        if previous is None:
            return self._launch(tensors)
        try:
            return self._launch(tensors)
        finally:
            restore_device(previous)

    def _launch(self, tensors: tuple) -> None:
        if self.cfg is not None:
            config._chosen[self.kernel.name] = self.cfg
        direct = self._direct
        if direct is not None and direct(*tensors):
            return
        if self.empty_grid:
            return
        kwargs = dict(self.constants)
        kwargs.update(zip(self.tensors, tensors, strict=True))
        compiled = self.kernel.run_jit(self.grid, kwargs)
        if (
            DIRECT
            and compiled is not None
            and all(not isinstance(t, torch.Tensor) or not t.data_ptr() & 15 for t in tensors)
        ):
            self._direct = self._generate(compiled, kwargs, tensors)

    def _generate(self, compiled, kwargs: dict, tensors: tuple) -> Callable[..., bool]:
        """The direct launcher of this launch, generated as Python source once (as inductor's
        launchers are): the compiled kernel's ``run`` with every constant written in as a
        literal and the tensors in their slots; it returns False, launching nothing, when a
        guard fails (a pointer not 16-byte aligned, a tensor where None was recorded or the
        reverse, a launch hook set): the JIT path then decides."""
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        params, defaults = self.kernel.params, self.kernel.defaults
        slot_of = {params.index(name): i for i, name in enumerate(self.tensors)}
        scope = dict(
            run=compiled.run, function=compiled.function, packed=compiled.packed_metadata,
            stream=triton.runtime.driver.active.get_current_stream,
            device=triton.runtime.driver.active.get_current_device, hooks_set=hooks_set,
        )  # fmt: skip
        args = []
        for j, name in enumerate(params):
            if j in slot_of:
                args.append(f"t{slot_of[j]}")
                continue
            value = kwargs[name] if name in kwargs else defaults[name]
            if (
                value is None
                or type(value) in (bool, int, str)
                or (type(value) is float and math.isfinite(value))
            ):
                args.append(repr(value))
            else:  # anything else by name
                scope[f"c{j}"] = value
                args.append(f"c{j}")
        names = [f"t{i}" for i in range(len(tensors))]
        guards = [f"{n} is {'' if t is None else 'not '}None"
                  for n, t in zip(names, tensors, strict=True)]  # fmt: skip
        aligned = [
            f"{names[i]}.data_ptr()" for i in self.checked if isinstance(tensors[i], torch.Tensor)
        ]
        if aligned:
            guards.append(f"not ({' | '.join(aligned)}) & 15")
        guards.append("not hooks_set()")
        g0, g1, g2 = self.grid
        run = (
            f"run({g0}, {g1}, {g2}, stream(device()), function, packed, None, None, None, "
            f"{', '.join(args)})"
        )
        source = (
            f"def launch({', '.join(names)}):\n"
            f"    if not ({' and '.join(guards)}):\n"
            f"        return False\n"
            f"    {run}\n"
            f"    return True\n"
            f"def unguarded({', '.join(['stream_handle', *names])}):\n"
            f"    {run.replace('stream(device())', 'stream_handle')}\n"
        )
        exec(compile(source, f"<tritonnorm launcher {self.kernel.name}>", "exec"), scope)
        self._unguarded = scope["unguarded"]
        return scope["launch"]


# --- binding a launch ---------------------------------------------------------------------------

# The scratch buffers only tritonnorm allocates (partials, coefficients, combined statistics):
# aligned by allocation, so a direct launch need not check them. Every other pointer is
# checked (a pointer added later is checked unless it is listed here: the safe default).
OWNED = ("partial_ptr", "coef_ptr", "combined_ptr")
# The epilogue constants of a launch without one (tensors: None pointers, bind fills them).
NO_EPILOGUE = dict(
    res_stride_n=0, res_stride_c=0, res_stride_s=0, slope=0.0, EPILOGUE=False, ACTIVATION=0
)


def index_64(*views) -> bool:
    """Whether element offsets over these (N, C, S) views need int64."""
    return config.index_64(max(v.span for v in views if v is not None))


def _bucket(red) -> tuple:
    """A tuned result's shape key: the view with its batch and long axes rounded up to powers
    of two (a smaller last batch reuses the full batch's result)."""
    v = red.view
    return (config._pow2(v.N), v.C, config._pow2(v.S), red.group_size, red.reduce_batch,
            v.channels_fast, red.acc_dtype.itemsize)  # fmt: skip


class _Bench:
    """Runs one candidate config of a launch with real tensors (the autotuner's timing)."""

    def __init__(self, kernel: Kernel, grid_of, tensors: dict, constants: dict):
        self.kernel, self.grid_of = kernel, grid_of
        self.tensors, self.constants = tensors, constants
        self.device = next(t.device for t in tensors.values() if isinstance(t, torch.Tensor))

    def __call__(self, cfg) -> None:
        kwargs = {**self.constants, **self.tensors, **cfg.all_kwargs(), **config.LAUNCH_OPTIONS}
        previous = switch_device(device_index_of_tensors(self.tensors))
        try:
            self.kernel.run_jit(self.grid_of(cfg.kwargs), kwargs)
        finally:
            restore_device(previous)


def bind(
    kernel: Kernel, red, tensors: dict, constants: dict, *, candidates=None,
    fused: bool = False, grid_of=None, grid=None,
) -> Launch:  # fmt: skip
    """A launch of ``kernel`` over the reduction ``red`` passing ``tensors`` (names -> this
    call's tensors, None allowed) at every call; every other pointer argument is None. With
    ``candidates``, the config is chosen (tuning.py; the tensors serve the timing) and the grid
    is ``grid_of(its meta-parameters)``."""
    # what a call passes (tensors, and runtime scalars such as momentum) is not bound
    constants = {k: v for k, v in constants.items() if k not in tensors}
    for name in kernel.params:
        if name.endswith("_ptr") and name not in tensors:
            constants[name] = None
    cfg = None
    if candidates is not None:
        # what specialises the kernel: its constexpr switches and which pointers are None
        flags = tuple(sorted((k, v) for k, v in constants.items() if k.isupper()))
        flags += (tuple(name for name, t in tensors.items() if t is None),)
        bench = _Bench(kernel, grid_of, tensors, constants) if tuning.enabled() else None
        device = bench.device if bench is not None else torch.device("cpu")
        cfg = tuning.choose(
            kernel, candidates, shape=red, fused=fused, flags=flags, bucket=_bucket(red),
            device=device, bench=bench,
        )  # fmt: skip
        grid = grid_of(cfg.kwargs)
    device = device_index_of_tensors(tensors)
    return kernel.bind(grid, cfg, tuple(tensors), OWNED, device, **constants)


def device_index_of_tensors(tensors: dict) -> int | None:
    """:func:`device_index` of a launch's first tensor."""
    first = next((t for t in tensors.values() if isinstance(t, torch.Tensor)), None)
    return None if first is None else device_index(first)
