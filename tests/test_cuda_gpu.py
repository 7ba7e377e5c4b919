"""The CUDA backend on a GPU, where the shared suites do not reach: the paths of
test_emulated_cuda.py (misaligned views, S % 4 tails, every lane-group size, streamed rows,
offsets across 2**32) on the hardware, and the device-side assert of a bad label.

The rest runs for every fused backend, "cuda" included: the grid, full-size shapes and more than
2**31 elements (test_backends.py), opcheck, torch.compile and CUDA graph replay of a scheduled
sigma without a sync (test_ops.py).
"""

import subprocess
import sys

import pytest
import test_emulated_cuda as emulated_cases
import torch

from blv_kernels.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or BACKENDS["cuda"].why_not("cuda", torch.float32) is not None,
    reason="needs a GPU and the CUDA backend",
)


@pytest.fixture
def on_gpu(monkeypatch):
    """test_emulated_cuda's checks, on the real kernels: its inputs moved to the GPU, backend "cuda"."""
    run = emulated_cases.run

    def run_on_gpu(backend, base, view, target, grad_out, **options):
        for key in ("weight", "position_weight"):
            if options.get(key) is not None:
                options[key] = options[key].cuda()
        loss, grad = run("cuda" if backend == emulated_cases.BACKEND else backend, base.cuda(), view, target.cuda(),
                         grad_out.cuda(), **options)  # fmt: skip
        return loss.cpu(), grad.cpu()

    monkeypatch.setattr(emulated_cases, "run", run_on_gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", emulated_cases.LAYOUTS, ids=[layout[0] for layout in emulated_cases.LAYOUTS])
def test_layouts_match_reference(layout, dtype, rng, poisoned, on_gpu):
    emulated_cases.test_layouts_match_reference(layout, dtype, rng, poisoned)


@pytest.mark.parametrize("c", [64, 65, 127, 128, 150, 1000, 1100])
@pytest.mark.parametrize("layout", ["nchw", "rows", "channels_last"])
def test_lane_groups_match_reference(layout, c, rng, poisoned, on_gpu):
    emulated_cases.test_lane_groups_match_reference(layout, c, rng, poisoned)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 6.0])
@pytest.mark.parametrize("shape", [(2, 700, 3, 3), (3, 1100)], ids=["pixel", "class"])
def test_streamed_rows_match_reference(shape, sigma, rng, poisoned, on_gpu):
    emulated_cases.test_streamed_rows_match_reference(shape, sigma, rng, poisoned)


@pytest.mark.parametrize("offset", [2**32 - 37, 2**63 - 1 - 70], ids=["across-2**32", "last-counters"])
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (70, 150)], ids=["pixel", "class"])
def test_offsets_across_the_32_bit_counter(shape, offset, rng, poisoned, on_gpu):
    emulated_cases.test_offsets_across_the_32_bit_counter(shape, offset, rng, poisoned)


def test_out_of_range_label_asserts_on_the_device():
    # a device-side assert poisons the CUDA context: run it in a fresh process
    code = (
        "import torch; from blv_kernels import blv_cross_entropy\n"
        "t = torch.zeros(2, 3, 4, dtype=torch.long, device='cuda'); t[1, 2, 3] = 19\n"
        "blv_cross_entropy(torch.randn(2, 19, 3, 4, device='cuda'), t, class_counts=list(range(1, 20)), seed=1,\n"
        "                  backend='cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "outside [0, 19)" in result.stderr, result.stderr[-2000:]
