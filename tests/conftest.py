"""One suite, two devices.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before any kernel is defined, hence before ``tritonnorm`` is imported. With a
CUDA device the same tests run natively on it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """The device the kernels run on: CUDA natively, or CPU through the Triton interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
