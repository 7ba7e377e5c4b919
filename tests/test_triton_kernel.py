"""The Triton backend's own pieces: its Philox and word -> v transform against blv_kernels.noise,
the block configuration for every class count, and the backward's scaling kernel.

The loss and gradient against the reference are in test_backends.py (the shared grid); the
compiled code's registers, spills and instruction budget in test_static_report.py.
"""

from types import SimpleNamespace

import pytest
import torch

from blv_kernels import noise

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from benchmarks import static_report  # noqa: E402
from blv_kernels.backends import triton_kernel as tk  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@triton.jit
def _philox_kernel(key_ptr, counters_ptr, out_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    key = tl.load(key_ptr).to(tl.uint64, bitcast=True)
    c = [tl.load(counters_ptr + 4 * o + k, mask=m).to(tl.uint32) for k in range(4)]
    r0, r1, r2, r3 = tk._philox(key.to(tl.uint32), (key >> 32).to(tl.uint32), c[0], c[1], c[2], c[3])
    tl.store(out_ptr + 4 * o, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * o + 3, r3.to(tl.int64), mask=m)


def test_philox_equals_the_pytorch_stream(rng):
    # our Philox (wide multiplies) against noise.philox4x32, counters and keys over all 32/64 bits
    key = int(torch.randint(0, 2**62, (), generator=rng)) * 2 + 2**63 + 1  # the top bit too
    counters = torch.randint(0, 2**32, (1000, 4), generator=rng)
    counters[0] = torch.tensor([2**32 - 1] * 4)
    words = torch.full_like(counters, -1, device=DEVICE)
    _philox_kernel[(8,)](noise.seed_tensor(key, DEVICE), counters.to(DEVICE), words, 1000, BLOCK=128)
    expected = noise.philox4x32(noise.seed_tensor(key, "cpu"), *counters.unbind(1))
    assert torch.equal(words.cpu(), torch.stack(expected, dim=1))


@triton.jit
def _variation_kernel(words_ptr, params_ptr, out_ptr, n, CLAMP_MODE: tl.constexpr, POLY: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(words_ptr + o, mask=o < n).to(tl.uint32)
    scale, threshold = tl.load(params_ptr), tl.load(params_ptr + 1)
    tl.store(out_ptr + o, tk._variation(words, scale, threshold, CLAMP_MODE, POLY), mask=o < n)


@pytest.mark.parametrize("mode", ["abs", "clamp"])
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.5, 0.9618, 1.0, 4.0, 6.0])
def test_transform_matches_pytorch(sigma, mode, rng):
    params = noise.variation_params(sigma, mode)
    words = torch.randint(0, 2**32, (20_000,), generator=rng)
    ref = noise.variation_from_words(words, params)
    out = torch.full_like(ref, float("nan"), device=DEVICE)
    _variation_kernel[(20,)](words.to(DEVICE), noise.variation_params_tensor(sigma, DEVICE), out, words.numel(),
                             params.clamp_mode, params.use_poly, BLOCK=1024)  # fmt: skip
    # the same float32 operations; only log and FMA contraction (on a GPU) may differ by a few ulps
    torch.testing.assert_close(out.cpu(), ref, rtol=4 * 2**-24, atol=2**-24)
    assert torch.equal(out.cpu() == 1, ref == 1)  # the atom at v = 1 is decided on t alone: exact


def _check_one_thread(num_classes, config, positions_contiguous):
    """One position a thread, its row padded to the next multiple of 4 classes."""
    groups, where = triton.cdiv(num_classes, 4), (num_classes, config)
    assert config.block_p == 32 * config.num_warps and config.chunk_groups == 0, where
    assert groups <= tk.ONE_THREAD_MAX_GROUPS and (
        groups <= sum(tk.class_blocks(groups, 1)) < 2 * groups or groups == 1
    )
    assert (config.main_groups, config.tail_groups) == tk.class_blocks(groups, 1), where
    masked_main_of_4 = config.main_groups == 4 and num_classes < 16  # C = 13-15: spills at 96
    for pressure, lean_groups in enumerate((5, 4, 0, 0)):  # measured (the static report's option sets)
        lean = groups <= lean_groups and not masked_main_of_4
        cap = 96 if lean else 128 if pressure < 3 else None
        assert tk.kernel_config(num_classes, positions_contiguous, pressure) == config._replace(maxnreg=cap), where


def _check_blocks(groups, config, spread, per_thread):
    """A row in registers over ``spread`` threads: power-of-two blocks, none smaller than the spread
    (it would be replicated), at most ``per_thread`` groups a thread, the fewest threads that allow it."""
    main, tail, where = config.main_groups, config.tail_groups, (groups, config)
    assert config.chunk_groups == 0 and main & (main - 1) == 0 and tail & (tail - 1) == 0, where
    assert (main, tail) == tk.class_blocks(groups, spread), where
    assert main >= spread and (tail == 0 or tail >= spread), where
    assert groups <= main + tail <= per_thread * spread, where
    assert sum(tk.class_blocks(groups, spread // 2)) > per_thread * (spread // 2), where


def test_kernel_config_with_contiguous_positions():
    # NCHW: a position's row in one thread, then over the fewest warps of 32 positions (one a lane)
    # that leave a thread <= ONE_THREAD_MAX_GROUPS groups, then two sweeps (one position a thread)
    for num_classes in range(1, 8193):
        config = tk.kernel_config(num_classes, True)
        groups, warps = triton.cdiv(num_classes, 4), config.num_warps
        if groups <= tk.ONE_THREAD_MAX_GROUPS:
            _check_one_thread(num_classes, config, True)
        elif config.main_groups:
            assert config.block_p == 32 and warps in tk.ROW_WARPS and config.maxnreg is None, config
            _check_blocks(groups, config, warps, tk.ONE_THREAD_MAX_GROUPS)
        else:
            assert config.block_p == 32 * warps and config.chunk_groups == tk.CHUNK_GROUPS, config
            assert groups > tk.ONE_THREAD_MAX_GROUPS * tk.ROW_WARPS[-1], config


def test_kernel_config_with_contiguous_classes():
    # channels_last and rows: one position a thread up to 24 classes; above, a row's groups over the
    # lanes of a warp (32 / L positions a warp, L lanes each) and then of 2 to 16 warps (one position
    # a program), L * warps the fewest that leave a lane <= SPREAD_MAX_GROUPS groups; then two sweeps
    # by one warp over chunks of one group a lane
    lanes_seen = set()
    for num_classes in range(1, 20_001):
        config = tk.kernel_config(num_classes, False)
        groups = triton.cdiv(num_classes, 4)
        if groups <= tk.ONE_THREAD_MAX_GROUPS:
            _check_one_thread(num_classes, config, False)
            continue
        assert config.block_p * config.num_warps <= 32, config
        spread = 32 * config.num_warps // config.block_p  # the lanes across one position's row
        if config.main_groups:
            assert (config.num_warps == 1 or config.block_p == 1) and config.maxnreg is None, config
            _check_blocks(groups, config, spread, tk.SPREAD_MAX_GROUPS)
            lanes_seen.add(spread)
        else:
            assert config.block_p == config.num_warps == 1 and config.chunk_groups == spread, config
            assert config.maxnreg == 128, config
            assert groups > tk.SPREAD_MAX_GROUPS * tk.ROW_LANES[-1], config
    assert lanes_seen == set(tk.ROW_LANES) and tk.ROW_LANES[-1] == 32 * tk.ROW_WARPS[-1]


def test_register_pressure_of_the_options():
    # the options' registers set the cap of a row in one thread (kernel_config)
    problem, scalar = static_report.meta_problem(static_report.Case((2, 19, 8, 8), torch.float32, "nchw"))

    def pressure(*options):
        return tk.register_pressure(static_report.with_options(problem, options))

    assert pressure() == 0
    assert pressure("class_weight") == pressure("clamp") == pressure("class_weight", "clamp") == 1
    assert pressure("position_weight") == pressure("label_smoothing") == pressure("reduction_none") == 2
    assert pressure("class_weight", "clamp", "position_weight", "reduction_none") == 2
    assert pressure("class_weight", "label_smoothing") == pressure("clamp", "label_smoothing") == 3
    assert pressure("reduction_none", "label_smoothing") == pressure(*static_report.OPTIONS) == 3
    changed = static_report.with_options(problem, ("label_smoothing",))
    assert tk.loss_launch(changed, tk.Addressed.of(changed, compute_grad=True), scalar).maxnreg == 128
    assert tk.loss_launch(problem, tk.Addressed.of(problem, compute_grad=True), scalar).maxnreg == 96


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_kernel(dtype, rng):
    # That a factor of exactly 1 reads and writes nothing is a property of the compiled code,
    # checked in test_static_report.py; here the values.
    grad = torch.randn(5000, generator=rng).to(DEVICE, dtype)
    before = grad.clone()
    tk.scale_grad_(grad, torch.ones((), device=DEVICE))
    assert torch.equal(grad, before)
    factor = torch.tensor(-0.37, device=DEVICE)
    tk.scale_grad_(grad, factor)
    torch.testing.assert_close(grad, (before.float() * factor).to(dtype))


def _meta(shape, strides=None):
    return torch.empty_strided(shape, strides or torch.empty(shape, device="meta").stride(), device="meta")


@pytest.mark.parametrize(
    "logits, runs, spatial, xn, xs, index_64",
    [
        (_meta((2, 19, 4, 5)), 2, 20, 380, 1, False),  # NCHW: a run per sample
        (_meta((2, 19, 4, 5), (380, 1, 95, 19)), 1, 40, 0, 19, False),  # channels_last: the batch is one run
        (_meta((6, 1000)), 1, 6, 0, 1000, False),  # rows: the batch stride steps between positions
        (_meta((4, 19, 8192, 8192)), 4, 2**26, 19 * 2**26, 1, True),  # 5.1e9 elements
        (_meta((1, 19, 1024, 1024)), 1, 2**20, 19 * 2**20, 1, False),
        (_meta((1, 1, 2**29 + 1), (2**31 + 4, 2**31 + 4, 4)), 1, 2**29 + 1, 2**31 + 4, 4, True),  # offsets to 2**31
        (_meta((1, 4, 2**29 + 7)), 1, 2**29 + 7, 4 * (2**29 + 7), 1, True),  # the classes' offsets reach 2**31
        # expanded logits: their offsets and the labels' stay small, the dense gradient's reach 5.1e9
        (_meta((1, 19, 1, 1)).expand(4, 19, 8192, 8192), 4, 2**26, 0, 0, True),
    ],
    ids=["nchw", "channels_last", "rows", "huge", "large", "strided", "classes", "gradient"],
)
def test_addressed_runs_and_64_bit_offsets(logits, runs, spatial, xn, xs, index_64):
    # Addressed reads its runs and index width from a per-layout cache: by hand here, on meta tensors
    target = _meta(logits.shape[:1] + logits.shape[2:])
    view = tk.Addressed.of(SimpleNamespace(logits=logits, target=target, position_weight=None), compute_grad=True)
    assert (view.runs, view.spatial, view.strides["stride_xn"], view.strides["stride_xs"]) == (runs, spatial, xn, xs)
    assert view.index_64 == index_64
    assert view.grad.shape == logits.shape


@pytest.mark.parametrize("far", ["target", "position_weight"])
def test_64_bit_offsets_of_a_tiny_batch_whose_labels_or_weights_lie_far_apart(far):
    # 3 x 2 x 1 x 2 logits, but one per-position tensor's samples 2**30 elements apart: offsets reach 2**31
    # (a position weight's were left out of the index width: the Triton kernel read out of bounds)
    logits, near = _meta((3, 2, 1, 2)), _meta((3, 1, 2))
    tensors = {"target": near, "position_weight": near} | {far: _meta((3, 1, 2), (2**30, 2, 1))}
    view = tk.Addressed.of(SimpleNamespace(logits=logits, **tensors), compute_grad=True)
    assert view.index_64
