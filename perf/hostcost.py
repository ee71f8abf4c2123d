"""``python -m perf.hostcost``: what one call costs the host, on a machine without a GPU.

How: tritonnorm's CUDA code path runs on CPU tensors through Triton's real launch path, i.e.
``JITFunction.run`` (binder, specialisation, cache key, kernel cache, global checks), a real
``CompiledKernel`` and Triton's real C launcher (built by Triton with gcc: the generated
per-signature launcher of Triton 3.6, the generic ``cuda_utils.launch`` of 3.9), against a stub
CUDA driver library (perf/stub_cuda.c: every function returns success, cuLaunchKernelEx counts
its calls), with compilation stubbed (a ``CompiledKernel`` made from the kernel's real signature
and options, with placeholder binary and no shared memory). No kernel runs, so the tensors are
``torch.empty`` of the report's real quick shapes in bf16 (their pages are never touched).

What is replaced, all in :func:`install` (Triton-facing, nothing of tritonnorm):
- ``libcuda.so.1``: the stub, built with gcc into a cache directory, loaded first (so Triton's
  modules linked against libcuda.so.1, and its dlopen of it, find it) and named by
  ``TRITON_LIBCUDA_PATH`` (Triton links its C modules against that directory).
- ``triton.runtime.driver.active``: Triton's own ``CudaDriver`` over the stub, with
  ``get_current_device()`` 0, ``get_current_stream(device)`` 0, capability (9, 0) (torch.cuda,
  which ``CudaDriver`` would ask, is unavailable) and a benchmarker that runs each autotuning
  candidate once and reports them all equal (the first, heuristic, candidate wins).
- ``triton.compiler.compile`` (what ``JITFunction`` binds as its compile step): the stub above.
  Its calls are counted: compiles after warm-up are recompiles.
- glibc's malloc keeps freed blocks (as CUDA's caching allocator does): otherwise every tensor
  above 32 MB would cost an mmap and munmap, 12 us here against ~1 us on the GPU path.
and in :func:`route_cpu_tensors_to_triton` (the only tritonnorm-facing patches): CPU tensors take
tritonnorm's Triton path although the interpreter is off, as the stub's device 0.

Measured per op of the quick set (:data:`CASES`), in one process:
- ``launches``: calls of Triton's launcher during one call (recorded on the launcher class), by
  kernel; ``driver_launches_per_call``: cuLaunchKernelEx calls per timed call (the stub's count).
- torch's aten ops during one call (a ``TorchDispatchMode``), as allocations (``empty``,
  ``empty_strided``, ``empty_like``, ``new_empty``, ``new_empty_strided``), views (metadata
  only) and kernels (everything else: what would be a GPU kernel).
- ``recompiles_after_warmup``: compile-stub calls after the warm-up calls.
- ``us_per_call``: CPU time (``time.process_time``) per call, best of several blocks: the
  public function (``tn.group_norm(x, 32, w, b, eps=..., scale=..., ...)``) with its arguments
  bound (``perf.ops.bound_call``), plus ``torch.autograd.grad`` for a backward.
- ``floor_us``: in the same blocks, the same compiled kernels launched directly (each launch's
  exact arguments recorded during a warm call, replayed through the launcher), the op's outputs
  allocated and an empty ``torch.autograd.Function`` taking the op's inputs (and, for a backward,
  allocating their gradients): what any Python-level op pays. ``floor_launch_us``: the direct
  launches alone. ``ratio`` = us_per_call / floor_us; issue 15's target is <= 2.

JSON (``--json FILE``), schema 1::

    {"schema": 1, "tool": "perf.hostcost", "triton": str, "torch": str, "python": str,
     "calls": int, "blocks": int, "warmup": int, "target_ratio": 2.0,
     "caching_allocations": bool,
     "cases": {name: {
         "norm": str, "epilogue": str | null, "backward": bool, "shape": [int], "dtype": str,
         "launches": int, "launches_by_kernel": {kernel: int},
         "driver_launches_per_call": float,
         "torch_kernels": int, "torch_kernel_ops": {aten op: int},
         "allocations": int, "allocation_ops": {aten op: int},
         "views": int, "view_ops": {aten op: int},
         "jit_launches": int (launches of the measured call that went through Triton's
                              JITFunction.run rather than tritonnorm's direct path),
         "compiles_in_warmup": int, "recompiles_after_warmup": int,
         "us_per_call": float, "floor_us": float, "floor_launch_us": float, "ratio": float}}}

Absolute microseconds depend on the machine (and its load: best of ``--blocks``); the counts do
not. The interpreter must be off: run it as its own process (``TRITON_INTERPRET`` unset;
:func:`run_subprocess` does that from a process that has it on, as the test suite does).

Where it differs from a GPU: torch.cuda is unavailable, so tritonnorm sizes split reductions for
4 programs instead of 4 per SM (other split candidates, the same launches); nothing is autotuned
(the default), so every launch uses the heuristic candidate. The warm-up is 3 calls.

Triton versions: 3.6 (torch 2.11 on the lent GPU machines) and 3.9 run this file unchanged. Both
make the launcher with ``driver.active.launcher_cls(src, metadata)`` and call it with the same
arguments (3.6 builds a C launcher per signature with gcc, 3.9 one generic ``cuda_utils.launch``);
both ``CompiledKernel``s take (src, metadata files, hash) and read the metadata keys
:func:`_compile_stub` writes (3.9 reads ``warp_size`` from it, 3.6 from the target); the stub
library exports what either looks up.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

STUB_SOURCE = Path(__file__).with_name("stub_cuda.c")
TARGET_RATIO = 2.0
DTYPE = torch.bfloat16
CAPABILITY = (9, 0)  # the stub's device, an H100-class sm_90


class EmulationUnavailable(RuntimeError):
    """The emulation cannot run here (no C compiler, no Python headers, no nvidia backend)."""


def unavailable(interpreter: bool = True) -> str | None:
    """Why the emulation cannot run on this machine, or None (``interpreter=False``: whatever
    this process's TRITON_INTERPRET, as for a caller about to start a process without it).
    Imports triton, not its driver."""
    if interpreter and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the emulation needs Triton's compiled path (run it as its own process)"
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        return "no C compiler (gcc) to build the stub driver and Triton's launcher"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h) to build Triton's C launcher"
    try:
        from triton.backends import backends
    except Exception as e:  # any failure to import triton means no emulation
        return f"triton cannot be imported: {e}"
    if "nvidia" not in backends:
        return "Triton's nvidia backend is not installed"
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tritonnorm-hostcost"


def build_stub_driver(cache_dir: Path) -> Path:
    """perf/stub_cuda.c built as ``<cache_dir>/<source hash>/libcuda.so.1`` (once per source)."""
    source = STUB_SOURCE.read_bytes()
    out = cache_dir / hashlib.sha256(source).hexdigest()[:16] / "libcuda.so.1"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    tmp = out.with_name(f"libcuda.so.1.tmp{os.getpid()}")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(tmp)]
    done = subprocess.run([*cmd, str(STUB_SOURCE), "-ldl"], capture_output=True, text=True)
    if done.returncode != 0:
        raise EmulationUnavailable(f"building the stub driver failed:\n{done.stderr}")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------------------------
# The Triton-facing emulation: stub driver library, Triton's driver over it, compile step.
# --------------------------------------------------------------------------------------------


@dataclass
class Emulation:
    """What :func:`install` set up, and its counters."""

    stub: ctypes.CDLL
    launcher_cls: type  # Triton's launcher class (CudaLauncher), whose __call__ is recorded
    kernel_dir: Path  # where the compile stub writes its metadata files
    caching_allocations: bool = False  # whether glibc keeps freed blocks (_keep_freed_blocks)
    compiles: int = 0
    kernel_names: dict = field(default_factory=dict)  # launcher -> kernel name

    def driver_launches(self) -> int:
        """cuLaunchKernelEx (or cuLaunchKernel) calls so far, counted by the stub library."""
        return ctypes.c_ulonglong.in_dll(self.stub, "hostcost_stub_launches").value

    @contextmanager
    def recording(self):
        """Within the block, every call of Triton's launcher is recorded as (launcher, args)
        before it runs (the class's ``__call__`` wrapped; restored after: nothing is added to
        the timed calls)."""
        log: list[tuple[object, tuple]] = []
        cls = self.launcher_cls
        call = cls.__call__

        def recorded(launcher, *args):
            log.append((launcher, args))
            return call(launcher, *args)

        cls.__call__ = recorded
        try:
            yield log
        finally:
            cls.__call__ = call


_emulation: Emulation | None = None


def _keep_freed_blocks() -> bool:
    """Make glibc's malloc keep freed blocks for reuse, as CUDA's caching allocator does: no
    mmap/munmap per allocation above 32 MB (12 us for a 51 MB ``torch.empty`` on the 2-core
    machine, against ~1 us reused), no trimming of the heap. Process-wide; False where the C
    library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1))


def _bench_once(kernel_call: Callable, quantiles=None, **_kw):
    """The driver's benchmarker: each autotuning candidate launched once, all equally fast."""
    kernel_call()
    return [1.0] * len(quantiles) if quantiles else 1.0


def _compile_stub(emu: Emulation):
    """``triton.compiler.compile`` for the emulation: a real ``CompiledKernel`` (its launcher,
    packed metadata, lazy handle loading through the stub driver) made from the source's real
    signature and options, with a placeholder binary, no shared memory and no scratch."""
    import triton
    from triton.compiler.compiler import CompiledKernel, make_backend
    from triton.runtime import driver

    def compile(src, target=None, options=None, _env_vars=None):
        emu.compiles += 1
        target = target or driver.active.get_current_target()
        backend = make_backend(target)
        opts = backend.parse_options(dict(options or {}, **src.parse_options()))
        stem = f"{emu.compiles}-{src.name}"
        metadata = {
            "hash": f"hostcost-{emu.compiles}",
            "target": target,
            **opts.__dict__,
            "triton_version": triton.__version__,
            "name": src.name,
            "warp_size": target.warp_size,
            "shared": 0,
            "tmem_size": None,
            "global_scratch_size": 0,
            "global_scratch_align": 1,
            "profile_scratch_size": 0,
            "profile_scratch_align": 1,
            "tensordesc_meta": [],
        }
        meta_path = emu.kernel_dir / f"{stem}.json"
        meta_path.write_text(json.dumps(metadata, default=vars))
        binary = emu.kernel_dir / f"{stem}.{backend.binary_ext}"
        binary.write_bytes(b"perf.hostcost placeholder binary")
        group = {meta_path.name: str(meta_path), binary.name: str(binary)}
        return CompiledKernel(src, group, metadata["hash"])

    return compile


def install(cache_dir: Path | None = None) -> Emulation:
    """Set up the emulation in this process (once): stub driver library, Triton's CUDA driver
    over it as ``triton.runtime.driver.active``, compile step stubbed. Must run before any
    Triton kernel is launched, with the interpreter off."""
    global _emulation
    if _emulation is not None:
        return _emulation
    if reason := unavailable():
        raise EmulationUnavailable(reason)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    lib = build_stub_driver(cache_dir)
    # Triton links its C modules with -L$TRITON_LIBCUDA_PATH -l:libcuda.so.1; loaded first and
    # global, the stub is also what the loader and dlopen("libcuda.so.1") resolve that name to.
    os.environ["TRITON_LIBCUDA_PATH"] = str(lib.parent)
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
    stub = ctypes.CDLL(str(lib), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    caching = _keep_freed_blocks()

    import triton.compiler
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver as driver_config

    cuda = CudaDriver()  # builds Triton's cuda_utils against the stub (cached by Triton)
    cuda.get_current_device = lambda: 0
    cuda.get_current_stream = lambda device=None: 0
    cuda.set_current_device = lambda device: None
    cuda.get_device_capability = lambda device=None: CAPABILITY
    cuda.get_benchmarker = lambda: _bench_once
    driver_config.set_active(cuda)

    kernel_dir = Path(tempfile.mkdtemp(prefix="hostcost-kernels-"))
    atexit.register(shutil.rmtree, kernel_dir, True)
    emu = Emulation(stub, cuda.launcher_cls, kernel_dir, caching_allocations=caching)
    names = emu.kernel_names

    def launcher(src, metadata):  # Triton's own launcher, its kernel's name noted
        made = emu.launcher_cls(src, metadata)
        names[made] = src.name
        return made

    cuda.launcher_cls = launcher
    triton.compiler.compile = _compile_stub(emu)
    _emulation = emu
    return emu


# --------------------------------------------------------------------------------------------
# The tritonnorm-facing part: one patch, kept minimal while the launch code is restructured.
# --------------------------------------------------------------------------------------------


def route_cpu_tensors_to_triton() -> list[str]:
    """Send CPU tensors down tritonnorm's Triton path with the interpreter off (tritonnorm
    sends them to torch's own ops then). The one patch point: ``runs_triton``, defined in
    ``tritonnorm.functional`` and replaced there and in every tritonnorm module that imported it
    by name (today ``tritonnorm.sync``); and ``device_index`` (launcher.py, launch.py), so that
    CPU tensors stand for device 0 as CUDA tensors would. Everything after that decision
    (validation, planning, autograd, configs, launches) runs unchanged. Returns what was
    patched."""
    import tritonnorm  # every module that may hold the function
    import tritonnorm.functional

    original = tritonnorm.functional.runs_triton

    def runs_triton(input: torch.Tensor) -> bool:
        return input.is_cuda or input.device.type == "cpu"

    patched = []
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tritonnorm" and getattr(module, "runs_triton", None) is original:
            module.runs_triton = runs_triton
            patched.append(name)
    # CPU tensors stand for the stub's device 0, so that each call pays the device check a
    # CUDA tensor's does (plans and launches compare the input's device with the current one)
    from tritonnorm.kernels import launch, launcher

    device_index = launcher.device_index
    as_cuda = lambda t: 0 if t.device.type == "cpu" else device_index(t)
    for module in (launcher, launch):
        if module.device_index is device_index:
            module.device_index = as_cuda
            patched.append(f"{module.__name__}.device_index")
    return patched


# --------------------------------------------------------------------------------------------
# The ops measured.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One op of the quick set: a ``perf.ops.NORMS`` row, an optional fused epilogue, forward
    alone or forward+backward, on a ``perf.shapes.QUICK`` shape class's first shape."""

    norm: str
    shape_class: str
    backward: bool = False
    scale_shift: bool = False
    residual: bool = False
    activation: str | None = None
    shape_override: tuple[int, ...] | None = None  # a shape of its own (on-chip cases)

    @property
    def shape(self) -> tuple[int, ...]:
        from perf.shapes import QUICK

        return self.shape_override or QUICK[self.shape_class][0]

    @property
    def epilogue(self):
        from perf.ops import Epilogue

        if not (self.scale_shift or self.residual or self.activation):
            return None
        return Epilogue(self.scale_shift, self.residual, self.activation)

    def build(self) -> tuple[Callable[[], None], tuple, tuple, torch.Tensor | None]:
        """The call (returns nothing), the op's tensor inputs, those differentiated, and dy."""
        from perf.ops import NORMS, bound_call, has_bias

        shape, grad = self.shape, self.backward
        c = shape[1]
        empty = lambda *s, g=grad: torch.empty(s, dtype=DTYPE, requires_grad=g)
        running = NORMS[self.norm][2]
        rm, rv = (empty(c, g=False), empty(c, g=False)) if running else (None, None)
        args = [empty(*shape), rm, rv, empty(c), empty(c) if has_bias(self.norm) else None]
        ep = self.epilogue
        if ep is not None:
            args += [empty(*shape[:2]) for _ in ("scale", "shift")[: 2 * ep.scale_shift]]
            args += [empty(*shape)] if ep.residual else []
        args = tuple(args)
        op = bound_call(self.norm, ep, args)  # the public function, its arguments bound
        grad_inputs = tuple(t for t in args if t is not None and t.requires_grad)
        dy = torch.empty(shape, dtype=DTYPE) if grad else None
        if grad:

            def call():
                torch.autograd.grad(op(), grad_inputs, dy)

        else:

            def call():
                op()

        return call, args, grad_inputs, dy


CASES: dict[str, Case] = {
    "bn eval forward": Case("bn_eval", "resnet50_bn"),
    "bn train forward": Case("bn_train", "resnet50_bn"),
    "bn train forward+backward": Case("bn_train", "resnet50_bn", backward=True),
    "in forward": Case("in", "style_in"),
    "in forward+backward": Case("in", "style_in", backward=True),
    "gn forward": Case("gn", "diffusion_gn"),
    "gn forward+backward": Case("gn", "diffusion_gn", backward=True),
    "gn+scale/shift+silu forward": Case("gn", "diffusion_gn", scale_shift=True, activation="silu"),
    "gn+scale/shift+silu forward+backward": Case(
        "gn", "diffusion_gn", backward=True, scale_shift=True, activation="silu"
    ),
    "bn+residual+relu forward+backward": Case(
        "bn_train", "resnet50_bn", backward=True, residual=True, activation="relu"
    ),
    # groups and instances that fit one program: normalised in registers
    "in forward+backward, on chip": Case(
        "in", "style_in", backward=True, shape_override=(8, 64, 32, 32)
    ),
    "gn forward+backward, on chip": Case(
        "gn", "diffusion_gn", backward=True, shape_override=(8, 256, 16, 16)
    ),
    # across the channels at each position (ConvNeXt's LayerNorm2d, timm's RmsNorm2d)
    "ln2d forward": Case("ln2d", "convnext_ln"),
    "ln2d forward+backward": Case("ln2d", "convnext_ln", backward=True),
    "rms2d forward+backward": Case("rms2d", "convnext_ln", backward=True),
    "ln2d+scale/shift+gelu forward+backward": Case(
        "ln2d", "convnext_ln", backward=True, scale_shift=True, activation="gelu"
    ),
}


def cases() -> dict[str, Case]:
    return dict(CASES)


# --------------------------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------------------------

_ALLOCATIONS = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")


def _op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        """Every aten op dispatched within the block, by kind."""

        def __init__(self):
            super().__init__()
            self.ops = {k: collections.Counter() for k in ("allocation", "view", "kernel")}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in _ALLOCATIONS:
                kind = "allocation"
            else:
                kind = "view" if func.is_view else "kernel"
            self.ops[kind][str(func)] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


class _NoOp(torch.autograd.Function):
    """The floor's Python-level op: takes the op's inputs, allocates its output (and, backward,
    the inputs' gradients), does nothing else."""

    @staticmethod
    def forward(ctx, x, *rest):
        ctx.save_for_backward(x, *rest)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        return tuple(
            torch.empty_like(t) if need else None
            for t, need in zip(saved, ctx.needs_input_grad, strict=True)
        )


def _floor_calls(launches, args, grad_inputs, dy) -> tuple[Callable, Callable]:
    """(the floor, its launches alone): the recorded launches replayed through the launcher,
    then the empty autograd.Function with the op's inputs (and its backward)."""
    launches = tuple(launches)

    def launch_only():
        for launcher, launch_args in launches:
            launcher(*launch_args)

    if dy is None:

        def floor():
            for launcher, launch_args in launches:
                launcher(*launch_args)
            _NoOp.apply(*args)

    else:

        def floor():
            for launcher, launch_args in launches:
                launcher(*launch_args)
            torch.autograd.grad(_NoOp.apply(*args), grad_inputs, dy)

    return floor, launch_only


def _block_us(fn: Callable, calls: int) -> float:
    """CPU microseconds per call over one block of ``calls`` calls (gc paused)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.process_time()
        for _ in range(calls):
            fn()
        return (time.process_time() - start) / calls * 1e6
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _jit_runs():
    """Counts the launches that went through ``JITFunction.run`` (not the direct path)."""
    from triton.runtime.jit import JITFunction

    runs, run = [0], JITFunction.run

    def counting(self, *args, **kwargs):
        runs[0] += 1
        return run(self, *args, **kwargs)

    JITFunction.run = counting
    try:
        yield runs
    finally:
        JITFunction.run = run


def measure_case(emu: Emulation, case: Case, calls: int, blocks: int, warmup: int) -> dict:
    call, args, grad_inputs, dy = case.build()
    compiles_before = emu.compiles
    for _ in range(max(warmup, 1)):
        call()
    compiles_warm = emu.compiles
    with emu.recording() as launches, _jit_runs() as jit_runs:
        call()
    counter = _op_counter()
    with counter:
        call()
    floor, launch_only = _floor_calls(launches, args, grad_inputs, dy)
    floor(), launch_only()  # warm
    times = {"call": [], "floor": [], "launch": []}
    driver_launches, driver_before = 0, emu.driver_launches()
    for _ in range(blocks):
        times["call"].append(_block_us(call, calls))
        driver_launches += emu.driver_launches() - driver_before
        times["floor"].append(_block_us(floor, calls))
        times["launch"].append(_block_us(launch_only, calls))
        driver_before = emu.driver_launches()
    by_kernel = collections.Counter(emu.kernel_names.get(lc, "?") for lc, _ in launches)
    ops = counter.ops
    us, floor_us = min(times["call"]), min(times["floor"])
    ep = case.epilogue
    return {
        "norm": case.norm,
        "epilogue": ep.tag if ep is not None else None,
        "backward": case.backward,
        "shape": list(case.shape),
        "dtype": str(DTYPE).removeprefix("torch."),
        "launches": len(launches),
        "launches_by_kernel": dict(sorted(by_kernel.items())),
        "driver_launches_per_call": driver_launches / (calls * blocks),
        "torch_kernels": sum(ops["kernel"].values()),
        "torch_kernel_ops": dict(sorted(ops["kernel"].items())),
        "allocations": sum(ops["allocation"].values()),
        "allocation_ops": dict(sorted(ops["allocation"].items())),
        "views": sum(ops["view"].values()),
        "view_ops": dict(sorted(ops["view"].items())),
        "jit_launches": jit_runs[0],
        "compiles_in_warmup": compiles_warm - compiles_before,
        "recompiles_after_warmup": emu.compiles - compiles_warm,
        "us_per_call": us,
        "floor_us": floor_us,
        "floor_launch_us": min(times["launch"]),
        "ratio": us / floor_us if floor_us > 0 else math.inf,
    }


def measure(
    calls: int = 100,
    blocks: int = 7,
    warmup: int = 3,
    names: list[str] | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Run the emulation on every case (or those named) and return the report (module
    docstring's schema). Installs the emulation in this process first."""
    import triton

    emu = install(cache_dir)
    route_cpu_tensors_to_triton()
    torch.set_num_threads(1)  # a host path is one thread; process_time counts every thread
    selected = cases() if names is None else {n: CASES[n] for n in names}
    report = {
        "schema": 1,
        "tool": "perf.hostcost",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "calls": calls,
        "blocks": blocks,
        "warmup": warmup,
        "target_ratio": TARGET_RATIO,
        "caching_allocations": emu.caching_allocations,
        "cases": {},
    }
    for name, case in selected.items():
        report["cases"][name] = measure_case(emu, case, calls, blocks, warmup)
    if names is None:
        report["guards"] = check_guards()
    return report


GUARD_CASE = "bn+residual+relu forward+backward"


def check_guards() -> dict:
    """What the fast path does when its guards fail, on :data:`GUARD_CASE` after warm-up:
    JIT launches of a call whose input is not 16-byte aligned (each launch reading it must go
    through ``JITFunction.run``, which specialises on alignment), of a call with a launch hook
    installed (every launch, and the hook sees them), and of an aligned call after each (0: the
    fast path is back)."""
    from triton import knobs

    from perf.ops import bound_call

    case = CASES[GUARD_CASE]
    call, args, grad_inputs, dy = case.build()
    for _ in range(3):
        call()
    x = args[0]
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).requires_grad_()
    moved = (shifted, *args[1:])
    op = bound_call(case.norm, case.epilogue, moved)
    result = {}
    with _jit_runs() as runs:
        torch.autograd.grad(op(), (shifted, *grad_inputs[1:]), dy)
    result["misaligned_jit_launches"] = runs[0]
    with _jit_runs() as runs:
        call()
    result["aligned_jit_launches_after_misaligned"] = runs[0]
    seen = []
    hook = lambda metadata: seen.append(metadata)
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        with _jit_runs() as runs:
            call()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    result["hooked_jit_launches"], result["hook_calls"] = runs[0], len(seen)
    with _jit_runs() as runs:
        call()
    result["aligned_jit_launches_after_hook"] = runs[0]
    return result


CASE_FIELDS = (
    "norm", "epilogue", "backward", "shape", "dtype", "launches", "launches_by_kernel",
    "driver_launches_per_call", "torch_kernels", "torch_kernel_ops", "allocations",
    "allocation_ops", "views", "view_ops", "jit_launches", "compiles_in_warmup",
    "recompiles_after_warmup",
    "us_per_call", "floor_us", "floor_launch_us", "ratio",
)  # fmt: skip


def launch_counts(report: dict) -> dict[str, int]:
    """Triton launches per call of each case: ``launch_counts(report)["bn eval forward"]``."""
    return {name: row["launches"] for name, row in report["cases"].items()}


def torch_kernel_counts(report: dict) -> dict[str, int]:
    """torch kernels (aten ops other than allocations and views) per call of each case."""
    return {name: row["torch_kernels"] for name, row in report["cases"].items()}


def run_subprocess(
    json_path: Path, *args: str, python: str = sys.executable, timeout: float = 600
) -> dict:
    """``python -m perf.hostcost --json json_path *args`` in a fresh process with the
    interpreter off (for callers whose process has it on, e.g. the test suite); the report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [python, "-m", "perf.hostcost", "--json", str(json_path), *args]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(Path(json_path).read_text())


def format_table(report: dict) -> str:
    head = (
        f"{'op':38s} {'us/call':>8s} {'floor':>7s} {'ratio':>6s} {'launch':>6s} "
        f"{'torch':>5s} {'alloc':>5s} {'recomp':>6s}"
    )
    lines = [
        f"perf.hostcost: Triton {report['triton']}, torch {report['torch']}, CPU time per call, "
        f"best of {report['blocks']} x {report['calls']} calls (target ratio <= "
        f"{report['target_ratio']:g})",
        head,
    ]
    for name, r in report["cases"].items():
        lines.append(
            f"{name:38s} {r['us_per_call']:8.1f} {r['floor_us']:7.1f} {r['ratio']:6.2f} "
            f"{r['launches']:6d} {r['torch_kernels']:5d} {r['allocations']:5d} "
            f"{r['recompiles_after_warmup']:6d}"
        )
    lines.append(
        "floor: the same launches replayed through Triton's launcher, plus an empty "
        "autograd.Function allocating the outputs; torch: aten ops other than allocations/views"
    )
    for name, r in report["cases"].items():
        kernels = ", ".join(f"{k} x{v}" for k, v in r["launches_by_kernel"].items())
        ops = ", ".join(f"{k} x{v}" for k, v in r["torch_kernel_ops"].items()) or "-"
        lines.append(f"  {name}: launches {kernels}; torch {ops}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.hostcost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=100, help="calls per timed block")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks (best is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="calls before counting")
    parser.add_argument("--only", action="append", help="a case name (repeatable)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--cache-dir", type=Path, help="stub driver and Triton cache")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only if n not in CASES]
        if unknown:
            parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    if reason := unavailable():
        print(f"perf.hostcost: cannot emulate here: {reason}", file=sys.stderr)
        return 2
    report = measure(args.calls, args.blocks, args.warmup, args.only, args.cache_dir)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
