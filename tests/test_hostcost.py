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
