"""A converted model under DistributedDataParallel trains exactly as the same torch model does.

Two gloo ranks on the CPU (the kernels through Triton's interpreter). Every rank builds a small
float64 CNN holding each kind of norm tritonnorm swaps (BatchNorm2d, BatchNorm2d with
``momentum=None``, GroupNorm, InstanceNorm2d with affine weights and running statistics), makes
two copies from the same initial weights, ``tn.convert``s one, wraps both in
``DistributedDataParallel(broadcast_buffers=True)`` and runs two SGD-with-momentum steps on its
own shard of a global batch, then one eval forward. The parent compares, rank by rank and step by
step, tritonnorm's model with torch's: losses, gradients, parameters and every buffer
(``num_batches_tracked`` exactly). That covers DDP's gradient all-reduce through our backward
and its broadcast of rank 0's buffers into our modules before each forward (the ranks' data
differ, so a buffer that missed the broadcast would show on rank 1). Parameters and gradients
must also be bit-identical across ranks. float64 keeps the comparison tight (tolerances.py).
"""

from __future__ import annotations

import copy
import os
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():  # spawned ranks import this module: same rule as conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerances import assert_close_to_reference
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritonnorm as tn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JOB_TIMEOUT_S = 120  # a hung collective fails the test (gloo itself gives up after 60 s)
WORLD = 2
SIZES = (3, 2)  # samples per rank: uneven, each rank its own data
STEPS = 2
CLASSES = 3
LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-3


# --------------------------------------------------------------------------------------------
# Model and data (the same in every process: fixed seeds)


def _generator(*key) -> torch.Generator:
    """The same stream in every process (str hashes are salted per process; crc32 is not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def build_model() -> nn.Module:
    torch.manual_seed(2024)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.SiLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),  # cumulative average
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, CLASSES),
    )  # fmt: skip
    with torch.no_grad():  # non-trivial norm weights (torch initialises them to 1 and 0)
        gen = _generator("affine")
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
    return model.double().to(DEVICE)


def shard(rank: int, step: int | str) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the global batch of ``step`` (contiguous float64), and its labels."""
    gen = _generator("ddp", step)
    x = torch.randn(sum(SIZES), 3, 6, 6, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    labels = torch.randint(0, CLASSES, (sum(SIZES),), generator=gen)
    start = sum(SIZES[:rank])
    part = slice(start, start + SIZES[rank])
    return x[part].contiguous().to(DEVICE), labels[part].to(DEVICE)


def _state(model: nn.Module) -> dict:
    return {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grads": {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        "buffers": {k: b.clone() for k, b in model.named_buffers()},
    }


def train(model: nn.Module, rank: int, broadcast_buffers: bool = True) -> dict:
    """DDP training on this rank's shards: per step the loss and the state after the step; then
    an eval forward and the state after it."""
    ddp = DDP(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    steps = []
    for step in range(STEPS):
        x, labels = shard(rank, step)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x), labels)
        loss.backward()
        opt.step()
        steps.append({"loss": loss.detach(), **_state(model)})
    ddp.eval()
    x, _ = shard(rank, "eval")
    with torch.no_grad():
        out = ddp(x)
    return {"steps": steps, "eval": {"out": out, **_state(model)}}


def job(rank: int) -> dict:
    torch_model = build_model()
    ours = tn.convert(copy.deepcopy(torch_model))
    swapped = [
        type(m).__name__ for m in ours.modules() if type(m).__module__.startswith("tritonnorm")
    ]
    x, _ = shard(rank, 0)
    return {
        "swapped": swapped,
        "runs_triton": tn.functional.runs_triton(x),  # else tritonnorm would be torch's op
        "x": x,
        "torch": train(torch_model, rank),
        # (checked once by hand: with broadcast_buffers=False here, rank 1's step-2 buffers fail)
        "tn": train(ours, rank, broadcast_buffers=True),
    }


# --------------------------------------------------------------------------------------------
# Running ranks


def _rank_main(rank: int, out_dir: str) -> None:
    """One spawned rank: init gloo, run the job, save results (or the error), always clean up."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/store",  # no port to race for with concurrent test runs
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        try:
            results = job(rank)
        except Exception:  # reported by the parent, with the rank's traceback
            results = {"error": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _rank_main, args=(str(out_dir),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP job on {WORLD} ranks did not finish within {JOB_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}:\n{res['error']}"
    return results


# --------------------------------------------------------------------------------------------
# Tests


def _compare_state(ours: dict, ref: dict, where: str) -> None:
    for kind in ("params", "grads", "buffers"):
        assert ours[kind].keys() == ref[kind].keys(), f"{where}: {kind} names differ"
        for name, value in ref[kind].items():
            what = f"{where} {kind[:-1]} {name}"
            assert ours[kind][name].dtype == value.dtype, what
            if value.is_floating_point():
                assert_close_to_reference(ours[kind][name], value, name=what)
            else:  # num_batches_tracked: exactly
                assert torch.equal(ours[kind][name], value), (
                    f"{what}: {ours[kind][name]} != {value}"
                )


def test_setup_is_meaningful(ranks):
    """The kernels ran, every norm was swapped, and the ranks saw different data."""
    for res in ranks:
        assert res["runs_triton"]
        assert sorted(res["swapped"]) == [
            "BatchNorm2d",
            "BatchNorm2d",
            "GroupNorm",
            "InstanceNorm2d",
        ]
    assert not torch.equal(ranks[0]["x"][:2], ranks[1]["x"][:2])
    # each rank's running statistics are its own after a step (so the broadcast matters)
    first = ranks[0]["torch"]["steps"][0]["buffers"]
    second = ranks[1]["torch"]["steps"][0]["buffers"]
    assert not torch.equal(first["1.running_mean"], second["1.running_mean"])


@pytest.mark.parametrize("rank", range(WORLD))
def test_training_matches_torch(ranks, rank):
    ours, ref = ranks[rank]["tn"], ranks[rank]["torch"]
    for step, (o, r) in enumerate(zip(ours["steps"], ref["steps"], strict=True)):
        where = f"rank {rank} step {step}"
        assert_close_to_reference(o["loss"], r["loss"], name=f"{where} loss")
        _compare_state(o, r, where)
    assert_close_to_reference(ours["eval"]["out"], ref["eval"]["out"], name=f"rank {rank} eval")
    _compare_state(ours["eval"], ref["eval"], f"rank {rank} eval")
    # the model did train: parameters moved, and momentum=None counted both steps
    assert not torch.equal(
        ref["steps"][0]["params"]["0.weight"], ref["steps"][1]["params"]["0.weight"]
    )
    assert int(ours["eval"]["buffers"]["10.num_batches_tracked"]) == STEPS


@pytest.mark.parametrize("model", ["torch", "tn"])
def test_parameters_identical_across_ranks(ranks, model):
    """DDP all-reduces the gradients: every rank holds bitwise the same gradients and weights."""
    for step in range(STEPS):
        for kind in ("params", "grads"):
            first = ranks[0][model]["steps"][step][kind]
            for rank in range(1, WORLD):
                for name, value in ranks[rank][model]["steps"][step][kind].items():
                    assert torch.equal(value, first[name]), f"rank {rank} step {step} {kind} {name}"
