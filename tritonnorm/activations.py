"""The one table of the fused epilogue's activations: name, the kernels' code
(kernels/common.py), torch's composition, the torch module it stands for, and whether its
derivative can be read off its output. Validation, the public functions, the launchers,
``convert`` and perf's references all read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

LEAKY_RELU_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # kernels/common.py's constexpr
    apply: Callable[[Tensor, float], Tensor]  # torch's composition: (y, leaky slope) -> act(y)
    # y = act(z) > 0 exactly where z > 0 (ReLU; leaky ReLU with a slope >= 0): act'(z) is read
    # off the output, which the op then keeps instead of the residual
    sign_from_output: bool = False


TABLE = (
    Activation("relu", 1, lambda y, s: F.relu(y), sign_from_output=True),
    Activation("leaky_relu", 2, lambda y, s: F.leaky_relu(y, s), sign_from_output=True),
    Activation("silu", 3, lambda y, s: F.silu(y)),
    Activation("gelu", 4, lambda y, s: F.gelu(y)),
    Activation("gelu_tanh", 5, lambda y, s: F.gelu(y, approximate="tanh")),
)
BY_NAME = {a.name: a for a in TABLE}
NAMES = tuple(BY_NAME)
CODES = {a.name: a.code for a in TABLE}


def apply(y: Tensor, name: str | None, slope: float = LEAKY_RELU_SLOPE) -> Tensor:
    """torch's own activation (the unfused fallback, and the tests' and perf's compositions)."""
    return y if name is None else BY_NAME[name].apply(y, slope)


_SIGN_FROM_OUTPUT = frozenset(a.code for a in TABLE if a.sign_from_output)
_LEAKY_RELU = BY_NAME["leaky_relu"].code


def derivative_from_output(code: int, slope: float) -> bool:
    """Whether act'(z) can be read off y = act(z) (a negative leaky slope makes y > 0 where
    z < 0). On every training call's path: two lookups."""
    return code in _SIGN_FROM_OUTPUT and (code != _LEAKY_RELU or slope >= 0)


def of_module(module: nn.Module) -> str | tuple | None:
    """The activation an ``nn`` activation module computes (exact type), or None."""
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.LeakyReLU:
        return ("leaky_relu", float(module.negative_slope))
    if kind is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None
