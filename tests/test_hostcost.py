"""perf.hostcost: the host time of a call with every kernel launch stubbed out."""

from __future__ import annotations

import pytest

hostcost = pytest.importorskip("perf.hostcost")


def test_every_launch_is_stubbed_and_timed():
    got = hostcost.measure(calls=2, blocks=1)
    names = [n for n in got if not n.endswith(": launches")]
    assert "bn train forward+backward" in names
    for name in names:
        assert got[name] > 0, name
        # A forward launches at least statistics + finalize (or finalize + apply), a backward
        # as many again: none of them may have reached a kernel.
        assert got[f"{name}: launches"] >= (4 if "backward" in name else 2), (name, got)


def test_launches_are_restored_after_the_block():
    from tritonnorm.kernels import config, launch

    before = config.TunedKernel.launch, launch._norm_stats_finalize_kernel
    with hostcost.kernels_stubbed():
        assert config.TunedKernel.launch is not before[0]
    assert (config.TunedKernel.launch, launch._norm_stats_finalize_kernel) == before
