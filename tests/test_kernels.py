"""Fused Triton kernel against the reference: loss and gradient, same seed, poisoned outputs.

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 on the CPU, where shapes
stay small. The grid covers every class-count regime of the kernel (C = 1, 2, below one
Philox group, the Cityscapes/ADE/COCO-Stuff/ImageNet C, and C above one class chunk of 64,
so the online softmax runs over several chunks), odd spatial sizes and N = 1, every layout
(NCHW, channels_last, (N, C) rows, 3-D, sliced views), every dtype, ignore ratios 0 to 100%,
every reduction, both weights, both modes and sigma in {0, 0.5, 4, 6} (0.5 takes the Giles
erfinv path, 4 and 6 the polynomial one).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blv_kernels import blv_cross_entropy, noise
from blv_kernels.kernels import blv_cross_entropy as kmod

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like during the test is filled with NaN (floats) or -7 (ints),
    so an output element that a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


# ------------------------------------------------------------------ the word -> v transform


@triton.jit
def _variation_kernel(words_ptr, sigma_ptr, params_ptr, out_ptr, n, CLAMP_MODE: tl.constexpr, BLOCK: tl.constexpr):
    scale, threshold = kmod._variation_params(sigma_ptr)
    tl.store(params_ptr, scale)
    tl.store(params_ptr + 1, threshold)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(words_ptr + o, mask=o < n).to(tl.uint32)
    tl.store(out_ptr + o, kmod._variation(words, scale, threshold, CLAMP_MODE), mask=o < n)


@pytest.mark.parametrize("mode", ["abs", "clamp"])
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 0.9618, 1.0, 4.0, 6.0])
def test_kernel_transform_matches_pytorch(sigma, mode, rng):
    params = noise.variation_params(sigma, mode)
    words = torch.randint(0, 2**32, (20_000,), generator=rng)
    ref = noise.variation_from_words(words, params)
    tri = torch.full_like(ref, float("nan"), device=DEVICE)
    tri_params = torch.full((2,), float("nan"), device=DEVICE)
    _variation_kernel[(20,)](words.to(DEVICE), noise.sigma_bits(sigma, DEVICE), tri_params, tri, words.numel(),
                             params.clamp_mode, BLOCK=1024)  # fmt: skip
    # sigma -> (scale, threshold) on the device in fp64, as on the host: equal after the fp32 rounding
    assert tri_params.tolist() == [params.scale, params.threshold]
    # same float32 operations; only log (and fma contraction on a GPU) may differ by an ulp
    torch.testing.assert_close(tri.cpu(), ref, rtol=4 * 2**-24, atol=2**-24)
    assert torch.equal(tri.cpu() == 1, ref == 1)


# ------------------------------------------------------------------ loss and gradient grid


def _logits(shape, layout, dtype, gen):
    x = torch.randn(shape, generator=gen) * 4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "class-sliced":  # a view of every other class of a wider tensor
        wide = torch.randn((shape[0], 2 * shape[1]) + shape[2:], generator=gen) * 4
        x = wide[:, ::2]
    elif layout == "permuted":  # dense, memory order (N, H, C, W): spatial dims are not one strided run
        x = torch.randn((shape[0], shape[2], shape[1], shape[3]), generator=gen).permute(0, 2, 1, 3) * 4
    elif layout == "cropped":  # a crop of the last spatial dim: spatial dims are not one strided run
        x = (torch.randn(shape[:-1] + (shape[-1] + 3,), generator=gen) * 4)[..., 1 : shape[-1] + 1]
    return x.to(device=DEVICE, dtype=dtype)


def _case(shape, *, layout="contiguous", dtype=torch.float32, ignore=0.2, reduction="mean", weight=False,
          position_weight=False, mode="abs", sigma=6.0, target_dtype=torch.int64):  # fmt: skip
    name = "x".join(map(str, shape)) + f"-{layout}-{str(dtype)[6:]}-ign{ignore}-{reduction}-{mode}-s{sigma}"
    name += ("-w" if weight else "") + ("-pw" if position_weight else "") + f"-t{str(target_dtype)[6:]}"
    return pytest.param(shape, layout, dtype, ignore, reduction, weight, position_weight, mode, sigma, target_dtype,
                        id=name)  # fmt: skip


CASES = [
    # realistic segmentation and classification shapes, scaled down for the interpreter
    _case((2, 19, 6, 10)),
    _case((2, 19, 6, 10), layout="channels_last", reduction="sum", target_dtype=torch.uint8),
    _case((1, 150, 3, 5), reduction="none", weight=True),
    _case((1, 171, 4, 3), layout="channels_last", mode="clamp", sigma=4.0, target_dtype=torch.int32),
    _case((8, 1000), reduction="mean", weight=True, position_weight=True),
    _case((5, 67), reduction="none", mode="clamp"),  # C above one chunk of 64 classes
    _case((1, 67, 2, 3), layout="class-sliced", sigma=4.0),
    # C = 1, 2, 3: below and at one Philox group of four classes
    _case((3, 1, 5, 7), reduction="none"),
    _case((4, 2, 3, 3), reduction="sum", mode="clamp"),
    _case((7, 3)),
    # odd spatial sizes, N = 1, 3-D volumes, views that need a copy
    _case((1, 19, 7, 13), reduction="none", position_weight=True, target_dtype=torch.uint8),
    _case((2, 5, 3, 4, 5), reduction="none", weight=True),
    _case((2, 5, 3, 4, 5), layout="channels_last", reduction="mean"),
    _case((2, 19, 5, 9), layout="cropped", reduction="none"),
    _case((2, 19, 3, 5), layout="permuted", reduction="sum"),
    # ignore ratios 0 and 100%, sigma 0 and the Giles path
    _case((2, 19, 4, 5), ignore=0.0, reduction="sum", weight=True),
    _case((2, 19, 4, 5), ignore=1.0, reduction="mean"),
    _case((2, 19, 4, 5), ignore=1.0, reduction="none", weight=True),
    _case((2, 19, 4, 5), sigma=0.0, weight=True),
    _case((2, 19, 4, 5), sigma=0.5, reduction="none"),
    _case((2, 19, 4, 5), sigma=0.5, mode="clamp", reduction="sum", position_weight=True),
    # low precision: compared with PyTorch at that precision against a float64 ground truth
    _case((2, 19, 6, 10), dtype=torch.bfloat16),
    _case((2, 19, 6, 10), dtype=torch.float16, layout="channels_last", reduction="none"),
    _case((1, 150, 3, 5), dtype=torch.bfloat16, reduction="sum", weight=True, mode="clamp"),
    _case((8, 1000), dtype=torch.float16, reduction="mean"),
    _case((6, 67), dtype=torch.bfloat16, reduction="none", sigma=4.0, position_weight=True),
]


def _inputs(shape, layout, dtype, ignore, weight, position_weight, target_dtype, gen):
    c = shape[1]
    x = _logits(shape, layout, dtype, gen)
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    target = torch.randint(0, c, shape[:1] + shape[2:], generator=gen)
    target[torch.rand(target.shape, generator=gen) < ignore] = ignore_index
    counts = torch.randint(1, 10**7, (c,), generator=gen)
    w = (torch.rand(c, generator=gen) + 0.5).to(DEVICE) if weight else None
    pw = (torch.rand(target.shape, generator=gen) + 0.5).to(DEVICE) if position_weight else None
    return x, target.to(device=DEVICE, dtype=target_dtype), counts, w, pw, ignore_index


def _run(backend, x, target, counts, w, pw, ignore_index, reduction, mode, sigma, seed, grad_out):
    x = x.detach().clone().requires_grad_(True)  # .clone() keeps the layout
    loss = blv_cross_entropy(x, target, counts, sigma, seed=seed, offset=12345, mode=mode, weight=w,
                             ignore_index=ignore_index, reduction=reduction, position_weight=pw, backend=backend)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x, grad_out.to(loss.dtype))
    return loss, grad


@pytest.mark.parametrize("shape, layout, dtype, ignore, reduction, weight, position_weight, mode, sigma, target_dtype",
                         CASES)  # fmt: skip
def test_fused_matches_reference(shape, layout, dtype, ignore, reduction, weight, position_weight, mode, sigma,
                                 target_dtype, rng, poisoned):  # fmt: skip
    check_fused_matches_reference("triton", shape, layout, dtype, ignore, reduction, weight, position_weight, mode,
                                  sigma, target_dtype, rng)  # fmt: skip


def check_fused_matches_reference(backend, shape, layout, dtype, ignore, reduction, weight, position_weight, mode,
                                  sigma, target_dtype, rng):  # fmt: skip
    """One grid case: a fused backend's loss and gradient against the reference (also used by test_cuda.py)."""
    x, target, counts, w, pw, ignore_index = _inputs(shape, layout, dtype, ignore, weight, position_weight,
                                                     target_dtype, rng)  # fmt: skip
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    loss_shape = target.shape if reduction == "none" else ()
    grad_out = torch.randn(loss_shape, generator=rng).to(DEVICE)
    args = (target, counts, w, pw, ignore_index, reduction, mode, sigma, seed, grad_out)

    tri_loss, tri_grad = _run(backend, x, *args)
    assert tri_loss.dtype == dtype and tri_loss.shape == loss_shape
    assert tri_grad.dtype == dtype and tri_grad.shape == x.shape
    if layout in ("contiguous", "channels_last"):  # the gradient keeps the logits' layout
        assert tri_grad.stride() == x.stride()
    if dtype == torch.float32:
        ref_loss, ref_grad = _run("reference", x, *args)
        torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(tri_grad, ref_grad, rtol=1e-5, atol=1e-6)
        return
    # Low precision: the kernel's error against a float64 ground truth is no worse than the
    # reference's at the same precision (plus half an ulp of the dtype at the result's scale,
    # for the final rounding both make). Triton's CPU interpreter truncates fp32 -> bf16
    # instead of rounding to nearest as GPUs do, so there the kernel's rounding is a full ulp.
    ref_loss, ref_grad = _run("reference", x, *args)
    gt_loss, gt_grad = _run("reference", x.double(), *args)
    rounding = 1.0 if dtype == torch.bfloat16 and x.device.type == "cpu" else 0.5
    eps = torch.finfo(dtype).eps
    for tri, ref, gt in [(tri_loss, ref_loss, gt_loss), (tri_grad, ref_grad, gt_grad)]:
        tri_err = (tri.double() - gt).abs().max()
        ref_err = (ref.double() - gt).abs().max()
        assert tri_err <= ref_err + rounding * eps * gt.abs().max(), (tri_err, ref_err)


@pytest.mark.parametrize("layout", ["channels_last", "class-sliced"])
def test_layout_does_not_change_the_result(layout, rng):
    shape = (2, 19, 5, 6)
    x = _logits(shape, layout, torch.float32, rng)
    target = torch.randint(0, 19, (2, 5, 6), generator=rng).to(DEVICE)
    counts = torch.randint(1, 1000, (19,), generator=rng)
    a = blv_cross_entropy(x, target, counts, seed=3, reduction="none", backend="triton")
    b = blv_cross_entropy(x.contiguous(), target, counts, seed=3, reduction="none", backend="triton")
    assert torch.equal(a, b)


def test_deterministic(rng):
    x, target, counts, w, _, ii = _inputs((2, 19, 6, 7), "contiguous", torch.float32, 0.2, True, False,
                                          torch.int64, rng)  # fmt: skip
    grad_out = torch.tensor(1.0)
    first = _run("triton", x, target, counts, w, None, ii, "mean", "abs", 6.0, 11, grad_out)
    second = _run("triton", x, target, counts, w, None, ii, "mean", "abs", 6.0, 11, grad_out)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    third = _run("triton", x, target, counts, w, None, ii, "mean", "abs", 6.0, 12, grad_out)
    assert not torch.equal(first[0], third[0])


def test_expanded_grad_output(rng):
    x, target, counts, _, _, ii = _inputs((2, 7, 3, 4), "contiguous", torch.float32, 0.2, False, False,
                                          torch.int64, rng)  # fmt: skip
    grad_out = torch.randn((), generator=rng).to(DEVICE).expand(target.shape)  # stride 0 everywhere
    tri = _run("triton", x, target, counts, None, None, ii, "none", "abs", 6.0, 5, grad_out)
    ref = _run("reference", x, target, counts, None, None, ii, "none", "abs", 6.0, 5, grad_out)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-6)


def test_confident_bf16_predictions_keep_their_gradient(rng):
    # target logit = max + 10: p_t = 1 - O(1e-4); the true-class term p_t - 1 must not cancel to 0.
    x = torch.randn(64, 19, generator=rng)
    target = torch.randint(0, 19, (64,), generator=rng)
    x[torch.arange(64), target] = x.max(dim=1).values + 10
    x = x.to(DEVICE, torch.bfloat16)
    target = target.to(DEVICE)
    counts = list(range(1, 20))
    gt = _run("reference", x.double(), target, counts, None, None, -100, "sum", "abs", 0.0, 1, torch.tensor(1.0))[1]
    tri = _run("triton", x, target, counts, None, None, -100, "sum", "abs", 0.0, 1, torch.tensor(1.0))[1]
    at_target = lambda g: g[torch.arange(64), target].double()
    assert (at_target(tri) < 0).all()
    # p_t - 1 ~ -1e-4. Formed in bf16 it would be 0 or -2**-8 (an error of 1e-4 or more); in
    # fp32 its error is that of z_t - lse, a few fp32 ulps at the logits' magnitude (exp turns
    # the absolute error of its argument into a relative error of p), plus the bf16 rounding.
    atol = 4 * torch.finfo(torch.float32).eps * x.float().abs().max().item()
    torch.testing.assert_close(at_target(tri), at_target(gt), rtol=2**-8, atol=atol)


def test_nan_and_inf_propagate_like_pytorch():
    x = torch.randn(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    x[0, 2] = float("inf")  # +inf logit: NaN loss and gradient, as in PyTorch
    x[1, 3] = float("-inf")  # -inf in another class: probability 0
    x[2, 2] = float("-inf")  # -inf at the target: infinite loss
    x[3, 0] = float("nan")  # NaN anywhere: NaN
    x, target = x.to(DEVICE), target.to(DEVICE)
    for sigma in (0.0, 6.0):
        tri = _run("triton", x, target, [5, 4, 3, 2, 1], None, None, -100, "none", "abs", sigma, 2, torch.ones(6))
        ref = _run("reference", x, target, [5, 4, 3, 2, 1], None, None, -100, "none", "abs", sigma, 2, torch.ones(6))
        torch.testing.assert_close(tri[0], ref[0], equal_nan=True)
        torch.testing.assert_close(tri[1], ref[1], equal_nan=True)
    plain = F.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(tri[0].isnan(), plain.isnan())


def test_all_neg_inf_first_chunk_does_not_poison_the_softmax(rng):
    # -inf logits (masked classes) filling the first chunk of 64 classes, finite ones after it
    x = torch.randn(4, 100, generator=rng)
    x[:, :64] = float("-inf")
    target = torch.randint(64, 100, (4,), generator=rng)
    tri = _run("triton", x.to(DEVICE), target.to(DEVICE), [1] * 100, None, None, -100, "none", "abs", 0.0, 1,
               torch.ones(4))  # fmt: skip
    torch.testing.assert_close(tri[0].cpu(), F.cross_entropy(x, target, reduction="none"))


def test_empty_batch(rng):
    x = torch.randn(0, 5, 3, device=DEVICE)
    target = torch.zeros(0, 3, dtype=torch.int64, device=DEVICE)
    loss = blv_cross_entropy(x, target, [1, 2, 3, 4, 5], seed=1, backend="triton")
    assert torch.isnan(loss)  # as F.cross_entropy on an empty batch


@pytest.mark.skipif(HAS_CUDA, reason="the CPU raises at once; on a GPU it is a device-side assert")
@pytest.mark.parametrize("bad", [19, -1, 200], ids=["C", "negative", "uint8-200"])
def test_out_of_range_label_raises(bad, rng):
    x = torch.randn(2, 19, 3, 4, generator=rng)
    target = torch.randint(0, 19, (2, 3, 4), generator=rng)
    target[1, 2, 3] = bad
    if bad == 200:
        target = target.to(torch.uint8)
    with pytest.raises(ValueError, match=rf"outside \[0, 19\).*first: {bad}"):
        blv_cross_entropy(x, target, list(range(1, 20)), ignore_index=255, seed=1, backend="triton")


def test_backend_errors(rng):
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="float64"):
        blv_cross_entropy(x, t, [1, 2, 3], seed=1, backend="triton")
    with pytest.raises(ValueError, match="variation="):
        blv_cross_entropy(x.float(), t, [1, 2, 3], variation=torch.rand(2, 3), backend="triton")


@pytest.mark.parametrize("num_classes", [1, 3, 19, 150, 1000, 8192])
def test_block_sizes_cover_every_class_count(num_classes):
    block_p, block_g = kmod.block_sizes(num_classes)
    assert block_g in (1, 2, 4, 8, 16) and block_p >= 16
    assert math.log2(block_p).is_integer()
    assert block_p * block_g * 4 <= 2048 or block_p == 16


@pytest.mark.skipif(not HAS_CUDA, reason="full-size shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(8, 19, 512, 1024), (2, 150, 512, 512), (65536, 1000)],
                         ids=["N8-C19-512x1024", "N2-C150-512x512", "N65536-C1000"])  # fmt: skip
def test_full_size_on_gpu(shape, dtype, rng):
    x, target, counts, _, _, ii = _inputs(shape, "contiguous", dtype, 0.1, False, False, torch.int64, rng)
    grad_out = torch.tensor(1.0, device=DEVICE)
    tri = _run("triton", x, target, counts, None, None, ii, "mean", "abs", 6.0, 9, grad_out)
    ref = _run("reference", x.float(), target, counts, None, None, ii, "mean", "abs", 6.0, 9, grad_out)
    torch.testing.assert_close(tri[0].float(), ref[0], rtol=2e-3 if dtype != torch.float32 else 1e-5, atol=1e-5)
    torch.testing.assert_close(tri[1].float(), ref[1], rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-7)


@pytest.mark.parametrize("avg_factor", ["all-positions", "float"])
def test_avg_factor(avg_factor, rng):
    x, target, counts, w, pw, ii = _inputs((2, 19, 4, 5), "contiguous", torch.float32, 0.3, True, True,
                                           torch.int64, rng)  # fmt: skip
    factor = target.numel() if avg_factor == "all-positions" else 13.25
    results = []
    for backend in ("triton", "reference"):
        xb = x.detach().clone().requires_grad_(True)
        loss = blv_cross_entropy(xb, target, counts, seed=8, weight=w, position_weight=pw, avg_factor=factor,
                                 backend=backend)  # fmt: skip
        results.append((loss, *torch.autograd.grad(loss, xb)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_CUDA, reason="a tensor of more than 2**31 elements needs a GPU's memory")
def test_more_than_2_31_elements_on_gpu(rng):
    # (1, 4, 2**29 + 7) fp16: 2**31 + 28 elements, so element offsets overflow int32. The
    # stream is defined per position, so the last positions must equal the reference on a
    # slice of them evaluated at the matching offset.
    size = 2**29 + 7
    x = torch.randn(1, 4, size, device="cuda", dtype=torch.float16, requires_grad=True)
    target = torch.randint(0, 4, (1, size), device="cuda")
    counts = [10, 20, 30, 40]
    loss = blv_cross_entropy(x, target, counts, seed=4, reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    tail = 1000
    xs = x.detach()[:, :, -tail:].float().requires_grad_(True)
    ref = blv_cross_entropy(xs, target[:, -tail:], counts, seed=4, offset=size - tail, reduction="none",
                            backend="reference")  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref, xs, torch.ones_like(ref))
    torch.testing.assert_close(loss[:, -tail:].float(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grad[:, :, -tail:].float(), ref_grad, rtol=2e-3, atol=1e-3)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the tests above compile the kernels for real")
def test_every_specialisation_compiles_for_hopper_without_spills():
    # Triton compiles for a GPU target without a GPU; the interpreter that runs the tests here
    # does not, so compile in a process without TRITON_INTERPRET. Catches what the interpreter
    # lets through (types that differ between the branches of an `if`, unsupported casts) and
    # register spills, which would slow the kernel.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "blv_kernels.kernels.compile_report", "--arch", "90", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert {(r["kernel"], r["dtype"], r["layout"]) for r in rows} == {
        (kernel, dtype, layout)
        for kernel in ("fwd", "bwd")
        for dtype in ("fp32", "bf16")
        for layout in ("pixels-contiguous", "classes-contiguous")
    }
    assert {(r["block_p"], r["block_g"]) for r in rows} == {kmod.block_sizes(c) for c in range(1, 8193)}
    assert [r for r in rows if r["spill_bytes"]] == []
