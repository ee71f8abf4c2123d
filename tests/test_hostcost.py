"""perf.hostcost: tritonnorm's CUDA path emulated on the CPU (Triton's real JIT path and C launcher
over a stub driver library, compilation stubbed).

The emulation needs the interpreter off, which this test process has on (conftest.py): it runs
once, in its own process, with few calls; every test reads its JSON report. Timings are a
benchmark, not tested. Launch-count targets: one line each against ``launch_counts(report)``.
"""

from __future__ import annotations

import pytest

from perf import hostcost

_reason = hostcost.unavailable(interpreter=False)
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"hostcost emulation: {_reason}")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("hostcost") / "hostcost.json"
    return hostcost.run_subprocess(out, "--calls", "2", "--blocks", "1")


def test_every_case_and_field_is_reported(report):
    assert set(report["cases"]) == set(hostcost.CASES)
    assert report["schema"] == 1
    for key in ("triton", "torch", "calls", "blocks", "warmup", "target_ratio"):
        assert key in report, key
    for name, row in report["cases"].items():
        assert set(row) == set(hostcost.CASE_FIELDS), name
        assert row["us_per_call"] > 0 and row["floor_us"] > 0 and row["ratio"] > 0, name


def test_every_case_ran_through_the_real_launcher(report):
    """Counted on Triton's launcher, and the same number reached the stub's cuLaunchKernelEx."""
    for name, row in report["cases"].items():
        assert row["launches"] > 0, name
        assert sum(row["launches_by_kernel"].values()) == row["launches"], name
        assert row["driver_launches_per_call"] == row["launches"], name
    backward = [n for n, r in report["cases"].items() if r["backward"]]
    assert backward and all(hostcost.launch_counts(report)[n] >= 2 for n in backward)


def test_no_recompiles_after_warmup(report):
    for name, row in report["cases"].items():
        assert row["compiles_in_warmup"] > 0, name  # the compile stub is what Triton called
        assert row["recompiles_after_warmup"] == 0, name


def test_torch_ops_are_classified(report):
    counts = hostcost.torch_kernel_counts(report)
    for name, row in report["cases"].items():
        assert counts[name] == sum(row["torch_kernel_ops"].values()), name
        assert row["allocations"] == sum(row["allocation_ops"].values()) > 0, name
        assert all(op.split(".")[1] in hostcost._ALLOCATIONS for op in row["allocation_ops"])


# Triton launches per call (issue 15's targets): eval BatchNorm 1; a streamed BatchNorm 2 each
# way; an instance or group on chip 1 forward, 1 backward + 1 to sum dweight/dbias over the
# samples (no float atomics); GroupNorm's streamed backward keeps a finalize (its dx
# coefficients sum over a group's channels); an epilogue's backward 3 (sums, finalize of dscale/
# dshift and the coefficients, apply). Across the channels at each position (LayerNorm2d,
# RMSNorm2d): forward 1; backward 2, dx with the partial sums of dweight / dbias (and of dscale /
# dshift), then their finalize.
LAUNCH_TARGETS = {
    "bn eval forward": 1,
    "bn train forward": 2,
    "bn train forward+backward": 4,
    "in forward": 2,
    "in forward+backward": 4,
    "gn forward": 2,
    "gn forward+backward": 5,
    "gn+scale/shift+silu forward": 2,
    "gn+scale/shift+silu forward+backward": 5,
    "bn+residual+relu forward+backward": 5,
    "in forward+backward, on chip": 3,
    "gn forward+backward, on chip": 3,
    "ln2d forward": 1,
    "ln2d forward+backward": 3,
    "rms2d forward+backward": 3,
    "ln2d+scale/shift+gelu forward+backward": 3,
}


def test_launch_counts_meet_their_targets(report):
    counts = hostcost.launch_counts(report)
    assert set(LAUNCH_TARGETS) == set(counts)
    over = {n: (counts[n], t) for n, t in LAUNCH_TARGETS.items() if counts[n] > t}
    assert not over, f"launches per call over target (got, target): {over}"


def test_no_torch_kernels_beyond_allocations(report):
    counts = hostcost.torch_kernel_counts(report)
    assert not any(counts.values()), {n: report["cases"][n]["torch_kernel_ops"] for n in counts}


def test_later_calls_launch_the_compiled_kernels_directly(report):
    # After the warm-up every launch bypasses JITFunction.run (launcher.py's direct path).
    jit = {n: row["jit_launches"] for n, row in report["cases"].items()}
    assert not any(jit.values()), jit
