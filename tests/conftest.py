"""Test setup: Triton kernels run under the interpreter when there is no GPU; the CUDA kernels
run emulated on the host as backend "cuda-emulated"; random seeds are reported with every
failure; outputs can be poisoned.

TRITON_INTERPRET must be set before any ``@triton.jit`` is decorated, i.e. before the
package's kernels are imported, which is why it is set here at import time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import emulated_cuda  # noqa: E402  (imports blv_kernels: after TRITON_INTERPRET)

emulated_cuda.register()  # backend "cuda-emulated": the CUDA source on the host, in every run

pytest_plugins = ["seeds", "pytester"]  # seeds: the rng fixture, reported on failure (tests/seeds.py)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like during the test is filled with NaN (floats) or -7 (ints),
    so an output element that a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
