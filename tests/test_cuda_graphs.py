"""CUDA graphs: a converted model captured with ``torch.cuda.graph`` after warm-up replays what
eager computes (issue #15). GPU only: the interpreter has no streams or graphs.

What capture needs from tritonnorm: no host synchronisation and no tuning while capturing (the
config is the plan's, chosen at warm-up), allocations from the graph's pool (the plans allocate
with torch), launches on the current (capturing) stream (the direct launchers ask Triton's
driver for it on every call), and running statistics updated in place by the kernels, so a
replay updates the buffers the model holds.
"""

import pytest
import torch
from torch import nn

import tritonnorm as tn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _model() -> nn.Module:
    """A small conv net with every kind of norm tritonnorm converts."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.SiLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.InstanceNorm2d(32, affine=True),
        nn.Conv2d(32, 32, 1),
        tn.LayerNorm2d(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_captured_training_step_replays_as_eager(layout):
    torch.manual_seed(0)
    model = tn.convert(_model(), fuse_activations=True).cuda().to(memory_format=layout)
    reference = tn.convert(_model(), fuse_activations=True).cuda().to(memory_format=layout)
    reference.load_state_dict(model.state_dict())
    static_x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=layout)

    def step(net, x):
        loss = net(x).square().mean()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return loss, grads

    # Warm-up on a side stream, as torch's documentation prescribes: kernels compile, plans bind
    # and the direct launchers are generated before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, static_x)
            step(reference, static_x)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grads = step(model, static_x)

    for _ in range(3):
        x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=layout)
        static_x.copy_(x)
        graph.replay()
        loss, grads = step(reference, x)
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
        for got, want in zip(static_grads, grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The replays updated the running statistics the module holds, as the eager steps did
    # (capture records without running: 3 warm-up steps and 3 replays against 3 + 3 steps).
    bn, bn_ref = model[1], reference[1]
    assert bn.num_batches_tracked.item() == bn_ref.num_batches_tracked.item() == 6
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
