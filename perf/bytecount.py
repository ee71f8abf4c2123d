"""Count the bytes Triton kernels load and store, under Triton's interpreter.

``count_bytes()`` is a context manager. While it is active, every element a kernel loads or
stores through the interpreter is counted (masked-off elements excluded, element size taken from
the pointer's element type), attributed to the kernel and to the kernel argument whose storage
the address falls in::

    with count_bytes(audit_min_numel=x.numel()) as traffic:
        y = tn.batch_norm(x, ...)
    traffic.passes(x.numel() * x.element_size())

It hooks the narrowest entry points the interpreter has, whose signatures differ by version
(Triton 3.6 and 3.8: ``cache_modifier, eviction_policy``; 3.9: ``cache_policy``):

- ``InterpreterBuilder.create_masked_load`` / ``create_masked_store``: every ``tl.load`` and
  ``tl.store`` ends there (unmasked, block-pointer, tensor-descriptor and, from 3.9, atomic
  loads/stores are routed through them);
- ``InterpreterBuilder.create_atomic_rmw`` / ``create_atomic_cas``: one read and one write each;
- ``GridExecutor.__call__`` / ``_init_args_hst``: which kernel is running and which tensors it got.

If one of them is missing or has a signature not listed in ``_HOOKS``, entering the context
raises ``UnsupportedTritonError`` rather than report a wrong number.

With ``audit_min_numel`` set it also watches the torch side (a ``TorchDispatchMode``): any aten op
outside a kernel launch that touches a tensor of at least that many elements and is not an
allocation (``empty*``), a view/alias, or a metadata query is recorded in ``torch_ops``. The
interpreter's own copies of kernel arguments happen inside launches and are not recorded.
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

UNKNOWN_TENSOR = "<unattributed>"


class UnsupportedTritonError(RuntimeError):
    """The interpreter internals the counter hooks are not there (another Triton version)."""


# (class, attribute) -> the parameter lists (after self) it may have; the hooks find their
# arguments by name, so any listed signature is counted the same way.
_HOOKS: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {
    ("InterpreterBuilder", "create_masked_load"): (
        ("ptrs", "mask", "other", "cache_policy", "is_volatile"),  # 3.9
        ("ptrs", "mask", "other", "cache_modifier", "eviction_policy", "is_volatile"),  # 3.6-3.8
    ),
    ("InterpreterBuilder", "create_masked_store"): (
        ("ptrs", "value", "mask", "cache_policy"),
        ("ptrs", "value", "mask", "cache_modifier", "eviction_policy"),
    ),
    ("InterpreterBuilder", "create_atomic_rmw"): (("rmwOp", "ptr", "val", "mask", "sem", "scope"),),
    ("InterpreterBuilder", "create_atomic_cas"): (("ptr", "cmp", "val", "sem", "scope"),),
    ("GridExecutor", "__call__"): (("args_dev", "kwargs"),),
    ("GridExecutor", "_init_args_hst"): (("args_dev", "kwargs"),),
}


@dataclass
class _TensorRange:
    name: str  # kernel argument name
    lo: int  # first byte address of the argument's storage
    hi: int  # one past the last byte
    numel: int
    dtype: str


@dataclass
class _Launch:
    kernel: str
    ranges: list[_TensorRange] = field(default_factory=list)


@dataclass
class Traffic:
    """What the counted region moved.

    ``bytes[(kernel, argument, argument_numel, dtype)] = [loaded, stored]``; ``launches`` is the
    kernel names in launch order; ``torch_ops`` the flagged torch-side ops (see module doc).
    """

    bytes: dict[tuple[str, str, int, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0])
    )
    launches: list[str] = field(default_factory=list)
    torch_ops: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        return sum(v[0] for v in self.bytes.values())

    @property
    def stored(self) -> int:
        return sum(v[1] for v in self.bytes.values())

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    def split(self, min_numel: int) -> tuple[int, int]:
        """(bytes on tensors of at least ``min_numel`` elements, bytes on smaller ones).

        Unattributed traffic counts as big: it cannot be shown to be per-channel.
        """
        big = small = 0
        for (_, name, numel, _), (ld, st) in self.bytes.items():
            if numel >= min_numel or name == UNKNOWN_TENSOR:
                big += ld + st
            else:
                small += ld + st
        return big, small

    def tiers(self, min_numel: int, stats_numel: int = -1, resident_bytes: int = 0) -> dict:
        """Bytes by tier: ``input`` (tensors of at least ``min_numel`` elements, and unattributed
        traffic), ``stats`` (tensors of exactly ``stats_numel`` elements: the per-position
        statistics of LayerNorm2d / RMSNorm2d, 1 / C of the input), ``small`` (the rest:
        per-channel vectors, partial sums) and ``small_raw`` (the same with every load counted).
        In ``small``, a kernel's loads of a tensor of at most ``resident_bytes`` bytes count at
        most its size per launch of that kernel (a DRAM model: re-read by every program, it stays
        in L2 after the first read; floors.L2_RESIDENT_BYTES)."""
        launches: dict[str, int] = defaultdict(int)
        for k in self.launches:
            launches[k] += 1
        out = dict.fromkeys(("input", "stats", "small", "small_raw"), 0)
        for (kernel, name, numel, dtype), (ld, st) in self.bytes.items():
            if numel >= min_numel or name == UNKNOWN_TENSOR:
                out["input"] += ld + st
            elif numel == stats_numel:
                out["stats"] += ld + st
            else:
                size = numel * getattr(torch, dtype).itemsize
                cached = min(ld, size * launches[kernel]) if size <= resident_bytes else ld
                out["small"] += cached + st
                out["small_raw"] += ld + st
        return out

    def passes(self, pass_bytes: int) -> float:
        """All counted traffic in passes of ``pass_bytes`` (numel x element size of the input)."""
        return self.total / pass_bytes

    def by_kernel(self) -> dict[str, tuple[int, int]]:
        """kernel -> (loaded, stored) bytes."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for (kernel, *_), (ld, st) in self.bytes.items():
            out[kernel][0] += ld
            out[kernel][1] += st
        return {k: (v[0], v[1]) for k, v in out.items()}

    def describe(self, min_numel: int | None = None) -> str:
        """Multi-line breakdown per kernel and argument (for failure messages and reports)."""
        lines = []
        for (kernel, name, numel, dtype), (ld, st) in sorted(self.bytes.items()):
            tag = ""
            if min_numel is not None:
                tag = " big" if numel >= min_numel or name == UNKNOWN_TENSOR else " small"
            lines.append(f"  {kernel}.{name} [{numel} x {dtype}]{tag}: load {ld} B, store {st} B")
        counts: dict[str, int] = defaultdict(int)
        for k in self.launches:
            counts[k] += 1
        lines.append("  launches: " + ", ".join(f"{k} x{n}" for k, n in counts.items()))
        if self.torch_ops:
            lines.append("  torch-side full-size ops: " + "; ".join(self.torch_ops))
        return "\n".join(lines)


def _interpreter_classes() -> dict[str, type]:
    """The hooked interpreter classes, checked; raises UnsupportedTritonError otherwise."""
    import triton

    why = f"cannot count bytes with this Triton version ({triton.__version__})"
    try:
        from triton.runtime import interpreter
    except ImportError as e:
        raise UnsupportedTritonError(f"{why}: {e}") from e
    classes = {
        name: getattr(interpreter, name, None) for name in ("InterpreterBuilder", "GridExecutor")
    }
    for (cls, attr), known in _HOOKS.items():
        fn = classes[cls].__dict__.get(attr) if classes[cls] else None
        if fn is None:
            raise UnsupportedTritonError(f"{why}: {cls}.{attr} not found")
        got = tuple(inspect.signature(fn).parameters)[1:]
        if got not in known:
            raise UnsupportedTritonError(f"{why}: {cls}.{attr}{got} is none of {known}")
    return classes


def unsupported_reason() -> str | None:
    """Why this Triton's interpreter cannot be counted (None: it can)."""
    try:
        _interpreter_classes()
    except UnsupportedTritonError as e:
        return str(e)
    return None


def interpreter_active() -> bool:
    """Whether @triton.jit kernels are being defined for the interpreter."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton: only the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _elsize(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


class _Recorder:
    """Shared state of the active counting region."""

    def __init__(self, traffic: Traffic):
        self.traffic = traffic
        self.launch: _Launch | None = None

    def record(self, ptrs, mask, load: bool, store: bool) -> None:
        addr = np.asarray(ptrs.data)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        addr = addr.ravel().astype(np.uint64, copy=False)
        if addr.size == 0:
            return
        size = _elsize(ptrs)
        kernel = self.launch.kernel if self.launch else "<no launch>"
        left = addr.size
        for r in self.launch.ranges if self.launch else ():
            n = int(np.count_nonzero((addr >= r.lo) & (addr < r.hi)))
            if n:
                self._add((kernel, r.name, r.numel, r.dtype), n * size, load, store)
                left -= n
            if not left:
                break
        if left:
            self._add((kernel, UNKNOWN_TENSOR, 0, "?"), left * size, load, store)

    def _add(self, key, nbytes: int, load: bool, store: bool) -> None:
        entry = self.traffic.bytes[key]
        entry[0] += nbytes if load else 0
        entry[1] += nbytes if store else 0


_ACTIVE: list[_Recorder] = []


def _install(classes: dict[str, type], rec: _Recorder) -> list[tuple[type, str, object]]:
    saved = [(classes[c], a, classes[c].__dict__[a]) for c, a in _HOOKS]
    orig = {a: f for _, a, f in saved}

    def counting(attr: str, load: bool, store: bool, mask: str | None):
        fn, ptr = orig[attr], "ptr" if "ptr" in _HOOKS["InterpreterBuilder", attr][0] else "ptrs"
        sig = inspect.signature(fn)

        def hook(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs).arguments
            rec.record(bound[ptr], bound.get(mask) if mask else None, load, store)
            return fn(self, *args, **kwargs)

        return hook

    hooks = {
        "create_masked_load": counting("create_masked_load", True, False, "mask"),
        "create_masked_store": counting("create_masked_store", False, True, "mask"),
        "create_atomic_rmw": counting("create_atomic_rmw", True, True, "mask"),
        "create_atomic_cas": counting("create_atomic_cas", True, True, None),
    }

    def executor_call(self, *args_dev, **kwargs):
        outer = rec.launch
        rec.launch = _Launch(kernel=getattr(self.fn, "__name__", "<kernel>"))
        rec.traffic.launches.append(rec.launch.kernel)
        try:
            return orig["__call__"](self, *args_dev, **kwargs)
        finally:
            rec.launch = outer

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig["_init_args_hst"](self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst, strict=False)) + list(kwargs_hst.items())
        for name, arg in named if rec.launch is not None else ():
            if isinstance(arg, torch.Tensor):
                lo = arg.untyped_storage().data_ptr()
                hi = lo + arg.untyped_storage().nbytes()
                dtype = str(arg.dtype).removeprefix("torch.")
                rec.launch.ranges.append(_TensorRange(name, lo, hi, arg.numel(), dtype))
        return args_hst, kwargs_hst

    hooks.update(__call__=executor_call, _init_args_hst=init_args_hst)
    for cls, attr, _ in saved:
        setattr(cls, attr, hooks[attr])
    return saved


# --- torch-side audit -------------------------------------------------------------------------

_ALLOCATIONS = frozenset(
    "aten::empty aten::empty_like aten::empty_strided aten::empty_permuted aten::new_empty "  # noqa: SIM905
    "aten::new_empty_strided".split()
)
_METADATA = frozenset(
    "aten::sym_size aten::sym_stride aten::sym_numel aten::sym_storage_offset aten::size "  # noqa: SIM905
    "aten::stride aten::dim aten::numel aten::storage_offset aten::is_contiguous "
    "aten::is_non_overlapping_and_dense aten::is_same_size "
    "aten::_has_compatible_shallow_copy_type prim::layout prim::device".split()
)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class _TorchAudit(TorchDispatchMode):
    """Records aten ops that move full-size data outside Triton launches."""

    def __init__(self, rec: _Recorder, min_numel: int):
        super().__init__()
        self.rec = rec
        self.min_numel = min_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prim"):
            # A custom op (torch.library): run its own implementation with this mode still
            # pushed, so the aten ops inside it are seen too.
            for key in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CompositeExplicitAutograd):
                if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
                    with self:
                        return func._op_dk(key, *args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.rec.launch is None:
            self._check(func, args, kwargs, out)
        return out

    def _check(self, func, args, kwargs, out) -> None:
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        big = [t for t in ins + outs if t.numel() >= self.min_numel]
        name = func._schema.name
        if not big or name in _ALLOCATIONS or name in _METADATA:
            return
        in_storages = {t.untyped_storage().data_ptr() for t in ins}
        aliases_only = bool(outs) and all(
            t.untyped_storage().data_ptr() in in_storages for t in outs
        )
        if aliases_only and not func._schema.is_mutable:
            return  # a view, alias, detach or no-op (e.g. contiguous of a contiguous tensor)
        shapes = ", ".join(str(tuple(t.shape)) for t in ins + outs)
        self.rec.traffic.torch_ops.append(f"{func} [{shapes}]")


@contextmanager
def count_bytes(audit_min_numel: int | None = None) -> Iterator[Traffic]:
    """Count Triton kernel traffic (and, optionally, audit torch ops) in the ``with`` block."""
    classes = _interpreter_classes()
    if not interpreter_active():
        raise RuntimeError(
            "count_bytes needs Triton's interpreter: set TRITON_INTERPRET=1 before the kernels "
            "are defined (before importing tritonnorm)"
        )
    if _ACTIVE:
        raise RuntimeError("count_bytes regions cannot be nested")
    traffic = Traffic()
    rec = _Recorder(traffic)
    saved = _install(classes, rec)
    _ACTIVE.append(rec)
    audit = _TorchAudit(rec, audit_min_numel) if audit_min_numel is not None else None
    try:
        if audit is None:
            yield traffic
        else:
            with audit:
                yield traffic
    finally:
        _ACTIVE.pop()
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)
