// Fused BLV cross-entropy in CUDA: the variation in registers, one read of the logits per pass.
//
// Math, per position with logits x_c, label t, variation weights w_c (BLV_SPEC.md):
//
//   z_c  = x_c + v_c * w_c                 v_c: word c % 4 of Philox(q, c / 4), see blv_math.cuh
//   lse  = log sum_c exp(z_c)              online: running max m and sum d = sum_c exp(z_c - m)
//   l    = (lse - z_t) * weight_t * position_weight
//   dl/dx_c = (exp(z_c - lse) - [c == t]) * grad_output * weight_t * position_weight (/ denom)
//
// The forward writes lse (4 bytes per position), the loss per position ("none") and one row
// [sum of losses, sum of weights] plus a bad-label count per block, reduced by the caller with
// torch.sum: deterministic, no atomics. The backward re-reads the logits, regenerates the
// noise and writes the gradient, as the Triton kernel does (kernels/blv_cross_entropy.py).
//
// Two thread layouts, each with one Philox call serving a group of four classes:
// - positions: one thread per position (or per VEC positions consecutive in s, read with
//   16-byte loads when the pixels are contiguous: NCHW), looping over all classes. Used for
//   NCHW and for few classes.
// - rows: one warp per position, lanes over groups of four classes (read as one 4-element
//   load when class-contiguous), merged with warp shuffles. Used when the classes are
//   contiguous (channels_last, (N, C) rows) and C >= kRowsMinClasses.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <type_traits>

#include "blv_kernel.h"
#include "blv_math.cuh"

namespace blv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
// Class-contiguous layouts with at least this many classes use a warp per position.
constexpr int64_t kRowsMinClasses = 64;

__device__ __forceinline__ float fast_exp(float x) { return exp2f(x * kLog2e); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// K consecutive elements moved as one K*sizeof(T)-byte access (the address must be aligned).
template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

template <typename T, int K>
__device__ __forceinline__ void load_pack(const T* p, float out[K]) {
  const Pack<T, K> pack = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int K>
__device__ __forceinline__ void store_pack(T* p, const float in[K]) {
  Pack<T, K> pack;
#pragma unroll
  for (int k = 0; k < K; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, K>*>(p) = pack;
}

__device__ __forceinline__ int64_t load_label(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case BLV_UINT8: return static_cast<const uint8_t*>(p)[i];
    case BLV_INT8: return static_cast<const int8_t*>(p)[i];
    case BLV_INT16: return static_cast<const int16_t*>(p)[i];
    case BLV_INT32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

// Per-position values shared by forward and backward.
struct Position {
  int64_t n, s;
  int64_t label;     // the target if valid, else -1 (matches no class)
  float weight;      // class weight of a valid label, else 0: what "mean" divides by
  float pos_weight;  // weight * position weight: the factor of the loss
  uint64_t q;        // Philox position counter, offset + n*S + s
  bool valid, bad;   // label in [0, C); label outside [0, C) and not ignore_index
};

__device__ __forceinline__ Position load_position(const BlvProblem& pr, int64_t p) {
  Position pos;
  pos.n = p / pr.S;
  pos.s = p - pos.n * pr.S;
  const int64_t t = load_label(pr.target, pr.target_dtype, pos.n * pr.stride_tn + pos.s * pr.stride_ts);
  const bool labelled = t != pr.ignore_index;
  const bool in_range = t >= 0 && t < pr.C;
  pos.valid = labelled && in_range;
  pos.bad = labelled && !in_range;
  pos.label = pos.valid ? t : -1;  // an out-of-range label is never used as an index
  pos.weight = pos.valid ? (pr.class_weight != nullptr ? pr.class_weight[t] : 1.0f) : 0.0f;
  pos.pos_weight = pos.weight;
  if (pr.position_weight != nullptr && pos.valid)
    pos.pos_weight = pos.weight * pr.position_weight[pos.n * pr.stride_wn + pos.s * pr.stride_ws];
  pos.q = static_cast<uint64_t>(pr.offset + p);
  return pos;
}

// z_k += v(word k) * w_k for the four classes of one group (w_k = 0 past C keeps z = -inf).
template <int KIND>
__device__ __forceinline__ void add_variation(float z[4], const float w[4], uint64_t q, uint32_t g,
                                              uint64_t seed, const BlvProblem& pr) {
  if constexpr (KIND != kNoVariation) {
    uint32_t words[4];
    philox_words(words, q, g, seed);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      z[k] += variation<KIND>(words[k], pr.scale, pr.threshold, pr.clamp_mode != 0) * w[k];
  }
}

// Online softmax: fold four logits into (m, d), d = sum exp(z - m). While every z so far is
// -inf the shift is 0, so exp(-inf - 0) = 0 rather than NaN; a +inf or NaN logit makes d NaN.
__device__ __forceinline__ void softmax_add4(float& m, float& d, const float z[4]) {
  const float m_new = fmaxf(m, fmaxf(fmaxf(z[0], z[1]), fmaxf(z[2], z[3])));
  const float shift = m_new == -INFINITY ? 0.0f : m_new;
  d = d * fast_exp(m - shift) +
      ((fast_exp(z[0] - shift) + fast_exp(z[1] - shift)) + (fast_exp(z[2] - shift) + fast_exp(z[3] - shift)));
  m = m_new;
}

__device__ __forceinline__ void softmax_merge(float& m, float& d, float m2, float d2) {
  const float m_new = fmaxf(m, m2);
  const float shift = m_new == -INFINITY ? 0.0f : m_new;
  d = d * fast_exp(m - shift) + d2 * fast_exp(m2 - shift);
  m = m_new;
}

// Block sums in a fixed order (warp tree, then warp 0 over the warps): one row per block.
__device__ __forceinline__ void store_block_sums(float loss, float weight, int bad, float* partial,
                                                 int32_t* num_bad) {
  __shared__ float s_loss[kWarps], s_weight[kWarps];
  __shared__ int s_bad[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    loss += __shfl_down_sync(kFullMask, loss, o);
    weight += __shfl_down_sync(kFullMask, weight, o);
    bad += __shfl_down_sync(kFullMask, bad, o);
  }
  if (lane == 0) {
    s_loss[warp] = loss;
    s_weight[warp] = weight;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (warp == 0) {
    loss = lane < kWarps ? s_loss[lane] : 0.0f;
    weight = lane < kWarps ? s_weight[lane] : 0.0f;
    bad = lane < kWarps ? s_bad[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      loss += __shfl_down_sync(kFullMask, loss, o);
      weight += __shfl_down_sync(kFullMask, weight, o);
      bad += __shfl_down_sync(kFullMask, bad, o);
    }
    if (lane == 0) {
      partial[2 * static_cast<int64_t>(blockIdx.x)] = loss;
      partial[2 * static_cast<int64_t>(blockIdx.x) + 1] = weight;
      num_bad[blockIdx.x] = bad;
    }
  }
}

// ------------------------------------------------------------------ positions layout

// Positions per thread: VECTOR reads 16 bytes of consecutive pixels per class.
template <typename T, bool VECTOR>
__host__ __device__ constexpr int positions_per_thread() { return VECTOR ? 16 / static_cast<int>(sizeof(T)) : 1; }

// Logits of classes 4g..4g+3 at the thread's VEC positions (-inf past C), and their w_c.
template <typename T, int VEC, int KIND>
__device__ __forceinline__ void load_group(const T* x, int64_t g, const BlvProblem& pr, float b_x[4][VEC],
                                           float w[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t c = 4 * g + k;
    w[k] = 0.0f;
    if (c < pr.C) {
      load_pack<T, VEC>(x + c * pr.stride_xc, b_x[k]);
      if constexpr (KIND != kNoVariation) w[k] = pr.variation_weight[c];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) b_x[k][j] = -INFINITY;
    }
  }
}

template <typename T, bool VECTOR, int KIND>
__global__ void __launch_bounds__(kThreads)
    fwd_positions_kernel(const BlvProblem pr, T* loss, float* lse, float* partial, int32_t* num_bad) {
  constexpr int VEC = positions_per_thread<T, VECTOR>();
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  float sum_loss = 0.0f, sum_weight = 0.0f;
  int bad = 0;
  if (p0 < pr.N * pr.S) {  // VECTOR: S % VEC == 0, so all VEC positions exist and share n
    Position pos[VEC];
    float m[VEC], d[VEC], zt[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      pos[j] = load_position(pr, p0 + j);
      m[j] = -INFINITY;
      d[j] = 0.0f;
      zt[j] = 0.0f;
    }
    const T* x = static_cast<const T*>(pr.logits) + pos[0].n * pr.stride_xn + pos[0].s * pr.stride_xs;
    const uint64_t seed = KIND != kNoVariation ? static_cast<uint64_t>(*pr.seed) : 0;
    for (int64_t g = 0; 4 * g < pr.C; ++g) {
      float b_x[4][VEC], w[4];
      load_group<T, VEC, KIND>(x, g, pr, b_x, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float z[4] = {b_x[0][j], b_x[1][j], b_x[2][j], b_x[3][j]};
        add_variation<KIND>(z, w, pos[j].q, static_cast<uint32_t>(g), seed, pr);
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (pos[j].label == 4 * g + k) zt[j] = z[k];
        softmax_add4(m[j], d[j], z);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float b_lse = m[j] + logf(d[j]);
      lse[p0 + j] = b_lse;
      const float l = pos[j].valid ? (b_lse - zt[j]) * pos[j].pos_weight : 0.0f;
      if (loss != nullptr) loss[p0 + j] = from_float<T>(l);
      sum_loss += l;
      sum_weight += pos[j].weight;
      bad += pos[j].bad;
    }
  }
  store_block_sums(sum_loss, sum_weight, bad, partial, num_bad);
}

template <typename T, bool VECTOR, int KIND>
__global__ void __launch_bounds__(kThreads)
    bwd_positions_kernel(const BlvProblem pr, const float* grad_loss, int64_t stride_gn, int64_t stride_gs,
                         const float* denom, const float* lse, T* grad, int64_t stride_dn, int64_t stride_dc,
                         int64_t stride_ds) {
  constexpr int VEC = positions_per_thread<T, VECTOR>();
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (p0 >= pr.N * pr.S) return;
  Position pos[VEC];
  float b_lse[VEC], coef[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    pos[j] = load_position(pr, p0 + j);
    b_lse[j] = lse[p0 + j];
    // coef = dL/dl * weight * position weight (/ denom for "mean"); 0 where not valid
    float g = grad_loss[pos[j].n * stride_gn + pos[j].s * stride_gs];
    if (denom != nullptr) g = g / *denom;
    coef[j] = pos[j].valid ? g * pos[j].pos_weight : 0.0f;
  }
  const T* x = static_cast<const T*>(pr.logits) + pos[0].n * pr.stride_xn + pos[0].s * pr.stride_xs;
  T* dx = grad + pos[0].n * stride_dn + pos[0].s * stride_ds;
  const uint64_t seed = KIND != kNoVariation ? static_cast<uint64_t>(*pr.seed) : 0;
  for (int64_t g = 0; 4 * g < pr.C; ++g) {
    float b_x[4][VEC], w[4];
    load_group<T, VEC, KIND>(x, g, pr, b_x, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float z[4] = {b_x[0][j], b_x[1][j], b_x[2][j], b_x[3][j]};
      add_variation<KIND>(z, w, pos[j].q, static_cast<uint32_t>(g), seed, pr);
#pragma unroll
      for (int k = 0; k < 4; ++k) b_x[k][j] = z[k];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t c = 4 * g + k;
      if (c < pr.C) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          out[j] = (fast_exp(b_x[k][j] - b_lse[j]) - (pos[j].label == c ? 1.0f : 0.0f)) * coef[j];
        store_pack<T, VEC>(dx + c * stride_dc, out);
      }
    }
  }
}

// ------------------------------------------------------------------ rows layout

// Classes 4g..4g+3 of one position: one 4-element load when VECTOR (class stride 1, C % 4 == 0).
template <typename T, bool VECTOR, int KIND>
__device__ __forceinline__ void load_row_group(const T* x, int64_t g, const BlvProblem& pr, float z[4],
                                               float w[4]) {
  if constexpr (VECTOR) {
    load_pack<T, 4>(x + 4 * g, z);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t c = 4 * g + k;
    w[k] = 0.0f;
    if (c < pr.C) {
      if constexpr (!VECTOR) z[k] = to_float(x[c * pr.stride_xc]);
      if constexpr (KIND != kNoVariation) w[k] = pr.variation_weight[c];
    } else {
      z[k] = -INFINITY;
    }
  }
}

template <typename T, bool VECTOR, int KIND>
__global__ void __launch_bounds__(kThreads)
    fwd_rows_kernel(const BlvProblem pr, T* loss, float* lse, float* partial, int32_t* num_bad) {
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  float sum_loss = 0.0f, sum_weight = 0.0f;
  int bad = 0;
  if (p < pr.N * pr.S) {  // the same for the whole warp: the shuffles below see 32 lanes
    const Position pos = load_position(pr, p);
    const T* x = static_cast<const T*>(pr.logits) + pos.n * pr.stride_xn + pos.s * pr.stride_xs;
    const uint64_t seed = KIND != kNoVariation ? static_cast<uint64_t>(*pr.seed) : 0;
    float m = -INFINITY, d = 0.0f, zt = 0.0f;
    for (int64_t g = lane; 4 * g < pr.C; g += 32) {
      float z[4], w[4];
      load_row_group<T, VECTOR, KIND>(x, g, pr, z, w);
      add_variation<KIND>(z, w, pos.q, static_cast<uint32_t>(g), seed, pr);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (pos.label == 4 * g + k) zt = z[k];
      softmax_add4(m, d, z);
    }
    // merge the lanes' (m, d); z_t is held by at most one lane, the others hold 0
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, m, o);
      const float d2 = __shfl_xor_sync(kFullMask, d, o);
      softmax_merge(m, d, m2, d2);
      zt += __shfl_xor_sync(kFullMask, zt, o);
    }
    if (lane == 0) {
      const float b_lse = m + logf(d);
      lse[p] = b_lse;
      const float l = pos.valid ? (b_lse - zt) * pos.pos_weight : 0.0f;
      if (loss != nullptr) loss[p] = from_float<T>(l);
      sum_loss = l;
      sum_weight = pos.weight;
      bad = pos.bad;
    }
  }
  store_block_sums(sum_loss, sum_weight, bad, partial, num_bad);
}

template <typename T, bool VECTOR, int KIND>
__global__ void __launch_bounds__(kThreads)
    bwd_rows_kernel(const BlvProblem pr, const float* grad_loss, int64_t stride_gn, int64_t stride_gs,
                    const float* denom, const float* lse, T* grad, int64_t stride_dn, int64_t stride_dc,
                    int64_t stride_ds) {
  const int lane = threadIdx.x & 31;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (p >= pr.N * pr.S) return;
  const Position pos = load_position(pr, p);
  const float b_lse = lse[p];
  float g_out = grad_loss[pos.n * stride_gn + pos.s * stride_gs];
  if (denom != nullptr) g_out = g_out / *denom;
  const float coef = pos.valid ? g_out * pos.pos_weight : 0.0f;
  const T* x = static_cast<const T*>(pr.logits) + pos.n * pr.stride_xn + pos.s * pr.stride_xs;
  T* dx = grad + pos.n * stride_dn + pos.s * stride_ds;
  const uint64_t seed = KIND != kNoVariation ? static_cast<uint64_t>(*pr.seed) : 0;
  for (int64_t g = lane; 4 * g < pr.C; g += 32) {
    float z[4], w[4], out[4];
    load_row_group<T, VECTOR, KIND>(x, g, pr, z, w);
    add_variation<KIND>(z, w, pos.q, static_cast<uint32_t>(g), seed, pr);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = (fast_exp(z[k] - b_lse) - (pos.label == 4 * g + k ? 1.0f : 0.0f)) * coef;
    if constexpr (VECTOR) {
      store_pack<T, 4>(dx + 4 * g, out);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        if (4 * g + k < pr.C) dx[(4 * g + k) * stride_dc] = from_float<T>(out[k]);
    }
  }
}

// ------------------------------------------------------------------ launch plans

struct Plan {
  bool rows;     // warp per position, else thread per position(s)
  bool vector;   // the aligned wide-access variant
  int64_t blocks;
};

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// dx == nullptr: the forward (only the logits' layout matters); else the gradient's strides too.
template <typename T>
Plan plan(const BlvProblem& pr, const void* dx, int64_t stride_dn, int64_t stride_dc, int64_t stride_ds) {
  const int64_t positions = pr.N * pr.S;
  Plan out;
  out.rows = pr.stride_xc == 1 && (pr.S == 1 || pr.stride_xs != 1) && pr.C >= kRowsMinClasses;
  if (out.rows) {  // 4 classes of one group per access: base, batch and pixel strides multiples of 4
    const int64_t bytes = 4 * sizeof(T);
    out.vector = pr.C % 4 == 0 && aligned(pr.logits, bytes) && pr.stride_xn % 4 == 0 &&
                 (pr.S == 1 || pr.stride_xs % 4 == 0);
    if (dx != nullptr)
      out.vector = out.vector && stride_dc == 1 && aligned(dx, bytes) && stride_dn % 4 == 0 &&
                   (pr.S == 1 || stride_ds % 4 == 0);
    out.blocks = (positions + kWarps - 1) / kWarps;
    return out;
  }
  // VEC pixels per access: contiguous pixels, S, batch and class strides multiples of VEC
  const int64_t vec = positions_per_thread<T, true>();
  out.vector = pr.stride_xs == 1 && pr.S % vec == 0 && pr.stride_xc % vec == 0 && pr.stride_xn % vec == 0 &&
               aligned(pr.logits, 16);
  if (dx != nullptr)
    out.vector = out.vector && stride_ds == 1 && stride_dc % vec == 0 && stride_dn % vec == 0 && aligned(dx, 16);
  const int64_t per_block = kThreads * (out.vector ? vec : 1);
  out.blocks = (positions + per_block - 1) / per_block;
  return out;
}

int variation_kind(const BlvProblem& pr) {
  if (!(pr.scale > 0.0f)) return kNoVariation;
  return pr.use_poly ? kPolyErfinv : kGilesErfinv;
}

// Calls f(bool_constant<VECTOR>, integral_constant<KIND>) for the runtime values.
template <typename F>
void dispatch(bool vector, int kind, F&& f) {
  using P = std::integral_constant<int, kPolyErfinv>;
  using G = std::integral_constant<int, kGilesErfinv>;
  using N = std::integral_constant<int, kNoVariation>;
  if (vector) {
    if (kind == kPolyErfinv) f(std::true_type{}, P{});
    else if (kind == kGilesErfinv) f(std::true_type{}, G{});
    else f(std::true_type{}, N{});
  } else {
    if (kind == kPolyErfinv) f(std::false_type{}, P{});
    else if (kind == kGilesErfinv) f(std::false_type{}, G{});
    else f(std::false_type{}, N{});
  }
}

template <typename T>
cudaError_t fwd(const BlvProblem& pr, void* loss, float* lse, float* partial, int32_t* num_bad,
                cudaStream_t stream) {
  const Plan pl = plan<T>(pr, nullptr, 0, 0, 0);
  if (pl.blocks == 0) return cudaSuccess;
  if (pl.blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  T* loss_t = static_cast<T*>(loss);
  dispatch(pl.vector, variation_kind(pr), [&](auto vector, auto kind) {
    constexpr bool V = decltype(vector)::value;
    constexpr int K = decltype(kind)::value;
    if (pl.rows)
      fwd_rows_kernel<T, V, K><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(pr, loss_t, lse, partial,
                                                                                          num_bad);
    else
      fwd_positions_kernel<T, V, K><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(pr, loss_t, lse,
                                                                                               partial, num_bad);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const BlvProblem& pr, const float* grad_loss, int64_t stride_gn, int64_t stride_gs,
                const float* denom, const float* lse, void* grad, int64_t stride_dn, int64_t stride_dc,
                int64_t stride_ds, cudaStream_t stream) {
  const Plan pl = plan<T>(pr, grad, stride_dn, stride_dc, stride_ds);
  if (pl.blocks == 0) return cudaSuccess;
  if (pl.blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  T* dx = static_cast<T*>(grad);
  dispatch(pl.vector, variation_kind(pr), [&](auto vector, auto kind) {
    constexpr bool V = decltype(vector)::value;
    constexpr int K = decltype(kind)::value;
    if (pl.rows)
      bwd_rows_kernel<T, V, K><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
          pr, grad_loss, stride_gn, stride_gs, denom, lse, dx, stride_dn, stride_dc, stride_ds);
    else
      bwd_positions_kernel<T, V, K><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
          pr, grad_loss, stride_gn, stride_gs, denom, lse, dx, stride_dn, stride_dc, stride_ds);
  });
  return cudaGetLastError();
}

}  // namespace
}  // namespace blv

extern "C" int64_t blv_ce_fwd_num_partials(const BlvProblem* problem) {
  switch (problem->logits_dtype) {
    case BLV_FLOAT16: return blv::plan<__half>(*problem, nullptr, 0, 0, 0).blocks;
    case BLV_BFLOAT16: return blv::plan<__nv_bfloat16>(*problem, nullptr, 0, 0, 0).blocks;
    default: return blv::plan<float>(*problem, nullptr, 0, 0, 0).blocks;
  }
}

extern "C" cudaError_t blv_ce_fwd_cuda(const BlvProblem* problem, void* loss, float* lse, float* partial,
                                       int32_t* num_bad, cudaStream_t stream) {
  switch (problem->logits_dtype) {
    case BLV_FLOAT32: return blv::fwd<float>(*problem, loss, lse, partial, num_bad, stream);
    case BLV_FLOAT16: return blv::fwd<__half>(*problem, loss, lse, partial, num_bad, stream);
    case BLV_BFLOAT16: return blv::fwd<__nv_bfloat16>(*problem, loss, lse, partial, num_bad, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t blv_ce_bwd_cuda(const BlvProblem* problem, const float* grad_loss, int64_t stride_gn,
                                       int64_t stride_gs, const float* denom, const float* lse, void* grad,
                                       int64_t stride_dn, int64_t stride_dc, int64_t stride_ds,
                                       cudaStream_t stream) {
  switch (problem->logits_dtype) {
    case BLV_FLOAT32:
      return blv::bwd<float>(*problem, grad_loss, stride_gn, stride_gs, denom, lse, grad, stride_dn, stride_dc,
                             stride_ds, stream);
    case BLV_FLOAT16:
      return blv::bwd<__half>(*problem, grad_loss, stride_gn, stride_gs, denom, lse, grad, stride_dn, stride_dc,
                              stride_ds, stream);
    case BLV_BFLOAT16:
      return blv::bwd<__nv_bfloat16>(*problem, grad_loss, stride_gn, stride_gs, denom, lse, grad, stride_dn,
                                     stride_dc, stride_ds, stream);
    default: return cudaErrorInvalidValue;
  }
}
