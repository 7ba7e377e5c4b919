"""The BLV variation stream: counter-based, reproducible, identical in PyTorch and in the kernels.

Contract (the README's "The variation stream"). View the logits as ``(N, C, S)``, S the product of
the spatial sizes (1 for ``(N, C)``). Element ``(n, c, s)`` takes word ``c % 4`` of

    Philox4x32-10(key = (lo32(seed), hi32(seed)),
                  counter = (lo32(q), hi32(q), c // 4, 0)),   q = offset + n*S + s

so one Philox call serves four classes of one position, any element can be regenerated
alone, and a tensor never repeats its stream (the counter carries 64 bits of position).
The rounds are those of Triton's ``tl.philox`` (and of PyTorch's CUDA generator).

Word -> variation ``v`` (one 32-bit word per element, inverse CDF):

    u = (word >> 8) * 2**-24                      # uniform on [0, 1), exact in float32
    abs mode   (v = min(|eps|, 1)):    t = u       # |eps| = sigma*sqrt(2)*erfinv(u)
    clamp mode (v = clamp(eps, 0, 1)): t = max(2u - 1, 0)   # eps <= 0 -> t = 0 -> v = 0
    v = 1                                          if t >= a,  a = erf(1 / (sigma*sqrt(2)))
    v = min(sigma*sqrt(2) * erfinv(t), 1)          otherwise

``a`` is the CDF of ``|eps|`` at the clamp, so the atom ``P(v = 1)`` is exact (to 2**-24) and
``erfinv`` is only needed on ``[0, a)``. For ``a <= 0.7`` (sigma >= 0.965, the paper's 4 and 6
included) ``erfinv`` is a degree-8 polynomial in ``t**2``: no transcendental function at all.
Below that sigma it is M. Giles' single-precision approximation ("Approximating the erfinv
function", GPU Computing Gems, 2011): one log, plus a sqrt in the tail. Both agree with the
exact ``erfinv`` to float32 rounding (``tests/test_noise.py`` checks this against float64).

The functions here are the PyTorch implementation; ``backends/triton_kernel.py`` repeats the
same float32 operations in Triton, so both give the same words bit for bit and the same
``v`` to within float32 rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["variation", "philox4x32", "VariationParams", "variation_params", "variation_params_tensor", "seed_tensor"]

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

MODES = ("abs", "clamp")

# erfinv(t) = t * P(t**2) on [0, ERFINV_POLY_MAX]: least-squares fit of erfinv(t)/t in
# relative error at 4000 Chebyshev nodes, float64 error 6.6e-9, below float32 rounding.
ERFINV_POLY_MAX = 0.7
ERFINV_POLY = (
    0.8862269520759583, 0.23201224207878113, 0.12763145565986633, 0.08502992242574692,
    0.08014745265245438, -0.031526193022727966, 0.3013332486152649, -0.39945346117019653,
    0.3621198236942291,
)  # fmt: skip
# Giles' erfinv, w = -log((1 - t)(1 + t)): central branch (w < 5) in w - 2.5, tail in sqrt(w) - 3.
ERFINV_GILES_CENTRAL = (
    1.50140941, 0.246640727, -0.00417768164, -0.00125372503, 0.00021858087,
    -4.39150654e-06, -3.5233877e-06, 3.43273939e-07, 2.81022636e-08,
)  # fmt: skip
ERFINV_GILES_TAIL = (
    2.83297682, 1.00167406, 0.00943887047, -0.0076224613, 0.00573950773,
    -0.00367342844, 0.00134934322, 0.000100950558, -0.000200214257,
)  # fmt: skip


# The largest sigma: beyond ~6.8e37 the threshold erf(1 / (sigma*sqrt(2))) is no normal float32 (a GPU
# may flush it to 0, and then v = 1 where t = 0 and clamp mode wants 0), and from ~2.4e38 the scale
# overflows (inf * erfinv(0) = NaN). Long before that v = 1 for every word but t = 0: no use for more.
SIGMA_MAX = 1e37


def _f32(x: float) -> float:
    """Round a Python float (within float32's range: sigma <= SIGMA_MAX) to the nearest float32, the
    value the kernels read."""
    return float(np.float32(x))


class VariationParams(NamedTuple):
    """Constants of the word -> v transform for one (sigma, mode): Python numbers, or 0-dim
    tensors read on the device (:func:`device_variation_params`)."""

    scale: float | torch.Tensor  # sigma * sqrt(2), rounded to float32
    threshold: float | torch.Tensor  # a = erf(1 / (sigma * sqrt(2))), rounded to float32; t >= a gives v = 1
    use_poly: bool | torch.Tensor  # a <= ERFINV_POLY_MAX: the polynomial erfinv serves
    clamp_mode: bool  # mode == "clamp"


def check_sigma(sigma, *, value: bool = True) -> None:
    """A number (not a tensor), in [0, SIGMA_MAX] unless ``value`` is False (a traced call, where sigma
    may be symbolic: ``variation_params_tensor``'s op checks it when the graph runs)."""
    if isinstance(sigma, torch.Tensor):
        raise TypeError(
            "sigma must be a Python number, got a tensor: to change sigma during training without a sync or a "
            "recompile, set BLVLoss.sigma (kept on the device)"
        )
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise TypeError(f"sigma must be a number, got {type(sigma).__name__}")
    if value and not 0 <= sigma <= SIGMA_MAX:  # (NaN fails the comparison)
        raise ValueError(f"sigma must be a number in [0, {SIGMA_MAX:g}], got {sigma!r}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_sigma_mode(sigma: float, mode: str) -> None:
    check_sigma(sigma)
    check_mode(mode)


def variation_params(sigma: float, mode: str) -> VariationParams:
    check_sigma_mode(sigma, mode)
    scale = sigma * math.sqrt(2.0)
    threshold = 1.0 if sigma == 0 else math.erf(1.0 / scale)
    threshold = _f32(threshold)
    return VariationParams(_f32(scale), threshold, threshold <= ERFINV_POLY_MAX, mode == "clamp")


def variation_params_tensor(sigma: float, device=None) -> torch.Tensor:
    """``[scale, threshold]`` of ``sigma`` as a float32 tensor on ``device``: what every backend reads.

    Read from memory rather than passed as numbers, sigma can change at every step (a schedule)
    without recompiling a kernel or a ``torch.compile`` graph, and a replayed CUDA graph sees
    the new value. Filled on the device: no host-to-device copy, no sync. A symbolic sigma (under
    ``torch.compile(dynamic=True)``, or once a changing one is) goes through one op, which runs the
    host's ``math.erf`` when the graph runs: a host node in the graph.
    """
    if torch.compiler.is_compiling():
        # as a float64 CPU tensor: an op's float argument would be specialized (a graph per sigma), and so
        # would torch.full's; a sum is not
        device = torch.get_default_device() if device is None else torch.device(device)
        return _traced_variation_params(torch.zeros((), dtype=torch.float64, device="cpu") + sigma, device)
    params = variation_params(sigma, "abs")
    out = torch.full((2,), params.scale, dtype=torch.float32, device=device)
    out[1].fill_(params.threshold)
    return out


@torch.library.custom_op("blv_kernels::variation_params", mutates_args=())
def _traced_variation_params(sigma: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``variation_params_tensor(sigma)``, sigma a 0-dim float64 CPU tensor (reading it: no sync)."""
    if sigma.shape != () or sigma.dtype != torch.float64 or sigma.device.type != "cpu":
        raise TypeError(f"sigma must be a 0-dim float64 CPU tensor, got shape {tuple(sigma.shape)} {sigma.dtype} on "
                        f"{sigma.device}")  # fmt: skip
    return variation_params_tensor(sigma.item(), device)


@_traced_variation_params.register_fake
def _(sigma, device):
    # (a meta sigma outside a fake mode comes here too: its output is meta, not memory on `device`)
    return torch.empty(2, dtype=torch.float32, device="meta" if sigma.device.type == "meta" else device)


def device_variation_params(params: torch.Tensor, mode: str) -> VariationParams:
    """The transform's constants from a :func:`variation_params_tensor`, as 0-dim tensors (no sync)."""
    check_mode(mode)
    scale, threshold = params.unbind()
    return VariationParams(scale, threshold, threshold <= ERFINV_POLY_MAX, mode == "clamp")


def seed_tensor(seed, device) -> torch.Tensor:
    """A 64-bit seed as a 0-dim int64 tensor on ``device`` (the bit pattern of the key).

    ``seed`` is a Python int in [0, 2**64) or an integer tensor with one element (used as is:
    a seed tensor drawn on the device keeps CUDA graphs replaying fresh noise).
    """
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(
                f"a seed tensor must hold one integer, got dtype {seed.dtype} and shape {tuple(seed.shape)}"
            )
        if seed.device.type == "meta" and torch.device(device).type != "meta":
            raise ValueError("the seed is a meta tensor: it holds no value")
        return seed.reshape(()).to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or an integer tensor, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if seed >= 2**63:  # same 64 bits, as a signed int64
        seed -= 2**64
    if torch.compiler.is_compiling():
        return _traced_seed(seed, device)
    # torch.full fills on the device: no host-to-device copy, no sync.
    return torch.full((), seed, dtype=torch.int64, device=device)


@torch.library.custom_op("blv_kernels::seed_tensor", mutates_args=())
def _traced_seed(seed: int, device: torch.device) -> torch.Tensor:
    """``seed_tensor(seed)`` in a traced graph, opaque: inductor folded a constant seed through the
    reference's Philox rounds into one expression that grew without end (minutes, gigabytes)."""
    return torch.full((), seed, dtype=torch.int64, device=device)


@_traced_seed.register_fake
def _(seed, device):
    return torch.empty((), dtype=torch.int64, device=device)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of the 32-bit constant ``a`` and uint32 values ``b``.

    Values are held in int64; ``a`` is split in 16-bit halves so no product overflows:
    a*b = x*2**16 + y with x = b*(a >> 16) and y = b*(a & 0xFFFF), both < 2**48.
    """
    x = b * (a >> 16)
    y = b * (a & 0xFFFF)
    lo = (((x & 0xFFFF) << 16) + y) & MASK32
    hi = (x + (y >> 16)) >> 16
    return hi, lo


def philox4x32(key: torch.Tensor, c0, c1, c2, c3, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 in PyTorch, bit-identical to Triton's ``tl.philox(seed, c0, c1, c2, c3)``.

    ``key`` is a 0-dim int64 tensor (the 64-bit seed); the counters are int64 tensors (or
    ints) holding uint32 values, broadcast together. Returns four int64 tensors of words.
    """
    k0 = key & MASK32
    k1 = (key >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _horner(coeffs, x: torch.Tensor) -> torch.Tensor:
    p = torch.full_like(x, coeffs[-1])
    for c in coeffs[-2::-1]:
        p = p * x + c
    return p


def erfinv_poly(t: torch.Tensor) -> torch.Tensor:
    """erfinv on [0, ERFINV_POLY_MAX] without transcendental functions (float32)."""
    return t * _horner(ERFINV_POLY, t * t)


def erfinv_giles(t: torch.Tensor) -> torch.Tensor:
    """Giles' single-precision erfinv on [0, 1) (float32)."""
    w = -torch.log((1.0 - t) * (1.0 + t))
    central = _horner(ERFINV_GILES_CENTRAL, w - 2.5)
    tail = _horner(ERFINV_GILES_TAIL, torch.sqrt(w) - 3.0)
    return t * torch.where(w < 5.0, central, tail)


def variation_from_words(words: torch.Tensor, params: VariationParams) -> torch.Tensor:
    """The transform word -> v of the module docstring, in float32."""
    u = (words >> 8).to(torch.float32) * 2.0**-24
    t = torch.clamp_min(2.0 * u - 1.0, 0.0) if params.clamp_mode else u
    if isinstance(params.use_poly, torch.Tensor):  # decided on the device: both, then select
        erfinv = torch.where(params.use_poly, erfinv_poly(t), erfinv_giles(t))
    else:
        erfinv = erfinv_poly(t) if params.use_poly else erfinv_giles(t)
    v = torch.clamp_max(params.scale * erfinv, 1.0)
    return torch.where(t < params.threshold, v, torch.ones_like(v))


def check_offset(offset, positions: int = 0) -> int:
    """An offset of the stream for ``positions`` positions: every position q = offset + n*S + s
    must stay below 2**63 (the stream is not defined past it)."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= 2**63 - 1 - positions:
        raise ValueError(f"offset must be in [0, 2**63 - 1 - N*S] = [0, {2**63 - 1 - positions}], got {offset}")
    return int(offset)


def check_variation_params_tensor(params, device) -> None:
    """The ``[scale, threshold]`` tensor of :func:`variation_params_tensor`, on ``device``."""
    if not isinstance(params, torch.Tensor) or params.dtype != torch.float32 or params.shape != (2,):
        raise TypeError("variation_params must be the float32 tensor [scale, threshold] of variation_params_tensor()")
    if params.device != torch.device(device):
        raise ValueError(f"variation_params is on {params.device} but logits are on {device}")


def variation(shape, sigma: float, *, seed, offset: int = 0, mode: str = "abs", device=None) -> torch.Tensor:
    """The variation ``v`` (before scaling by ``w_c``) of every element of a logical ``(N, C, ...)`` tensor.

    ``v = min(|eps|, 1)`` (``mode="abs"``, the released code) or ``clamp(eps, 0, 1)``
    (``mode="clamp"``, the paper's pseudo-code), ``eps ~ Normal(0, sigma**2)``, drawn from the
    counter-based stream of the module docstring. Returns a float32 tensor of ``shape``.
    """
    if not isinstance(shape, (tuple, list, torch.Size)) or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in shape
    ):
        raise ValueError(f"shape must be a sequence of sizes >= 0, got {shape!r}")
    shape = torch.Size(shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (N, C, ...) with at least 2 dimensions, got {tuple(shape)}")
    offset = check_offset(offset, shape[0] * math.prod(shape[2:]))
    return variation_of(shape, variation_params(sigma, mode), seed_tensor(seed, device), offset)


def variation_of(shape: torch.Size, params: VariationParams, key: torch.Tensor, offset: int) -> torch.Tensor:
    """:func:`variation` from the transform's constants and the key tensor (on the output's device)."""
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    # Per position q = offset + n*S + s (row-major over (N, S)); per group of four classes g.
    q = torch.arange(n * s, device=key.device, dtype=torch.int64) + offset
    g = torch.arange((c + 3) // 4, device=key.device, dtype=torch.int64)
    words = philox4x32(key, (q & MASK32)[:, None], (q >> 32)[:, None], g[None, :], 0)
    # word k of group g is class 4g + k: interleave to (N*S, 4G), keep C, move classes to dim 1.
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1).reshape(n * s, 4 * len(g))[:, :c]
    v = variation_from_words(words, params)
    return v.reshape(n, s, c).permute(0, 2, 1).reshape(shape).contiguous()
