"""Fused Triton BLV cross-entropy: noise in registers, one read of the logits per pass.

Math, for one position with logits x_c, target t and variation weights w_c (BLV_SPEC.md):

    z_c  = x_c + v_c * w_c                     v_c from the Philox stream of blv_kernels.noise
    lse  = log sum_c exp(z_c)                  online over chunks of classes: (m, d) running max and sum
    l    = lse - z_t
    dl/dx_c = softmax(z)_c - [c == t] = exp(z_c - lse) - [c == t]

Forward: reads the logits once, writes lse (4 bytes per position) and the per-position loss
(``reduction="none"``) or one partial sum per program (``"sum"``/``"mean"``, reduced by
``torch.sum``: deterministic, no atomics). Backward: re-reads the logits, regenerates the same
noise and writes the gradient. Recomputing costs one more read of the logits than storing the
gradient in the forward would, but storing it needs a second pass over the gradient to scale
it by ``grad_output`` (a read and a write), so for forward+backward recomputation moves 3x
the logits' bytes against 4x, and a forward without backward writes no gradient at all.

What bounds it (an estimate from counting, not yet a measurement: see benchmarks/). Per
element and per pass: one load (plus the store in the backward); a quarter of a Philox4x32-10
call, i.e. 10 rounds x 2 wide 32x32->64 multiplies / 4 = 5 wide multiplies (~10 IMAD) and ~5
logic ops; the transform (~12 FMA, no transcendental for sigma >= 0.962); one exp. Forward +
backward on an H100 (~3 TB/s copy rate; IMAD at 64 per SM per clock, ~17 Tops/s): fp32 moves
12 bytes per element (4 ps) against ~30 integer ops (~2 ps): memory-bound. bf16/fp16 move 6
bytes (2 ps) while the integer work stays ~2 ps: the two meet, so Philox is what a faster
low-precision kernel would have to cut (e.g. keeping the words of the forward is no option:
they would cost more bytes than they save).

Layouts: the logits are addressed as (N, C, S) with three strides, so NCHW (class stride S,
pixels contiguous), channels_last (class stride 1) and (N, C) rows need no copy. Classes are
processed four at a time as four interleaved tiles [BLOCK_G, BLOCK_P] (classes 4g+k for
k = 0..3), one per Philox output word, so each Philox call feeds four classes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import noise
from .._layout import as_ncs, empty_gradient
from .._validation import invalid_target_mask, raise_or_assert_no_bad_labels

_P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8 = map(tl.constexpr, noise.ERFINV_POLY)
_GC0, _GC1, _GC2, _GC3, _GC4, _GC5, _GC6, _GC7, _GC8 = map(tl.constexpr, noise.ERFINV_GILES_CENTRAL)
_GT0, _GT1, _GT2, _GT3, _GT4, _GT5, _GT6, _GT7, _GT8 = map(tl.constexpr, noise.ERFINV_GILES_TAIL)
_POLY_MAX = tl.constexpr(noise.ERFINV_POLY_MAX)


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
def _variation_params(sigma_ptr):
    """noise.variation_params on the device, from sigma's float64 bits in memory (noise.sigma_bits):
    scale = sigma*sqrt(2), threshold = erf(1 / scale) (1 at sigma = 0), both in fp64, rounded
    to fp32. sigma is read, not passed, so a schedule that changes it neither recompiles the
    kernel nor, under torch.compile, the graph."""
    sigma = tl.load(sigma_ptr).to(tl.float64, bitcast=True)
    scale = sigma * tl.full((), 1.4142135623730951, tl.float64)  # a float literal would be fp32
    threshold = tl.where(sigma > 0, tl.math.erf(1.0 / scale), 1.0)
    return scale.to(tl.float32), threshold.to(tl.float32)


@triton.jit
def _variation(word, scale, threshold, CLAMP_MODE: tl.constexpr):
    """Philox word -> v, the transform of blv_kernels.noise.variation_from_words."""
    u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    if CLAMP_MODE:
        t = tl.maximum(2.0 * u - 1.0, 0.0)  # eps <= 0 -> t = 0 -> v = 0
    else:
        t = u
    if threshold <= _POLY_MAX:  # uniform branch; t < threshold <= 0.7: erfinv(t) = t * P(t^2)
        e = t * _horner8(t * t, _P0, _P1, _P2, _P3, _P4, _P5, _P6, _P7, _P8)
    else:  # Giles' erfinv
        w = -tl.log((1.0 - t) * (1.0 + t))
        central = _horner8(w - 2.5, _GC0, _GC1, _GC2, _GC3, _GC4, _GC5, _GC6, _GC7, _GC8)
        tail = _horner8(tl.sqrt(w) - 3.0, _GT0, _GT1, _GT2, _GT3, _GT4, _GT5, _GT6, _GT7, _GT8)
        e = t * tl.where(w < 5.0, central, tail)
    v = tl.minimum(scale * e, 1.0)
    return tl.where(t < threshold, v, 1.0)


@triton.jit
def _perturbed_tile(x_row_ptr, var_w_ptr, o_c, m_p, word, C, stride_xc, scale, threshold,
                    CLAMP_MODE: tl.constexpr):  # fmt: skip
    """z = x + v*w for classes o_c [BLOCK_G] x positions [BLOCK_P], -inf where c >= C."""
    m_c = o_c < C
    p_x = x_row_ptr[None, :] + o_c[:, None].to(tl.int64) * stride_xc
    b_x = tl.load(p_x, mask=m_c[:, None] & m_p[None, :], other=0.0).to(tl.float32)
    if scale > 0:  # uniform branch: sigma = 0 is plain cross-entropy
        b_w = tl.load(var_w_ptr + o_c, mask=m_c, other=0.0)
        b_x = b_x + _variation(word, scale, threshold, CLAMP_MODE) * b_w[:, None]
    return tl.where(m_c[:, None], b_x, float("-inf"))


@triton.jit
def _position_setup(pid, target_ptr, pos_w_ptr, cls_w_ptr, P, S, C, offset, stride_tn, stride_ts,
                    stride_wn, stride_ws, ignore_index, BLOCK_P: tl.constexpr,
                    HAS_CLASS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr):  # fmt: skip
    """Per-position values shared by forward and backward: indices, label, weight, Philox counter."""
    o_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened position n*S + s
    m_p = o_p < P
    o_n = o_p // S
    o_s = o_p - o_n * S
    b_t = tl.load(target_ptr + o_n * stride_tn + o_s * stride_ts, mask=m_p, other=0).to(tl.int64)
    b_t = tl.where(m_p, b_t, ignore_index)
    m_labelled = b_t != ignore_index
    m_in_range = (b_t >= 0) & (b_t < C)
    m_valid = m_labelled & m_in_range
    # loss weight of a valid position: class weight of its label times its own weight
    b_weight = tl.where(m_valid, 1.0, 0.0)
    if HAS_CLASS_WEIGHT:
        b_weight *= tl.load(cls_w_ptr + tl.where(m_valid, b_t, 0), mask=m_valid, other=0.0).to(tl.float32)
    b_pos_weight = b_weight
    if HAS_POS_WEIGHT:
        b_pos_weight = b_weight * tl.load(pos_w_ptr + o_n * stride_wn + o_s * stride_ws, mask=m_valid, other=0.0).to(
            tl.float32
        )
    # Philox counter (lo32(q), hi32(q), group, 0), q = offset + n*S + s
    q = o_p + offset
    ctr_lo = (q & 0xFFFFFFFF).to(tl.uint32)
    ctr_hi = (q >> 32).to(tl.uint32)
    m_bad = m_labelled & ~m_in_range
    return o_p, m_p, o_n, o_s, b_t, m_valid, m_bad, b_weight, b_pos_weight, ctr_lo, ctr_hi


@triton.jit
def _perturbed_chunk(x_row_ptr, var_w_ptr, seed, ctr_lo, ctr_hi, m_p, c_start, C, stride_xc, scale, threshold,
                     BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, CLAMP_MODE: tl.constexpr):  # fmt: skip
    """The perturbed logits of classes [c_start, c_start + 4*BLOCK_G) as four interleaved tiles.

    Tile k holds classes 4g + k; one Philox call per (group g, position) gives word k to tile k.
    """
    o_g = c_start // 4 + tl.arange(0, BLOCK_G)
    b_lo = tl.broadcast_to(ctr_lo[None, :], (BLOCK_G, BLOCK_P))
    if scale > 0:  # uniform branch; new names only inside it, as both branches must yield one type
        b_hi = tl.broadcast_to(ctr_hi[None, :], (BLOCK_G, BLOCK_P))
        b_g = tl.broadcast_to(o_g[:, None].to(tl.uint32), (BLOCK_G, BLOCK_P))
        r0, r1, r2, r3 = tl.philox(seed, b_lo, b_hi, b_g, tl.zeros_like(b_g))
    else:  # sigma = 0: no words needed
        r0, r1, r2, r3 = b_lo, b_lo, b_lo, b_lo
    o_c = 4 * o_g
    z0 = _perturbed_tile(x_row_ptr, var_w_ptr, o_c, m_p, r0, C, stride_xc, scale, threshold, CLAMP_MODE)
    z1 = _perturbed_tile(x_row_ptr, var_w_ptr, o_c + 1, m_p, r1, C, stride_xc, scale, threshold, CLAMP_MODE)
    z2 = _perturbed_tile(x_row_ptr, var_w_ptr, o_c + 2, m_p, r2, C, stride_xc, scale, threshold, CLAMP_MODE)
    z3 = _perturbed_tile(x_row_ptr, var_w_ptr, o_c + 3, m_p, r3, C, stride_xc, scale, threshold, CLAMP_MODE)
    return o_c, z0, z1, z2, z3


@triton.jit
def _blv_ce_fwd_kernel(
    x_ptr,  # logits, addressed as (N, C, S) through three strides
    target_ptr,  # labels (N, S), any integer dtype
    var_w_ptr,  # variation weights w_c, fp32 (C,)
    cls_w_ptr,  # class weights of F.cross_entropy (C,), if HAS_CLASS_WEIGHT
    pos_w_ptr,  # per-position weights (N, S), if HAS_POS_WEIGHT
    seed_ptr,  # 64-bit Philox key, int64 0-dim
    sigma_ptr,  # standard deviation of eps: its float64 bits, int64 0-dim
    loss_ptr,  # out: weighted loss per position (N*S,), if STORE_LOSS
    lse_ptr,  # out: logsumexp of the perturbed logits per position, fp32 (N*S,)
    partial_ptr,  # out: per program [sum of weighted losses, sum of weights], fp32 (programs, 2)
    bad_ptr,  # out: per program number of labels outside [0, C) that are not ignore_index, int32
    P, S, C, offset,  # positions N*S, spatial size, classes, stream offset
    stride_xn, stride_xc, stride_xs, stride_tn, stride_ts, stride_wn, stride_ws,
    ignore_index,  # label to skip
    BLOCK_P: tl.constexpr,  # positions per program
    BLOCK_G: tl.constexpr,  # groups of four classes per chunk
    CLAMP_MODE: tl.constexpr,  # v = clamp(eps, 0, 1) instead of min(|eps|, 1)
    HAS_CLASS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, STORE_LOSS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    o_p, m_p, o_n, o_s, b_t, m_valid, m_bad, b_weight, b_pos_weight, ctr_lo, ctr_hi = _position_setup(
        pid, target_ptr, pos_w_ptr, cls_w_ptr, P, S, C, offset, stride_tn, stride_ts, stride_wn, stride_ws,
        ignore_index, BLOCK_P, HAS_CLASS_WEIGHT, HAS_POS_WEIGHT,
    )  # fmt: skip
    seed = tl.load(seed_ptr)
    scale, threshold = _variation_params(sigma_ptr)
    x_row_ptr = x_ptr + o_n * stride_xn + o_s * stride_xs

    # online softmax: m = running max of z, d = sum_c exp(z_c - m); z_t = perturbed target logit
    b_m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    b_d = tl.zeros((BLOCK_P,), tl.float32)
    b_zt = tl.zeros((BLOCK_P,), tl.float32)
    for c_start in range(0, C, 4 * BLOCK_G):
        o_c, z0, z1, z2, z3 = _perturbed_chunk(
            x_row_ptr, var_w_ptr, seed, ctr_lo, ctr_hi, m_p, c_start, C, stride_xc, scale, threshold,
            BLOCK_G, BLOCK_P, CLAMP_MODE,
        )  # fmt: skip
        m_new = tl.maximum(tl.maximum(tl.max(z0, 0), tl.max(z1, 0)), tl.maximum(tl.max(z2, 0), tl.max(z3, 0)))
        m_new = tl.maximum(b_m, m_new)
        # shift by 0 while every z so far is -inf, so that exp(-inf - shift) = 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_e = tl.exp(z0 - m_shift[None, :]) + tl.exp(z1 - m_shift[None, :])
        b_e += tl.exp(z2 - m_shift[None, :]) + tl.exp(z3 - m_shift[None, :])
        b_d = b_d * tl.exp(b_m - m_shift) + tl.sum(b_e, 0)
        b_m = m_new
        b_zt_c = tl.where(o_c[:, None] == b_t[None, :], z0, 0.0) + tl.where(o_c[:, None] + 1 == b_t[None, :], z1, 0.0)
        b_zt_c += tl.where(o_c[:, None] + 2 == b_t[None, :], z2, 0.0) + tl.where(
            o_c[:, None] + 3 == b_t[None, :], z3, 0.0
        )
        b_zt += tl.sum(b_zt_c, 0)

    b_lse = b_m + tl.log(b_d)
    tl.store(lse_ptr + o_p, b_lse, mask=m_p)
    # l = lse - z_t, weighted; 0 at ignored positions
    b_loss = tl.where(m_valid, (b_lse - b_zt) * b_pos_weight, 0.0)
    if STORE_LOSS:
        tl.store(loss_ptr + o_p, b_loss.to(loss_ptr.dtype.element_ty), mask=m_p)
    tl.store(partial_ptr + 2 * pid, tl.sum(b_loss, 0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(b_weight, 0))
    tl.store(bad_ptr + pid, tl.sum(m_bad.to(tl.int32), 0))


@triton.jit
def _grad_tile(dx_row_ptr, o_c, z, b_lse, b_t, b_coef, m_p, C, stride_dc):
    """dx_c = (exp(z_c - lse) - [c == t]) * coef, formed in fp32, stored in dx's dtype."""
    b_grad = (tl.exp(z - b_lse[None, :]) - tl.where(o_c[:, None] == b_t[None, :], 1.0, 0.0)) * b_coef[None, :]
    p_dx = dx_row_ptr[None, :] + o_c[:, None].to(tl.int64) * stride_dc
    tl.store(p_dx, b_grad.to(dx_row_ptr.dtype.element_ty), mask=(o_c < C)[:, None] & m_p[None, :])


@triton.jit
def _blv_ce_bwd_kernel(
    x_ptr, target_ptr, var_w_ptr, cls_w_ptr, pos_w_ptr, seed_ptr, sigma_ptr,  # as in the forward
    lse_ptr,  # the forward's logsumexp per position, fp32 (N*S,)
    grad_loss_ptr,  # dL/dloss: per position (N, S) for "none", a scalar otherwise (strides 0)
    denom_ptr,  # the divisor of "mean" (sum of weights of valid positions), if IS_MEAN
    dx_ptr,  # out: dL/dlogits, addressed as (N, C, S)
    P, S, C, offset,
    stride_xn, stride_xc, stride_xs, stride_tn, stride_ts, stride_wn, stride_ws, stride_gn, stride_gs,
    stride_dn, stride_dc, stride_ds,
    ignore_index,
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, CLAMP_MODE: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, IS_MEAN: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    o_p, m_p, o_n, o_s, b_t, m_valid, m_bad, b_weight, b_pos_weight, ctr_lo, ctr_hi = _position_setup(
        pid, target_ptr, pos_w_ptr, cls_w_ptr, P, S, C, offset, stride_tn, stride_ts, stride_wn, stride_ws,
        ignore_index, BLOCK_P, HAS_CLASS_WEIGHT, HAS_POS_WEIGHT,
    )  # fmt: skip
    seed = tl.load(seed_ptr)
    scale, threshold = _variation_params(sigma_ptr)
    x_row_ptr = x_ptr + o_n * stride_xn + o_s * stride_xs
    dx_row_ptr = dx_ptr + o_n * stride_dn + o_s * stride_ds
    b_lse = tl.load(lse_ptr + o_p, mask=m_p, other=0.0)
    # coef = dL/dl_position * class weight * position weight (/ denominator for "mean")
    b_coef = tl.load(grad_loss_ptr + o_n * stride_gn + o_s * stride_gs, mask=m_p, other=0.0).to(tl.float32)
    if IS_MEAN:
        b_coef = b_coef / tl.load(denom_ptr)
    b_coef = tl.where(m_valid, b_coef * b_pos_weight, 0.0)
    for c_start in range(0, C, 4 * BLOCK_G):
        o_c, z0, z1, z2, z3 = _perturbed_chunk(
            x_row_ptr, var_w_ptr, seed, ctr_lo, ctr_hi, m_p, c_start, C, stride_xc, scale, threshold,
            BLOCK_G, BLOCK_P, CLAMP_MODE,
        )  # fmt: skip
        _grad_tile(dx_row_ptr, o_c, z0, b_lse, b_t, b_coef, m_p, C, stride_dc)
        _grad_tile(dx_row_ptr, o_c + 1, z1, b_lse, b_t, b_coef, m_p, C, stride_dc)
        _grad_tile(dx_row_ptr, o_c + 2, z2, b_lse, b_t, b_coef, m_p, C, stride_dc)
        _grad_tile(dx_row_ptr, o_c + 3, z3, b_lse, b_t, b_coef, m_p, C, stride_dc)


# ----------------------------------------------------------------------------------------------
# Launchers: validate layout, allocate, pick the blocks and the grid.

_CHUNK_COST = 8  # per-position cost of one class chunk (rescale exp, reductions), in element-equivalents


def block_sizes(num_classes: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_G): the group count per chunk that minimises padded work plus per-chunk cost,
    then as many positions as keep about 2048 elements in flight per program, at most 128: more
    spill registers on sm_90 (``python -m blv_kernels.kernels.compile_report``). Untuned on a GPU."""
    groups = triton.cdiv(num_classes, 4)
    block_g = min((1, 2, 4, 8, 16), key=lambda g: (triton.cdiv(groups, g) * (4 * g + _CHUNK_COST), -g))
    return min(128, 2048 // (4 * block_g)), block_g


def _common(logits, target, position_weight, mode):
    num_classes = logits.shape[1]
    positions = target.numel()
    block_p, block_g = block_sizes(num_classes)
    logits, x_strides = as_ncs(logits, 2)
    target, t_strides = as_ncs(target, 1)
    w_strides = (0, 0)
    if position_weight is not None:
        position_weight, w_strides = as_ncs(position_weight, 1)
    meta = dict(BLOCK_P=block_p, BLOCK_G=block_g, CLAMP_MODE=mode == "clamp", num_warps=4)
    return logits, x_strides, target, t_strides, position_weight, w_strides, meta, positions


def blv_ce_fwd(
    logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight, ignore_index, reduction
):
    """Fused forward: returns (loss, lse, denom); loss as ``F.cross_entropy(..., reduction)`` gives it,
    lse the per-position logsumexp the backward needs, denom the divisor of ``"mean"``. ``seed``
    and ``sigma`` are 0-dim int64 device tensors (``noise.seed_tensor``, ``noise.sigma_bits``)."""
    num_classes = logits.shape[1]
    out_dtype = logits.dtype
    logits, x_strides, target_ncs, t_strides, position_weight, w_strides, meta, positions = _common(
        logits, target, position_weight, mode
    )
    programs = triton.cdiv(positions, meta["BLOCK_P"])
    device = logits.device
    lse = torch.empty(positions, dtype=torch.float32, device=device)
    partial = torch.zeros(programs, 2, dtype=torch.float32, device=device)
    bad = torch.zeros(programs, dtype=torch.int32, device=device)
    store_loss = reduction == "none"
    loss = torch.empty(target.shape if store_loss else (), dtype=out_dtype, device=device)
    if programs:
        _blv_ce_fwd_kernel[(programs,)](
            logits, target_ncs, variation_weight, class_weight, position_weight, seed, sigma,
            loss, lse, partial, bad,
            positions, positions // max(logits.shape[0], 1), num_classes, offset,
            *x_strides, *t_strides, *w_strides,
            ignore_index,
            HAS_CLASS_WEIGHT=class_weight is not None, HAS_POS_WEIGHT=position_weight is not None,
            STORE_LOSS=store_loss, **meta,
        )  # fmt: skip
    raise_or_assert_no_bad_labels(
        bad.sum(), lambda: target[invalid_target_mask(target.long(), num_classes, ignore_index)][0],
        num_classes, ignore_index,
    )  # fmt: skip
    total, denom = partial[:, 0].sum(), partial[:, 1].sum()  # separate tensors: outputs may not alias
    if reduction == "sum":
        loss = total.to(out_dtype)
    elif reduction == "mean":
        loss = (total / denom).to(out_dtype)
    return loss, lse, denom


def blv_ce_bwd(
    grad_loss, logits, target, variation_weight, seed, offset, sigma, mode, class_weight, position_weight,
    lse, denom, ignore_index, reduction,
):  # fmt: skip
    """Fused backward: dL/dlogits, recomputing the forward's noise and softmax from its lse."""
    num_classes = logits.shape[1]
    grad = empty_gradient(logits)
    _, d_strides = as_ncs(grad, 2)  # no copy: empty_gradient gives an (N, C, S) layout
    logits, x_strides, target, t_strides, position_weight, w_strides, meta, positions = _common(
        logits, target, position_weight, mode
    )
    g_strides = (0, 0)
    if reduction == "none":
        grad_loss, g_strides = as_ncs(grad_loss, 1)
    programs = triton.cdiv(positions, meta["BLOCK_P"])
    if programs:
        _blv_ce_bwd_kernel[(programs,)](
            logits, target, variation_weight, class_weight, position_weight, seed, sigma,
            lse, grad_loss, denom, grad,
            positions, positions // max(logits.shape[0], 1), num_classes, offset,
            *x_strides, *t_strides, *w_strides, *g_strides, *d_strides,
            ignore_index,
            HAS_CLASS_WEIGHT=class_weight is not None, HAS_POS_WEIGHT=position_weight is not None,
            IS_MEAN=reduction == "mean", **meta,
        )  # fmt: skip
    return grad
