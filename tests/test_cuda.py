"""The CUDA C++ backend (csrc/): compile checks on any machine with the toolchain, the
equivalence grid, opcheck and torch.compile on a GPU with the extension.

Without a GPU nothing compiled by nvcc can run, so the CPU checks are: nvcc compiles the
kernel translation unit for sm_80 and sm_90 (it includes no torch header for this reason),
the torch binding passes a C++ syntax check against the installed torch headers, and the
host-and-device math of ``blv_math.cuh`` (Philox and the word -> v transform), compiled for
the host, reproduces ``blv_kernels.noise`` word for word.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import test_kernels as tk
import torch
import torch._inductor.config

from blv_kernels import blv_cross_entropy, noise
from blv_kernels import cuda as blv_cuda

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HAS_CUDA = torch.cuda.is_available()
poisoned = tk.poisoned


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or next((p for p in [Path(home, "bin", "nvcc")] if p.exists()), None)


def _cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime.h), or None."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if _nvcc() is not None:
        homes.append(Path(_nvcc()).resolve().parent.parent)
    return next((Path(h, "include") for h in homes if h and Path(h, "include", "cuda_runtime.h").exists()), None)


def _cxx():
    return shutil.which("g++") or shutil.which("c++")


# ------------------------------------------------------------------ CPU: compile checks


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_kernel_compiles_with_nvcc(tmp_path):
    cmd = [str(_nvcc()), "-std=c++17", "-O3", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
           "arch=compute_90,code=sm_90", "-Werror", "all-warnings", "-c", str(CSRC / "cuda" / "blv_kernel.cu"),
           "-o", str(tmp_path / "blv_kernel.o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(_cuda_include() is None or _cxx() is None, reason="needs the CUDA headers and g++")
@pytest.mark.parametrize("std", ["c++17", "c++20"])  # setup.py's flag; what torch's own build flags give
def test_binding_compiles_against_torch_headers(tmp_path, std):
    from torch.utils.cpp_extension import include_paths

    # A CPU build of torch ships the c10/cuda headers but not this generated one.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [tmp_path, *include_paths(), sysconfig.get_paths()["include"], _cuda_include(), CSRC]
    cmd = [_cxx(), f"-std={std}", "-fsyntax-only", "-Wall", *(f"-I{p}" for p in includes), str(CSRC / "blv_ops.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    own = [
        line for line in result.stderr.splitlines() if "blv_ops.cpp:" in line and ("error" in line or "warning" in line)
    ]
    assert result.returncode == 0 and not own, result.stderr[-4000:]


_MATH_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "cuda/blv_math.cuh"
// philox SEED: reads "q g" lines, prints the four words; variation KIND SCALE THRESHOLD CLAMP:
// reads words, prints v as a float bit pattern.
int main(int argc, char** argv) {
  if (argv[1][0] == 'p') {
    unsigned long long seed = strtoull(argv[2], 0, 10), q, g;
    uint32_t w[4];
    while (scanf("%llu %llu", &q, &g) == 2) {
      blv::philox_words(w, q, (uint32_t)g, seed);
      printf("%u %u %u %u\n", w[0], w[1], w[2], w[3]);
    }
  } else {
    const int kind = atoi(argv[2]), clamp = atoi(argv[5]);
    const float scale = strtof(argv[3], 0), threshold = strtof(argv[4], 0);
    unsigned word;
    while (scanf("%u", &word) == 1) {
      float v = kind == 1 ? blv::variation<1>(word, scale, threshold, clamp) : blv::variation<2>(word, scale, threshold, clamp);
      printf("%.9g\n", v);
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def math_program(tmp_path_factory):
    if _cxx() is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("blv_math")
    (d / "main.cpp").write_text(_MATH_MAIN)
    subprocess.run([_cxx(), "-std=c++17", "-O1", f"-I{CSRC}", str(d / "main.cpp"), "-o", str(d / "main")], check=True)
    return d / "main"


def test_philox_words_match_pytorch(math_program, rng):
    seed = int(torch.randint(0, 2**62, (), generator=rng)) * 2 + 2**63 + 1  # the top bit too
    q = torch.cat([torch.randint(0, 2**62, (300,), generator=rng), torch.tensor([0, 2**32 - 1, 2**32, 2**63 - 1])])
    g = torch.randint(0, 300, q.shape, generator=rng)
    lines = "\n".join(f"{a} {b}" for a, b in zip(q.tolist(), g.tolist(), strict=True))
    out = subprocess.run([str(math_program), "p", str(seed)], input=lines, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    words = torch.tensor([[int(w) for w in line.split()] for line in out.splitlines()])
    ref = noise.philox4x32(noise.seed_tensor(seed, "cpu"), q & noise.MASK32, q >> 32, g, 0)
    assert torch.equal(words, torch.stack(ref, dim=1))


@pytest.mark.parametrize("mode", ["abs", "clamp"])
@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 4.0, 6.0])
def test_variation_transform_matches_pytorch(math_program, sigma, mode, rng):
    params = noise.variation_params(sigma, mode)
    words = torch.randint(0, 2**32, (5000,), generator=rng)
    args = [
        "v",
        "1" if params.use_poly else "2",
        repr(params.scale),
        repr(params.threshold),
        str(int(params.clamp_mode)),
    ]
    out = subprocess.run([str(math_program), *args], input="\n".join(map(str, words.tolist())), capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    v = torch.tensor([float(x) for x in out.split()], dtype=torch.float32)
    ref = noise.variation_from_words(words, params)
    torch.testing.assert_close(v, ref, rtol=4 * 2**-24, atol=2**-24)
    assert torch.equal(v == 1, ref == 1)


def test_cuda_backend_errors_without_the_extension_or_a_gpu():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="CUDA tensors"):
        blv_cross_entropy(x, t, [1, 2, 3], seed=1, backend="cuda")
    if not blv_cuda.available():
        with pytest.raises(RuntimeError, match="BLV_BUILD_CUDA=1"):
            blv_cuda.require()


# ------------------------------------------------------------------ GPU: the extension


@pytest.fixture
def extension():
    if not HAS_CUDA:
        pytest.skip("no GPU")
    if not blv_cuda.available():
        pytest.skip(f"CUDA extension not available: {blv_cuda._load()}")


# The Triton grid, plus shapes that reach this backend's vectorised paths: bf16/fp16 NCHW with
# S % 8 == 0 (16-byte pixel loads), class-contiguous rows with C % 4 == 0 and C >= 64 (one
# 4-class load per Philox call) and without (C % 4 != 0).
CUDA_CASES = tk.CASES + [
    tk._case((2, 19, 8, 16), dtype=torch.bfloat16),
    tk._case((2, 19, 8, 16), dtype=torch.float16, reduction="none", weight=True, position_weight=True),
    tk._case((3, 128, 4, 4), layout="channels_last", reduction="none", sigma=0.5, target_dtype=torch.uint8),
    tk._case((3, 128, 4, 4), layout="channels_last", dtype=torch.bfloat16, reduction="sum"),
    tk._case((4, 66), reduction="none", weight=True),
    tk._case((2, 150, 8, 8), layout="channels_last", dtype=torch.float16, mode="clamp", target_dtype=torch.int32),
]


@pytest.mark.parametrize("shape, layout, dtype, ignore, reduction, weight, position_weight, mode, sigma, target_dtype",
                         CUDA_CASES)  # fmt: skip
def test_cuda_matches_reference(shape, layout, dtype, ignore, reduction, weight, position_weight, mode, sigma,
                                target_dtype, rng, poisoned, extension):  # fmt: skip
    tk.check_fused_matches_reference("cuda", shape, layout, dtype, ignore, reduction, weight, position_weight, mode,
                                     sigma, target_dtype, rng)  # fmt: skip


@pytest.mark.parametrize("offset", [0, 2**32 - 7, 2**40 + 3])
def test_cuda_equals_triton_across_the_32_bit_counter(offset, rng, extension):
    x = torch.randn(2, 19, 8, 8, generator=rng).cuda()
    target = torch.randint(0, 19, (2, 8, 8), generator=rng).cuda()
    counts = list(range(1, 20))
    a, b = (blv_cross_entropy(x, target, counts, seed=5, offset=offset, reduction="none", backend=backend)
            for backend in ("cuda", "triton"))  # fmt: skip
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cuda_deterministic(rng, extension):
    x = torch.randn(4, 19, 64, 64, generator=rng).cuda().requires_grad_(True)
    target = torch.randint(0, 19, (4, 64, 64), generator=rng).cuda()
    runs = []
    for _ in range(2):
        loss = blv_cross_entropy(x, target, list(range(1, 20)), seed=7, backend="cuda")
        runs.append((loss, *torch.autograd.grad(loss, x)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_cuda_out_of_range_label_asserts_on_the_device(extension):
    # a device-side assert poisons the CUDA context: run it in a fresh process
    code = (
        "import torch; from blv_kernels import blv_cross_entropy\n"
        "t = torch.zeros(2, 3, 4, dtype=torch.long, device='cuda'); t[1, 2, 3] = 19\n"
        "blv_cross_entropy(torch.randn(2, 19, 3, 4, device='cuda'), t, list(range(1, 20)), seed=1, backend='cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "outside [0, 19)" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weights", [False, True], ids=["", "weights"])
def test_cuda_opcheck(reduction, weights, rng, extension):
    x = torch.randn(2, 7, 3, 5, generator=rng).cuda().requires_grad_(True)
    target = torch.randint(0, 7, (2, 3, 5), generator=rng).cuda()
    target[0, 0, 0] = -100
    cw = (torch.rand(7, generator=rng) + 0.5).cuda() if weights else None
    pw = (torch.rand(2, 3, 5, generator=rng) + 0.5).cuda() if weights else None
    params = noise.variation_params(6.0, "abs")
    args = (x, target, torch.rand(7, generator=rng).cuda(), noise.seed_tensor(123, "cuda"), 17, params.scale,
            params.threshold, params.use_poly, params.clamp_mode, cw, pw, -100, reduction)  # fmt: skip
    torch.library.opcheck(torch.ops.blv_kernels_cuda.blv_cross_entropy_fwd.default, args)


def test_cuda_compile_fullgraph_matches_eager(rng, extension, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    x = torch.randn(2, 5, 6, 7, generator=rng).cuda().requires_grad_(True)
    labels = torch.randint(0, 5, (2, 6, 7), generator=rng, dtype=torch.uint8).cuda()

    def f(x):
        return blv_cross_entropy(x, labels, [1, 2, 3, 4, 5], ignore_index=255, backend="cuda")

    torch.manual_seed(3)
    eager = f(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    torch.manual_seed(3)
    loss = torch.compile(f, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, layout", [((8, 19, 512, 1024), "contiguous"), ((2, 150, 512, 512), "channels_last"),
                                           ((65536, 1000), "contiguous")],
                         ids=["N8-C19-512x1024", "N2-C150-512x512-cl", "N65536-C1000"])  # fmt: skip
def test_cuda_full_size_equals_triton(shape, layout, dtype, rng, extension):
    x, target, counts, _, _, ii = tk._inputs(shape, layout, dtype, 0.1, False, False, torch.int64, rng)
    grad_out = torch.tensor(1.0, device="cuda")
    cu = tk._run("cuda", x, target, counts, None, None, ii, "mean", "abs", 6.0, 9, grad_out)
    tri = tk._run("triton", x, target, counts, None, None, ii, "mean", "abs", 6.0, 9, grad_out)
    torch.testing.assert_close(cu[0].float(), tri[0].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cu[1].float(), tri[1].float(), rtol=1e-2 if dtype != torch.float32 else 1e-4,
                               atol=1e-7 if dtype == torch.float32 else 1e-6)  # fmt: skip
