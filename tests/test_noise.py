"""The variation stream: Philox words, the word -> v transform, reproducibility, distribution."""

import math

import pytest
import torch
from scipy import special, stats

from blv_kernels import noise, variation


def test_philox_known_answer():
    # Random123's known-answer test for Philox4x32-10 (kat_vectors): counter 0, key 0.
    words = noise.philox4x32(torch.tensor(0), torch.tensor(0), 0, 0, 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counter all ones, key all ones.
    ones = torch.tensor(0xFFFFFFFF)
    words = noise.philox4x32(torch.tensor(-1), ones, ones, ones, ones)
    assert [int(w) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) from its published constants, in Python ints: written
    apart from noise.py, to check variation() against the spec rather than against itself."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        a, b = 0xD2511F53 * c0, 0xCD9E8D57 * c2  # 64-bit products
        c0, c1, c2, c3 = (b >> 32) ^ c1 ^ k0, b & 0xFFFFFFFF, (a >> 32) ^ c3 ^ k1, a & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def test_independent_philox_known_answers():
    # Random123's kat_vectors for philox4x32 10: counter (4 words), key (2 words) -> 4 words
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for counter, key, expected in kat:
        assert _philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("sigma, mode", [(6.0, "abs"), (0.5, "clamp")])  # the polynomial and Giles' erfinv
def test_variation_known_answer(sigma, mode):
    # BLV_SPEC section 4, element (n, c, s): word c % 4 of Philox4x32-10 with key (lo32, hi32) of the
    # seed and counter (lo32(q), hi32(q), c // 4, 0), q = offset + n*S + s; then the transform of
    # noise.py's docstring, here in float64 with scipy's erfinv. A seed with its top bit set, positions
    # across 2**32 (hi32(q) = 0 and 1), 6 classes (two Philox calls a position).
    seed, offset, shape = 0xFEDCBA9876543210, 2**32 - 4, (2, 6, 2, 2)
    v = variation(shape, sigma, seed=seed, offset=offset, mode=mode)
    n_, c_, s_ = shape[0], shape[1], 4
    expected = torch.empty(n_, c_, s_, dtype=torch.float64)
    scale, a = sigma * math.sqrt(2), math.erf(1 / (sigma * math.sqrt(2)))  # a: P(|eps| < 1)
    for n in range(n_):
        for s in range(s_):
            q = offset + n * s_ + s
            for c in range(c_):
                word = _philox4x32_10((q & 0xFFFFFFFF, q >> 32, c // 4, 0), (seed & 0xFFFFFFFF, seed >> 32))[c % 4]
                u = (word >> 8) * 2.0**-24  # uniform on [0, 1)
                t = u if mode == "abs" else max(2 * u - 1, 0.0)  # clamp: eps <= 0 gives t = 0, v = 0
                expected[n, c, s] = 1.0 if t >= a else min(scale * special.erfinv(t), 1.0)
    # v is continuous at the threshold a (scale * erfinv(a) = 1), so its float32 rounding decides
    # nothing; erfinv in float32 is within a few ulps (test_erfinv_approximations_within_float32_rounding)
    torch.testing.assert_close(v.reshape(n_, c_, s_).double(), expected, rtol=16 * 2**-24, atol=2**-24)
    # the pinned values reach the atom v = 1, values below it and, in clamp mode only, v = 0
    assert 0 < (expected == 1).sum() < expected.numel() and (mode == "abs") == bool((expected > 0).all())


def test_philox_matches_triton_bit_for_bit(rng):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def philox_words(seed_ptr, c0_ptr, c1_ptr, c2_ptr, out_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < n
        c0 = tl.load(c0_ptr + o, mask=m).to(tl.uint32)
        c1 = tl.load(c1_ptr + o, mask=m).to(tl.uint32)
        c2 = tl.load(c2_ptr + o, mask=m).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(tl.load(seed_ptr), c0, c1, c2, tl.zeros_like(c0))
        tl.store(out_ptr + 4 * o, r0.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * o + 1, r1.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * o + 2, r2.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * o + 3, r3.to(tl.int64), mask=m)

    n = 100
    # Positions q around 2**32 and 2**40 (hi32(q) != 0), class groups, seeds over all 64 bits.
    q = torch.cat([2**32 - 50 + torch.arange(n // 2), 2**40 + torch.randint(0, 2**31, (n // 2,), generator=rng)])
    g = torch.randint(0, 2048, (n,), generator=rng)
    for seed in [
        int(torch.randint(0, 2**62, (), generator=rng)),
        2**64 - 1 - int(torch.randint(0, 99, (), generator=rng)),
    ]:
        key = noise.seed_tensor(seed, "cpu")
        tri = torch.full((4 * n,), -1, dtype=torch.int64)  # poisoned
        philox_words[(1,)](key, q & noise.MASK32, q >> 32, g, tri, n, BLOCK=128)
        ref = torch.stack(noise.philox4x32(key, q & noise.MASK32, q >> 32, g, 0), dim=-1).reshape(-1)
        assert torch.equal(tri, ref)


def test_erfinv_approximations_within_float32_rounding():
    t = torch.linspace(0, noise.ERFINV_POLY_MAX, 200_001, dtype=torch.float32)
    exact = torch.erfinv(t.double())
    rel = lambda approx: ((approx.double() - exact).abs() / exact.clamp_min(1e-30)).max().item()
    assert rel(noise.erfinv_poly(t)) < 2.5 * 2**-24 * 2  # a couple of float32 ulps
    t = torch.cat([t, torch.linspace(0.7, 1 - 2**-24, 200_001)])
    exact = torch.erfinv(t.double())
    assert rel(noise.erfinv_giles(t)) < 8 * 2**-24


def _elements(shape):
    n, c, s = shape[0], shape[1], math.prod(shape[2:])
    return n, c, s


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 3, 4), (1, 9, 2, 3, 2)], ids=["NC", "NCHW", "NCDHW"])
def test_stream_reproducible_and_regenerates_elementwise(shape, rng):
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    offset = int(torch.randint(0, 2**40, (), generator=rng))
    v = variation(shape, 4.0, seed=seed, offset=offset)
    assert v.dtype == torch.float32 and v.shape == shape
    assert torch.equal(v, variation(shape, 4.0, seed=seed, offset=offset))
    n, c, s = _elements(shape)
    flat = v.reshape(n, c, s)
    for _ in range(6):
        i, k, j = (int(torch.randint(0, m, (), generator=rng)) for m in (n, c, s))
        alone = variation((1, c, 1), 4.0, seed=seed, offset=offset + i * s + j)
        assert alone[0, k, 0] == flat[i, k, j]


def test_seeds_and_offsets_give_independent_streams(rng):
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    shape = (4, 8, 64)
    base = variation(shape, 1.0, seed=seed)
    other_seed = variation(shape, 1.0, seed=seed + 1)
    other_offset = variation(shape, 1.0, seed=seed, offset=shape[0] * shape[2])
    for other in (other_seed, other_offset):
        assert not torch.equal(base, other)
        # independent draws: correlation of the continuous values near 0
        r = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]
        assert abs(r) < 0.1
    # an offset continues the stream: positions [S, 2S) of seed equal positions [0, S) at offset S
    two = variation((2, 8, 64), 1.0, seed=seed)
    assert torch.equal(two[1], variation((1, 8, 64), 1.0, seed=seed, offset=64)[0])


def test_offset_above_2_32_does_not_repeat(rng):
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    low = variation((1, 8, 16), 1.0, seed=seed, offset=5)
    high = variation((1, 8, 16), 1.0, seed=seed, offset=5 + 2**32)
    assert not torch.equal(low, high)


def test_seed_tensor_equals_int_seed(rng):
    seed = int(torch.randint(0, 2**62, (), generator=rng))
    as_int = variation((2, 6, 5), 6.0, seed=seed)
    as_tensor = variation((2, 6, 5), 6.0, seed=torch.tensor(seed))
    assert torch.equal(as_int, as_tensor)
    # seeds above 2**63 are their 64-bit pattern
    assert torch.equal(variation((2, 6), 6.0, seed=2**64 - 3), variation((2, 6), 6.0, seed=torch.tensor(-3)))


@pytest.mark.parametrize("sigma", [1.0, 4.0, 6.0])
@pytest.mark.parametrize("mode", ["abs", "clamp"])
def test_distribution_matches_analytic(sigma, mode):
    # Fixed seeds: a deterministic check of the stream, not a flaky statistical one.
    v = variation((8, 101, 500), sigma, seed=20230613 + int(sigma), mode=mode).flatten().double()
    n = v.numel()
    a = math.erf(1 / (sigma * math.sqrt(2)))  # P(|eps| < 1)
    p_one = 1 - a if mode == "abs" else (1 - a) / 2
    p_zero = 0.0 if mode == "abs" else 0.5
    for observed, p in [((v == 1).sum().item(), p_one), ((v == 0).sum().item(), p_zero)]:
        assert abs(observed - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9
    inner = v[(v > 0) & (v < 1)].numpy()
    # |eps| given |eps| < 1 (abs) and eps given 0 < eps < 1 (clamp) share this CDF:
    cdf = lambda x: special.erf(x / (sigma * math.sqrt(2))) / a
    assert stats.kstest(inner, cdf).pvalue > 1e-4


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.9, 1.0, 6.0])
def test_transform_boundaries(sigma, rng):
    # Both erfinv paths (polynomial for sigma >= 0.962, Giles below) stay in [0, 1], are
    # monotone in the word, and hit exactly 1 at and above the threshold.
    params = noise.variation_params(sigma, "abs")
    assert params.use_poly == (sigma >= 1.0)
    words = torch.sort(torch.randint(0, 2**32, (50_000,), generator=rng)).values
    v = noise.variation_from_words(words, params)
    assert (v >= 0).all() and (v <= 1).all()
    assert (v.diff() >= 0).all()
    u = (words >> 8).float() * 2**-24
    assert ((u >= params.threshold) <= (v == 1)).all()


def test_sigma_zero_gives_zero_variation():
    assert torch.equal(variation((2, 5, 7), 0.0, seed=3), torch.zeros(2, 5, 7))
    assert torch.equal(variation((2, 5, 7), 0.0, seed=3, mode="clamp"), torch.zeros(2, 5, 7))


@pytest.mark.parametrize("mode", ["abs", "clamp"])
def test_largest_sigma_gives_one_but_where_eps_is_zero(mode):
    # sigma = SIGMA_MAX: the threshold is still a normal float32 and the scale finite, so a word with
    # t = 0 (|eps| = 0; clamp mode: eps <= 0) gives v = 0, not NaN (inf * 0) nor 1 (a threshold of 0).
    # Element 3 of position 10460476 under seed 1 has t = 0 in abs mode.
    v = variation((1, 4), noise.SIGMA_MAX, seed=1, offset=10460476, mode=mode)
    assert v.tolist() == [[1.0, 1.0, 1.0, 0.0]] if mode == "abs" else ((v == 0) | (v == 1)).all()
    clamp_zero = variation((64, 4), noise.SIGMA_MAX, seed=1, mode="clamp") == 0  # eps <= 0: half of them
    assert 0.3 < clamp_zero.float().mean() < 0.7


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"shape": (5,)}, ValueError, "at least 2"),
        ({"shape": (2, -5)}, ValueError, r"shape must be a sequence of sizes >= 0, got \(2, -5\)"),
        ({"shape": (True, 3)}, ValueError, "shape must be a sequence of sizes >= 0"),
        ({"sigma": -1.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"sigma": 1.01e37}, ValueError, r"sigma must be a number in \[0, 1e\+37\], got 1.01e\+37"),
        ({"mode": "gauss"}, ValueError, "mode"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": torch.tensor([1.0])}, TypeError, "seed"),
        ({"offset": -3}, ValueError, "offset"),
    ],
    ids=["1d-shape", "negative-size", "bool-size", "negative-sigma", "nan-sigma", "huge-sigma", "mode", "negative-seed", "big-seed", "float-seed",
         "float-seed-tensor", "negative-offset"],
)  # fmt: skip
def test_bad_arguments(kwargs, error, match):
    args = {"shape": (2, 3), "sigma": 1.0, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        variation(args.pop("shape"), args.pop("sigma"), **args)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 6.0])
def test_traced_variation_params_op_is_the_host_arithmetic(sigma):
    # what torch.compile runs for variation_params_tensor: one op, sigma a float64 CPU tensor
    op, cpu = torch.ops.blv_kernels.variation_params, torch.device("cpu")
    sigma_tensor = torch.tensor(sigma, dtype=torch.float64)
    torch.library.opcheck(op, (sigma_tensor, cpu))
    params = noise.variation_params(sigma, "abs")
    assert op(sigma_tensor, cpu).tolist() == [params.scale, params.threshold]
    with pytest.raises(ValueError, match="sigma must be a number in"):
        op(torch.tensor(math.nan, dtype=torch.float64), cpu)
    with pytest.raises(TypeError, match=r"sigma must be a 0-dim float64 CPU tensor, got shape \(2,\)"):
        op(torch.tensor([sigma, sigma], dtype=torch.float64), cpu)
    assert op(sigma_tensor.to("meta"), cpu).device.type == "meta"  # no memory on the CPU left unwritten


def test_a_number_seed_is_opaque_to_the_compiler():
    # Under torch.compile an int seed is an op's output, not a constant: inductor folded a constant
    # seed through the reference's Philox rounds into one expression that grew for minutes
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(lambda: noise.seed_tensor(2**64 - 3, "cpu"), backend=capture, fullgraph=True)
    assert traced().item() == -3 == noise.seed_tensor(2**64 - 3, "cpu").item()
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert torch.ops.blv_kernels.seed_tensor.default in targets
