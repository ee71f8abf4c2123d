"""tritonnorm.activations, the one table of epilogue activations: its codes are the kernels',
its compositions torch's, and the derivative-from-output rule holds for exactly the activations
whose sign it reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritonnorm import activations
from tritonnorm.kernels import common


def test_codes_are_the_kernels_constexprs():
    for a in activations.TABLE:
        assert getattr(common, a.name.upper()).value == a.code, a.name
    assert len({a.code for a in activations.TABLE}) == len(activations.TABLE)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("relu", F.relu),
        ("leaky_relu", lambda y: F.leaky_relu(y, 0.2)),
        ("silu", F.silu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")),
    ],
)
def test_compositions_are_torchs(name, reference):
    y = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert torch.equal(activations.apply(y, name, 0.2), reference(y))
    assert activations.apply(y, None) is y


def test_derivative_from_output_only_where_the_sign_tells():
    codes = activations.CODES
    z = torch.linspace(-2, 2, 41, dtype=torch.float64)
    for name, code in codes.items():
        for slope in (0.0, 0.01, -0.5):
            y = activations.apply(z, name, slope)
            # The rule's meaning: act'(z) is a function of y (its sign) alone.
            sign_tells = bool(((y > 0) == (z > 0)).all())
            if activations.derivative_from_output(code, slope):
                assert sign_tells and name in ("relu", "leaky_relu"), (name, slope)
        assert not activations.derivative_from_output(code, -0.5) or name == "relu"
    assert activations.derivative_from_output(codes["leaky_relu"], 0.0)
    assert not activations.derivative_from_output(codes["silu"], 0.01)


def test_modules_map_to_their_activation():
    assert activations.of_module(nn.ReLU()) == "relu"
    assert activations.of_module(nn.SiLU()) == "silu"
    assert activations.of_module(nn.LeakyReLU(0.3)) == ("leaky_relu", 0.3)
    assert activations.of_module(nn.GELU()) == "gelu"
    assert activations.of_module(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activations.of_module(nn.Tanh()) is None
    assert activations.of_module(nn.ReLU6()) is None  # not min(max(x, 0), 6): not folded
