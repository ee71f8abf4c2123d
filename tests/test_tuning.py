"""Which config a launch uses (tritonnorm/kernels/tuning.py): the committed table by default,
opt-in autotuning that times each class of shape once, persists it per GPU and Triton release,
and never times while a CUDA graph is captured.

Under the interpreter no launch is timed; these tests drive ``tuning.choose`` directly with the
interpreter's guard lifted and a stand-in benchmarker, on the candidate lists of real shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tritonnorm.kernels import config, tuning
from tritonnorm.kernels.config import Features
from tritonnorm.kernels.geometry import Reduction
from tritonnorm.kernels.lru import LRU


class _Kernel:
    """Stands in for a launcher.Kernel: a name and a source hash."""

    def __init__(self, name: str):
        self.name = name
        self.fn = type("Fn", (), {"cache_key": "source-hash"})()


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """tuning.choose as on a GPU: no interpreter guard, an empty process cache, the on-disk
    cache under tmp_path, and a benchmarker that returns the time a test assigns to a config."""
    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(tuning, "_tuned", LRU(4096))
    monkeypatch.setattr(tuning, "_cache_path", lambda device: tmp_path / "tuning.json")
    monkeypatch.setattr(tuning, "_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_arch", lambda device: None)  # no table unless a test sets one
    tuning._disk.cache_clear()
    timed = []

    class Benchmarker:
        def __init__(self):
            self.times: dict = {}

        def __call__(self, fn, **_):
            fn()
            return self.times.get(timed[-1], 1.0)

    bench_times = Benchmarker()
    monkeypatch.setattr(tuning, "_benchmarker", lambda: bench_times)
    yield timed, bench_times, tmp_path
    tuning._disk.cache_clear()


BN = Reduction.of(N=32, C=256, S=3136, group_size=1, reduce_batch=True, channels_fast=False)


def _candidates(shape=BN):
    """A shape's GPU candidates (the interpreter's list has one tile; 528 programs: an H100)."""
    return config._reduction_configs(shape, False, False, False, config._Overrides(), 528)


@pytest.fixture(autouse=True)
def _gpu_candidate_lists(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)
    config._reduction_configs.cache_clear()
    yield
    config._reduction_configs.cache_clear()  # none of the GPU lists survive into other tests


def _choose(candidates, bench=None, device="cuda", bucket=("b",)):
    return tuning.choose(
        _Kernel("_norm_stats_partial_kernel"), candidates, shape=BN, fused=False, flags=(),
        bucket=bucket, device=torch.device(device), bench=bench,
    )  # fmt: skip


def test_committed_table_is_what_perf_tuning_table_makes_of_the_committed_csv():
    from perf import tuning_table

    root = Path(__file__).resolve().parent.parent
    csv = root / "perf" / "results" / "h100" / "run2-ef14ab3" / "tuning.csv"
    committed = json.loads((root / "tritonnorm" / "kernels" / "tuned" / "sm90.json").read_text())
    made = tuning_table.build([csv.relative_to(root)], "sm90")
    assert made["rules"] == committed["rules"]
    assert len(made["rules"]) >= 12


def test_table_rules_name_candidates_of_their_class():
    # Every streamed rule's features exist among a real shape's candidates: picked, not ignored.
    rules = tuning._table("sm90")
    streamed = [(cls, f) for cls, f in rules.items() if not cls[1]]
    assert streamed
    for (_, _, channels_fast, reduce_batch), features in streamed:
        shape = Reduction.of(16, 64, 4096, 1, reduce_batch, channels_fast)
        cands = _candidates(shape)
        assert features in cands.features, (features, sorted(map(str, cands.features)))


def test_default_uses_the_table_and_times_nothing(monkeypatch, tuner):
    timed, _, _ = tuner
    cands = _candidates()
    rule = Features(2048, False, "high", "low")
    monkeypatch.setattr(tuning, "_arch", lambda device: "sm90")
    monkeypatch.setattr(
        tuning, "_table", lambda arch: {("_norm_stats_partial_kernel", False, False, True): rule}
    )
    bench = lambda cfg: timed.append(cfg)
    chosen = _choose(cands, bench)
    assert chosen is cands.features[rule] and chosen is not cands.configs[0]
    assert timed == []  # autotuning is off by default
    # Without a table for the device: the heuristic, first candidate.
    monkeypatch.setattr(tuning, "_table", lambda arch: {})
    assert _choose(cands, bench) is cands.configs[0]


def test_autotune_times_once_persists_and_reuses(tuner):
    timed, bench_times, tmp_path = tuner
    cands = _candidates()
    assert len(cands.configs) > 2
    winner = cands.configs[-1]
    bench_times.times = {winner: 0.5}
    with tuning.autotune():
        chosen = _choose(cands, timed.append)
        assert chosen is winner
        assert set(timed) == set(cands.configs)
        # A smaller batch in the same bucket: no second timing.
        timed.clear()
        assert _choose(cands, timed.append) is winner and timed == []
    stored = json.loads((tmp_path / "tuning.json").read_text())
    assert len(stored) == 1 and "source-hash" in next(iter(stored))
    # A new process (empty process cache) with autotuning on reads the file instead of timing.
    tuning._tuned.clear()
    tuning._disk.cache_clear()
    with tuning.autotune():
        assert _choose(cands, timed.append) is winner
    assert timed == []
    log = tuning.tuning_log()
    assert sum(1 for row in log if row[4]) >= 1


def test_autotune_off_again_after_the_block(tuner):
    timed, _, _ = tuner
    assert not tuning.enabled()
    with tuning.autotune():
        assert tuning.enabled()
    assert not tuning.enabled()
    _choose(_candidates(), timed.append)
    assert timed == []


def test_nothing_timed_while_a_graph_is_captured(monkeypatch, tuner):
    timed, _, _ = tuner
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    cands = _candidates()
    with tuning.autotune():
        assert _choose(cands, timed.append) is cands.configs[0]
    assert timed == []


def test_recordings_leave_no_results_behind(tuner):
    timed, _, tmp_path = tuner
    with tuning.tuning_discarded(), tuning.autotune():
        _choose(_candidates(), timed.append)
        assert tuning._tuned
    assert not tuning._tuned
    assert not (tmp_path / "tuning.json").exists()


def test_forced_paths_and_the_interpreter_take_the_first_candidate(tuner, monkeypatch):
    timed, _, _ = tuner
    cands = _candidates()
    assert len(cands.configs) > 1
    with tuning.autotune(), config.forced(split=2):
        assert _choose(cands, timed.append) is cands.configs[0]
    monkeypatch.setattr(config, "INTERPRET", True)
    with tuning.autotune():
        assert _choose(cands, timed.append) is cands.configs[0]
    assert timed == []
