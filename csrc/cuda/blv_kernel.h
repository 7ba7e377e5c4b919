/* Fused BLV cross-entropy CUDA kernels: a plain C interface (raw pointers, sizes, strides, a
 * stream), free of torch headers so that any nvcc can compile the kernels on their own.
 *
 * Semantics are those of blv_kernels/kernels/blv_cross_entropy.py: logits addressed as
 * (N, C, S) through three element strides, labels and position weights as (N, S), the
 * variation stream of blv_kernels/noise.py, fp32 math whatever the logits' dtype. */
#ifndef BLV_KERNEL_H_
#define BLV_KERNEL_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum BlvFloatType { BLV_FLOAT32 = 0, BLV_FLOAT16 = 1, BLV_BFLOAT16 = 2 };
enum BlvIntType { BLV_UINT8 = 0, BLV_INT8 = 1, BLV_INT16 = 2, BLV_INT32 = 3, BLV_INT64 = 4 };

typedef struct BlvProblem {
  const void* logits; /* (N, C, S) through stride_x{n,c,s}, of logits_dtype */
  int logits_dtype;   /* BlvFloatType */
  const void* target; /* labels (N, S) through stride_t{n,s}, of target_dtype */
  int target_dtype;   /* BlvIntType */
  const float* variation_weight; /* w_c, (C,) contiguous */
  const float* class_weight;     /* F.cross_entropy's weight, (C,) contiguous, or NULL */
  const float* position_weight;  /* (N, S) through stride_w{n,s}, or NULL */
  const int64_t* seed;           /* device scalar: the 64-bit Philox key (k0 = lo32, k1 = hi32) */
  int64_t offset;                /* stream offset: q = offset + n*S + s */
  int64_t N, C, S;
  int64_t stride_xn, stride_xc, stride_xs;
  int64_t stride_tn, stride_ts;
  int64_t stride_wn, stride_ws;
  int64_t ignore_index;
  float scale;     /* sigma*sqrt(2) in float32; 0 for no variation */
  float threshold; /* erf(1/(sigma*sqrt(2))) in float32: t >= threshold gives v = 1 */
  int use_poly;    /* erfinv by the polynomial (threshold <= 0.7), else Giles' */
  int clamp_mode;  /* mode "clamp" (t = max(2u - 1, 0)), else "abs" (t = u) */
} BlvProblem;

/* Number of blocks of the forward launch: the row count of its partial sums. */
int64_t blv_ce_fwd_num_partials(const BlvProblem* problem);

/* Forward. Writes lse[N*S] (logsumexp of the perturbed logits), partial[blocks][2] (sum of
 * weighted losses, sum of class weights of valid positions), num_bad[blocks] (labels outside
 * [0, C) that are not ignore_index) and, when loss is not NULL, the weighted loss per
 * position (N*S, logits' dtype, 0 where not valid). */
cudaError_t blv_ce_fwd_cuda(const BlvProblem* problem, void* loss, float* lse, float* partial,
                            int32_t* num_bad, cudaStream_t stream);

/* Backward. grad[n, c, s] = (softmax(z)_c - [c == t]) * grad_loss[n, s] * weight / denom,
 * recomputing z from the logits and the forward's lse. grad_loss is fp32 (strides 0 for a
 * scalar); denom is NULL unless the reduction is "mean"; grad is of the logits' dtype. */
cudaError_t blv_ce_bwd_cuda(const BlvProblem* problem, const float* grad_loss, int64_t stride_gn,
                            int64_t stride_gs, const float* denom, const float* lse, void* grad,
                            int64_t stride_dn, int64_t stride_dc, int64_t stride_ds,
                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* BLV_KERNEL_H_ */
