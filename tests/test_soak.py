"""perf.soak --quick: momentum=None BatchNorm2d over more shapes than a small plan bound, in the
CPU emulation (perf.hostcost's), in its own process with the interpreter off (issue 24, item 1).

One run (2,000 rotation calls over 12 shapes, bound 8; ~15 s on the 2-core machine); the tests
read its JSON report. Timings are a benchmark, not tested.
"""

from __future__ import annotations

import pytest

from perf import hostcost, soak

_reason = hostcost.unavailable(interpreter=False)
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"hostcost emulation: {_reason}")

BOUND = soak.QUICK["plan_cache_size"]
# A forward plan of this layer holds ~10-20 KB of resident memory: at HEAD e3bbb83, before issue
# 24's change, momentum=None kept one per call, and this quick run's second half (1,000 rotation
# calls and 320 timed ones: 1,320 plans) grew RSS by 12-18 MB (two runs). Bounded, it moves by
# ~0.1 MB. A leak of a plan per call is 3x the threshold or more; of a plan per 4 calls, ~1x.
RSS_GROWTH_MB = 4.0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    return soak.run_subprocess(out, "--quick", timeout=300)


def test_the_run_is_reported(report):
    assert report["schema"] == 1 and report["tool"] == "perf.soak"
    assert report["calls"] == soak.QUICK["calls"] and report["shapes"] > BOUND
    assert [s["call"] for s in report["samples"]][-1] == report["calls"]
    assert len(report["samples"]) == soak.SAMPLES + 1


def test_plan_counts_stay_within_the_bound(report):
    assert report["plan_cache_size"] == BOUND, "launch.set_plan_cache_size did not set the bound"
    counts = [(s["call"], s["forward_plans"], s["backward_plans"]) for s in report["samples"]]
    over = [c for c in counts if not (0 < c[1] <= BOUND and 0 < c[2] <= BOUND)]
    assert not over, f"(call, forward plans, backward plans) over the bound {BOUND}: {over}"


def test_momentum_none_on_one_shape_holds_one_plan_each_way(report):
    single = report["single_shape"]
    assert (single["forward_plans"], single["backward_plans"]) == (1, 1), single


def test_resident_memory_is_flat_in_the_second_half(report):
    summary = report["summary"]
    growth = summary["rss_growth_mb_second_half"]
    assert growth < RSS_GROWTH_MB, (
        f"RSS grew {growth:.1f} MB over the second half ({summary['rss_mb_half']:.1f} -> "
        f"{summary['rss_mb_last']:.1f} MB); plans {summary['max_plans']} at most"
    )
