"""The CUDA kernels (blv_kernels/csrc/cuda/blv_kernel.cu) through the host emulation, on the
paths the shared grid does not reach, and the emulation itself on planted bugs.

Paths: S not a multiple of 4 (a scalar tail per image, class rows at every alignment),
misaligned views (funnel-shifted vector loads, split vector stores), lane groups of every size
for C in {64, 65, 127, 128, 150, 1000}, rows longer than registers (two sweeps), no contiguous
axis, offsets across 2**32, S = 0, strided targets and weights, bad labels in a late block. The
emulation's access counts show the interior is vectorised and that the backward's scaling
touches nothing when grad_output is 1. Planted bugs: a shuffle in a lane-divergent branch and a
divergent __syncthreads (deadlocks, found at once), a misaligned 16-byte load, an off-by-one
tail write (caught by guard memory).
"""

import ctypes
import math

import emulated_cuda
import pytest
import torch
from emulated_cuda import backend as emulated
from grid import assert_as_close_as_reference

from blv_kernels import blv_cross_entropy

BACKEND = "cuda-emulated"
pytestmark = pytest.mark.skipif(
    emulated_cuda.unavailable("cpu") is not None, reason=str(emulated_cuda.unavailable("cpu"))
)


def counts_and_target(c, target_shape, rng, ignore=0.2):
    target = torch.randint(0, c, target_shape, generator=rng)
    target[torch.rand(target_shape, generator=rng) < ignore] = -100
    return torch.randint(1, 10**6, (c,), generator=rng), target


def run(backend, base, view, target, grad_out, **options):
    """Loss and gradient of view(base) (a view keeps its strides and misalignment: the leaf is a
    clone of the dense base), the gradient seen through the same view."""
    leaf = base.detach().clone().requires_grad_(True)
    loss = blv_cross_entropy(view(leaf), target, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, leaf, grad_out.to(loss.dtype))
    return loss, view(grad)


def assert_matches_reference(base, view, target, rng, **options):
    """As grid.check_matches_reference: float32 within 1e-5 of the reference; halves no further
    from a float64 ground truth than the reference at that precision, plus half an ulp. Halves
    take grad_output 1: the kernel's gradient, rounded once. (Another grad_output scales that
    stored half gradient in the backward, a second rounding of the operator contract, worth up
    to an ulp more than the reference's one rounding; test_scale_grad_* checks the scaling.)"""
    options.setdefault("seed", int(torch.randint(0, 2**62, (), generator=rng)))
    shape = target.shape if options.get("reduction") == "none" else ()
    grad_out = torch.randn(shape, generator=rng) if base.dtype == torch.float32 else torch.ones(shape)
    loss, grad = run(BACKEND, base, view, target, grad_out, **options)
    assert loss.dtype == base.dtype and grad.shape == view(base).shape
    assert_as_close_as_reference(
        base.dtype, (loss, grad), run("reference", base, view, target, grad_out, **options),
        lambda: run("reference", base.double(), view, target, grad_out.double(), **options),
    )  # fmt: skip


def _same(t):
    return t


# (id, dense base shape, view of it as (N, C, ...)): every way the kernels address the logits
LAYOUTS = [
    ("nchw-S%4=1", (2, 19, 7, 11), _same),  # tail of 1 per image; class rows at alignments 0..3
    ("nchw-S%4=2-lanes2", (3, 21, 2, 3), _same),  # C = 21: two lanes share 4 positions
    ("nchw-S%4=3", (1, 19, 3, 5), _same),
    ("nchw-base+1", (2, 19, 36), lambda t: t[..., 1:]),  # every row 1 element past a vector boundary
    ("nchw-base+2-S%4=0", (2, 7, 38), lambda t: t[..., 2:]),
    ("rows-base+1", (6, 68), lambda t: t[:, 1:]),  # class rows misaligned, C % 4 = 3
    ("rows-C=1", (5, 1), _same),
    ("channels_last-base+1", (2, 3, 5, 152), lambda t: t.permute(0, 3, 1, 2)[:, 1:]),
    ("no-contiguous-axis", (19, 3, 5, 2), lambda t: t.permute(3, 0, 1, 2)),  # N innermost: scalar accesses
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layouts_match_reference(layout, dtype, rng, poisoned):
    _, shape, view = layout
    base = torch.randn(shape, generator=rng).mul(4).to(dtype)
    x = view(base)
    counts, target = counts_and_target(x.shape[1], x.shape[:1] + x.shape[2:], rng)
    assert_matches_reference(base, view, target, rng, class_counts=counts, reduction="none", offset=99)


# C around every lane-group size: pixel layout (NCHW), class layout (rows, channels_last); C = 1000
# in the pixel layout and C = 1100 in the class layout are streamed (two sweeps)
@pytest.mark.parametrize("c", [64, 65, 127, 128, 150, 1000, 1100])
@pytest.mark.parametrize("layout", ["nchw", "rows", "channels_last"])
def test_lane_groups_match_reference(layout, c, rng, poisoned):
    shape = {"nchw": (2, c, 2, 3), "rows": (5, c), "channels_last": (2, 2, 3, c)}[layout]
    base = torch.randn(shape, generator=rng) * 4
    view = (lambda t: t.permute(0, 3, 1, 2)) if layout == "channels_last" else _same
    x = view(base)
    counts, target = counts_and_target(c, x.shape[:1] + x.shape[2:], rng)
    weight = torch.rand(c, generator=rng) + 0.5
    assert_matches_reference(base, view, target, rng, class_counts=counts, weight=weight, label_smoothing=0.1,
                             position_weight=torch.rand(target.shape, generator=rng) + 0.5)  # fmt: skip


@pytest.mark.parametrize("sigma", [0.0, 0.5, 6.0])  # none, Giles, polynomial: the per-group branch
@pytest.mark.parametrize("shape", [(2, 700, 3, 3), (3, 1100)], ids=["pixel", "class"])
def test_streamed_rows_match_reference(shape, sigma, rng, poisoned):
    base = torch.randn(shape, generator=rng) * 4
    counts, target = counts_and_target(shape[1], shape[:1] + shape[2:], rng)
    assert_matches_reference(base, _same, target, rng, class_counts=counts, sigma=sigma, reduction="sum",
                             mode="clamp")  # fmt: skip


@pytest.mark.parametrize("offset", [2**32 - 37, 2**63 - 1 - 70], ids=["across-2**32", "last-counters"])
@pytest.mark.parametrize("shape", [(2, 19, 5, 7), (70, 150)], ids=["pixel", "class"])
def test_offsets_across_the_32_bit_counter(shape, offset, rng, poisoned):
    base = torch.randn(shape, generator=rng) * 4
    counts, target = counts_and_target(shape[1], shape[:1] + shape[2:], rng)
    assert math.prod(target.shape) == 70  # positions q = offset .. offset + 69 straddle 2**32 / end at 2**63 - 1
    assert_matches_reference(base, _same, target, rng, class_counts=counts, offset=offset, reduction="none")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_positions(reduction, rng, poisoned):
    base = torch.randn(2, 19, 0, 5, generator=rng)
    counts, target = counts_and_target(19, (2, 0, 5), rng)
    loss, grad = run(BACKEND, base, _same, target, torch.ones(target.shape if reduction == "none" else ()),
                     class_counts=counts, reduction=reduction)  # fmt: skip
    assert grad.shape == base.shape and loss.shape == (target.shape if reduction == "none" else ())
    if reduction != "none":
        ref, _ = run("reference", base, _same, target, torch.ones(()), class_counts=counts, reduction=reduction)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # 0 for "sum", 0/0 for "mean"


@pytest.mark.parametrize("target_dtype", [torch.int8, torch.int16])
def test_strided_targets_and_position_weights(target_dtype, rng, poisoned):
    base = torch.randn(2, 7, 4, 6, generator=rng) * 4
    wide_target = torch.randint(0, 7, (2, 4, 12), generator=rng).to(target_dtype)
    wide_target[0, 1, ::3] = -100
    target = wide_target[:, :, ::2]  # pixel stride 2
    position_weight = (torch.rand(2, 6, 4, generator=rng) + 0.5).transpose(1, 2)  # strides (24, 1, 4)
    assert_matches_reference(base, _same, target, rng, class_counts=list(range(1, 8)),
                             position_weight=position_weight, reduction="none")  # fmt: skip


def test_bad_label_in_a_later_label_block_raises(rng):
    x = torch.randn(3, 19, 30, 40, generator=rng)  # 3600 positions: 4 blocks of the label pass
    target = torch.randint(0, 19, (3, 30, 40), generator=rng, dtype=torch.int16)
    target[2, 29, 39] = 19
    target[2, 10, 3] = -5
    with pytest.raises(ValueError, match="2 value"):
        blv_cross_entropy(x, target, class_counts=list(range(1, 20)), backend=BACKEND)


# ------------------------------------------------------------------ vector accesses


def accesses(reset=True):
    """{bytes: loads}, {bytes: stores} through the intrinsics since the last reset."""
    loads, stores = (ctypes.c_uint64 * 17)(), (ctypes.c_uint64 * 17)()
    emulated.kernels().lib.blv_emulation_accesses(loads, stores, int(reset))
    return {b: n for b, n in enumerate(loads) if n}, {b: n for b, n in enumerate(stores) if n}


def expected_run_accesses(t, vector_axis, runs):
    """(loads, stores) of the 4-element runs of t along vector_axis that `runs` lists as (n, c, s)
    element coordinates: a run at a vector boundary is one load and one store; else two loads
    (funnel-shifted) and one 2-element store at 2 elements past the boundary, two at 1 or 3 (as
    2-element stores are 1 + 2 + 1 or 2 + 2)."""
    loads = stores_vec = stores_pair = 0
    first = t.data_ptr() // t.element_size()
    for n, c, s in runs:
        misaligned = (first + n * t.stride(0) + c * t.stride(1) + s * vector_axis) % 4
        loads += 1 if misaligned == 0 else 2
        stores_vec += misaligned == 0
        stores_pair += {0: 0, 2: 2}.get(misaligned, 1)
    return loads, stores_vec, stores_pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw-S%4=1", "nchw-base+1", "rows-base+1"])
def test_interior_runs_are_vector_accesses(layout, dtype, rng):
    """Every full 4-element run is vectorised whatever its alignment; tails are scalar."""
    _, shape, view = next(entry for entry in LAYOUTS if entry[0] == layout)
    base = torch.randn(shape, generator=rng).to(dtype)
    leaf = base.clone().requires_grad_(True)
    x = view(leaf).flatten(2) if len(shape) > 2 else view(leaf)
    n, c = x.shape[:2]
    s = x.shape[2] if x.dim() == 3 else 1
    counts, target = counts_and_target(c, (n, s) if x.dim() == 3 else (n,), rng)
    accesses()
    loss = blv_cross_entropy(x, target, class_counts=counts, reduction="sum", backend=BACKEND)
    loads, stores = accesses()
    (grad,) = torch.autograd.grad(loss, x)  # the forward's gradient, scaled by 1: nothing more runs
    assert accesses() == ({}, {})
    vector, pair = 4 * base.element_size(), 2 * base.element_size()
    if x.dim() == 3:  # pixel layout: runs of 4 positions of one class
        runs = [(i, k, p) for i in range(n) for k in range(c) for p in range(0, s - 3, 4)]
        weight_loads = n * -(-s // 4) * (c // 4)  # each item reads w of its full groups (16-byte float32 runs)
        axis, grad_axis = x.stride(2), grad.stride(2)
    else:  # class layout: runs of the 4 classes of a full Philox group
        runs = [(i, 4 * g, 0) for i in range(n) for g in range(c // 4)]
        weight_loads = n * (c // 4)
        axis, grad_axis = x.stride(1), grad.stride(1)
    assert axis == 1 and grad_axis == 1
    logit_loads, _, _ = expected_run_accesses(x, 1, runs)
    _, grad_vectors, grad_pairs = expected_run_accesses(grad, 1, runs)
    expected_loads = {vector: logit_loads}
    expected_loads[16] = expected_loads.get(16, 0) + weight_loads
    expected_stores = {size: count for size, count in [(vector, grad_vectors), (pair, grad_pairs)] if count}
    assert loads == expected_loads
    assert stores == expected_stores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("start", [0, 1, 3])  # elements past a 16-byte boundary: scalar head, vectors, tail
def test_scale_grad_reads_nothing_for_one_and_scales_otherwise(start, dtype, rng):
    buffer = torch.randn(start + 1001, generator=rng).to(dtype)
    grad = buffer[start:]
    before = grad.clone()
    accesses()
    emulated.scale_grad_(grad, torch.tensor(1.0))
    assert accesses() == ({}, {}) and torch.equal(grad, before)
    emulated.scale_grad_(grad, torch.tensor(-0.75))
    loads, stores = accesses()
    head = (16 - grad.data_ptr() % 16) % 16 // grad.element_size()
    vectors = (grad.numel() - head) // (16 // grad.element_size())
    assert loads == {16: vectors} and stores == {16: vectors}
    assert torch.equal(grad, (before.float() * -0.75).to(dtype))  # one rounding of the fp32 product


# ------------------------------------------------------------------ the emulation on planted bugs

PLANTED = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

__global__ void divergent_shuffle(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16-31 never come
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void uniform_shuffle(float* out) {
  float v = threadIdx.x;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void divergent_syncthreads(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void vector_load(const float* in, float* out, int offset) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + offset));
  out[threadIdx.x] = __uint_as_float(v.x);
}

// out[0..n) = in[0..n): 16-byte runs, then a scalar tail; TAIL_END n, or n + 1 (the planted bug)
template <int EXTRA>
__global__ void copy(const float* in, float* out, int n) {
  const int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
  if (i + 4 <= n) {
    __stcs(reinterpret_cast<uint4*>(out + i), __ldg(reinterpret_cast<const uint4*>(in + i)));
  } else {
    for (int j = i; j < n + EXTRA; ++j) out[j] = in[j < n ? j : n - 1];
  }
}

// float -> half / bfloat16 bits (round to nearest even), and the halves back to float
__global__ void convert(const float* in, uint16_t* half, uint16_t* bf16, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const __half h = __float2half_rn(in[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
    memcpy(half + i, &h, 2);
    memcpy(bf16 + i, &b, 2);
    back[2 * i] = __half2float(h);
    back[2 * i + 1] = __bfloat162float(b);
  }
}

extern "C" int run_divergent_shuffle(float* out) {
  BLV_LAUNCH(dim3(2), dim3(64), nullptr, divergent_shuffle)(out);
  return cudaGetLastError();
}
extern "C" int run_uniform_shuffle(float* out) {
  BLV_LAUNCH(dim3(2), dim3(64), nullptr, uniform_shuffle)(out);
  return cudaGetLastError();
}
extern "C" int run_divergent_syncthreads(float* out) {
  BLV_LAUNCH(dim3(1), dim3(128), nullptr, divergent_syncthreads)(out);
  return cudaGetLastError();
}
extern "C" int run_vector_load(const float* in, float* out, int offset) {
  BLV_LAUNCH(dim3(1), dim3(32), nullptr, vector_load)(in, out, offset);
  return cudaGetLastError();
}
extern "C" int run_copy(const float* in, float* out, int n, int off_by_one) {
  const dim3 grid((n + 4 * 64 - 1) / (4 * 64));
  if (off_by_one)
    BLV_LAUNCH(grid, dim3(64), nullptr, copy<1>)(in, out, n);
  else
    BLV_LAUNCH(grid, dim3(64), nullptr, copy<0>)(in, out, n);
  return cudaGetLastError();
}
extern "C" int run_convert(const float* in, uint16_t* half, uint16_t* bf16, float* back, int n) {
  BLV_LAUNCH(dim3((n + 127) / 128), dim3(128), nullptr, convert)(in, half, bf16, back, n);
  return cudaGetLastError();
}
extern "C" const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("planted")
    source = directory / "planted.cu"
    source.write_text(PLANTED)
    lib = emulated_cuda.compile_source(source, directory)
    lib.error_string.restype = ctypes.c_char_p
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _error(lib, code: int) -> str:
    return lib.error_string(code).decode()


def test_shuffle_in_a_lane_divergent_branch_deadlocks(planted):
    out = torch.zeros(128)
    assert planted.run_uniform_shuffle(_ptr(out)) == 0  # the same shuffle, reached by every lane
    lane = torch.arange(128) % 64
    assert torch.equal(out, (lane + (lane ^ 1)).float())
    code = planted.run_divergent_shuffle(_ptr(out))
    message = _error(planted, code)
    assert code == 702, message  # cudaErrorLaunchTimeout: on a GPU, a hang
    assert "block (0,0,0)" in message and "warp 0" in message and "planted.cu:" in message
    assert "reached by lanes 0-15, not by lanes 16-31 (lane 16 exited)" in message


def test_divergent_syncthreads_deadlocks(planted):
    code = planted.run_divergent_syncthreads(_ptr(torch.zeros(128)))
    message = _error(planted, code)
    assert code == 702 and "__syncthreads at planted.cu:" in message and "reached by 64 of 128 threads" in message
    assert "thread 64 exited" in message


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_vector_load_fails(planted, offset):
    data, out = torch.zeros(64), torch.zeros(32)
    assert data.data_ptr() % 16 == 0
    assert planted.run_vector_load(_ptr(data), _ptr(out), 0) == 0
    code = planted.run_vector_load(_ptr(data), _ptr(out), offset)
    message = _error(planted, code)
    assert code == 716, message  # cudaErrorMisalignedAddress
    assert "block (0,0,0) thread 0" in message and "__ldg: misaligned 16-byte load" in message


@pytest.mark.parametrize("n", [8, 1001, 1003])
def test_off_by_one_tail_write_is_caught_by_guard_memory(planted, n, rng):
    def copies_exactly(off_by_one: bool) -> bool:
        source = torch.randn(n, generator=rng)
        out = torch.full((n + 16,), float("nan"))  # the copy's n elements, then poisoned guard elements
        assert planted.run_copy(_ptr(source), _ptr(out), n, int(off_by_one)) == 0
        return torch.equal(out[:n], source) and bool(out[n:].isnan().all())

    assert copies_exactly(off_by_one=False)
    assert not copies_exactly(off_by_one=True)  # the element past the tail changed the guard


def test_half_and_bfloat16_conversions_round_to_nearest_even(planted, rng):
    """Bit for bit PyTorch's (IEEE round to nearest even, as the hardware's cvt.rn): normal,
    subnormal and overflowing halves, ties, zeros and infinities; NaN stays NaN."""
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2**-24 * 1.5, 2**-24 * 2.5, 65520.0, 65519.0, 1 + 2**-8])
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 2**-25, 2**-26, 6e-8, 65504.0, 1e30, 3e-39])
    values = torch.cat([torch.randn(3000, generator=rng) * torch.logspace(-9, 6, 3000),
                        torch.randint(-(2**31), 2**31, (3000,), generator=rng, dtype=torch.int32).view(torch.float32),
                        ties, -ties, special])  # fmt: skip
    finite = values.isfinite() | values.isinf()
    n = values.numel()
    half, bf16 = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    back = torch.empty(2 * n)
    assert planted.run_convert(_ptr(values), _ptr(half), _ptr(bf16), _ptr(back), n) == 0
    assert torch.equal(half[finite], values.half().view(torch.int16)[finite])
    assert torch.equal(bf16[finite], values.bfloat16().view(torch.int16)[finite])
    assert torch.equal(back[0::2][finite], values.half().float()[finite])
    assert torch.equal(back[1::2][finite], values.bfloat16().float()[finite])
    assert back[0::2][~finite].isnan().all() and back[1::2][~finite].isnan().all()
