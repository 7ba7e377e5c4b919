"""Test setup: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` is decorated, i.e. before the
package's kernels are imported, which is why it is set here at import time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator with a fresh seed per test (printed on failure through the test id's report)."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)
