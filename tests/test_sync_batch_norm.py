"""tn.SyncBatchNorm across 2 and 3 processes (gloo; on CPU through the Triton interpreter).

Each multi-process job spawns one process per rank; every rank runs a list of cases on its slice
of a global batch (generated from fixed seeds, so parent and children agree on the data) and saves
its results to a file. The parent compares them with single-process tritonnorm on the whole
batch: outputs, input gradients and running statistics must match the global batch, parameter
gradients must be the LOCAL sums (torch.nn.SyncBatchNorm's semantics; torch's own cannot run on
CPU, so the expectation is computed analytically in float64), and running statistics must be
bit-identical on every rank. A job that hangs is killed after a timeout and fails its tests.
"""

from __future__ import annotations

import os
import time
import traceback
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():  # spawned ranks import this module: same rule as conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import tritonnorm as tn
from tritonnorm import sync as sync_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
JOB_TIMEOUT_S = 150  # a hung collective fails the job (gloo itself gives up after 60 s)
EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Running ranks


def _rank_main(rank: int, world: int, out_dir: str, job: str) -> None:
    """Entry point of one spawned rank: init gloo, run the job, save results, always clean up."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/store",  # no port to race for with concurrent test runs
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        results = JOBS[job](rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(job: str, world: int, out_dir: Path) -> list[dict]:
    """Run ``job`` on ``world`` spawned ranks; the results of every rank, in rank order."""
    context = mp.start_processes(
        _rank_main, args=(world, str(out_dir), job), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{job} on {world} ranks did not finish within {JOB_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


# --------------------------------------------------------------------------------------------
# Cases: global data shared by the ranks (their slices) and the single-process reference


@dataclass(frozen=True)
class Case:
    feature_shape: tuple[int, ...]  # (C, *spatial)
    sizes: dict[int, tuple[int, ...]]  # world size -> samples per rank
    dtype: torch.dtype = torch.float32
    memory_format: torch.memory_format = torch.contiguous_format
    momentum: float | None = 0.1
    steps: int = 1
    input_grad: bool = True
    tol: dict = field(default_factory=lambda: {"rtol": 2e-5, "atol": 2e-5})


CASES = {
    "uneven": Case((3, 2, 3), {2: (3, 2), 3: (3, 1, 2)}),
    # rank 0 holds 1 value per channel (allowed: the statistics are global), rank 1 none
    "empty_rank": Case((4,), {2: (0, 3), 3: (1, 0, 2)}),
    "all_empty": Case((3, 2), {2: (0, 0), 3: (0, 0, 0)}),
    "channels_last_cma": Case(
        (5, 3, 2),
        {2: (2, 2), 3: (1, 2, 2)},
        memory_format=torch.channels_last,
        momentum=None,
        steps=2,
    ),
    "bfloat16": Case(
        (3, 4),
        {2: (3, 2), 3: (2, 2, 1)},
        dtype=torch.bfloat16,
        tol={"rtol": 1.6e-2, "atol": 1.6e-2},  # 2 bf16 ulps: the fp32 statistics differ in order
    ),
    "no_input_grad": Case((3, 5), {2: (2, 3), 3: (2, 1, 2)}, input_grad=False),
}


def _generator(*key) -> torch.Generator:
    """The same stream in every process (str hashes are salted per process; crc32 is not)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def case_data(name: str, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (x, dy) of one step, in the case's dtype and memory format."""
    case = CASES[name]
    shape = (sum(case.sizes[world]), *case.feature_shape)
    gen = _generator(name, world, step)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = case.memory_format
    return (x.to(case.dtype).contiguous(memory_format=fmt).to(DEVICE),
            dy.to(case.dtype).contiguous(memory_format=fmt).to(DEVICE))  # fmt: skip


def case_params(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    C = CASES[name].feature_shape[0]
    gen = _generator(name, "params")
    weight = torch.rand(C, generator=gen) + 0.5
    return weight.to(DEVICE), torch.randn(C, generator=gen).to(DEVICE)


def rank_slice(name: str, world: int, rank: int) -> slice:
    sizes = CASES[name].sizes[world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _snapshot(m: nn.Module) -> dict:
    return {
        "running_mean": m.running_mean.clone(),
        "running_var": m.running_var.clone(),
        "num_batches_tracked": int(m.num_batches_tracked),
    }


def run_case(name: str, world: int, rank: int) -> dict:
    """One rank's steps of a case: per step y, dx, dweight, dbias; then the buffers."""
    case = CASES[name]
    weight, bias = case_params(name)
    m = tn.SyncBatchNorm(weight.numel(), eps=EPS, momentum=case.momentum).to(DEVICE)
    with torch.no_grad():
        m.weight.copy_(weight), m.bias.copy_(bias)
    steps = []
    for step in range(case.steps):
        x_global, dy_global = case_data(name, world, step)
        part = rank_slice(name, world, rank)
        x = x_global[part].clone().requires_grad_(case.input_grad)
        m.zero_grad(set_to_none=True)
        y = m(x)
        y.backward(dy_global[part])
        steps.append(
            {"y": y.detach(), "dx": x.grad, "dweight": m.weight.grad, "dbias": m.bias.grad}
        )
    return {"steps": steps, **_snapshot(m)}


def reference_case(name: str, world: int) -> dict:
    """Single process, whole batch: tn.batch_norm's y, dx and running statistics per step, and
    each rank's expected (local) weight/bias gradients computed in float64."""
    case = CASES[name]
    weight, bias = case_params(name)
    C = weight.numel()
    running_mean = torch.zeros(C, device=DEVICE)
    running_var = torch.ones(C, device=DEVICE)
    steps = []
    for step in range(case.steps):
        x_global, dy_global = case_data(name, world, step)
        x = x_global.clone().requires_grad_(case.input_grad)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        momentum = case.momentum if case.momentum is not None else 1.0 / (step + 1)
        y = tn.batch_norm(x, running_mean, running_var, w, b, True, momentum, EPS)
        y.backward(dy_global)
        # x_hat with the global statistics, float64; local parameter gradients per rank.
        x64, dy64 = x_global.double(), dy_global.double()
        dims = [0, *range(2, x64.dim())]
        if x64.numel():
            var, mean = torch.var_mean(x64, dim=dims, keepdim=True, correction=0)
            x_hat = (x64 - mean) / torch.sqrt(var + EPS)
        else:
            x_hat = x64
        local = []
        for rank in range(world):
            part = rank_slice(name, world, rank)
            local.append(
                {
                    "dweight": (dy64[part] * x_hat[part]).sum(dims),
                    "dbias": dy64[part].sum(dims),
                }
            )
        steps.append(
            {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "dbias": b.grad, "local": local}
        )
    return {"steps": steps, "running_mean": running_mean, "running_var": running_var}


# --------------------------------------------------------------------------------------------
# Jobs (what every rank runs)


def _capture(fn) -> str | None:
    """None if fn() ran, else the exception's type and message."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _no_collective(*_args, **_kwargs):
    raise AssertionError("a fallback must not communicate")


def _fallback_checks(rank: int, world: int) -> dict:
    """Eval mode, world size 1 and eval without buffers: plain tn.batch_norm, no collective."""
    out = {}
    C = 3
    x = torch.randn(2 + rank, C, 4, generator=_generator("fallback", rank), device="cpu")
    x = x.to(DEVICE)
    weight, bias = torch.rand(C, device=DEVICE) + 0.5, torch.randn(C, device=DEVICE)
    # every rank creates every group (new_group is collective), then uses its own
    singles = [dist.new_group([r]) for r in range(world)]
    gather = sync_module._all_gather
    sync_module._all_gather = _no_collective
    try:
        # eval: running statistics, exactly tn.batch_norm's
        m = tn.SyncBatchNorm(C, eps=EPS).to(DEVICE).eval()
        with torch.no_grad():
            m.weight.copy_(weight), m.bias.copy_(bias)
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
        expected = tn.batch_norm(x, m.running_mean, m.running_var, weight, bias, False, 0.1, EPS)
        out["eval"] = (m(x).detach(), expected)

        # eval without running statistics: local batch statistics, still no synchronisation
        m = tn.SyncBatchNorm(C, eps=EPS, track_running_stats=False).to(DEVICE).eval()
        out["eval_no_buffers"] = (m(x).detach(), tn.batch_norm(x, None, None, None, None, True))

        # a process group of one rank: local training batch norm, buffers updated locally
        m = tn.SyncBatchNorm(C, eps=EPS, process_group=singles[rank]).to(DEVICE)
        with torch.no_grad():
            m.weight.copy_(weight), m.bias.copy_(bias)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        y = m(xs[0])
        y.backward(torch.ones_like(y) + xs[0].detach())
        running_mean, running_var = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        y_ref = tn.batch_norm(xs[1], running_mean, running_var, w, b, True, 0.1, EPS)
        y_ref.backward(torch.ones_like(y_ref) + xs[1].detach())
        out["world_size_1"] = {
            "y": (y.detach(), y_ref.detach()),
            "dx": (xs[0].grad, xs[1].grad),
            "dweight": (m.weight.grad, w.grad),
            "dbias": (m.bias.grad, b.grad),
            "running_mean": (m.running_mean, running_mean),
            "running_var": (m.running_var, running_var),
        }
    finally:
        sync_module._all_gather = gather
    return out


def _validation_checks(rank: int) -> dict:
    """Bad inputs on the synchronised path raise on every rank before any buffer changes (and
    before any collective, so nothing hangs)."""
    m = tn.SyncBatchNorm(3).to(DEVICE)
    bad_eps = tn.SyncBatchNorm(3, eps=0.0).to(DEVICE)
    before = _snapshot(m)
    errors = {
        "channels": _capture(lambda: m(torch.randn(4, 5, 2, device=DEVICE))),
        "dtype": _capture(lambda: m(torch.ones(4, 3, 2, dtype=torch.int64, device=DEVICE))),
        "dim": _capture(lambda: m(torch.randn(3, device=DEVICE))),
        "device": _capture(lambda: m(torch.randn(4, 3, 2, device="meta"))),
        "eps": _capture(lambda: bad_eps(torch.randn(4, 3, 2, device=DEVICE))),
    }
    after = _snapshot(m)
    unchanged = (
        torch.equal(before["running_mean"], after["running_mean"])
        and torch.equal(before["running_var"], after["running_var"])
        and before["num_batches_tracked"] == after["num_batches_tracked"]
        and int(bad_eps.num_batches_tracked) == 0
    )
    return {"errors": errors, "unchanged": unchanged}


def _gather_checks(rank: int, world: int) -> dict:
    """Both all-gather forms (single tensor and list) give every rank's tensor in rank order."""
    t = torch.arange(6.0, device=DEVICE).view(2, 3) + 10 * rank
    return {
        single: sync_module._all_gather(t, dist.group.WORLD, world, single=single)
        for single in (True, False)
    }


def _compile_checks(rank: int) -> dict:
    """torch.compile: a graph break around the synchronised forward (as for torch's own
    SyncBatchNorm), the rest compiled, results as in eager mode."""
    from torch._dynamo.utils import counters

    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), tn.SyncBatchNorm(3), nn.ReLU()).to(DEVICE)
    x = torch.randn(2 + rank, 2, 3, 3, generator=_generator("compile", rank)).to(DEVICE)
    results = {}
    for label, fn in (("eager", model), ("compiled", torch.compile(model, backend="eager"))):
        model.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        results[label] = [y.detach(), *(p.grad for p in model.parameters())]
    results["graph_breaks"] = sum(counters["graph_break"].values())
    return results


def job_cases(rank: int, world: int) -> dict:
    results = {}
    for name in CASES:
        try:
            results[name] = run_case(name, world, rank)
        except Exception:  # reported by the case's test; the next cases still run
            results[name] = {"error": traceback.format_exc()}
    results["fallback"] = _fallback_checks(rank, world)
    results["validation"] = _validation_checks(rank)
    results["gather"] = _gather_checks(rank, world)
    results["compile"] = _compile_checks(rank)
    if world == len(DDP_SIZES):  # DDP training runs in the same ranks: one spawn fewer
        try:
            results["ddp"] = job_ddp(rank, world)
        except Exception:  # reported by the DDP test
            results["ddp"] = {"error": traceback.format_exc()}
    return results


# DDP: a small model trained for 3 SGD steps on uneven per-rank batches.
DDP_SIZES = (2, 1, 3)
DDP_STEPS = 3
DDP_LR = 0.1


def ddp_model() -> nn.Module:
    torch.manual_seed(1234)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip
    return model.to(DEVICE)


def ddp_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _generator("ddp", step)
    n = sum(DDP_SIZES)
    x = torch.randn(n, 2, 4, 4, generator=gen) * 2.0 + 1.0
    return x.to(DEVICE), torch.randn(n, 3, generator=gen).to(DEVICE)


def job_ddp(rank: int, world: int) -> dict:
    assert world == len(DDP_SIZES)
    model = tn.SyncBatchNorm.convert_sync_batchnorm(ddp_model())
    assert isinstance(model[1], tn.SyncBatchNorm)
    if DEVICE == "cpu":
        # DDP refuses any nn.SyncBatchNorm (subclasses included) in a CPU module, because torch's
        # own needs a GPU; ours runs on CPU through the interpreter, so lift that check here.
        ddp_cls = nn.parallel.DistributedDataParallel
        ddp_cls._passing_sync_batchnorm_handle = lambda self, module: None
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    start = sum(DDP_SIZES[:rank])
    part = slice(start, start + DDP_SIZES[rank])
    n_global = sum(DDP_SIZES)
    for step in range(DDP_STEPS):
        x, target = ddp_data(step)
        opt.zero_grad()
        out = ddp(x[part])
        # The single-process loss is sum/n_global. DDP AVERAGES gradients over ranks, and each
        # rank's gradients (SyncBN's dx included) are those of its own loss term, so the sum of
        # the rank losses must be world * (sum/n_global): scale each rank's local sum by world.
        loss = ((out - target[part]) ** 2).sum() * world / n_global
        loss.backward()
        opt.step()
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


JOBS = {"cases": job_cases}


# --------------------------------------------------------------------------------------------
# Tests: multi-process


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(world)``: the results of the "cases" job on ``world`` ranks, run once per module
    (the 3-rank run holds the DDP training too)."""
    runs = {}

    def get(world: int) -> list[dict]:
        if world not in runs:
            runs[world] = run_ranks("cases", world, tmp_path_factory.mktemp(f"sync{world}"))
        return runs[world]

    return get


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def cases_run(request, ranks):
    world = request.param
    return world, ranks(world)


def _close(ours, ref, name, **tol):
    assert ours is not None, f"{name}: missing"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    torch.testing.assert_close(ours, ref, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_on_global_batch(cases_run, name):
    world, results = cases_run
    case = CASES[name]
    ref = reference_case(name, world)
    for rank, res in enumerate(results):
        res = res[name]
        assert "error" not in res, f"rank {rank}: {res.get('error')}"
        part = rank_slice(name, world, rank)
        for step, (ours, exp) in enumerate(zip(res["steps"], ref["steps"], strict=True)):
            where = f"rank {rank} step {step}"
            _close(ours["y"], exp["y"][part], f"{where} y", **case.tol)
            assert ours["y"].is_contiguous(memory_format=case.memory_format), where
            if case.input_grad:
                _close(ours["dx"], exp["dx"][part], f"{where} dx", **case.tol)
                assert ours["dx"].is_contiguous(memory_format=case.memory_format), where
            else:
                assert ours["dx"] is None
            # Parameter gradients: this rank's own sums (as torch.nn.SyncBatchNorm; DDP averages)
            for key in ("dweight", "dbias"):
                expected = exp["local"][rank][key].to(ours[key].dtype)
                _close(ours[key], expected, f"{where} {key} (local)", rtol=1e-4, atol=1e-4)
        _close(res["running_mean"], ref["running_mean"], f"rank {rank} running_mean")
        _close(res["running_var"], ref["running_var"], f"rank {rank} running_var")
        assert res["num_batches_tracked"] == case.steps
    # Summed over ranks, the local parameter gradients are the global batch's.
    last = ref["steps"][-1]
    for key in ("dweight", "dbias"):
        total = sum(res[name]["steps"][-1][key] for res in results)
        _close(total, last[key], f"sum over ranks of {key}", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_running_stats_bit_identical_across_ranks(cases_run, name):
    _, results = cases_run
    first = results[0][name]
    assert "error" not in first, first.get("error")
    for rank, res in enumerate(results[1:], start=1):
        for key in ("running_mean", "running_var"):
            assert torch.equal(res[name][key], first[key]), f"rank {rank} {key} differs from rank 0"


def test_all_empty_batch_keeps_running_stats(cases_run):
    _, results = cases_run
    for res in results:
        res = res["all_empty"]
        assert torch.equal(res["running_mean"], torch.zeros(3, device=DEVICE))
        assert torch.equal(res["running_var"], torch.ones(3, device=DEVICE))
        assert res["steps"][0]["y"].shape == (0, 3, 2)


def test_fallbacks_equal_batch_norm(cases_run):
    _, results = cases_run
    for rank, res in enumerate(results):
        fb = res["fallback"]
        for key in ("eval", "eval_no_buffers"):
            ours, expected = fb[key]
            assert torch.equal(ours, expected), f"rank {rank} {key}"
        for key, (ours, expected) in fb["world_size_1"].items():
            assert torch.equal(ours, expected), f"rank {rank} world size 1: {key}"


def test_invalid_input_raises_before_state_changes(cases_run):
    _, results = cases_run
    for rank, res in enumerate(results):
        errors = res["validation"]["errors"]
        assert errors["channels"].startswith("RuntimeError"), errors["channels"]
        assert "should contain 5 elements" in errors["channels"]
        assert errors["dtype"].startswith("UnsupportedDtypeError"), errors["dtype"]
        assert errors["dim"].startswith("ValueError"), errors["dim"]
        assert errors["device"].startswith("ValueError"), errors["device"]
        assert "SyncBatchNorm expected input tensor" in errors["device"]
        assert errors["eps"].startswith("ValueError"), errors["eps"]
        assert res["validation"]["unchanged"], f"rank {rank}: state changed by a rejected input"


def test_all_gather_forms(cases_run):
    world, results = cases_run
    expected = torch.stack(
        [torch.arange(6.0, device=DEVICE).view(2, 3) + 10 * r for r in range(world)]
    )
    for res in results:
        for single, gathered in res["gather"].items():
            assert torch.equal(gathered, expected), f"single={single}"


def test_compile_graph_breaks_and_matches_eager(cases_run):
    _, results = cases_run
    for rank, res in enumerate(results):
        res = res["compile"]
        assert res["graph_breaks"] > 0
        for i, (eager, compiled) in enumerate(zip(res["eager"], res["compiled"], strict=True)):
            _close(compiled, eager, f"rank {rank} compiled vs eager, output/grad {i}")


def test_ddp_training_matches_single_process(ranks):
    results = [res["ddp"] for res in ranks(len(DDP_SIZES))]
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}: {res['error']}"
    model = tn.convert(ddp_model())  # the same initial weights, plain tritonnorm BatchNorm
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for step in range(DDP_STEPS):
        x, target = ddp_data(step)
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).sum() / sum(DDP_SIZES)
        loss.backward()
        opt.step()
    expected = model.state_dict()
    for rank, res in enumerate(results):
        state = res["state"]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                assert int(state[key]) == DDP_STEPS == int(value)
            else:
                _close(state[key], value, f"rank {rank} {key}", rtol=1e-4, atol=1e-5)
            assert torch.equal(state[key], results[0]["state"][key]), f"rank {rank} {key}"


# --------------------------------------------------------------------------------------------
# Tests: single process (distributed not initialised), module and conversion


def test_not_initialised_falls_back_to_batch_norm():
    assert not dist.is_initialized()
    C = 4
    m = tn.SyncBatchNorm(C, momentum=None).to(DEVICE)
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    running_mean, running_var = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    for step in range(2):
        x = torch.randn(3, C, 5, device=DEVICE)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        y = m(xs[0])
        y_ref = tn.batch_norm(xs[1], running_mean, running_var, w, b, True, 1.0 / (step + 1))
        g = torch.randn_like(y)
        y.backward(g), y_ref.backward(g)
        assert torch.equal(y, y_ref)
        assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(m.weight.grad, w.grad) and torch.equal(m.bias.grad, b.grad)
    assert torch.equal(m.running_mean, running_mean)
    assert torch.equal(m.running_var, running_var)
    assert int(m.num_batches_tracked) == 2
    m.eval()
    x = torch.randn(3, C, 5, device=DEVICE)
    assert torch.equal(m(x), tn.batch_norm(x, running_mean, running_var, w, b, False))


def test_not_initialised_checks_before_state_changes():
    m = tn.SyncBatchNorm(3).to(DEVICE)
    with pytest.raises(RuntimeError, match="should contain 5 elements"):
        m(torch.randn(4, 5, 2, device=DEVICE))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, device=DEVICE))  # torch: only without synchronisation
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="channels should be non-zero"):
        m(torch.randn(2, 0, 3, device=DEVICE))
    assert int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_mean, torch.zeros(3, device=DEVICE))


def test_is_torch_sync_batch_norm_with_its_state_dict():
    group = object()  # stored, not used until training with torch.distributed initialised
    ours = tn.SyncBatchNorm(5, eps=1e-3, momentum=0.2, process_group=group, bias=False)
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=0.2, bias=False)
    assert isinstance(ours, nn.SyncBatchNorm)
    assert ours.process_group is group and ours.bias is None
    assert repr(ours) == repr(theirs)
    with torch.no_grad():
        theirs.weight.uniform_(), theirs.running_mean.normal_()
    ours.load_state_dict(theirs.state_dict())
    for (k1, v1), (k2, v2) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


def _model_with_every_batch_norm() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3),
        nn.Sequential(nn.BatchNorm2d(4, momentum=None), tn.BatchNorm2d(4, affine=False)),
        nn.BatchNorm3d(2, track_running_stats=False, eps=1e-3), tn.BatchNorm1d(5, bias=False),
        nn.SyncBatchNorm(6), nn.InstanceNorm2d(3),
    )  # fmt: skip


def _check_converted(old_layers, model, group):
    converted = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(converted) == len(old_layers)
    for old, new in zip(old_layers, converted, strict=True):
        assert type(new) is tn.SyncBatchNorm and new is not old
        assert new.process_group is group
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, attr) == getattr(old, attr), attr
        assert new.training == old.training
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, key) is getattr(old, key), key  # the same tensors
        assert getattr(new, "qconfig", None) is getattr(old, "qconfig", None)


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_state():
    model = _model_with_every_batch_norm()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for i, layer in enumerate(layers):
        layer.train(i % 2 == 0)
        layer.qconfig = f"qconfig {i}"
        if layer.running_mean is not None:
            layer.running_mean.normal_(), layer.num_batches_tracked.fill_(7)
    group = object()
    values = {k: v.clone() for k, v in model.state_dict().items()}
    converted = tn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert converted is model
    _check_converted(layers, converted, group)
    assert converted.state_dict().keys() == values.keys()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, values[key]), key
    assert type(converted[-1]) is nn.InstanceNorm2d  # only BatchNorm layers change

    root = nn.BatchNorm2d(3).eval()  # a BatchNorm root: a new module is returned
    new_root = tn.SyncBatchNorm.convert_sync_batchnorm(root)
    assert new_root is not root
    _check_converted([root], new_root, None)


def test_convert_with_sync():
    model = _model_with_every_batch_norm()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out = tn.convert(model, sync=True)
    assert out is model
    _check_converted(layers, out, None)
    assert type(out[-1]) is tn.InstanceNorm2d  # the rest converted as without sync
    root = tn.BatchNorm1d(4)
    assert type(tn.convert(root, sync=True)) is tn.SyncBatchNorm
    plain = tn.convert(nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3)))  # sync=False
    assert type(plain[0]) is tn.BatchNorm2d and type(plain[1]) is nn.SyncBatchNorm
    # converted modules still run (distributed not initialised: plain batch norm)
    y = out[2](torch.randn(2, 4, 3, 3))
    assert y.shape == (2, 4, 3, 3)


def test_convert_refuses_uninitialised_lazy_batch_norm():
    with pytest.raises(ValueError, match="run one forward pass"):
        tn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_fallback_compiles_without_graph_break():
    m = tn.SyncBatchNorm(3).to(DEVICE)
    x = torch.randn(4, 3, 5, device=DEVICE)
    y = torch.compile(m, backend="eager", fullgraph=True)(x)
    expected = tn.batch_norm(x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE),
                             m.weight, m.bias, True)  # fmt: skip
    torch.testing.assert_close(y, expected)
    assert int(m.num_batches_tracked) == 1
