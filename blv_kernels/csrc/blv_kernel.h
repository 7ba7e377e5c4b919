/* The fused BLV cross-entropy kernels behind one plain C interface: raw pointers and element
 * strides, no torch or CUDA header, so that blv_kernels/backends/cpp_kernel.py can call them
 * through ctypes and every implementation compiles on its own:
 *
 *   cpu/blv_kernel.cpp    host pointers, `num_threads` worker threads ("cpu" backend)
 *   cuda/blv_kernel.cu    device pointers, launched on `stream` ("cuda" backend); the tests
 *                         also compile it for the host through a CUDA emulation layer
 *
 * The semantics are those of the operator contract in blv_kernels/ops.py. For one position
 * (n, s) with label t, logits x_c, variation weights w_c, class weights cw_c (1 without),
 * position weight pw (1 without), label smoothing eps and W = sum_c cw_c:
 *
 *   z_c   = x_c + v_c * w_c          v_c: word c % 4 of Philox(q = offset + n*S + s, c / 4), blv_math.h
 *   m     = max_c z_c,  d = sum_c exp(z_c - m),  p_c = exp(z_c - m) / d
 *   valid = t in [0, C) and t != ignore_index
 *   l     = valid ? (1-eps) cw_t ((m - z_t) + log d) + (eps/C) sum_c cw_c ((m - z_c) + log d) : 0
 *   loss  = l * pw                   (a NaN position weight gives NaN even where not valid)
 *   dloss/dx_c = valid ? pw (p_c ((1-eps) cw_t + eps W / C) - (1-eps) cw_t [c == t] - (eps/C) cw_c) / denom : 0
 *
 * with denom = 1 for the reductions "none" and "sum"; for "mean" the caller passes it (the sum
 * of the label pass's weight sums, or an explicit avg_factor). m is kept apart from log d, so
 * adding a constant to every logit changes nothing (as in F.cross_entropy). A label outside
 * [0, C) that is not ignore_index is never used as an index: it counts as not valid and the
 * label pass reports it (the caller raises). All arithmetic is fp32 whatever the logits'
 * dtype; the gradient is stored in the logits' dtype, per-position losses in loss_dtype (the
 * logits', or float32: half logits under autocast, as F.cross_entropy returns). Reductions are
 * per-block partial sums in a fixed order (deterministic, no atomics), summed by the caller.
 *
 * Every function but the *_blocks ones returns 0 on success, else an error code that
 * blv_error_string describes. */
#ifndef BLV_KERNEL_H_
#define BLV_KERNEL_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum BlvFloatType { BLV_FLOAT32 = 0, BLV_FLOAT16 = 1, BLV_BFLOAT16 = 2 };
enum BlvIntType { BLV_UINT8 = 0, BLV_INT8 = 1, BLV_INT16 = 2, BLV_INT32 = 3, BLV_INT64 = 4 };
enum BlvReduction { BLV_REDUCTION_NONE = 0, BLV_REDUCTION_SUM = 1, BLV_REDUCTION_MEAN = 2 };

typedef struct BlvProblem {
  const void* logits;            /* x[n, c, s] at n*stride_xn + c*stride_xc + s*stride_xs, logits_dtype */
  const void* target;            /* t[n, s] at n*stride_tn + s*stride_ts, target_dtype */
  const float* variation_weight; /* w_c: (C,) contiguous, in [0, 1] */
  const float* class_weight;     /* cw_c: (C,) contiguous, or NULL (all 1) */
  const float* position_weight;  /* pw[n, s] at n*stride_wn + s*stride_ws, or NULL (all 1) */
  const int64_t* seed;           /* one value: the 64-bit Philox key (k0 = low 32 bits, k1 = high) */
  const float* variation_params; /* two values, [scale, threshold]: blv::variation in blv_math.h */
  int64_t N, C, S;               /* batch, classes, positions per sample (product of spatial sizes) */
  int64_t offset;                /* stream offset; offset + N*S <= 2**63 - 1 */
  int64_t ignore_index;
  int64_t stride_xn, stride_xc, stride_xs;
  int64_t stride_tn, stride_ts;
  int64_t stride_wn, stride_ws;
  int32_t logits_dtype;  /* BlvFloatType */
  int32_t target_dtype;  /* BlvIntType */
  int32_t reduction;     /* BlvReduction */
  int32_t clamp_mode;    /* 1: mode "clamp" (t = max(2u - 1, 0)); 0: mode "abs" (t = u) */
  int32_t loss_dtype;    /* BlvFloatType of the per-position losses: logits_dtype or BLV_FLOAT32 */
  float label_smoothing; /* eps in [0, 1] */
} BlvProblem;

/* Pass 1, over the labels only. For each of blv_label_blocks(problem) blocks: weight_sums[b],
 * the sum over its valid positions of cw_t (their count without class weights), and
 * bad_counts[b], its labels outside [0, C) that are not ignore_index. */
int64_t blv_label_blocks(const BlvProblem* problem);
int blv_label_pass(const BlvProblem* problem, float* weight_sums, int32_t* bad_counts, void* stream,
                   int num_threads);

/* Pass 2, over the logits. For each of blv_loss_blocks(problem) blocks, loss_sums[b] = the sum
 * of its positions' losses. With reduction "none", loss_per_position (N*S contiguous,
 * loss_dtype) gets every position's loss; it is NULL otherwise. denom: one value, the divisor of
 * "mean", read where the kernel runs; NULL for "none" and "sum". grad: NULL (no gradient), or
 * dloss/dx at n*stride_gn + c*stride_gc + s*stride_gs in the logits' dtype: the gradient of
 * the reduced loss for a grad_output of 1 ("sum", "mean"), of every position's loss ("none"). */
int64_t blv_loss_blocks(const BlvProblem* problem);
int blv_loss_pass(const BlvProblem* problem, const float* denom, void* loss_per_position, float* loss_sums,
                  void* grad, int64_t stride_gn, int64_t stride_gc, int64_t stride_gs, void* stream,
                  int num_threads);

/* Backward of "sum" and "mean": grad[i] *= grad_output[0], in fp32, for the numel elements of a
 * dense buffer of dtype (BlvFloatType); reads and writes nothing of grad when grad_output is
 * exactly 1 (decided where the kernel runs: no host sync). */
int blv_scale_grad(void* grad, int32_t dtype, int64_t numel, const float* grad_output, void* stream,
                   int num_threads);

/* What an error code returned above means. */
const char* blv_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* BLV_KERNEL_H_ */
