"""The C sources (blv_kernels/csrc) and the "cpu" backend beyond the shared grid.

- blv_math.h states every constant of the variation stream a second time: parsed here and
  compared with blv_kernels/noise.py, so the two cannot drift apart.
- The building blocks, compiled for the host in one small program that includes the CPU
  kernel's source: the Philox words and the word -> v transform of blv_math.h against
  noise.py, the CPU kernel's lane-wise versions of them bit for bit against blv_math.h, its exp
  against float64, its half conversions bit for bit against torch.
- The CPU library through the backend: the same bits for any thread count, the gradient
  scaling, NaN/Inf like F.cross_entropy, empty batches, bad labels, the 32-bit counter
  boundary, and shapes large enough for many blocks and both tile widths against the reference.
"""

import inspect
import re
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grid import Case, assert_as_close_as_reference, loss_and_grad, make_inputs

from blv_kernels import blv_cross_entropy, noise
from blv_kernels.backends import BACKENDS, build_csrc, cpp_kernel, resolve_backend

CSRC = build_csrc.CSRC
CPU_LIBRARY = build_csrc.LIBRARIES["cpu"]
HAS_CXX = build_csrc.compiler_path("c++") is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler")


@pytest.fixture
def cpu_kernels():
    error = BACKENDS["cpu"].why_not("cpu", torch.float32)
    if error is not None:
        pytest.skip(str(error))
    return cpp_kernel.kernels("cpu")


@pytest.fixture
def set_threads():
    """torch.set_num_threads, restored afterwards: the CPU backend runs on torch's intra-op thread count."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ------------------------------------------------------------------ blv_math.h's constants


def _math_header() -> str:
    return (CSRC / "blv_math.h").read_text()


def _function_body(source: str, signature: str) -> str:
    """The text of a function from its signature to the closing brace at the start of a line."""
    start = source.index(signature)
    return source[start : source.index("\n}", start)]


def _float_literal(text: str) -> float:
    """A C float literal (``0.7f``, ``-3.5233877e-06f``) as the float32 value the compiler makes of it."""
    return float(np.float32(text.removesuffix("f")))


def _horner(body: str, acc: str, arg: str) -> tuple[float, ...]:
    """The coefficients of ``float acc = c_n; acc = acc * arg + c_{n-1}; ...``, lowest degree first."""
    literal = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?f)"
    first = re.findall(rf"float {acc} = {literal};", body)
    steps = re.findall(rf"{acc} = {acc} \* {arg} \+ {literal};", body)
    assert len(first) == 1 and steps, f"no Horner scheme for {acc} in {body!r}"
    return tuple(_float_literal(c) for c in [*first, *steps])[::-1]


def _f32(values) -> tuple[float, ...]:
    return tuple(float(np.float32(v)) for v in values)


def test_header_philox_constants_match_noise():
    header = _math_header()
    constant = lambda name: re.search(rf"constexpr \w+ {name} = (\w+?)u?;", header).group(1)
    assert int(constant("kPhiloxRoundA"), 16) == noise.PHILOX_ROUND_A
    assert int(constant("kPhiloxRoundB"), 16) == noise.PHILOX_ROUND_B
    assert int(constant("kPhiloxKeyA"), 16) == noise.PHILOX_KEY_A
    assert int(constant("kPhiloxKeyB"), 16) == noise.PHILOX_KEY_B
    assert int(constant("kPhiloxRounds")) == noise.PHILOX_ROUNDS


def test_header_transform_constants_match_noise():
    """Compared as float32, the precision both sides compute in (noise.py's Python floats are
    rounded to float32 where they meet float32 tensors)."""
    header = _math_header()
    poly_max = re.search(r"constexpr float kErfinvPolyMax = ([^;]+);", header).group(1)
    assert _float_literal(poly_max) == float(np.float32(noise.ERFINV_POLY_MAX))
    assert _horner(_function_body(header, "float erfinv_poly("), "p", "x") == _f32(noise.ERFINV_POLY)
    giles = _function_body(header, "float erfinv_giles(")
    assert _horner(giles, "central", "x") == _f32(noise.ERFINV_GILES_CENTRAL)
    assert _horner(giles, "tail", "y") == _f32(noise.ERFINV_GILES_TAIL)
    # Giles' branch point (w < 5) and the centres of its two expansions (w - 2.5, sqrt(w) - 3), as written in both
    giles_py = inspect.getsource(noise.erfinv_giles)
    for in_header, in_noise in [
        (r"const float x = w - ([0-9.]+f);", r"ERFINV_GILES_CENTRAL, w - ([0-9.]+)\)"),
        (r"const float y = sqrtf\(w\) - ([0-9.]+f);", r"torch\.sqrt\(w\) - ([0-9.]+)\)"),
        (r"w < ([0-9.]+f) \? central : tail", r"torch\.where\(w < ([0-9.]+),"),
    ]:
        assert _float_literal(re.search(in_header, giles).group(1)) == float(re.search(in_noise, giles_py).group(1))
    # u = (word >> 8) * 2^-24
    factor = re.search(
        r"\(float\)\(int32_t\)\(word >> 8\) \* ([^;]+);", _function_body(header, "float variation(")
    ).group(1)
    exponent = re.search(
        r"\(words >> 8\)\.to\(torch\.float32\) \* 2\.0\*\*-(\d+)", inspect.getsource(noise.variation_from_words)
    )
    assert _float_literal(factor) == 2.0 ** -int(exponent.group(1))


# ------------------------------------------------------------------ host-compiled building blocks

# MODE IN OUT [ARGS]: IN holds 32-bit values, OUT gets 32-bit values (float bit patterns for floats).
_BLOCKS_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cpu/blv_kernel.cpp"

using namespace blv::cpu;

static std::vector<uint32_t> read_values(const char* path) {
  FILE* f = fopen(path, "rb");
  std::vector<uint32_t> v;
  uint32_t x;
  while (fread(&x, sizeof x, 1, f) == 1) v.push_back(x);
  fclose(f);
  return v;
}

int main(int argc, char** argv) {
  const char* mode = argv[1];
  const std::vector<uint32_t> in = read_values(argv[2]);
  const size_t n = in.size();
  std::vector<uint32_t> out;
  if (!strcmp(mode, "philox")) {  // arg SEED; in: per tile, q_lo[16], q_hi[16], g, 15 unused; out: blv::philox_words,
    const uint64_t seed = strtoull(argv[4], nullptr, 10);  // then the kernel's tile_words
    const size_t tiles = n / (3 * kNarrowTile);
    out.resize(8 * kNarrowTile * tiles);
    for (size_t i = 0; i < tiles; ++i) {
      const uint32_t* q_lo = &in[3 * kNarrowTile * i];
      const uint32_t* q_hi = q_lo + kNarrowTile;
      const uint32_t g = q_hi[kNarrowTile];
      for (int j = 0; j < kNarrowTile; ++j)
        blv::philox_words(&out[4 * (kNarrowTile * i + j)], q_lo[j] | (uint64_t)q_hi[j] << 32, g, seed);
      uint32_t words[4][kNarrowTile];
      tile_words<kNarrowTile>(q_lo, q_hi, g, seed, words);
      for (int j = 0; j < kNarrowTile; ++j)
        for (int k = 0; k < 4; ++k) out[4 * kNarrowTile * (tiles + i) + 4 * j + k] = words[k][j];
    }
  } else if (!strcmp(mode, "variation")) {  // args KIND SCALE THRESHOLD CLAMP; out: blv::variation
    const int kind = atoi(argv[4]), clamp = atoi(argv[7]);
    const float scale = strtof(argv[5], nullptr), threshold = strtof(argv[6], nullptr);
    const blv::Mode m = blv::mode_of(clamp != 0);
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i)  // a loop over lanes, as in the kernels (vectorised on the host)
      v[i] = kind == blv::kPolyErfinv ? blv::variation<blv::kPolyErfinv>(in[i], scale, threshold, m)
                                      : blv::variation<blv::kGilesErfinv>(in[i], scale, threshold, m);
    out.resize(n);
    memcpy(out.data(), v.data(), n * sizeof(float));
  } else if (!strcmp(mode, "exp")) {  // in: float bits; out: exp_nonpositive
    std::vector<float> x(n), y(n);
    memcpy(x.data(), in.data(), n * sizeof(float));
    for (size_t i = 0; i < n; ++i) y[i] = exp_nonpositive(x[i]);
    out.resize(n);
    memcpy(out.data(), y.data(), n * sizeof(float));
  } else if (!strcmp(mode, "narrow")) {  // in: float bits; out: Float16::store, then BFloat16::store
    std::vector<float> x(n);
    memcpy(x.data(), in.data(), n * sizeof(float));
    out.resize(2 * n);
    for (size_t i = 0; i < n; ++i) out[i] = Float16::store(x[i]);
    for (size_t i = 0; i < n; ++i) out[n + i] = BFloat16::store(x[i]);
  } else if (!strcmp(mode, "widen")) {  // in: 16-bit patterns; out: Float16::load, then BFloat16::load
    std::vector<float> y(2 * n);
    for (size_t i = 0; i < n; ++i) y[i] = Float16::load((uint16_t)in[i]);
    for (size_t i = 0; i < n; ++i) y[n + i] = BFloat16::load((uint16_t)in[i]);
    out.resize(2 * n);
    memcpy(out.data(), y.data(), 2 * n * sizeof(float));
  } else {
    return 2;
  }
  FILE* f = fopen(argv[3], "wb");
  fwrite(out.data(), sizeof(uint32_t), out.size(), f);
  fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """Runs the building-blocks program: blocks(mode, uint32 values, *args) -> uint32 numpy array."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    directory = tmp_path_factory.mktemp("csrc_blocks")
    (directory / "main.cpp").write_text(_BLOCKS_MAIN)
    # the library's own flags (-O3, -march=native: the vectorised code), an executable instead of a shared library
    command_flags = [f for f in build_csrc.flags(CPU_LIBRARY, portable=False) if f not in ("-shared", "-fPIC")]
    program = directory / "blocks"
    command = [build_csrc.compiler_path("c++"), *command_flags, str(directory / "main.cpp"), "-o", str(program)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)

    def run(mode: str, values: np.ndarray, *args) -> np.ndarray:
        source, result = directory / f"{mode}.in", directory / f"{mode}.out"
        np.asarray(values, dtype=np.uint32).tofile(source)
        subprocess.run([str(program), mode, str(source), str(result), *map(str, args)], check=True, timeout=300)
        return np.fromfile(result, dtype=np.uint32)

    return run


def test_philox_words_match_noise(blocks, rng):
    tiles = 40
    # positions around 2**32 (hi32(q) changes inside a tile), up to 2**63 - 1 and anywhere; the seed's top bit set
    q = torch.cat([2**32 - 300 + torch.arange(600), 2**63 - 16 + torch.arange(16),
                   torch.randint(0, 2**62, (16 * tiles - 616,), generator=rng)])  # fmt: skip
    g = torch.randint(0, 2**20, (tiles,), generator=rng)  # one class group per tile, as in the kernel
    seed = 2**63 + int(torch.randint(0, 2**62, (), generator=rng))
    values = torch.zeros(tiles, 48, dtype=torch.int64)
    values[:, :16] = (q & noise.MASK32).reshape(tiles, 16)
    values[:, 16:32] = (q >> 32).reshape(tiles, 16)
    values[:, 32] = g
    words = torch.from_numpy(blocks("philox", values.numpy(), seed).astype(np.int64)).reshape(2, tiles * 16, 4)
    ref = noise.philox4x32(noise.seed_tensor(seed, "cpu"), q & noise.MASK32, q >> 32, g.repeat_interleave(16), 0)
    ref = torch.stack(ref, dim=1)
    assert torch.equal(words[0], ref), "blv::philox_words differs from noise.philox4x32"
    assert torch.equal(words[1], ref), "the CPU kernel's tile_words differs from noise.philox4x32"


@pytest.mark.parametrize("mode", ["abs", "clamp"])
@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.95, 0.97, 4.0, 6.0])  # Giles up to the switch at 0.966, then the poly
def test_variation_matches_noise(blocks, sigma, mode, rng):
    params = noise.variation_params(sigma, mode)
    # random words, plus those at the threshold's u and at both ends
    at_threshold = int(params.threshold * 2**24) if mode == "abs" else int((params.threshold + 1) / 2 * 2**24)
    at_threshold = min(at_threshold, 2**24 - 2)  # sigma = 0.05: threshold 1, past every word
    special = torch.tensor([0, 255, 256, 2**31, 2**32 - 1, (at_threshold << 8), ((at_threshold + 1) << 8)])
    words = torch.cat([torch.randint(0, 2**32, (20_000,), generator=rng), special])
    kind = 1 if params.use_poly else 2
    out = blocks("variation", words.numpy(), kind, repr(params.scale), repr(params.threshold), int(params.clamp_mode))
    header = torch.from_numpy(out.view(np.float32).copy())
    ref = noise.variation_from_words(words, params)
    # the same float32 operations, a rounding apart where the compiler contracts a * b + c into an fma
    torch.testing.assert_close(header, ref, rtol=4 * 2**-24, atol=2**-24)
    u = (words >> 8).to(torch.float32) * 2.0**-24
    t = torch.clamp_min(2 * u - 1, 0) if params.clamp_mode else u  # exact in float32
    assert (header[t >= params.threshold] == 1).all()  # the atom P(v = 1): exactly the words past the threshold


def test_exp_within_float32_rounding(blocks, rng):
    x = torch.cat([-torch.rand(100_000, generator=rng) * 90, -torch.rand(10_000, generator=rng) * 1e-3,
                   torch.tensor([0.0, -0.0, -87.0, -87.5, -88.0, -1e30, -float("inf"), float("nan")])])  # fmt: skip
    y = torch.from_numpy(blocks("exp", x.numpy().view(np.uint32)).view(np.float32).copy())
    exact = torch.exp(x.double())
    normal = x >= -87.0  # below, the exact result is near or below float32's smallest normal: flushed to 0
    assert ((y[normal].double() - exact[normal]).abs() <= 2**-23 * exact[normal]).all()  # measured: below one ulp
    assert (y[~normal & ~x.isnan()] == 0).all()
    assert y[x == 0].eq(1).all() and y[x.isnan()].isnan().all()


def test_half_conversions_match_torch(blocks, rng):
    bits = np.arange(2**16, dtype=np.uint32)
    widened = torch.from_numpy(blocks("widen", bits).view(np.float32).copy()).reshape(2, -1)
    for dtype, ours in zip((torch.float16, torch.bfloat16), widened, strict=True):
        ref = torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(dtype).float()
        assert torch.equal(ours.isnan(), ref.isnan())
        assert torch.equal(ours[~ref.isnan()].view(torch.int32), ref[~ref.isnan()].view(torch.int32))
    # every rounding case: random bit patterns (NaN, inf, subnormals included), ties, the overflow edges
    edges = [65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
             1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3895314e38, float("inf"), -0.0]  # fmt: skip
    random_bits = torch.randint(-(2**31), 2**31, (200_000,), generator=rng, dtype=torch.int32).view(torch.float32)
    x = torch.cat([random_bits, torch.tensor(edges)])
    narrowed = torch.from_numpy(blocks("narrow", x.numpy().view(np.uint32)).astype(np.uint16).view(np.int16))
    for dtype, ours in zip((torch.float16, torch.bfloat16), narrowed.reshape(2, -1), strict=True):
        ref = x.to(dtype)
        ours = ours.view(dtype)
        assert torch.equal(ours.isnan(), ref.isnan())
        assert torch.equal(ours[~ref.isnan()].view(torch.int16), ref[~ref.isnan()].view(torch.int16))


@needs_cxx
@pytest.mark.parametrize("portable", [True, False], ids=["portable", "native"])
def test_cpu_kernel_compiles_without_warnings(tmp_path, portable):
    # -Wno-unknown-pragmas: blv_math.h's `#pragma unroll` is for nvcc; host compilers ignore it
    warnings = ["-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"]
    command = [build_csrc.compiler_path("c++"), *build_csrc.flags(CPU_LIBRARY, portable=portable), *warnings,
               str(CSRC / "cpu" / "blv_kernel.cpp"), "-o", str(tmp_path / "lib.so")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


# ------------------------------------------------------------------ the library, through the backend


# The kernel's two paths: tiles of positions (NCHW, few classes) and rows (class-contiguous, C >= 64).
PATHS = {"tiles": 19, "rows": 70}


def _logits(shape, path, gen):
    """Random logits of ``shape`` in the path's layout: NCHW for tiles, classes innermost for rows."""
    x = torch.randn(shape, generator=gen) * 4
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if path == "rows" else x


def _loss_and_grad(x, target, counts, **options):
    x = x.detach().clone().requires_grad_(True)
    loss = blv_cross_entropy(x, target, class_counts=counts, backend="cpu", **options)
    (grad,) = torch.autograd.grad(loss.sum() if loss.dim() else loss, x)
    return loss, grad


@pytest.mark.parametrize(
    "shape, layout",
    [((3, 19, 67, 129), "contiguous"), ((3, 19, 67, 129), "channels_last"), ((2, 150, 37, 41), "channels_last")],
    ids=["tiles-wide", "tiles-narrow", "rows"],
)
def test_same_bits_for_any_thread_count(cpu_kernels, set_threads, shape, layout, rng, poisoned):
    # about 460K logits: 15 or 16 blocks, so 7 threads all get some
    x = torch.randn(shape, generator=rng) * 4
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=rng)
    target[torch.rand(target.shape, generator=rng) < 0.1] = -100
    counts = torch.randint(1, 10**6, (shape[1],), generator=rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    runs = {}
    for threads in (1, 2, 7):
        set_threads(threads)
        runs[threads] = [
            _loss_and_grad(x, target, counts, seed=seed, reduction=reduction, label_smoothing=0.1)
            for reduction in ("mean", "none")
        ]  # fmt: skip
    for threads in (2, 7):
        for (loss, grad), (loss_1, grad_1) in zip(runs[threads], runs[1], strict=True):
            assert torch.equal(loss, loss_1) and torch.equal(grad, grad_1), f"{threads} threads differ from 1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_grad(cpu_kernels, set_threads, dtype, rng):
    set_threads(2)
    numel = 2 * 65536 + 13  # three scaling blocks, the last one partial
    nan = torch.full((numel,), float("nan"), dtype=dtype)
    cpu_kernels.scale_grad_(nan, torch.tensor(1.0))
    assert nan.isnan().all(), "a grad_output of exactly 1 must leave the buffer unread and unwritten"
    grad = (torch.randn(numel, generator=rng) * 10).to(dtype)
    grad[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-7])  # specials and a half subnormal
    factor = torch.tensor(-0.3712)
    expected = (grad.float() * factor).to(dtype)  # fp32 product, rounded to nearest even
    cpu_kernels.scale_grad_(grad, factor)
    assert torch.equal(grad.isnan(), expected.isnan())
    assert torch.equal(grad[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_nan_and_inf_propagate_like_cross_entropy(cpu_kernels, path, reduction, rng, poisoned):
    """sigma = 0: the loss is F.cross_entropy of the logits themselves, specials included."""
    x = _logits((6, PATHS[path], 7), path, rng)
    target = torch.randint(0, 5, (6, 7), generator=rng)
    x[0, 2, 0] = float("inf")  # +inf logit, not the target: NaN
    target[0, 0] = 1
    x[1, 3, 1], target[1, 1] = -float("inf"), 3  # -inf at the target: inf
    x[2, 4, 2], target[2, 2] = -float("inf"), 0  # -inf elsewhere: finite
    x[3, 0, 3] = float("nan")  # NaN logit: NaN
    x[4, :, 4] = -float("inf")  # every logit -inf: NaN
    x[5, 1, 5], target[5, 5] = float("nan"), -100  # NaN at an ignored position: no effect on the loss
    loss, grad = _loss_and_grad(x, target, [1] * x.shape[1], sigma=0.0, reduction=reduction)
    ref_x = x.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, target, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    if reduction == "none":
        assert loss[0, 0].isnan() and loss[1, 1] == float("inf") and loss[2, 2].isfinite() and loss[5, 5] == 0
    # The gradient where F.cross_entropy defines it; at the ignored position F.cross_entropy's
    # backward gives NaN (0 * NaN in log_softmax's backward), blv_kernel.h's contract 0.
    labelled = (target != -100)[:, None, :].expand_as(x)
    torch.testing.assert_close(grad[labelled], ref_grad[labelled], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (grad[~labelled] == 0).all()


@pytest.mark.parametrize("shape", [(2, 19, 0, 5), (0, 70)])  # no positions with N > 0; rows with N = 0
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(cpu_kernels, shape, reduction, poisoned):
    x = torch.randn(shape)
    target = torch.zeros((shape[0], *shape[2:]), dtype=torch.int64)
    loss, grad = _loss_and_grad(x, target, [1] * shape[1], seed=3, reduction=reduction)
    ref = F.cross_entropy(x, target, reduction=reduction)  # mean of nothing: NaN, as 0 / 0
    torch.testing.assert_close(loss, ref, equal_nan=True)
    assert grad.shape == shape


# Beyond test_backends' out-of-range labels: a uint8 label can never be a negative ignore_index,
# -100 is a bad label when ignore_index is another value, and of two bad labels the first is named.
@pytest.mark.parametrize(
    "dtype, bad, ignore_index", [(torch.uint8, 255, -100), (torch.int16, -100, 255), (torch.int32, 19, -100)]
)
def test_bad_labels_raise_and_name_the_first(cpu_kernels, dtype, bad, ignore_index, rng):
    x = torch.randn(2, 19, 5, 6, generator=rng, requires_grad=True)
    target = torch.randint(0, 19, (2, 5, 6), generator=rng).to(dtype)
    target[1, 2, 3], target[1, 4, 5] = bad, 20
    with pytest.raises(ValueError, match=rf"target has 2 value\(s\) outside \[0, 19\).*\(first: {bad}\)"):
        blv_cross_entropy(x, target, class_counts=[1] * 19, ignore_index=ignore_index, backend="cpu")


@pytest.mark.parametrize("path", PATHS)
def test_bad_labels_are_never_an_index(cpu_kernels, path, monkeypatch, rng, poisoned):
    """Past the label check (which raises first), the loss pass counts a bad label as not valid."""
    monkeypatch.setattr(cpp_kernel, "check_labels", lambda problem, bad_counts: None)
    classes = PATHS[path]
    x = _logits((2, classes, 5, 6), path, rng)
    target = torch.randint(0, classes, (2, 5, 6), generator=rng)
    bad = torch.zeros(target.shape, dtype=torch.bool)
    bad[0, 1, 1], bad[1, 3, 2], bad[1, 4, 0] = True, True, True
    target[bad] = torch.tensor([2**40, -5, classes])
    loss, grad = _loss_and_grad(x, target, [1] * classes, seed=1, reduction="none")
    assert (loss[bad] == 0).all() and (grad.movedim(1, -1)[bad] == 0).all()
    ignored = target.masked_fill(bad, -100)
    ref = blv_cross_entropy(x, ignored, class_counts=[1] * classes, seed=1, reduction="none", backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [2**32 - 7 * 64 - 5, 2**62 + 2**32 - 100])
def test_across_the_32_bit_counter(cpu_kernels, path, offset, rng, poisoned):
    """hi32(q) changes inside a tile (or a block of rows): each position keeps its own counter."""
    classes = PATHS[path]
    x = _logits((2, classes, 9, 71), path, rng)
    target = torch.randint(0, classes, (2, 9, 71), generator=rng)
    counts = torch.randint(1, 10**6, (classes,), generator=rng)
    options = dict(class_counts=counts, seed=int(torch.randint(0, 2**62, (), generator=rng)), offset=offset,
                   reduction="none")  # fmt: skip
    ours = blv_cross_entropy(x, target, backend="cpu", **options)
    torch.testing.assert_close(ours, blv_cross_entropy(x, target, backend="reference", **options), rtol=1e-5, atol=1e-5)


# Beyond the grid's small shapes: many blocks, wide (64-position) NCHW tiles, narrow tiles at sample
# boundaries (S % 64 != 0) and for channels_last with few classes, rows for (N, C) and channels_last
# with C >= 64, both erfinv kinds.
LARGE_CASES = [
    Case((2, 19, 96, 160), ignore=0.05),
    Case(
        (3, 19, 7, 37),
        reduction="none",
        weight=True,
        position_weight=True,
        label_smoothing=0.1,
        target_dtype=torch.uint8,
    ),
    Case((2, 19, 48, 80), layout="channels_last", reduction="sum", mode="clamp", sigma=0.5),
    Case((300, 1000), weight=True, label_smoothing=0.05),
    Case((2, 150, 33, 40), reduction="none", sigma=4.0, target_dtype=torch.int32),
    Case((2, 150, 21, 26), layout="channels_last", weight=True, position_weight=True, label_smoothing=0.1),
    Case((2, 19, 64, 96), dtype=torch.bfloat16),
    Case((2, 19, 48, 80), dtype=torch.float16, layout="channels_last", reduction="sum", position_weight=True),
    Case((64, 1000), dtype=torch.bfloat16, sigma=0.5),
]


@pytest.mark.parametrize("case", [c.param() for c in LARGE_CASES])
def test_large_cases_match_reference(cpu_kernels, case, rng, poisoned):
    """Float32: the reference's values to float32 rounding over a sum of C terms (1e-5). Halves, with
    grad_output 1 (loss.backward() of a training step): no further from a float64 ground truth than
    the reference, plus half an ulp at the result's scale (both round a float32 result once)."""
    inputs = make_inputs(case, rng)
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    grad_out = torch.ones(inputs.target.shape if case.reduction == "none" else ())
    loss, grad = loss_and_grad("cpu", case, inputs, seed, grad_out)
    assert loss.dtype == grad.dtype == case.dtype
    assert loss.isfinite().all()  # so that the comparison's equal_nan matches nothing here
    assert_as_close_as_reference(
        case.dtype, (loss, grad), loss_and_grad("reference", case, inputs, seed, grad_out),
        lambda: loss_and_grad("reference", case, inputs, seed, grad_out.double(), inputs.logits.double()),
    )  # fmt: skip


# ------------------------------------------------------------------ building and loading


def test_prebuilt_library_serves_only_its_own_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(build_csrc, "PREBUILT", tmp_path)
    prebuilt = build_csrc.prebuilt_path(CPU_LIBRARY, tmp_path)
    prebuilt.write_bytes(b"")
    assert build_csrc._current_prebuilt(CPU_LIBRARY) is None  # no hash beside it
    digest = prebuilt.with_name(prebuilt.name + ".sha256")
    digest.write_text(build_csrc.sources_digest(CPU_LIBRARY) + "\n")
    assert build_csrc._current_prebuilt(CPU_LIBRARY) == prebuilt
    digest.write_text("0" * 64 + "\n")  # built from other sources (e.g. csrc/ edited in an editable install)
    assert build_csrc._current_prebuilt(CPU_LIBRARY) is None


def test_without_a_compiler_auto_warns_once_and_falls_back_to_the_reference(tmp_path, monkeypatch, rng):
    from blv_kernels import backends

    monkeypatch.setattr(build_csrc, "PREBUILT", tmp_path)  # no library setup.py built
    monkeypatch.setattr(build_csrc, "compiler_path", lambda compiler: None)
    monkeypatch.setattr(cpp_kernel, "_loaded", {})
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.randn(3, 5, generator=rng)
    target = torch.randint(0, 5, (3,), generator=rng)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel is unavailable") as caught:
        loss = blv_cross_entropy(x, target, class_counts=[1] * 5, seed=9, backend="auto")
        blv_cross_entropy(x, target, class_counts=[1] * 5, seed=9, backend="auto")
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "no c++ compiler" in str(caught[0].message)
    assert resolve_backend("auto", x).name == "reference"
    assert torch.equal(loss, blv_cross_entropy(x, target, class_counts=[1] * 5, seed=9, backend="reference"))
    with pytest.raises(RuntimeError, match="no c\\+\\+ compiler"):
        blv_cross_entropy(x, target, class_counts=[1] * 5, seed=9, backend="cpu")


def test_auto_picks_the_cpu_kernel_for_cpu_tensors(cpu_kernels):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", torch.empty(2, 3, dtype=dtype)).name == "cpu"
    assert resolve_backend("auto", torch.empty(2, 3, dtype=torch.float64)).name == "reference"


def test_first_use_builds_into_the_cache_once(tmp_path, monkeypatch):
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("BLV_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(build_csrc, "PREBUILT", tmp_path / "none")
    path = build_csrc.library_path(CPU_LIBRARY, quiet=True)
    assert path.parent == tmp_path and re.fullmatch(r"libblv_cpu-[0-9a-f]{16}\.so", path.name)
    built = path.stat().st_mtime_ns
    assert build_csrc.library_path(CPU_LIBRARY, quiet=True) == path and path.stat().st_mtime_ns == built
    kernels = cpp_kernel.CompiledKernels(path, "cpu")  # it loads, with every function of blv_kernel.h
    assert kernels.lib.blv_error_string(0) == b"no error"
