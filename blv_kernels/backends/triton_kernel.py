"""The ``"triton"`` backend: fused BLV cross-entropy in Triton, noise generated in registers.

Math of one position (the contract, ``csrc/blv_kernel.h``), logits x_c, label t, variation
weights w_c, class weights cw_c, label smoothing eps:

    z_c = x_c + v_c * w_c          v_c: word c % 4 of Philox(q, c // 4), the transform of blv_kernels.noise
    m   = max_c z_c,   e_c = exp(z_c - m),   d = sum_c e_c,   p_c = e_c / d
    l   = (1-eps) cw_t ((m - z_t) + log d) + (eps/C) sum_c cw_c ((m - z_c) + log d)
    dl/dx_c = p_c ((1-eps) cw_t + eps W/C) - (1-eps) cw_t [c == t] - (eps/C) cw_c,   W = sum_c cw_c

Two kernels per forward: a label pass (the divisor of "mean" and the count of bad labels, a
read of the labels only) and the loss pass, which reads the logits once and, when autograd
needs it, writes the gradient in the same pass: the backward then only scales it by
``grad_output`` (``_scale_kernel``, which reads nothing when that is exactly 1).

The loss pass gives each program BLOCK_P positions of one sample (grid: position blocks x N;
N = 1 when the layout lets the batch be one run of positions, as channels_last and rows do).
Classes are held as four tiles [groups, positions], one per Philox output word (classes
4g + k), so one Philox call serves four classes. ``kernel_config`` chooses how:

- the whole row in registers, as a main block (the largest power of two of groups within C)
  and a tail block (the rest, padded to a power of two of groups; classes >= C are masked);
  noise, transform and exponential are computed once per element. Up to
  ``ONE_THREAD_MAX_GROUPS`` groups a thread holds its position's row (one position a thread, no
  reduction crosses threads). Above, the class reductions (the max, then the sum, z_t and the
  label-smoothing sums) cross threads, and the tail holds at least one group a thread. With
  contiguous positions (NCHW), up to ``ROW_WARPS[-1]`` times that a program's warps share the
  rows of 32 positions (one a lane; the reductions go through shared memory). With contiguous
  classes (channels_last, rows) a row is spread over the lanes of a warp (shuffles), then of up
  to ``ROW_WARPS[-1]`` warps, ``SPREAD_MAX_GROUPS`` groups a lane: a warp's load then reads
  consecutive classes of a few rows, not one class of 32 rows, 32 lines of 128 B apiece.
- more classes: chunks of classes swept twice (one position a thread with contiguous
  positions; with contiguous classes, one position a program, its chunks over the lanes): a
  first sweep keeps the running max and sum (online softmax), a second sweep regenerates the
  noise and writes the gradient.

Layouts: the logits are addressed as (N, C, S) through three strides, so NCHW (positions
contiguous), channels_last and (N, C) rows (classes contiguous) need no copy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import noise
from .._layout import NCSLayout, ncs_tensors
from ..problem import BLVProblem, check_labels, mean_divisor, reduced_loss

__all__ = ["forward", "scale_grad_", "kernel_config", "KernelConfig"]

_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = map(tl.constexpr, noise.ERFINV_POLY)
_GC0, _GC1, _GC2, _GC3, _GC4, _GC5, _GC6, _GC7, _GC8 = map(tl.constexpr, noise.ERFINV_GILES_CENTRAL)
_GT0, _GT1, _GT2, _GT3, _GT4, _GT5, _GT6, _GT7, _GT8 = map(tl.constexpr, noise.ERFINV_GILES_TAIL)
_POLY_MAX = tl.constexpr(noise.ERFINV_POLY_MAX)
_ROUND_A = tl.constexpr(noise.PHILOX_ROUND_A)
_ROUND_B = tl.constexpr(noise.PHILOX_ROUND_B)
_KEY_A = tl.constexpr(noise.PHILOX_KEY_A)
_KEY_B = tl.constexpr(noise.PHILOX_KEY_B)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


# ----------------------------------------------------------------------------------------------
# The variation stream, element by element


@triton.jit
def _philox(k0, k1, c0, c1, c2, c3):
    """Philox4x32-10 (noise.philox4x32, tl.philox): each round's two 32x32 -> 64-bit products are
    one wide multiply apiece, the high and low halves read from it."""
    for _ in tl.static_range(10):
        prod_b = c2.to(tl.uint64) * _ROUND_B
        prod_a = c0.to(tl.uint64) * _ROUND_A
        c0 = (prod_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (prod_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = prod_b.to(tl.uint32)
        c3 = prod_a.to(tl.uint32)
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _horner8(x, c0: tl.constexpr, c1: tl.constexpr, c2: tl.constexpr, c3: tl.constexpr, c4: tl.constexpr,
             c5: tl.constexpr, c6: tl.constexpr, c7: tl.constexpr, c8: tl.constexpr):  # fmt: skip
    p = c8 * x + c7
    p = p * x + c6
    p = p * x + c5
    p = p * x + c4
    p = p * x + c3
    p = p * x + c2
    p = p * x + c1
    return p * x + c0


@triton.jit
def _variation(word, scale, threshold, CLAMP_MODE: tl.constexpr, POLY: tl.constexpr):
    """Philox word -> v (noise.variation_from_words): u = (word >> 8) 2^-24, t = u or max(2u - 1, 0),
    v = 1 where t >= threshold, else min(scale * erfinv(t), 1). POLY: threshold <= 0.7, so that
    erfinv is needed on [0, 0.7] only, where it is t * P(t^2); else Giles' erfinv (one log)."""
    u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    if CLAMP_MODE:
        t = tl.maximum(2.0 * u - 1.0, 0.0)  # eps <= 0 -> t = 0 -> v = 0
    else:
        t = u
    if POLY:
        e = t * _horner8(t * t, _P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8)
    else:
        w = -tl.log((1.0 - t) * (1.0 + t))
        central = _horner8(w - 2.5, _GC0, _GC1, _GC2, _GC3, _GC4, _GC5, _GC6, _GC7, _GC8)
        tail = _horner8(tl.sqrt(w) - 3.0, _GT0, _GT1, _GT2, _GT3, _GT4, _GT5, _GT6, _GT7, _GT8)
        e = t * tl.where(w < 5.0, central, tail)
    return tl.where(t < threshold, tl.minimum(scale * e, 1.0), 1.0)


@triton.jit
def _tile_mask(o_c, m_p, C, FULL: tl.constexpr, EVEN_S: tl.constexpr):
    """Which elements of a [classes, positions] tile exist: classes < C unless FULL (every class of
    the block exists), positions < S unless EVEN_S (every block is full)."""
    if FULL:
        return tl.broadcast_to(m_p[None, :], (o_c.shape[0], m_p.shape[0]))
    if EVEN_S:
        return tl.broadcast_to((o_c < C)[:, None], (o_c.shape[0], m_p.shape[0]))
    return (o_c < C)[:, None] & m_p[None, :]


# A tile's logits and gradient go through memory as a flat (1-D) view. Triton lays a load or store
# out by its pointers' contiguity; with strided positions (channels_last, rows) neither axis of a
# [classes, positions] tile is contiguous, and Triton 3.6 then spreads the threads over the classes
# and converts every tile to and from the layout of the arithmetic (36-44 at C = 150). A
# flat view has one axis, and its layout is the tile's own, flattened: both reshapes are free.


@triton.jit
def _load_tile(p, mask=None):
    """The [G, P] tile at pointers ``p`` (0 where ``mask`` is false), loaded through a flat view."""
    flat: tl.constexpr = p.shape[0] * p.shape[1]
    if mask is None:
        b = tl.load(tl.reshape(p, flat))
    else:
        b = tl.load(tl.reshape(p, flat), mask=tl.reshape(mask, flat), other=0.0)
    return tl.reshape(b, (p.shape[0], p.shape[1]))


@triton.jit
def _store_tile(p, b, mask=None):
    """Store the [G, P] tile ``b`` at pointers ``p`` (where ``mask``), through a flat view."""
    flat: tl.constexpr = p.shape[0] * p.shape[1]
    if mask is None:
        tl.store(tl.reshape(p, flat), tl.reshape(b, flat))
    else:
        tl.store(tl.reshape(p, flat), tl.reshape(b, flat), mask=tl.reshape(mask, flat))


@triton.jit
def _perturbed_tile(x_ptr, o_x, variation_weight_ptr, o_c, m_p, word, C, stride_xc, scale, threshold,
                    CLAMP_MODE: tl.constexpr, POLY: tl.constexpr, FULL: tl.constexpr,
                    EVEN_S: tl.constexpr):  # fmt: skip
    """z = x + v * w of classes o_c [G] at the block's positions (element offsets o_x [BLOCK_P]);
    -inf for classes >= C."""
    p_x = x_ptr + (o_x[None, :] + (o_c * stride_xc)[:, None])
    if FULL and EVEN_S:
        b_x = _load_tile(p_x)
        b_w = tl.load(variation_weight_ptr + o_c)
    else:
        b_x = _load_tile(p_x, _tile_mask(o_c, m_p, C, FULL, EVEN_S))
        b_w = tl.load(variation_weight_ptr + o_c, mask=o_c < C, other=0.0)
    b_z = b_x.to(tl.float32) + _variation(word, scale, threshold, CLAMP_MODE, POLY) * b_w[:, None]
    if not FULL:
        b_z = tl.where((o_c < C)[:, None], b_z, float("-inf"))
    return b_z


@triton.jit
def _perturbed_block(x_ptr, o_x, variation_weight_ptr, k0, k1, q_lo, q_hi, g_start, m_p, C, stride_xc, scale,
                     threshold, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, CLAMP_MODE: tl.constexpr,
                     POLY: tl.constexpr, FULL: tl.constexpr, EVEN_S: tl.constexpr):  # fmt: skip
    """Classes [4 g_start, 4 (g_start + GROUPS)) as four tiles [GROUPS, BLOCK_P]: tile k holds the
    classes 4g + k, from word k of the Philox call of (position, group g)."""
    o_g = g_start + tl.arange(0, GROUPS)
    shape: tl.constexpr = (GROUPS, BLOCK_P)
    r0, r1, r2, r3 = _philox(
        k0, k1, tl.broadcast_to(q_lo[None, :], shape), tl.broadcast_to(q_hi[None, :], shape),
        tl.broadcast_to(o_g[:, None].to(tl.uint32), shape), tl.zeros(shape, tl.uint32),
    )  # fmt: skip
    o_c = 4 * o_g
    z0 = _perturbed_tile(x_ptr, o_x, variation_weight_ptr, o_c, m_p, r0, C, stride_xc, scale, threshold, CLAMP_MODE,
                         POLY, FULL, EVEN_S)  # fmt: skip
    z1 = _perturbed_tile(x_ptr, o_x, variation_weight_ptr, o_c + 1, m_p, r1, C, stride_xc, scale, threshold,
                         CLAMP_MODE, POLY, FULL, EVEN_S)  # fmt: skip
    z2 = _perturbed_tile(x_ptr, o_x, variation_weight_ptr, o_c + 2, m_p, r2, C, stride_xc, scale, threshold,
                         CLAMP_MODE, POLY, FULL, EVEN_S)  # fmt: skip
    z3 = _perturbed_tile(x_ptr, o_x, variation_weight_ptr, o_c + 3, m_p, r3, C, stride_xc, scale, threshold,
                         CLAMP_MODE, POLY, FULL, EVEN_S)  # fmt: skip
    return o_c, z0, z1, z2, z3


# ----------------------------------------------------------------------------------------------
# Reductions of the four tiles of a class block over their classes (axis 0): the tiles combined
# element by element first, so that one reduction (the costly part where warps share a row: a
# round through shared memory) serves all four


@triton.jit
def _max4(z0, z1, z2, z3):
    return tl.max(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), 0)


@triton.jit
def _sum4(a0, a1, a2, a3):
    return tl.sum((a0 + a1) + (a2 + a3), 0)


@triton.jit
def _exp_shifted(z, b_m):
    """exp(z - m) as exp2((z - m) log2(e)). z - m first: it is exact for z near m, where
    z log2(e) - m log2(e) would lose |z| ulps of precision (large logits: shift invariance)."""
    return tl.math.exp2((z - b_m[None, :]) * _LOG2E)


@triton.jit
def _label_logit4(o_c, z0, z1, z2, z3, b_t):
    """z_t of each position: the z of the tile row whose class is the label (0 when none is)."""
    return _sum4(tl.where(o_c[:, None] == b_t[None, :], z0, 0.0), tl.where(o_c[:, None] + 1 == b_t[None, :], z1, 0.0),
                 tl.where(o_c[:, None] + 2 == b_t[None, :], z2, 0.0),
                 tl.where(o_c[:, None] + 3 == b_t[None, :], z3, 0.0))  # fmt: skip


@triton.jit
def _smoothing_terms(o_c, z, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT: tl.constexpr):
    """cw_c (m - z_c), 0 for classes >= C."""
    m_c = o_c < C
    terms = b_m[None, :] - z
    if HAS_CLASS_WEIGHT:
        terms = terms * tl.load(class_weight_ptr + o_c, mask=m_c, other=0.0)[:, None]
    return tl.where(m_c[:, None], terms, 0.0)


@triton.jit
def _smoothing_sum4(o_c, z0, z1, z2, z3, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT: tl.constexpr):
    return _sum4(_smoothing_terms(o_c, z0, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT),
                 _smoothing_terms(o_c + 1, z1, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT),
                 _smoothing_terms(o_c + 2, z2, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT),
                 _smoothing_terms(o_c + 3, z3, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT))  # fmt: skip


@triton.jit
def _class_weight_sum(class_weight_ptr, o_c, C):
    """sum of cw over the classes 4g + k of the block whose group starts are o_c."""
    w = tl.load(class_weight_ptr + o_c, mask=o_c < C, other=0.0)
    w += tl.load(class_weight_ptr + o_c + 1, mask=o_c + 1 < C, other=0.0)
    w += tl.load(class_weight_ptr + o_c + 2, mask=o_c + 2 < C, other=0.0)
    w += tl.load(class_weight_ptr + o_c + 3, mask=o_c + 3 < C, other=0.0)
    return tl.sum(w, 0)


@triton.jit
def _grad_factors(b_cw, b_pw, m_valid, b_d, b_weight_sum, eps, C, denom_ptr, HAS_POSITION_WEIGHT: tl.constexpr,
                  HAS_SMOOTHING: tl.constexpr, REDUCTION: tl.constexpr):  # fmt: skip
    """Per position, dl/dx_c = e_c k_p - k_t [c == t] - k_s cw_c with coef = pw / denom (0 where not valid):
    k_p = coef ((1-eps) cw_t + eps W / C) / d,  k_t = coef (1-eps) cw_t,  k_s = coef eps / C."""
    coef = b_pw if HAS_POSITION_WEIGHT else 1.0
    if REDUCTION == 2:
        coef = coef / tl.load(denom_ptr)
    coef = tl.where(m_valid, coef, 0.0)  # also where "mean" divides by 0 (every label ignored)
    k_t = coef * (1.0 - eps) * b_cw
    if HAS_SMOOTHING:
        k_s = coef * (eps / C)
        k_p = (k_t + k_s * b_weight_sum) / b_d
    else:
        k_s = k_t
        k_p = k_t / b_d
    return k_p, k_t, k_s


@triton.jit
def _store_grad(grad_ptr, o_g, o_c, e, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc,
                HAS_CLASS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, FULL: tl.constexpr,
                EVEN_S: tl.constexpr):  # fmt: skip
    """dl/dx_c = e_c k_p - k_t [c == t] - k_s cw_c (per-position factors k_*, see _grad_factors)."""
    b_g = e * k_p[None, :] - tl.where(o_c[:, None] == b_t[None, :], k_t[None, :], 0.0)
    if HAS_SMOOTHING:
        if HAS_CLASS_WEIGHT:
            b_g -= k_s[None, :] * tl.load(class_weight_ptr + o_c, mask=o_c < C, other=0.0)[:, None]
        else:
            b_g -= k_s[None, :]
    p_g = grad_ptr + (o_g[None, :] + (o_c * stride_gc)[:, None])
    if FULL and EVEN_S:
        _store_tile(p_g, b_g.to(grad_ptr.dtype.element_ty))
    else:
        _store_tile(p_g, b_g.to(grad_ptr.dtype.element_ty), _tile_mask(o_c, m_p, C, FULL, EVEN_S))


@triton.jit
def _store_grad4(grad_ptr, o_g, o_c, e0, e1, e2, e3, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc,
                 HAS_CLASS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, FULL: tl.constexpr,
                 EVEN_S: tl.constexpr):  # fmt: skip
    _store_grad(grad_ptr, o_g, o_c, e0, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc, HAS_CLASS_WEIGHT,
                HAS_SMOOTHING, FULL, EVEN_S)  # fmt: skip
    _store_grad(grad_ptr, o_g, o_c + 1, e1, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc, HAS_CLASS_WEIGHT,
                HAS_SMOOTHING, FULL, EVEN_S)  # fmt: skip
    _store_grad(grad_ptr, o_g, o_c + 2, e2, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc, HAS_CLASS_WEIGHT,
                HAS_SMOOTHING, FULL, EVEN_S)  # fmt: skip
    _store_grad(grad_ptr, o_g, o_c + 3, e3, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc, HAS_CLASS_WEIGHT,
                HAS_SMOOTHING, FULL, EVEN_S)  # fmt: skip


@triton.jit
def _program_positions(BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """(sample n, position block, its positions s) of this program, on a grid (position blocks, N);
    64-bit indices when INDEX_64."""
    pid_s = tl.program_id(0)
    n = tl.program_id(1)
    if INDEX_64:
        n = n.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    return n, pid_s, pid_s * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _label_kernel(
    target_ptr,  # labels (N, S) through stride_tn, stride_ts, any integer dtype
    class_weight_ptr,  # cw_c (C,) fp32, if HAS_CLASS_WEIGHT
    weight_sums_ptr,  # out: per program, the sum of cw_t over valid labels (their count without class weights)
    bad_counts_ptr,  # out: per program, the labels outside [0, C) that are not ignore_index
    S, C, ignore_index, stride_tn, stride_ts,
    BLOCK: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, INDEX_64: tl.constexpr,
):  # fmt: skip
    n, pid_s, o_s = _program_positions(BLOCK, INDEX_64)
    m_p = o_s < S
    b_t = tl.load(target_ptr + n * stride_tn + o_s * stride_ts, mask=m_p, other=0).to(tl.int64)
    m_labelled = m_p & (b_t != ignore_index)
    m_in_range = (b_t >= 0) & (b_t < C)
    m_valid = m_labelled & m_in_range
    if HAS_CLASS_WEIGHT:
        b_w = tl.load(class_weight_ptr + tl.where(m_valid, b_t, 0), mask=m_valid, other=0.0)
    else:
        b_w = m_valid.to(tl.float32)
    pid = n * tl.num_programs(0) + pid_s
    tl.store(weight_sums_ptr + pid, tl.sum(b_w, 0))
    tl.store(bad_counts_ptr + pid, tl.sum((m_labelled & ~m_in_range).to(tl.int32), 0))


@triton.jit
def _online_softmax_chunk(
    b_m, b_d, b_zt, b_weight_sum, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, k0, k1, q_lo, q_hi, g_start,
    m_p, b_t, C, stride_xc, scale, threshold, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr,
    CLAMP_MODE: tl.constexpr, POLY: tl.constexpr, FULL: tl.constexpr, EVEN_S: tl.constexpr,
    SUM_CLASS_WEIGHTS: tl.constexpr,
):  # fmt: skip
    """Fold one chunk of classes into the running max m and sum d = sum_c exp(z_c - m), and z_t."""
    oc, z0, z1, z2, z3 = _perturbed_block(x_ptr, o_x, variation_weight_ptr, k0, k1, q_lo, q_hi, g_start, m_p, C,
                                          stride_xc, scale, threshold, GROUPS, BLOCK_P, CLAMP_MODE, POLY, FULL,
                                          EVEN_S)  # fmt: skip
    m_new = tl.maximum(b_m, _max4(z0, z1, z2, z3))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp(-inf - 0) = 0 while every z is -inf
    b_d = b_d * tl.math.exp2((b_m - m_shift) * _LOG2E) + _sum4(
        _exp_shifted(z0, m_shift), _exp_shifted(z1, m_shift), _exp_shifted(z2, m_shift), _exp_shifted(z3, m_shift)
    )
    b_zt += _label_logit4(oc, z0, z1, z2, z3, b_t)
    if SUM_CLASS_WEIGHTS:
        b_weight_sum += _class_weight_sum(class_weight_ptr, oc, C)
    return m_new, b_d, b_zt, b_weight_sum


@triton.jit
def _gradient_chunk(
    b_smooth, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, k0, k1, q_lo, q_hi, g_start, m_p,
    b_t, b_m, k_p, k_t, k_s, C, stride_xc, stride_gc, scale, threshold, GROUPS: tl.constexpr, BLOCK_P: tl.constexpr,
    CLAMP_MODE: tl.constexpr, POLY: tl.constexpr, FULL: tl.constexpr, EVEN_S: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):  # fmt: skip
    """The second sweep over one chunk: the same noise again, the gradient, and the label-smoothing sum."""
    oc, z0, z1, z2, z3 = _perturbed_block(x_ptr, o_x, variation_weight_ptr, k0, k1, q_lo, q_hi, g_start, m_p, C,
                                          stride_xc, scale, threshold, GROUPS, BLOCK_P, CLAMP_MODE, POLY, FULL,
                                          EVEN_S)  # fmt: skip
    if HAS_SMOOTHING:
        b_smooth += _smoothing_sum4(oc, z0, z1, z2, z3, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT)
    if COMPUTE_GRAD:
        _store_grad4(grad_ptr, o_g, oc, _exp_shifted(z0, b_m), _exp_shifted(z1, b_m), _exp_shifted(z2, b_m),
                     _exp_shifted(z3, b_m), b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc, HAS_CLASS_WEIGHT,
                     HAS_SMOOTHING, FULL, EVEN_S)  # fmt: skip
    return b_smooth


@triton.jit
def _exp_block(o_c, z0, z1, z2, z3, b_m, b_t, b_smooth, b_weight_sum, class_weight_ptr, C,
               HAS_CLASS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """A block of the row in registers, once m is known: e_c = exp(z_c - m) in place of z, and the
    block's share of d, z_t and (label smoothing) sum_c cw_c (m - z_c) and W."""
    b_zt = _label_logit4(o_c, z0, z1, z2, z3, b_t)
    if HAS_SMOOTHING:
        b_smooth += _smoothing_sum4(o_c, z0, z1, z2, z3, b_m, class_weight_ptr, C, HAS_CLASS_WEIGHT)
        if HAS_CLASS_WEIGHT:
            b_weight_sum += _class_weight_sum(class_weight_ptr, o_c, C)
    e0, e1, e2, e3 = _exp_shifted(z0, b_m), _exp_shifted(z1, b_m), _exp_shifted(z2, b_m), _exp_shifted(z3, b_m)
    return e0, e1, e2, e3, _sum4(e0, e1, e2, e3), b_zt, b_smooth, b_weight_sum


@triton.jit
def _position_loss(b_m, b_d, b_zt, b_smooth, b_weight_sum, b_cw, b_pw, m_valid, eps, C, HAS_CLASS_WEIGHT: tl.constexpr,
                   HAS_POSITION_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """l = (1-eps) cw_t ((m - z_t) + log d) + (eps/C) (sum_c cw_c (m - z_c) + W log d) times pw, 0 where not
    valid (past S too) by a select: cw_t = 0 there, but a NaN or inf logit of an ignored position makes l NaN
    (without class weights cw_t = [valid], which the select reads instead of the mask)."""
    b_log_d = tl.log(b_d)
    b_loss = (1.0 - eps) * b_cw * ((b_m - b_zt) + b_log_d)
    if HAS_SMOOTHING:
        b_loss += (eps / C) * (b_smooth + b_weight_sum * b_log_d)
    b_loss = tl.where(m_valid if HAS_CLASS_WEIGHT else b_cw != 0.0, b_loss, 0.0)
    if HAS_POSITION_WEIGHT:
        b_loss *= b_pw  # 0 * NaN = NaN even where not valid, as the reference (and mmseg) give; pw = 0 past S
    return b_loss


@triton.jit
def _row_loss(
    x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, denom_ptr, k0, k1, q_lo, q_hi, m_p, b_t, b_cw,
    b_pw, m_valid, C, eps, scale, threshold, stride_xc, stride_gc,
    BLOCK_P: tl.constexpr, MAIN_GROUPS: tl.constexpr, TAIL_GROUPS: tl.constexpr, CHUNK_GROUPS: tl.constexpr,
    TAIL_CHUNK: tl.constexpr, MAIN_FULL: tl.constexpr, EVEN_S: tl.constexpr, POLY: tl.constexpr, REDUCTION: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, CLAMP_MODE: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_POSITION_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):  # fmt: skip
    """The loss of each position of the block (``_position_loss``); stores the gradient when COMPUTE_GRAD."""
    if HAS_CLASS_WEIGHT:  # W = sum_c cw_c, wanted with label smoothing, summed over the class blocks below
        b_weight_sum = 0.0
    else:
        b_weight_sum = C + 0.0
    b_smooth = tl.zeros((BLOCK_P,), tl.float32)
    if MAIN_GROUPS > 0:
        # One pass, the whole row in registers: noise, transform and exponential once per element.
        oc_a, a0, a1, a2, a3 = _perturbed_block(x_ptr, o_x, variation_weight_ptr, k0, k1, q_lo, q_hi, 0, m_p, C,
                                                stride_xc, scale, threshold, MAIN_GROUPS, BLOCK_P, CLAMP_MODE, POLY,
                                                MAIN_FULL, EVEN_S)  # fmt: skip
        b_m = _max4(a0, a1, a2, a3)
        if TAIL_GROUPS > 0:
            oc_b, b0, b1, b2, b3 = _perturbed_block(x_ptr, o_x, variation_weight_ptr, k0, k1, q_lo, q_hi, MAIN_GROUPS,
                                                    m_p, C, stride_xc, scale, threshold, TAIL_GROUPS, BLOCK_P,
                                                    CLAMP_MODE, POLY, False, EVEN_S)  # fmt: skip
            b_m = tl.maximum(b_m, _max4(b0, b1, b2, b3))
        b_m = tl.where(b_m == float("-inf"), 0.0, b_m)  # shift by 0 while every z is -inf: exp(-inf) = 0, not NaN
        a0, a1, a2, a3, b_d, b_zt, b_smooth, b_weight_sum = _exp_block(
            oc_a, a0, a1, a2, a3, b_m, b_t, b_smooth, b_weight_sum, class_weight_ptr, C, HAS_CLASS_WEIGHT, HAS_SMOOTHING
        )
        if TAIL_GROUPS > 0:
            b0, b1, b2, b3, d_tail, zt_tail, b_smooth, b_weight_sum = _exp_block(
                oc_b, b0, b1, b2, b3, b_m, b_t, b_smooth, b_weight_sum, class_weight_ptr, C, HAS_CLASS_WEIGHT,
                HAS_SMOOTHING,
            )  # fmt: skip
            b_d += d_tail
            b_zt += zt_tail
        if COMPUTE_GRAD:
            k_p, k_t, k_s = _grad_factors(b_cw, b_pw, m_valid, b_d, b_weight_sum, eps, C, denom_ptr,
                                          HAS_POSITION_WEIGHT, HAS_SMOOTHING, REDUCTION)  # fmt: skip
            _store_grad4(grad_ptr, o_g, oc_a, a0, a1, a2, a3, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C, stride_gc,
                         HAS_CLASS_WEIGHT, HAS_SMOOTHING, MAIN_FULL, EVEN_S)  # fmt: skip
            if TAIL_GROUPS > 0:
                _store_grad4(grad_ptr, o_g, oc_b, b0, b1, b2, b3, b_t, m_p, k_p, k_t, k_s, class_weight_ptr, C,
                             stride_gc, HAS_CLASS_WEIGHT, HAS_SMOOTHING, False, EVEN_S)  # fmt: skip
    else:
        # Two sweeps over chunks of classes: the online softmax (m, d), then the gradient. The full
        # chunks need no class masks; a last, partial chunk (TAIL_CHUNK) has them.
        b_m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        b_d = tl.zeros((BLOCK_P,), tl.float32)
        b_zt = tl.zeros((BLOCK_P,), tl.float32)
        full_chunks = C // (4 * CHUNK_GROUPS)
        for chunk in range(0, full_chunks):  # first sweep
            b_m, b_d, b_zt, b_weight_sum = _online_softmax_chunk(
                b_m, b_d, b_zt, b_weight_sum, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, k0, k1, q_lo, q_hi,
                chunk * CHUNK_GROUPS, m_p, b_t, C, stride_xc, scale, threshold, CHUNK_GROUPS, BLOCK_P, CLAMP_MODE, POLY,
                True, EVEN_S, HAS_CLASS_WEIGHT and HAS_SMOOTHING,
            )  # fmt: skip
        if TAIL_CHUNK:
            b_m, b_d, b_zt, b_weight_sum = _online_softmax_chunk(
                b_m, b_d, b_zt, b_weight_sum, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, k0, k1, q_lo, q_hi,
                full_chunks * CHUNK_GROUPS, m_p, b_t, C, stride_xc, scale, threshold, CHUNK_GROUPS, BLOCK_P,
                CLAMP_MODE, POLY, False, EVEN_S, HAS_CLASS_WEIGHT and HAS_SMOOTHING,
            )  # fmt: skip
        b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
        if COMPUTE_GRAD or HAS_SMOOTHING:
            k_p, k_t, k_s = _grad_factors(b_cw, b_pw, m_valid, b_d, b_weight_sum, eps, C, denom_ptr,
                                          HAS_POSITION_WEIGHT, HAS_SMOOTHING, REDUCTION)  # fmt: skip
            for chunk in range(0, full_chunks):  # second sweep
                b_smooth = _gradient_chunk(
                    b_smooth, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, k0, k1, q_lo, q_hi,
                    chunk * CHUNK_GROUPS, m_p, b_t, b_m, k_p, k_t, k_s, C, stride_xc, stride_gc, scale, threshold,
                    CHUNK_GROUPS, BLOCK_P, CLAMP_MODE, POLY, True, EVEN_S, COMPUTE_GRAD, HAS_CLASS_WEIGHT,
                    HAS_SMOOTHING,
                )  # fmt: skip
            if TAIL_CHUNK:
                b_smooth = _gradient_chunk(
                    b_smooth, x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, k0, k1, q_lo, q_hi,
                    full_chunks * CHUNK_GROUPS, m_p, b_t, b_m, k_p, k_t, k_s, C, stride_xc, stride_gc, scale,
                    threshold, CHUNK_GROUPS, BLOCK_P, CLAMP_MODE, POLY, False, EVEN_S, COMPUTE_GRAD,
                    HAS_CLASS_WEIGHT, HAS_SMOOTHING,
                )  # fmt: skip
    return _position_loss(b_m, b_d, b_zt, b_smooth, b_weight_sum, b_cw, b_pw, m_valid, eps, C, HAS_CLASS_WEIGHT,
                          HAS_POSITION_WEIGHT, HAS_SMOOTHING)  # fmt: skip


@triton.jit
def _blv_loss_kernel(
    x_ptr,  # logits, (N, C, S) through stride_x{n,c,s}
    target_ptr,  # labels, (N, S) through stride_t{n,s}, any integer dtype
    variation_weight_ptr,  # w_c (C,) fp32
    class_weight_ptr,  # cw_c (C,) fp32, if HAS_CLASS_WEIGHT
    position_weight_ptr,  # (N, S) fp32 through stride_w{n,s}, if HAS_POSITION_WEIGHT
    seed_ptr,  # the 64-bit Philox key, int64
    params_ptr,  # [scale, threshold] fp32 of the word -> v transform
    denom_ptr,  # the divisor of "mean" (REDUCTION == 2), fp32
    loss_ptr,  # out: loss per position (N*S,) in the loss's dtype, if REDUCTION == 0
    loss_sums_ptr,  # out: per program, the sum of its positions' losses, fp32
    grad_ptr,  # out: dloss/dx (N, C, S) through stride_g{n,c,s} (the logits' if GRAD_LIKE_X), if COMPUTE_GRAD
    S, C, offset, ignore_index, label_smoothing,
    stride_xn, stride_xc, stride_xs, stride_tn, stride_ts, stride_wn, stride_ws, stride_gn, stride_gc, stride_gs,
    BLOCK_P: tl.constexpr,  # positions per program
    MAIN_GROUPS: tl.constexpr,  # one pass: groups of four classes in the main block (a power of two), else 0
    TAIL_GROUPS: tl.constexpr,  # one pass: groups in the tail block (0 or a power of two)
    CHUNK_GROUPS: tl.constexpr,  # two sweeps (MAIN_GROUPS == 0): groups per chunk
    TAIL_CHUNK: tl.constexpr,  # two sweeps: C is not a multiple of 4 * CHUNK_GROUPS, a last partial chunk
    MAIN_FULL: tl.constexpr,  # every class of the main block is < C: no class masks there
    EVEN_S: tl.constexpr,  # S % BLOCK_P == 0: no position masks
    GRAD_LIKE_X: tl.constexpr,  # the gradient has the logits' strides: one set of offsets serves both
    REDUCTION: tl.constexpr,  # 0 none, 1 sum, 2 mean
    COMPUTE_GRAD: tl.constexpr, CLAMP_MODE: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr,
    HAS_POSITION_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    INDEX_64: tl.constexpr,  # some element offset is >= 2**31: 64-bit index arithmetic
):  # fmt: skip
    n, pid_s, o_s = _program_positions(BLOCK_P, INDEX_64)
    m_p = o_s < S

    # per position: label, weights, element offsets, Philox counter (lo32(q), hi32(q)), q = offset + n*S + s
    if EVEN_S:
        b_t = tl.load(target_ptr + n * stride_tn + o_s * stride_ts).to(tl.int64)
    else:
        b_t = tl.load(target_ptr + n * stride_tn + o_s * stride_ts, mask=m_p, other=0).to(tl.int64)
    m_valid = m_p & (b_t != ignore_index) & (b_t >= 0) & (b_t < C)
    b_t = tl.where(m_valid, b_t, -1).to(tl.int32)  # -1 matches no class: an invalid label is never an index
    if HAS_CLASS_WEIGHT:
        b_cw = tl.load(class_weight_ptr + b_t, mask=m_valid, other=0.0)
    else:
        b_cw = m_valid.to(tl.float32)
    if HAS_POSITION_WEIGHT:
        b_pw = tl.load(position_weight_ptr + n * stride_wn + o_s * stride_ws, mask=m_p, other=0.0)
    else:
        b_pw = 1.0
    # Vector width 1 (divisibility 1): every tile in Triton's default layout, a thread's classes (or
    # its warp's share of them) in its own registers (a vectorised load would give the logits another
    # layout, and converting them would cross warps through shared memory; without the hint, Triton
    # 3.9 exchanges 1.8 sync instructions per element at C = 19). On the offsets: Triton 3.6's
    # inliner drops a hint on a helper's result.
    o_x = tl.multiple_of(n * stride_xn + o_s * stride_xs, 1)
    if GRAD_LIKE_X:
        o_g = o_x
        stride_gc = stride_xc
    else:
        o_g = tl.multiple_of(n * stride_gn + o_s * stride_gs, 1)
    q = n.to(tl.int64) * S + o_s + offset
    q_lo = q.to(tl.uint32)
    q_hi = (q >> 32).to(tl.uint32)
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    scale = tl.load(params_ptr)
    threshold = tl.load(params_ptr + 1)
    eps = label_smoothing

    # One uniform branch for the whole row: the erfinv of the transform (noise.variation_from_words).
    if threshold <= _POLY_MAX:
        b_loss = _row_loss(
            x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, denom_ptr, k0, k1, q_lo, q_hi, m_p, b_t,
            b_cw, b_pw, m_valid, C, eps, scale, threshold, stride_xc, stride_gc, BLOCK_P, MAIN_GROUPS, TAIL_GROUPS,
            CHUNK_GROUPS, TAIL_CHUNK, MAIN_FULL, EVEN_S, True, REDUCTION, COMPUTE_GRAD, CLAMP_MODE, HAS_CLASS_WEIGHT,
            HAS_POSITION_WEIGHT, HAS_SMOOTHING,
        )  # fmt: skip
    else:
        b_loss = _row_loss(
            x_ptr, o_x, variation_weight_ptr, class_weight_ptr, grad_ptr, o_g, denom_ptr, k0, k1, q_lo, q_hi, m_p, b_t,
            b_cw, b_pw, m_valid, C, eps, scale, threshold, stride_xc, stride_gc, BLOCK_P, MAIN_GROUPS, TAIL_GROUPS,
            CHUNK_GROUPS, TAIL_CHUNK, MAIN_FULL, EVEN_S, False, REDUCTION, COMPUTE_GRAD, CLAMP_MODE, HAS_CLASS_WEIGHT,
            HAS_POSITION_WEIGHT, HAS_SMOOTHING,
        )  # fmt: skip

    tl.store(loss_sums_ptr + n * tl.num_programs(0) + pid_s, tl.sum(b_loss, 0))
    if REDUCTION == 0:
        tl.store(loss_ptr + n * S + o_s, b_loss.to(loss_ptr.dtype.element_ty), mask=m_p)


@triton.jit
def _scale_kernel(grad_ptr, grad_output_ptr, numel, BLOCK: tl.constexpr):
    """grad *= grad_output, in place; every program returns at once when grad_output is exactly 1."""
    scale = tl.load(grad_output_ptr)
    if scale != 1.0:
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < numel
        b_g = tl.load(grad_ptr + o, mask=m)
        tl.store(grad_ptr + o, (b_g.to(tl.float32) * scale).to(grad_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers

# The loss kernel's configuration, chosen by the static report (benchmarks/static_report.py, sm_90,
# Triton 3.9, fwd+bwd thread-instructions per element, fp32 NCHW 8 x C x 512 x 512 unless said):
#   a thread holds at most 6 groups of four classes of a position in registers (24 classes; the
#   8 x 19 x 512 x 1024 case 61.3 at 96 registers); 4 + 4 groups (C = 28) spills 32-64 B.
#   Above 24 classes a program's W warps share the rows of 32 positions (one a lane), W the
#   fewest of 2, 4, 8, 16 that leave a thread at most 6 groups; against this kernel's two sweeps:
#     C =  25 W = 2   89.0   two sweeps 121.1      C = 150 W = 8   69.6   two sweeps 91.9
#     C =  40 W = 2   64.9              95.5       C = 171 W = 8   72.3              93.2
#     C =  65 W = 4   80.0             101.8       C = 256 W = 16  63.9              90.4
#     C = 100 W = 8   90.3              94.9       C = 384 W = 16  66.3
#   The class reductions cross the warps through shared memory (1.8-3.8 sync instructions per
#   element); the tail block's padding costs C = 25 and 100 most. The limit of 6 groups is a
#   margin, not a wall: at C = 100, W = 4 (8 groups a thread) counts 81.0 in 128 registers
#   without spilling here, but the card's Triton, other options and other sizes may spill; the
#   sweep (benchmarks/sweep.py) has it as a candidate. With class and position weights, label
#   smoothing and reduction "none", C = 161 NCHW fp32 spills 8 B uncapped. Above 16 x 24 = 384
#   classes: two sweeps over chunks of CHUNK_GROUPS groups, one position a thread.
# Contiguous classes (channels_last, rows; fp32 65536 x C rows): above 24 classes a row over L
#   lanes of one warp (32 / L positions a warp), then over the 32 lanes of W warps, L x W the
#   fewest that leave a lane at most 5 groups (more take > 128 registers: C = 1000 over 32 lanes,
#   8 groups a lane, 148; capped at 128 it spills 96 B). Against the previous blocking, the warps
#   sharing 32 positions (one a lane; from C = 321 two sweeps, one position a thread):
#     C =  25 L = 2   80.5   before 87.1       C = 171 L = 16  76.1   before 82.4
#     C =  40 L = 2   63.2          66.1       C = 300 L = 16  68.4          70.3
#     C =  65 L = 4   77.5          79.8       C = 365 L = 32  71.7          93.5
#     C = 100 L = 8   81.3          87.8       C = 1000 W = 2  70.2          89.7
#     C = 150 L = 8   62.8          69.7       C = 10000 W = 16 68.0         89.5
#   More to the point, a warp's load reads 32 rows' class c before (32 lines of 128 B apiece,
#   4 B used in each; the card ran 65536 x 1000 rows at 8x the copy floor), consecutive classes
#   of 32 / L rows now (4-8 lines in fp32; per element 0.26-0.42 lines against 2-3: the static
#   report's line_accesses). Above 16 x 32 x 5 groups (10240 classes): two sweeps by one warp, a
#   group a lane a chunk (C = 12000: 100.5; 2 groups a lane or 4 warps spill 8 B or count 108).
#   Registers: ptxas's own choice, at most 128 for at most 5 groups a lane, no spill under 3.6 or
#   3.9 (the static report's --all-configs, default options); a cap of 128 spills 8 B at
#   C = 125-128 bf16 (Triton 3.9), where ptxas alone takes 116.
# Register caps: 128 for the two sweeps. A row in one thread takes the registers its options
# take (``register_pressure``: 0 the defaults; 1 class weights or mode "clamp"; 2 position
# weights, a loss per position or label smoothing alone; 3 label smoothing with other options):
#   96 (20 warps an SM) up to LEAN_MAX_GROUPS[pressure] groups (5, 4, -, -), but not at C = 13-15
#     (a main block of 4 groups with masked classes): 96 ran 6% faster than 112 on the card
#     (below). At 96, C = 13-15 spill 8 B with the defaults; C = 17-20 8 B with class weights or
#     clamp (channels_last and rows); the extras 8-32 B from C = 13;
#   else 128 (16 warps, as 112 for blocks of 4 warps; the card timed the two alike): 112 spilled
#     8-16 B with label smoothing at C = 17-24;
#   ptxas's own choice (72-156 registers) for label smoothing with other options, which spill
#     8-16 B at 128 from C = 13 (8-64 B at 112). Uncapped, ptxas takes 80 at 19 classes with the
#     defaults, with fewer instructions, and ran slower than at 96.
#   No spill under 3.6 or 3.9 for any of the static report's option sets (OPTION_SETS) up to 24
#   classes. Above, compiled by hand (RESULTS.md): the NCHW two sweeps with a partial chunk
#   (C > 384 not a multiple of 8) spill 96-152 B at 128 with class weights and label smoothing
#   (16 B uncapped, at 168 registers; none at 192, 8 warps an SM), left so until a card times it.
# NCHW rows over warps take <= 128 uncapped (a cap of 128 spills 8-16 B at C = 65-80 and 161-192).
# Measured on an H100 80GB HBM3 (2026-11-27, Triton 3.6; benchmarks/sweep.py: the step's kernels
# replayed in a CUDA graph; benchmarks/RESULTS.md), ms:
#   8 x 19 x 512 x 1024 fp32, 4 warps: cap 112 0.323, 96 0.304, 128 0.322, none (80) 0.358;
#     2 and 8 warps no faster (bf16's variants were not reached: 96 is taken for it untimed).
#   8 x 19 x 512 x 1024 bf16 0.274; 16 x 150 x 512 x 512 fp32 / bf16 3.135 / 2.718 (W = 8);
#     8 x 171 x 512 x 512 1.672 / 1.520 (W = 8): their variants were not reached.
#   65536 x 1000 rows, the former two sweeps: 1.400 / 1.342, against CUDA C++'s 0.361 / 0.352,
#     which backend="auto" takes there (backends.AUTO_ORDER_WIDE_ROWS); the row over lanes since
#     was not timed.
ONE_THREAD_MAX_GROUPS = 6
LEAN_MAX_GROUPS = (5, 4, 0, 0)  # by register_pressure
SPREAD_MAX_GROUPS = 5
ROW_WARPS = (2, 4, 8, 16)
ROW_LANES = (2, 4, 8, 16, 32, 64, 128, 256, 512)  # contiguous classes: the lanes a row is spread over
CHUNK_GROUPS = 2
LABEL_BLOCK = 1024
SCALE_BLOCK = 4096


class KernelConfig(NamedTuple):
    block_p: int  # positions per program
    num_warps: int
    main_groups: int  # one pass: groups of four classes in the main block, else 0
    tail_groups: int  # one pass: groups in the tail block
    chunk_groups: int  # two sweeps: groups per chunk
    maxnreg: int | None  # register cap (ptxas)


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv on the host: a constexpr_function in recent Triton, microseconds a call (six a step)
    return -(-a // b)


def class_blocks(groups: int, spread: int) -> tuple[int, int]:
    """(main, tail) groups of a row held in registers: the largest power of two <= groups, and the
    rest padded up to a power of two (0 when there is none) and to at least ``spread`` groups, the
    threads (warps, or lanes) a row's groups are spread over: a smaller tile would be replicated
    across them. The main block is at least that wherever ``kernel_config`` spreads a row."""
    main = 1 << (groups.bit_length() - 1)
    rest = groups - main
    return main, max(1 << (rest - 1).bit_length(), spread) if rest else 0


@functools.cache
def kernel_config(num_classes: int, positions_contiguous: bool = True, pressure: int = 0) -> KernelConfig:
    """The loss kernel's blocks for C classes (see the table above): the row in registers, held by
    one thread up to ONE_THREAD_MAX_GROUPS groups of four; above, with contiguous positions (NCHW),
    spread over the fewest warps that leave a thread no more, else two sweeps over chunks of
    CHUNK_GROUPS groups, one position a thread; with contiguous classes, ``_contiguous_classes``.
    ``pressure``: the registers the options take (``register_pressure``), which set the register
    cap of a row in one thread."""
    groups = _cdiv(num_classes, 4)
    if groups <= ONE_THREAD_MAX_GROUPS:
        main, tail = class_blocks(groups, 1)
        masked_main_of_4 = main == 4 and num_classes < 16  # C = 13-15: spills at 96
        lean = groups <= LEAN_MAX_GROUPS[pressure] and not masked_main_of_4
        return KernelConfig(128, 4, main, tail, 0, 96 if lean else 128 if pressure < 3 else None)
    if not positions_contiguous:
        return _contiguous_classes(groups)
    for warps in ROW_WARPS:
        main, tail = class_blocks(groups, warps)
        if main + tail <= ONE_THREAD_MAX_GROUPS * warps:
            return KernelConfig(32, warps, main, tail, 0, None)
    return KernelConfig(128, 4, 0, 0, CHUNK_GROUPS, 128)


def register_pressure(problem: BLVProblem) -> int:
    """The registers the options take beyond the defaults', for ``kernel_config``'s caps (measured:
    the static report's OPTION_SETS): 0 the defaults; 1 class weights or mode "clamp"; 2 position
    weights, a loss per position or label smoothing, alone or with the former; 3 label smoothing
    with any other option."""
    weighted = problem.class_weight is not None or problem.mode == "clamp"
    extras = problem.position_weight is not None or problem.reduction == "none"
    if problem.label_smoothing > 0:
        return 3 if weighted or extras else 2
    return 2 if extras else int(weighted)


def across_lanes(groups: int, lanes: int) -> KernelConfig:
    """A row of ``groups`` groups held over ``lanes`` lanes in one pass: up to 32 lanes, one warp
    holds 32 / lanes positions' rows; above, 2 to 16 warps hold one position's."""
    return KernelConfig(max(32 // lanes, 1), max(lanes // 32, 1), *class_blocks(groups, lanes), 0, None)


def _contiguous_classes(groups: int) -> KernelConfig:
    """Contiguous classes (channels_last, rows): a row's groups across lanes, so that a warp's load
    reads a few rows' consecutive classes (lanes across positions would read 32 rows, one class
    each), over the fewest ROW_LANES that leave a lane at most SPREAD_MAX_GROUPS groups; a wider
    row is swept twice by one warp, a group a lane a chunk."""
    for lanes in ROW_LANES:
        config = across_lanes(groups, lanes)
        if config.main_groups + config.tail_groups <= SPREAD_MAX_GROUPS * lanes:
            return config
    return KernelConfig(1, 1, 0, 0, 32, 128)


@dataclass(frozen=True)
class Launch:
    """One kernel launch, planned: the static report compiles exactly what ``__call__`` launches."""

    kernel: triton.JITFunction
    grid: tuple[int, int]
    args: dict  # every argument by name: tensors (or None), numbers, and the constexprs
    num_warps: int = 4
    num_stages: int = 1  # no software pipelining: the loops' loads are not worth the registers
    maxnreg: int | None = None  # a register cap for ptxas, which otherwise takes more than it needs

    def __call__(self):
        """Launch; returns Triton's compiled kernel (None when the grid is empty or under the interpreter)."""
        if self.grid[0] * self.grid[1]:
            # FMA contraction on, whatever Triton's default (3.10 turns it off): the instruction
            # counts, the budget and the tolerances against the reference (which rounds a * b + c
            # twice, a few ulps apart) are for fused multiply-adds
            options = dict(num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=True)
            if self.maxnreg is not None:
                options["maxnreg"] = self.maxnreg
            return self.kernel[self.grid](**self.args, **options)
        return None


@dataclass(frozen=True)
class Addressed:
    """The tensors of a problem as the kernels address them: (N, [C,] S) strides, batch and spatial
    size, and the gradient's buffer. When every per-position tensor lets it, the batch becomes one
    run of positions (N, S) -> (1, N*S), as in channels_last and (N, C) rows: no program then
    straddles two samples, and the stream counter q = n*S + s is the same."""

    logits: torch.Tensor
    target: torch.Tensor
    position_weight: torch.Tensor | None
    grad: torch.Tensor | None
    runs: int  # N, or 1 after the merge
    spatial: int  # S, or N*S after the merge
    strides: dict[str, int]  # stride_x{n,c,s}, stride_t{n,s}, stride_w{n,s}, stride_g{n,c,s}
    index_64: bool  # an element offset reaches 2**31

    @property
    def positions_contiguous(self) -> bool:
        """Stride 1 between positions, in the logits and the gradient (``kernel_config``'s layout)."""
        return self.strides["stride_xs"] == 1 and (self.grad is None or self.strides["stride_gs"] == 1)

    @classmethod
    def of(cls, problem: BLVProblem, *, compute_grad: bool) -> Addressed:
        t = ncs_tensors(problem, compute_grad=compute_grad)
        runs, spatial, strides, index_64 = _addressing(t.layout)
        return cls(t.logits, t.target, t.position_weight, t.grad, runs, spatial, dict(strides), index_64)


@functools.lru_cache(maxsize=1024)
def _addressing(layout: NCSLayout) -> tuple[int, int, tuple[tuple[str, int], ...], bool]:
    """(runs, spatial, strides, index_64) of ``Addressed`` for a layout, once per layout."""
    strides = layout.named_strides
    batch, classes = layout.logits_shape[:2]
    positions = batch * math.prod(layout.logits_shape[2:])
    spatial = positions // batch if batch else 0
    per_position = [(f"stride_{k}n", f"stride_{k}s") for k in "xtwg"]
    # the largest element offset of the logits, target, position weight and gradient, read through (N, [C,] S)
    largest_offset = max(
        ((batch - 1) * abs(strides[f"stride_{k}n"]) + (classes - 1) * abs(strides.get(f"stride_{k}c", 0))
         + (spatial - 1) * abs(strides[f"stride_{k}s"])) if positions else 0
        for k in "xtwg"
    )  # fmt: skip
    runs = batch
    if batch > 1 and all(spatial == 1 or strides[n] == spatial * strides[s] for n, s in per_position):
        runs, spatial = 1, positions
        for n, s in per_position:  # with one position per sample, the batch stride steps between positions
            strides[s], strides[n] = strides[n] if positions == batch else strides[s], 0
    return runs, spatial, tuple(strides.items()), max(largest_offset, positions) >= 2**31


def label_launch(problem: BLVProblem, view: Addressed) -> Launch:
    """The label pass; its outputs ``weight_sums_ptr`` and ``bad_counts_ptr`` are in ``args``."""
    grid = (_cdiv(view.spatial, LABEL_BLOCK), view.runs)
    device = view.logits.device
    return Launch(_label_kernel, grid, dict(
        target_ptr=view.target, class_weight_ptr=problem.class_weight,
        weight_sums_ptr=torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device),
        bad_counts_ptr=torch.empty(grid[0] * grid[1], dtype=torch.int32, device=device), S=view.spatial,
        C=problem.num_classes, ignore_index=problem.ignore_index, stride_tn=view.strides["stride_tn"],
        stride_ts=view.strides["stride_ts"], BLOCK=LABEL_BLOCK, HAS_CLASS_WEIGHT=problem.class_weight is not None,
        INDEX_64=view.index_64,
    ))  # fmt: skip


def loss_launch(problem: BLVProblem, view: Addressed, denom: torch.Tensor | None,
                config: KernelConfig | None = None) -> Launch:  # fmt: skip
    """The loss pass (with ``kernel_config``'s blocks unless ``config`` is given: the sweep's
    candidates); its outputs ``loss_sums_ptr``, ``loss_ptr`` (per position, "none") and
    ``grad_ptr`` are in ``args``."""
    s = view.strides
    if config is None:
        config = kernel_config(problem.num_classes, view.positions_contiguous, register_pressure(problem))
    grid = (_cdiv(view.spatial, config.block_p), view.runs)
    device = view.logits.device
    grad_like_x = view.grad is None or all(s[f"stride_g{k}"] == s[f"stride_x{k}"] for k in "ncs")
    return Launch(_blv_loss_kernel, grid, dict(
        x_ptr=view.logits, target_ptr=view.target, variation_weight_ptr=problem.variation_weight,
        class_weight_ptr=problem.class_weight, position_weight_ptr=view.position_weight, seed_ptr=problem.seed,
        params_ptr=problem.variation_params, denom_ptr=denom,
        loss_ptr=torch.empty(problem.target.shape, dtype=problem.loss_dtype, device=device)
        if problem.reduction == "none" else None,
        loss_sums_ptr=torch.empty(grid[0] * grid[1], dtype=torch.float32, device=device), grad_ptr=view.grad,
        S=view.spatial, C=problem.num_classes, offset=problem.offset, ignore_index=problem.ignore_index,
        label_smoothing=problem.label_smoothing, **s,
        BLOCK_P=config.block_p, MAIN_GROUPS=config.main_groups, TAIL_GROUPS=config.tail_groups,
        CHUNK_GROUPS=config.chunk_groups, TAIL_CHUNK=config.chunk_groups > 0 and problem.num_classes % (4 * config.chunk_groups) != 0,
        MAIN_FULL=4 * config.main_groups <= problem.num_classes,
        EVEN_S=view.spatial % config.block_p == 0, GRAD_LIKE_X=grad_like_x,
        REDUCTION=_REDUCTION_CODES[problem.reduction], COMPUTE_GRAD=view.grad is not None,
        CLAMP_MODE=problem.mode == "clamp", HAS_CLASS_WEIGHT=problem.class_weight is not None,
        HAS_POSITION_WEIGHT=view.position_weight is not None, HAS_SMOOTHING=problem.label_smoothing > 0,
        INDEX_64=view.index_64,
    ), num_warps=config.num_warps, maxnreg=config.maxnreg)  # fmt: skip


def scale_launch(grad: torch.Tensor, grad_output: torch.Tensor) -> Launch:
    return Launch(_scale_kernel, (_cdiv(grad.numel(), SCALE_BLOCK), 1),
                  dict(grad_ptr=grad, grad_output_ptr=grad_output.reshape(()), numel=grad.numel(), BLOCK=SCALE_BLOCK))  # fmt: skip


def forward(problem: BLVProblem, *, compute_grad: bool, config: KernelConfig | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The operator contract's forward: (loss, its gradient for grad_output 1, or an empty tensor);
    ``config``: the loss pass's blocks instead of ``kernel_config``'s (``benchmarks/sweep.py``)."""
    view = Addressed.of(problem, compute_grad=compute_grad)
    labels = label_launch(problem, view)
    labels()
    check_labels(problem, labels.args["bad_counts_ptr"])
    denom = mean_divisor(problem, labels.args["weight_sums_ptr"])
    loss = loss_launch(problem, view, denom, config)
    loss()
    result = reduced_loss(problem, loss.args["loss_sums_ptr"], denom, loss.args["loss_ptr"])
    return result, view.grad if view.grad is not None else view.logits.new_empty(0)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (a one-element float32 tensor) in place; the kernel reads nothing when it is exactly 1."""
    scale_launch(grad, grad_output)()
