"""``python -m perf.compile_check``: compile every kernel specialisation for a GPU, without one.

Only a GPU can time the kernels, but the compiler runs anywhere: Triton lowers a kernel to PTX
and its bundled ``ptxas`` assembles it for any NVIDIA architecture with no driver present. This
tool drives the real launchers (``tritonnorm.kernels.launch``) on ``meta`` tensors of the
report's shapes, with a stand-in driver that reports the target GPU, and records what each
launch would compile, every autotune candidate included (the candidates are generated exactly
as on that GPU: the split factors follow its SM count). Each distinct specialisation is then
compiled for the target, and ``ptxas -v`` reports its resources: registers, spilled bytes and
the stack frame; with Triton's shared memory they bound the warps one SM can hold.

What it shows: that every kernel the report (and the library's other paths: eval, no affine
parameters, IN with running statistics, SyncBatchNorm, float64) would launch compiles natively,
and which candidates spill or starve an SM of warps. What it cannot show: time. Results go to
``perf/results/<arch>-static/`` (kernels.csv, summary.md). Exit status 1 when a kernel fails to
compile or spills at the register cap.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

from perf.ops import DTYPES, LAYOUTS, memory_format
from perf.report import write_csv
from perf.shapes import SETS, Shape, shape_str

# Hopper (H100/H200): SM count, and the per-SM limits that bound occupancy.
TARGETS = {
    90: dict(sms=132, regs_per_sm=65536, max_warps_per_sm=64, smem_per_sm=228 * 1024),
    80: dict(sms=108, regs_per_sm=65536, max_warps_per_sm=64, smem_per_sm=164 * 1024),
}
# Below this many resident warps per SM a streaming kernel keeps too few loads in flight.
MIN_RESIDENT_WARPS = 16


# --- recording what would be compiled --------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver: reports the target and 'times' every autotune candidate
    equally (the first then wins), so launchers and the autotuner run unchanged."""

    def __init__(self, target: GPUTarget):
        self.get_current_target = lambda: target
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: 0
        self.get_active_torch_device = lambda: torch.device("meta")
        self.get_benchmarker = lambda: (
            lambda call, quantiles=None, **_: call() or ([1.0, 1.0, 1.0] if quantiles else 1.0)
        )


@dataclass
class Spec:
    """One specialisation as Triton's JIT would compile it."""

    kernel: str
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    scenario: str  # the first scenario that launched it

    def source(self) -> ASTSource:
        from importlib import import_module

        module, name = self.kernel.rsplit(".", 1)
        fn = getattr(import_module(module), name)
        return ASTSource(fn, self.signature, self.constants, self.attrs)

    def describe(self) -> tuple[str, str, str]:
        """(flags: constexpr switches and None pointers; config: block sizes, split, warps;
        dtypes of the pointers)."""
        names = list(self.signature)
        consts = {names[i]: v for (i,), v in sorted(self.constants.items())}
        tuned = lambda n: n.isupper() and n.startswith(("BLOCK", "SPLIT", "LANES"))
        flags = [f"{n}={int(v)}" if n.isupper() else f"{n}=None" for n, v in consts.items()
                 if (n.isupper() and not tuned(n)) or v is None]  # fmt: skip
        config = [f"{n}={v}" for n, v in sorted(consts.items()) if tuned(n)]
        dtypes = sorted({t.lstrip("*") for t in self.signature.values() if t.startswith("*")})
        warps = f"warps={self.options['num_warps']}"
        return " ".join(flags), " ".join([*config, warps]), ",".join(dtypes)


@contextlib.contextmanager
def recording(
    arch: int, heuristic: bool = False, sms: int | None = None
) -> Iterator[tuple[list[Spec], list[str]]]:
    """Within the block, kernel launches record their specialisation instead of compiling or
    running. Yields (specs, scenario) where ``scenario[0]`` labels the launches that follow.
    ``heuristic`` keeps only each launch's first candidate (what a forced config launches)
    instead of the whole autotune space."""
    from tritonnorm.kernels import config, launch, tuning

    specs: list[Spec] = []
    seen: set[str] = set()
    scenario = ["?"]

    def hook(*, key, fn, compile, **_):
        ident = f"{fn.module}.{fn.name}:{key}"
        if ident not in seen:
            seen.add(ident)
            options = json.loads(compile["specialization_data"])["options"]
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
            specs.append(Spec(f"{fn.module}.{fn.name}", dict(compile["signature"]),
                              dict(compile["constants"]), dict(compile["configs"][0]), options,
                              scenario[0]))  # fmt: skip
        return True  # skip compiling and launching: this is only a recording

    sms = sms or TARGETS[arch]["sms"]
    saved_programs = config.target_programs
    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = driver._active  # None without a GPU: reset_active() would raise
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    knobs.runtime.jit_cache_hook = hook
    config.target_programs = lambda: config.PROGRAMS_PER_SM * sms
    launch.clear_plans()  # plans hold their configs: none made for another device size survives
    try:
        # The whole space: every candidate "timed" (the stand-in driver rates them equal).
        with tuning.tuning_discarded(), tuning.autotune(not heuristic):
            yield specs, scenario
    finally:
        launch.clear_plans()
        config.target_programs = saved_programs
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver


# --- scenarios: the launches each public path makes ------------------------------------------


def _meta(shape: Shape, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(
        memory_format=memory_format(layout, len(shape))
    )


def _run_norm(x, norm, affine=True, running=True, param_dtype=None, bias=True):
    """The launcher entry points' forward and backward (custom ops dispatch to their fake
    implementations on meta tensors: the public functions would not reach the kernels).
    ``bias=False``: weight alone (RMSNorm2d)."""
    from tritonnorm.kernels import launch

    c, dt = x.shape[1], param_dtype or x.dtype
    w, b = (_meta((c,), dt), _meta((c,), dt) if bias else None) if affine else (None, None)
    rm, rv = (_meta((c,), dt), _meta((c,), dt)) if running else (None, None)
    _, mean, rstd = launch.forward(x, w, b, rm, rv, norm=norm, momentum=0.1, eps=1e-5)
    mask = (True, affine, affine and b is not None, False, False, False)
    launch.backward(torch.empty_like(x), x, w, b, mean, rstd, norm=norm, output_mask=mask)


def _run_epilogue(x, norm, epilogue, running: bool, bias: bool = True, affine_grads: bool = True):
    """An op with a fused epilogue (``perf.ops.Epilogue``) as tritonnorm's custom ops launch it:
    the forward (running statistics updated into new buffers), then the backward with every
    gradient (weight, bias, and scale and shift or the residual; ``affine_grads=False``: frozen
    weight and bias). ``bias=False``: weight alone (RMSNorm2d)."""
    from tritonnorm.kernels import launch

    (n, c), dt = x.shape[:2], x.dtype
    w, b = _meta((c,), dt), _meta((c,), dt) if bias else None
    rm, rv = (_meta((c,), dt), _meta((c,), dt)) if running else (None, None)
    scale = shift = None
    if epilogue.scale_shift:
        scale, shift = _meta((n, c), dt), _meta((n, c), dt)
    residual = torch.empty_like(x) if epilogue.residual else None  # in x's layout
    code = launch.ACTIVATIONS[epilogue.activation] if epilogue.activation else 0
    ep = launch.Epilogue(scale, shift, residual, code)
    out = (_meta((c,), dt), _meta((c,), dt)) if running else None
    y, mean, rstd = launch.forward(x, w, b, rm, rv, norm=norm, momentum=0.1, eps=1e-5,
                                   running_out=out, epilogue=ep)  # fmt: skip
    # As the ops do: with a residual and ReLU, the backward reads act' off the saved output;
    # a residual without activation has dy for its gradient (no kernel output).
    from_output = residual is not None and launch.derivative_from_output(code, ep.slope)
    if from_output or not code:
        ep = launch.Epilogue(scale, shift, None, code)
    mask = (True, affine_grads, affine_grads and bias, epilogue.scale_shift,
            epilogue.scale_shift, epilogue.residual and bool(code))  # fmt: skip
    launch.backward(torch.empty_like(x), x, w, b, mean, rstd, norm=norm, epilogue=ep,
                    output_mask=mask, output=y if from_output else None)  # fmt: skip


def _run_sync(x, param_dtype, world=2):
    """SyncBatchNorm's own function, forward and backward, its collectives replaced."""
    from unittest import mock

    from tritonnorm import sync

    c = x.shape[1]
    w, b = (_meta((c,), param_dtype).requires_grad_() for _ in range(2))
    gather = lambda t, group, size: t.new_empty((world, *t.shape))
    with mock.patch.object(sync, "_all_gather", gather), \
         mock.patch.object(sync, "_global_count", lambda g: world * x.numel() // c):  # fmt: skip
        x = x.detach().requires_grad_()
        y = sync._sync_batch_norm(x, w, b, _meta((c,), param_dtype), _meta((c,), param_dtype),
                                  1e-5, 0.1, None, world)  # fmt: skip
        torch.autograd.grad(y, (x, w, b), torch.empty_like(y))


# Shapes beyond the report's: on-chip (fused) reductions, 1-D and 3-D inputs, odd sizes.
EXTRA_SHAPES: dict[str, list[Shape]] = {
    "bn": [(8, 16, 32, 32), (64, 512), (16, 96, 127), (2, 3, 64, 128), (4, 40, 9, 9)],
    "in": [(4, 64, 64, 64), (8, 32, 127), (2, 8, 16, 16, 16), (2, 3, 5, 7), (2, 4, 160, 256)],
}


def scenarios(shape_set: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, thunk) for every launch path the library has, over the report's shapes and the
    extra ones: BN training, IN and GN in every dtype and layout, then the less travelled paths
    (eval, no affine parameters, fp32 parameters with half inputs, IN with running statistics,
    SyncBatchNorm, float64) on a few shapes."""
    from tritonnorm.kernels.launch import Norm

    table = SETS[shape_set]
    of = lambda *classes: [s for c in classes for s in table.get(c, [])]
    bn, inst = of("resnet50_bn", "small_c_bn") + EXTRA_SHAPES["bn"], of("style_in", "medical3d_in")
    per_norm = [("bn train", Norm(True), bn), ("in", Norm(False), inst + EXTRA_SHAPES["in"]),
                ("gn", None, of("diffusion_gn") + EXTRA_SHAPES["in"][::3])]  # fmt: skip
    for (dname, dtype), layout in itertools.product(DTYPES.items(), LAYOUTS):
        for name, norm, shapes in per_norm:
            for shape in shapes:  # GroupNorm: 32 groups where C allows, as perf/ops.py
                norm_ = norm or Norm(False, num_groups=math.gcd(shape[1], 32))
                yield (
                    f"{name} {shape_str(shape)} {layout} {dname}",
                    functools.partial(
                        _run_norm, _meta(shape, dtype, layout), norm_, running=name.startswith("bn")
                    ),
                )
    few = [(32, 256, 56, 56), (8, 16, 32, 32), (4, 64, 64, 64)]
    for shape, (dname, dtype), layout in itertools.product(few, DTYPES.items(), LAYOUTS):
        x, tag = _meta(shape, dtype, layout), f"{shape_str(shape)} {layout} {dname}"
        for kind, norm in (("bn", Norm(True)), ("in", Norm(False))):
            yield f"{kind} no-affine {tag}", functools.partial(_run_norm, x, norm, False, False)
            yield (
                f"{kind} fp32-params {tag}",
                functools.partial(_run_norm, x, norm, param_dtype=torch.float32),
            )
        yield (
            f"in eval-running {tag}",
            functools.partial(_run_norm, x, Norm(False, use_input_stats=False)),
        )
        # eval BatchNorm: dx written by the gradient sums' pass (dweight/dbias asked), or the
        # apply pass alone (dx = w rstd dy)
        bn_eval = Norm(True, use_input_stats=False)
        yield f"bn eval {tag}", functools.partial(_run_norm, x, bn_eval)
        yield f"bn eval no-affine {tag}", functools.partial(_run_norm, x, bn_eval, False)
        yield f"in train-running {tag}", functools.partial(_run_norm, x, Norm(False))
        yield f"sync-bn {tag}", functools.partial(_run_sync, x, dtype)
    for shape, (kind, norm) in itertools.product(few, (("bn", Norm(True)), ("in", Norm(False)))):
        yield (
            f"{kind} float64 {shape_str(shape)}",
            functools.partial(_run_norm, _meta(shape, torch.float64), norm),
        )
    yield from position_scenarios(shape_set)


# LayerNorm2d / RMSNorm2d beyond the report's ConvNeXt shapes: 96 channels (BLOCK_C 128, many
# positions a program), 4096, and the kernels' widest rows, config.position_max_channels (4096
# channels with float32 statistics, half types too, with or without an epilogue; 2048 in
# float64, 1024 with an epilogue): read from config, so that the check follows the limits.
def position_shapes() -> dict[str, list[Shape]]:
    """{"plain", "epilogue", "float64", "float64_epilogue"}: the rows of each kind of launch."""
    from tritonnorm.kernels.config import position_max_channels as widest

    shapes = {
        "plain": [(8, 96, 16, 16), (2, 4096, 8, 8), (2, widest(4, False), 4, 4)],
        "epilogue": [(8, 96, 16, 16), (2, widest(4, True), 8, 8)],
        "float64": [(8, 96, 16, 16), (2, widest(8, False), 4, 4)],
        "float64_epilogue": [(2, widest(8, True), 4, 4)],
    }
    return {k: list(dict.fromkeys(v)) for k, v in shapes.items()}


def _position_epilogues():
    """(norm, Epilogue, weight and bias trained): the epilogue variants of the kernels across
    channels. Scale and shift make the gradient partials per sample; a residual with ReLU (or a
    leaky ReLU) reads act' off the output, with GELU it recomputes the pre-activation."""
    from perf.ops import Epilogue

    return [
        ("ln2d", Epilogue(scale_shift=True, activation="gelu"), True),
        ("ln2d", Epilogue(residual=True, activation="relu"), True),
        ("ln2d", Epilogue(scale_shift=True, residual=True, activation="gelu_tanh"), True),
        ("ln2d", Epilogue(scale_shift=True, activation="silu"), False),  # dscale, dshift alone
        ("rms2d", Epilogue(scale_shift=True, activation="silu"), True),
        ("rms2d", Epilogue(residual=True, activation="leaky_relu"), True),
        ("rms2d", Epilogue(residual=True), True),  # no activation: dresidual is dy
    ]


def position_scenarios(shape_set: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """The kernels across the channels at each position (positions.py): LayerNorm2d and
    RMSNorm2d forward and backward (dx with the partial sums of dweight / dbias, and dx alone)
    on the report's ConvNeXt shapes and ``position_shapes()`` in every dtype and layout, the
    epilogue variants (``_position_epilogues``) at 96 channels and the epilogue limit, and
    float64 up to its limits; labels as ``scenarios``'. The ``dry-run`` set (the test suite's)
    leaves the half types out and takes each case but the widest rows in one layout, alternating."""
    from perf.ops import has_bias, launch_norm

    dry = shape_set == "dry-run"
    rows = position_shapes()
    # the dry-run set compiles float32 and float64 (half types differ only in loads and stores)
    dtypes = [(n, d) for n, d in DTYPES.items() if not (dry and n in ("float16", "bfloat16"))]
    cases = []  # (label, shape, dtype name, dtype, thunk of x)
    for (dname, dtype), norm in itertools.product(dtypes, ("ln2d", "rms2d")):
        run = functools.partial(_run_norm, norm=launch_norm(norm, 1), running=False,
                                bias=has_bias(norm))  # fmt: skip
        for shape in SETS[shape_set].get("convnext_ln", []) + rows["plain"]:
            cases.append((norm, shape, dname, dtype, run))
        for shape in (rows["plain"][0], rows["plain"][-1]):  # dx alone: no partial sums
            run = functools.partial(_run_norm, norm=launch_norm(norm, 1), affine=False,
                                    running=False)  # fmt: skip
            cases.append((f"{norm} no-affine", shape, dname, dtype, run))
    for (dname, dtype), (norm, ep, trained), shape in itertools.product(
        dtypes, _position_epilogues(), rows["epilogue"]
    ):
        run = functools.partial(_run_epilogue, norm=launch_norm(norm, 1), epilogue=ep,
                                running=False, bias=has_bias(norm),
                                affine_grads=trained)  # fmt: skip
        cases.append((f"{norm}+{ep.tag}{'' if trained else ' frozen-affine'}", shape, dname,
                      dtype, run))  # fmt: skip
    f64 = torch.float64
    for norm in ("ln2d", "rms2d"):
        run = functools.partial(_run_norm, norm=launch_norm(norm, 1), running=False,
                                bias=has_bias(norm))  # fmt: skip
        cases += [(norm, shape, "float64", f64, run) for shape in rows["float64"]]
    for norm, ep, _ in [_position_epilogues()[i] for i in (0, 1, 4)]:
        run = functools.partial(_run_epilogue, norm=launch_norm(norm, 1), epilogue=ep,
                                running=False, bias=has_bias(norm))  # fmt: skip
        for shape in rows["float64_epilogue"]:
            cases.append((f"{norm}+{ep.tag}", shape, "float64", f64, run))
    for i, (label, shape, dname, dtype, run) in enumerate(cases):
        # the widest rows in both layouts: contiguous ones hold a scalar address per element
        both = not dry or (shape in rows["plain"][1:] and label in ("ln2d", "rms2d"))
        for layout in LAYOUTS if both else LAYOUTS[i % 2 :][:1]:
            yield (
                f"{label} {shape_str(shape)} {layout} {dname}",
                functools.partial(run, _meta(shape, dtype, layout)),
            )


def epilogue_scenarios(shape_set: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(label, thunk) for the fused-epilogue ops the report times (``perf.ops.OPS`` with an
    epilogue) over their shape classes, every dtype and layout; labels as ``scenarios``'."""
    from perf.ops import NORMS, OPS, launch_norm

    table = SETS[shape_set]
    fused = {(op.norm, op.epilogue): op.shape_classes for op in OPS.values() if op.epilogue}
    for (dname, dtype), layout in itertools.product(DTYPES.items(), LAYOUTS):
        for (norm, epilogue), classes in fused.items():
            running = NORMS[norm][2]
            for shape in [s for c in classes for s in table.get(c, [])]:
                yield (
                    f"{norm}+{epilogue.tag} {shape_str(shape)} {layout} {dname}",
                    functools.partial(
                        _run_epilogue, _meta(shape, dtype, layout), launch_norm(norm, shape[1]),
                        epilogue, running,
                    ),
                )  # fmt: skip


def record(arch: int, shape_set: str, heuristic=False, sms=None, todo=None) -> list[Spec]:
    """The specialisations the ``todo`` scenarios (default: ``scenarios(shape_set)``) launch."""
    # Compiling needs real JIT functions: under the interpreter the kernels are not compilable.
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("perf.compile_check compiles kernels: run it without TRITON_INTERPRET=1")
    with recording(arch, heuristic, sms) as (specs, scenario):
        for label, thunk in todo if todo is not None else scenarios(shape_set):
            scenario[0] = label
            thunk()
    return specs


# --- compiling and reading resources ---------------------------------------------------------


@dataclass
class Compiled:
    """One specialisation's resources: a row of kernels.csv."""

    kernel: str
    flags: str
    dtypes: str
    config: str
    warps: int
    regs: int | None = None
    spill_bytes: int | None = None  # per thread: registers spilled to local memory
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    resident_warps: int | None = None  # what one SM can hold (registers, shared memory)
    load_bits: int | None = None  # widest global load per thread (128: fully vectorised)
    store_bits: int | None = None
    compile_s: float = 0.0
    error: str = ""
    scenario: str = ""


def ptxas_report(ptx: str, arch: int, fp_fusion: bool) -> dict[str, int]:
    """Registers, spill stores and stack frame (bytes per thread) that ptxas reports for the PTX,
    assembled with the options Triton itself uses (its bundled ptxas, -lineinfo, register
    allocation level 2)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", *([] if fp_fusion else ["--fmad=false"]),
               str(src), "-o", str(Path(tmp, "kernel.cubin"))]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    if not (regs and frame):
        raise RuntimeError(f"ptxas -v printed no resource usage:\n{log}")
    return {"regs": int(regs[1]), "stack": int(frame[1]), "spill": int(frame[2])}


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global[.\w:]*?(?:\.v(\d))?\.[bfus](\d+)\b")


def widest_access(ptx: str) -> dict[str, int]:
    """Widest global load and store in bits per thread and instruction: 128-bit vectors are what
    a streaming kernel needs to approach copy bandwidth."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _GLOBAL_ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits))
    return widest


def resident_warps(arch: int, regs: int, warps: int, shared: int) -> int:
    """Warps one SM can hold of this kernel: registers are allocated per warp in 256-register
    units, shared memory per block."""
    limits = TARGETS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    blocks = min(
        limits["regs_per_sm"] // (regs_per_warp * warps),
        limits["max_warps_per_sm"] // warps,
        limits["smem_per_sm"] // shared if shared else 1 << 30,
    )
    return blocks * warps


def compile_one(spec: Spec, arch: int) -> Compiled:
    start = time.perf_counter()
    flags, config, dtypes = spec.describe()
    r = Compiled(spec.kernel.rsplit(".", 1)[1], flags, dtypes, config, spec.options["num_warps"],
                 scenario=spec.scenario)  # fmt: skip
    try:
        kernel = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32),
                                options=spec.options)  # fmt: skip
        res = ptxas_report(kernel.asm["ptx"], arch, spec.options.get("enable_fp_fusion", True))
    except Exception as exc:  # a compile error is a finding, reported with the spec
        r.error = " | ".join(f"{type(exc).__name__}: {exc}".strip().splitlines()[-3:])[:400]
    else:
        access = widest_access(kernel.asm["ptx"])
        r.shared_bytes = int(getattr(kernel.metadata, "shared", 0) or 0)
        r.regs, r.spill_bytes, r.stack_bytes = res["regs"], res["spill"], res["stack"]
        r.load_bits, r.store_bits = access["ld"], access["st"]
        r.resident_warps = resident_warps(arch, r.regs, r.warps, r.shared_bytes)
    r.compile_s = round(time.perf_counter() - start, 2)
    return r


def _compile_index(args: tuple[int, int]) -> Compiled:
    index, arch = args
    return compile_one(_SPECS[index], arch)


_SPECS: list[Spec] = []  # inherited by forked workers


def _warm_index(args: tuple[int, int]) -> str:
    index, arch = args
    try:  # the JIT's own compile call: the result lands in Triton's cache under the JIT's key
        kernel = triton.compile(_SPECS[index].source(), target=GPUTarget("cuda", arch, 32),
                                options=_SPECS[index].options)  # fmt: skip
    except Exception as exc:
        return f"{_SPECS[index].kernel}: {type(exc).__name__}: {exc}"[:200]
    # Its C launcher too: Triton 3.6 builds one per signature with gcc (~0.25 s each, cached),
    # on a kernel's first load otherwise. Without a driver (no GPU) there is nothing to build.
    with contextlib.suppress(Exception):
        from triton.runtime import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    return ""


def warm_cache(specs: list[Spec], arch: int, jobs: int, deadline: float) -> tuple[int, list[str]]:
    """Compile ``specs`` into Triton's cache, ``jobs`` processes at a time, until ``deadline``
    (time.monotonic): a GPU's JIT then loads them instead of compiling one after another.
    Returns (compiled, errors)."""
    global _SPECS
    _SPECS = specs
    import multiprocessing
    from concurrent.futures import wait

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
    futures = [pool.submit(_warm_index, (i, arch)) for i in range(len(specs))]
    done, _ = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    pool.shutdown(wait=False, cancel_futures=True)
    return len(done), [e for f in done if (e := f.result())]


def compile_all(specs: list[Spec], arch: int, jobs: int) -> list[Compiled]:
    global _SPECS
    _SPECS = specs
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_index, [(i, arch) for i in range(len(specs))]))


# --- report ----------------------------------------------------------------------------------


def register_cap(arch: int, warps: int) -> int:
    """The most registers a thread of a ``warps``-warp program may use (allocated by 8)."""
    return min(255, TARGETS[arch]["regs_per_sm"] // (warps * 32) // 8 * 8)


def pressure_spill(r: Compiled, arch: int) -> bool:
    """Spills forced by the register cap: the tile does not fit. ptxas also spills a few bytes
    well below the cap under Triton's ``--regAllocOptLevel=2`` (a ptxas 13 workaround): those
    are listed in the CSV but are not a problem of the tile."""
    return bool(r.spill_bytes) and r.regs >= register_cap(arch, r.warps)


def problems(results: list[Compiled], arch: int) -> list[str]:
    out = []
    for r in results:
        where = f"{r.kernel} [{r.flags}] {r.config} ({r.scenario})"
        if r.error:
            out.append(f"compile error: {where}: {r.error}")
        elif pressure_spill(r, arch):
            out.append(f"spills {r.spill_bytes} B/thread at {r.regs} registers: {where}")
    return out


def summary(results: list[Compiled], arch: int, shape_set: str, heuristic: bool) -> str:
    by_kernel: dict[str, list[Compiled]] = {}
    for r in results:
        by_kernel.setdefault(r.kernel, []).append(r)
    lines = [
        f"# Static compile check for sm_{arch} (no GPU: nothing here is a timing)",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}; shapes: `{shape_set}` set "
        "plus the extra and less-travelled paths in `perf/compile_check.py`.",
        f"{len(results)} specialisations "
        f"({'first candidate of each launch' if heuristic else 'every autotune candidate'}) "
        "compiled with Triton's bundled ptxas; resources as `ptxas -v` reports them. `resident warps`: "
        "what one SM can hold given registers and shared memory (64 at most).",
        "",
        "| kernel | variants | errors | spilling at the register cap | spilling below it "
        "| regs min-max | fewest resident warps/SM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in by_kernel.items():
        ok = [r for r in rs if not r.error]
        regs = [r.regs for r in ok]
        warps = [r.resident_warps for r in ok]
        lines.append(
            f"| {name} | {len(rs)} | {len(rs) - len(ok)} "
            f"| {sum(1 for r in ok if pressure_spill(r, arch))} "
            f"| {sum(1 for r in ok if r.spill_bytes and not pressure_spill(r, arch))} "
            f"| {min(regs, default=0)}-{max(regs, default=0)} | {min(warps, default=0)} |"
        )
    low = [r for r in results if not r.error and r.resident_warps < MIN_RESIDENT_WARPS]
    lines += [
        "",
        f"Variants with fewer than {MIN_RESIDENT_WARPS} resident warps per SM: {len(low)}",
    ]
    for r in low[:20]:
        lines.append(f"- {r.kernel} {r.config} regs={r.regs} ({r.scenario})")
    found = problems(results, arch)
    lines += ["", f"Problems (compile errors, spills at the register cap): {len(found) or 'none'}"]
    lines += [f"- {p}" for p in found[:50]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--arch", type=int, default=90, choices=sorted(TARGETS))
    p.add_argument("--set", default="full", choices=sorted(SETS), help="report shapes to cover")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", help="output directory (default perf/results/sm<arch>-static/)")
    p.add_argument("--limit", type=int, help="compile only the first N specialisations")
    p.add_argument("--heuristic", action="store_true",
                   help="only each launch's first (heuristic) candidate, not every autotune one")  # fmt: skip
    args = p.parse_args(argv)

    start = time.perf_counter()
    specs = record(args.arch, args.set, args.heuristic)
    if args.limit:
        specs = specs[: args.limit]
    print(f"{len(specs)} distinct specialisations recorded in {time.perf_counter() - start:.1f} s")
    results = compile_all(specs, args.arch, args.jobs)
    out = Path(args.out or Path(__file__).parent / "results" / f"sm{args.arch}-static")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "kernels.csv")
    text = summary(results, args.arch, args.set, args.heuristic)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out}/kernels.csv, summary.md in {time.perf_counter() - start:.0f} s")
    return 1 if problems(results, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
