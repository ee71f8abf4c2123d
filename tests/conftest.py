"""One suite, two devices.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before any kernel is defined, hence before ``tritonnorm`` is imported. With a
CUDA device the same tests run natively on it.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk FX graph cache does not key on a custom op's schema: code compiled against
# an earlier tritonnorm::norm_* signature would be replayed. One cache per version of ops.py.
_OPS = Path(__file__).resolve().parents[1] / "tritonnorm" / "ops.py"
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"tritonnorm-inductor-{hashlib.sha1(_OPS.read_bytes()).hexdigest()[:12]}",
    ),
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """The device the kernels run on: CUDA natively, or CPU through the Triton interpreter."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
