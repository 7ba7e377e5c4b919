"""pytest-benchmark versions of the key loss cases: ``pytest benchmarks/ --benchmark-only``.

Forward+backward of each provider on the fused-kernel issue's baseline rows (Cityscapes
8x19x512x1024 and ADE20K 16x150x512x512, fp32 and bf16) and the classification batch. Without a
GPU the CPU providers run at the CPU sizes of ``benchmarks.loss`` and the rest skip with a reason.
"""

from __future__ import annotations

import pytest
import torch

from .common import DTYPES, blv_backend_problem, synchronize
from .loss import PROVIDERS, SHAPES, make_inputs, make_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = "full" if DEVICE.type == "cuda" else "small"
KEY_CASES = [("cityscapes-n8", "fp32"), ("cityscapes-n8", "bf16"), ("ade20k", "fp32"), ("ade20k", "bf16"),
             ("classification", "fp32")]  # fmt: skip
# compiling costs a minute per case on the CPU, and the released approach seconds per call on a GPU
TIMED = ("cross_entropy", "reference", "triton", "cuda")


@pytest.mark.parametrize("provider", TIMED)
@pytest.mark.parametrize(("shape_name", "dtype"), KEY_CASES, ids=[f"{s}-{d}" for s, d in KEY_CASES])
def test_fwd_bwd(benchmark, provider, shape_name, dtype):
    backend = PROVIDERS[provider].blv_backend
    problem = backend and blv_backend_problem(backend, DEVICE)
    if problem:
        pytest.skip(problem)
    shape = SHAPES[shape_name]
    logits, target = make_inputs(getattr(shape, SIZE), DTYPES[dtype], shape.channels_last, DEVICE)
    loss_fn = make_loss(provider, logits.shape[1], DEVICE, "inductor")

    def step():
        loss_fn(logits, target).backward()
        synchronize(DEVICE)

    def clear_grad():
        logits.grad = None

    benchmark.extra_info.update(device=str(DEVICE), size=SIZE, shape=list(logits.shape))
    benchmark.pedantic(step, setup=clear_grad, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=2)
