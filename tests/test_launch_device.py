"""Launches run on their input's device and that device's current stream, whatever device is
current (a model split over two GPUs in one process, without torch.cuda.set_device per stage),
and every pointer a caller can supply has its alignment checked by the direct launchers.

The device test runs in the host-cost emulation (perf/hostcost.py: Triton's real JIT path and
launchers over a stub driver, its own process with the interpreter off), with two fake devices:
the driver's current device, ``set_current_device`` and per-device streams are emulated, and a
tensor's device is looked up in a table instead of read off the (CPU) tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonnorm as tn
from perf import hostcost
from tritonnorm.kernels import launcher

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import torch
from perf import hostcost

emu = hostcost.install()
hostcost.route_cpu_tensors_to_triton()
import triton
import tritonnorm as tn
from tritonnorm.kernels import geometry, launch, launcher

driver = triton.runtime.driver.active
state = {"device": 0, "switches": []}
driver.get_current_device = lambda: state["device"]

def set_current_device(index):
    state["switches"].append(index)
    state["device"] = index

driver.set_current_device = set_current_device
driver.get_current_stream = lambda device=None: 1000 + (
    state["device"] if device is None else device)
fake = {}  # data_ptr -> the fake device of a tensor
lookup = lambda t: fake.get(t.data_ptr())
launcher.device_index = launch.device_index = lookup

def streams_of(fn):
    with emu.recording() as log:
        fn()
    return sorted({args[3] for _, args in log})  # (grid x 3, stream, function, ...)

def step(module, x, dy):
    y = module(x)
    torch.autograd.grad(y, (x, *module.parameters()), dy)

result = {}
for name, module, shape in (
    ("groupnorm", tn.GroupNorm(2, 4), (2, 4, 8, 8)),
    ("batchnorm", tn.BatchNorm2d(4), (2, 4, 16, 16)),
):
    for device in (0, 1):  # a shape per device: the CPU tensors' plans are keyed apart
        x = torch.empty(shape[0] + device, *shape[1:]).requires_grad_()
        dy = torch.empty_like(x)
        fake[x.data_ptr()] = device
        fake[dy.data_ptr()] = device
        # three calls: the first through Triton's JIT, the later ones replayed
        result[f"{name} on {device}"] = [streams_of(lambda: step(module, x, dy)) for _ in range(3)]
        assert state["device"] == 0, "the current device was not restored"

# one bound launch outside a plan (SyncBatchNorm's steps)
x = torch.empty(3, 4, 5, 5)
fake[x.data_ptr()] = 1
red = geometry.reduction_of(tuple(x.shape), x.stride(), x.dtype, launch.Norm(True), True)
result["stats_partials on 1"] = [streams_of(lambda: launch.stats_partials(x, red))]
result["current_after"] = state["device"]
result["switches"] = state["switches"]
json.dump(result, sys.stdout)
"""


@pytest.fixture(scope="module")
def streams() -> dict:
    reason = hostcost.unavailable(interpreter=False)
    if reason is not None:
        pytest.skip(f"hostcost emulation: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("norm", ["groupnorm", "batchnorm"])
@pytest.mark.parametrize("device", [0, 1])
def test_every_launch_uses_its_inputs_device_stream(streams, norm, device):
    """Device 0 current throughout: device 1's calls launch on device 1's stream (1001), JIT
    and replayed calls alike; device 0's on 1000."""
    assert streams[f"{norm} on {device}"] == [[1000 + device]] * 3


def test_bound_launches_outside_plans_switch_too(streams):
    assert streams["stats_partials on 1"] == [[1001]]


def test_the_current_device_is_restored(streams):
    assert streams["current_after"] == 0
    switches = streams["switches"]
    assert switches and switches[::2] == [1] * (len(switches) // 2)  # to 1, back to 0, ...
    assert switches[1::2] == [0] * (len(switches) // 2)


def test_every_pointer_but_the_scratch_buffers_has_its_alignment_checked():
    """Direct launchers check the 16-byte alignment Triton specialised on for every pointer
    argument a caller could supply: all of each kernel's pointers but the scratch buffers only
    tritonnorm allocates (launcher.OWNED), so a pointer added later is checked by default."""
    kernels = launcher.Kernel.instances
    assert kernels
    for kernel in kernels:
        pointers = tuple(p for p in kernel.params if p.endswith("_ptr"))
        launch = kernel.bind((1,), None, pointers, launcher.OWNED)
        checked = {pointers[i] for i in launch.checked}
        assert checked == set(pointers) - set(launcher.OWNED), kernel.name
    assert set(launcher.OWNED) == {"partial_ptr", "coef_ptr", "combined_ptr"}


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)
def test_a_model_split_over_two_gpus_matches_torch():
    """Stage 1 on cuda:0, stage 2 on cuda:1, cuda:0 current throughout (no set_device per
    stage): forward, backward and running statistics as torch's."""

    def stages():
        torch.manual_seed(0)
        first = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        second = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm2d(8))
        return first.to("cuda:0"), second.to("cuda:1")

    ours, theirs = [tn.convert(s) for s in stages()], stages()
    x = torch.randn(4, 3, 12, 12, device="cuda:0")
    torch.cuda.set_device(0)
    outputs = []
    for first, second in (ours, theirs):
        y = second(first(x).to("cuda:1"))
        y.square().sum().backward()
        outputs.append((y, [p.grad for p in (*first.parameters(), *second.parameters())]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours[0][1].running_var, theirs[0][1].running_var)
