// Fused BLV cross-entropy in CUDA: the C interface of blv_kernel.h (math, reductions, denom
// there). The variation is generated in registers; the loss pass reads the logits once and, with
// `grad`, writes the gradient in the same pass.
//
// Work split. A group of L lanes (L = 1, 2, 4, ..., 32, consecutive in a warp) owns one item,
// and lane l of it owns the Philox groups g = l, l + L, l + 2L, ... (classes 4g..4g+3), so
// every Philox call serves four classes:
//
// - pixel layout (pixels contiguous: NCHW; or no contiguous axis at all): an item is 4
//   consecutive positions of one image, s0 = 4i.. (the last item of an image may hold fewer).
//   A class's 4 values are one 16-byte (fp32) or 8-byte (fp16/bf16) access.
// - class layout (classes contiguous: channels_last, (N, C) rows): an item is one position; the
//   4 classes of a group are one 16-/8-byte access.
//
// L is the smallest power of two for which the lanes hold the whole class row in registers,
// J = kPixelGroups (pixel: J*4*4 = 80 floats) or kClassGroups (class: J*4 = 32 floats) groups a
// lane; then each element's noise, transform and exp are computed once: z = x + v*w into
// registers, m = max over the row (lanes merged by shuffles), e = exp(z - m) in place, d = sum e,
// then the loss and, from the same e, the gradient. Lanes hold ceil(G/L) of G groups, so the
// busy share is G / (L ceil(G/L)) (C = 19: 5 of 5 slots; C = 150: 38 of 40; C = 1000: 250 of
// 256). A row longer than 32 lanes hold (pixel C > 640, class C > 1024) is streamed instead:
// online (m, d) in a first sweep, and with `grad` a second sweep that re-reads the logits and
// regenerates the noise (twice the noise and exp work, 1.5x the bytes: the price of a row that
// fits nowhere on chip). The resident pixel row needs about 150 registers a thread: blocks of
// 128 threads, 3 per SM (12 warps); the other kernels fit 128 registers, 4 blocks or more.
//
// Vector accesses need no alignment of the tensor: 4 elements at any element-aligned address
// are read as the one or two aligned vectors that hold them, funnel-shifted (crops such as
// 769x769 put every class row of an NCHW tensor at another alignment), and written as one vector
// where aligned, else as two 2-element or 1 + 2 + 1 element stores. A tail item (S % 4
// positions, or a group of C % 4 classes) and strided axes use scalar accesses.
//
// The erfinv variant is read from the device (variation_params), so a new sigma needs no new
// launch configuration (a captured CUDA graph replays it): one uniform branch per Philox group
// picks the polynomial or the Giles instantiation of the transform, or none for sigma = 0; the
// loads, exp and gradient code around it exist once. exp(z - m) is one ex2.approx.ftz (its
// argument is <= 0: a term flushed to 0 below 2^-126 is 0 next to d >= 1 in float32 too).
// Block sums are a shuffle tree then warp 0 over the warps: deterministic, no atomics.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blv_kernel.h"
#include "blv_math.h"

// Every launch goes through this macro: BLV_LAUNCH(grid, block, stream, kernel)(args...). The
// tests' CUDA emulation (tests/emulated_cuda) defines it first, to run this source on the host.
#ifndef BLV_LAUNCH
#define BLV_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif

namespace blv {
namespace {

constexpr int kThreads = 256;      // label pass, gradient scaling
constexpr int kLossThreads = 128;  // loss pass
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRun = 4;          // elements of one vector access = classes of one Philox call
constexpr int kPixelGroups = 5;  // J of the pixel layout: 5 groups x 4 classes x 4 positions
constexpr int kClassGroups = 8;  // J of the class layout: 8 groups x 4 classes
constexpr int kLabelsPerThread = 4;
constexpr int kScaleBlocks = 2048;  // grid-stride cap of the gradient scaling
constexpr float kLog2e = 1.4426950408889634f;

enum Status : int { kOk = 0, kBadDtype = 1, kBadProblem = 2, kGridTooLarge = 3, kCudaError = 1000 };

// ------------------------------------------------------------------ elements and vectors

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
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 2^x by the SFU with subnormal results flushed to 0 (ex2.approx.ftz: one MUFU.EX2; exp2f and
// __expf add a subnormal fix-up of three instructions). Used for exp(z - m) with z - m <= 0,
// next to d >= 1: a term below 2^-126 is 0 in float32 sums anyway. A host build (the tests'
// emulation) takes exp2f.
__device__ __forceinline__ float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// exp(x) for x <= 0 (see exp2_ftz).
__device__ __forceinline__ float exp_nonpositive(float x) { return exp2_ftz(x * kLog2e); }

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// Four elements of T as one aligned vector of kWords 32-bit words (uint4: fp32; uint2: halves):
// loaded by one __ldg (read-only path), stored by one __stcs (evict-first: the gradient is written
// once, and at training sizes it is far larger than L2), and so are two of them (store_pair).
template <typename T>
struct Run;

template <>
struct Run<float> {
  static constexpr int kWords = 4;
  __device__ __forceinline__ static void load(const uint32_t* p, uint32_t w[4]) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  }
  __device__ __forceinline__ static void unpack(const uint32_t w[], float f[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
  }
  __device__ __forceinline__ static void store(float* p, const float f[4]) {
    __stcs(reinterpret_cast<uint4*>(p),
           make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3])));
  }
  __device__ __forceinline__ static void store_pair(float* p, float a, float b) {
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(__float_as_uint(a), __float_as_uint(b)));
  }
};

// fp16 and bf16: a word holds two elements, converted pairwise (one F2FP per pair on sm_80+).
template <typename T, typename T2>
struct HalfRun {
  static constexpr int kWords = 2;
  __device__ __forceinline__ static float2 to_float2(uint32_t w);
  __device__ __forceinline__ static uint32_t pack(float a, float b);
  __device__ __forceinline__ static void load(const uint32_t* p, uint32_t w[2]) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x, w[1] = v.y;
  }
  __device__ __forceinline__ static void unpack(const uint32_t w[], float f[4]) {
    const float2 lo = to_float2(w[0]), hi = to_float2(w[1]);
    f[0] = lo.x, f[1] = lo.y, f[2] = hi.x, f[3] = hi.y;
  }
  __device__ __forceinline__ static void store(T* p, const float f[4]) {
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(pack(f[0], f[1]), pack(f[2], f[3])));
  }
  __device__ __forceinline__ static void store_pair(T* p, float a, float b) {
    __stcs(reinterpret_cast<unsigned int*>(p), pack(a, b));
  }
};

template <>
__device__ __forceinline__ float2 HalfRun<__half, __half2>::to_float2(uint32_t w) {
  return __half22float2(bit_cast<__half2>(w));
}
template <>
__device__ __forceinline__ uint32_t HalfRun<__half, __half2>::pack(float a, float b) {
  return bit_cast<uint32_t>(__floats2half2_rn(a, b));
}
template <>
__device__ __forceinline__ float2 HalfRun<__nv_bfloat16, __nv_bfloat162>::to_float2(uint32_t w) {
  return __bfloat1622float2(bit_cast<__nv_bfloat162>(w));
}
template <>
__device__ __forceinline__ uint32_t HalfRun<__nv_bfloat16, __nv_bfloat162>::pack(float a, float b) {
  return bit_cast<uint32_t>(__floats2bfloat162_rn(a, b));
}

template <>
struct Run<__half> : HalfRun<__half, __half2> {};
template <>
struct Run<__nv_bfloat16> : HalfRun<__nv_bfloat16, __nv_bfloat162> {};

// w[0..W) = bytes [shift, shift + 4W) of w[0..2W); shift is a multiple of the element size.
template <int W>
__device__ __forceinline__ void funnel(uint32_t w[], uint32_t shift) {
  if constexpr (W == 4) {
#pragma unroll
    for (int i = 0; i < 6; ++i) w[i] = (shift & 8) ? w[i + 2] : w[i];
  }
#pragma unroll
  for (int i = 0; i < W + 1; ++i) w[i] = (shift & 4) ? w[i + 1] : w[i];
  if constexpr (W == 2) {
#pragma unroll
    for (int i = 0; i < 2; ++i) w[i] = (shift & 2) ? __funnelshift_r(w[i], w[i + 1], 16) : w[i];
  }
}

// The 4 elements at p (aligned to sizeof(T) only): the aligned vector at p, or the two aligned
// vectors that hold [p, p + 4) funnel-shifted. Each holds one of the 4 elements: nothing outside
// their 16-byte (8-byte) blocks is read.
template <typename T>
__device__ __forceinline__ void load_run(const T* p, float out[kRun]) {
  using R = Run<T>;
  const uint32_t shift = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)) & (kRun * sizeof(T) - 1);
  const uint32_t* base = reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(p) - shift);
  uint32_t w[2 * R::kWords];
  R::load(base, w);
  if (shift != 0) {
    R::load(base + R::kWords, w + R::kWords);
    funnel<R::kWords>(w, shift);
  }
  R::unpack(w, out);
}

// The 4 elements at p: one vector store where aligned, else aligned 2-element and 1-element stores.
template <typename T>
__device__ __forceinline__ void store_run(T* p, const float v[kRun]) {
  using R = Run<T>;
  const uint32_t a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) / sizeof(T)) & (kRun - 1);
  if (a == 0) {
    R::store(p, v);
  } else if (a == 2) {
    R::store_pair(p, v[0], v[1]);
    R::store_pair(p + 2, v[2], v[3]);
  } else {  // p + 1 is 2-element aligned
    p[0] = from_float<T>(v[0]);
    R::store_pair(p + 1, v[1], v[2]);
    p[3] = from_float<T>(v[3]);
  }
}

// A run known to be vector-aligned (ALIGNED: one load or store, no alignment test), or any run.
// ptxas predicates the funnel rather than branch around it, so an aligned run would pay for its
// selects: the choice is made per tensor on the host instead (LossArgs::x_aligned, dx_aligned).
template <bool ALIGNED, typename T>
__device__ __forceinline__ void load_vector(const T* p, float out[kRun]) {
  if constexpr (ALIGNED) {
    uint32_t w[Run<T>::kWords];
    Run<T>::load(reinterpret_cast<const uint32_t*>(p), w);
    Run<T>::unpack(w, out);
  } else {
    load_run(p, out);
  }
}

template <bool ALIGNED, typename T>
__device__ __forceinline__ void store_vector(T* p, const float v[kRun]) {
  if constexpr (ALIGNED)
    Run<T>::store(p, v);
  else
    store_run(p, v);
}

// 4 elements along a strided axis, the first `count` present; `pad` for the others.
template <typename T>
__device__ __forceinline__ void load_strided(const T* p, int64_t stride, int count, float pad, float out[kRun]) {
#pragma unroll
  for (int i = 0; i < kRun; ++i) out[i] = i < count ? to_float(p[i * stride]) : pad;
}

template <typename T>
__device__ __forceinline__ void store_strided(T* p, int64_t stride, int count, const float v[kRun]) {
#pragma unroll
  for (int i = 0; i < kRun; ++i)
    if (i < count) p[i * stride] = from_float<T>(v[i]);
}

// The 4 float32 values of group g of a (C,) vector (w_c, cw_c), 0 past C.
__device__ __forceinline__ void load_class_values(const float* v, int g, int C, float out[kRun]) {
  if (4 * g + kRun <= C)
    load_run(v + 4 * g, out);
  else
    load_strided(v + 4 * g, 1, C - 4 * g, 0.0f, out);
}

// ------------------------------------------------------------------ reductions

// Over the L lanes of a group (aligned within the warp): a butterfly, so every lane combines the
// same pairs and gets the same bits. Every lane of the warp must call these (L is uniform).
__device__ __forceinline__ float lanes_max(float v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

__device__ __forceinline__ float lanes_sum(float v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The sum over a block of WARPS warps in a fixed order (a shuffle tree in each warp, then warp 0
// over the warps), in thread 0. Every thread of the block must call it.
template <int WARPS, typename V>
__device__ __forceinline__ V block_sum(V v) {
  static_assert(WARPS <= kWarpSize && (WARPS & (WARPS - 1)) == 0, "a power-of-two warp count");
  __shared__ V warp_sums[WARPS];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < WARPS ? warp_sums[lane] : V(0);
#pragma unroll
    for (int o = WARPS / 2; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  }
  return v;
}

// ------------------------------------------------------------------ label pass

__global__ void __launch_bounds__(kThreads) label_kernel(const BlvProblem pr, float* weight_sums, int32_t* bad_counts) {
  const int64_t positions = pr.N * pr.S;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kLabelsPerThread;
  float weight = 0.0f;
  int bad = 0;
  if (p0 < positions) {
    // one division, in 32 bits where the positions fit; then step s, wrapping to the next image
    int64_t n = positions <= UINT32_MAX ? static_cast<uint32_t>(p0) / static_cast<uint32_t>(pr.S) : p0 / pr.S;
    int64_t s = p0 - n * pr.S;
#pragma unroll
    for (int i = 0; i < kLabelsPerThread; ++i) {
      if (p0 + i < positions) {
        const int64_t t = load_label(pr.target, pr.target_dtype, n * pr.stride_tn + s * pr.stride_ts);
        const bool labelled = t != pr.ignore_index, in_range = t >= 0 && t < pr.C;
        if (labelled && in_range) weight += pr.class_weight != nullptr ? pr.class_weight[t] : 1.0f;
        bad += labelled && !in_range;
        if (++s == pr.S) s = 0, ++n;
      }
    }
  }
  weight = block_sum<kThreads / kWarpSize>(weight);
  bad = block_sum<kThreads / kWarpSize>(bad);
  if (threadIdx.x == 0) {
    weight_sums[blockIdx.x] = weight;
    bad_counts[blockIdx.x] = bad;
  }
}

// ------------------------------------------------------------------ loss pass

struct LossArgs {
  const float* denom;  // "mean": the divisor; else NULL
  void* loss_per_position;
  float* loss_sums;
  void* grad;
  int64_t stride_gn, stride_gc, stride_gs;
  int64_t items, per_image;  // items (chunks of 4 positions, or positions), per image
  int lanes;                 // L
  int groups;                // G = ceil(C / 4)
  bool x_aligned, dx_aligned;  // every 4-element run of the logits (gradient) starts at a vector boundary
};

// One item's positions (P = 4 in the pixel layout, 1 in the class layout).
template <int P>
struct Item {
  int64_t n, s0;         // image, first position
  int64_t x_at, grad_at;  // the element offsets of x[n, 0, s0] and grad[n, 0, s0]
  int count;              // positions present (a tail item has fewer), 0 past the last item
  uint64_t q0;            // Philox counter of the first: offset + n*S + s0
  int label[P];   // the label where valid, else -1: matches no class
};

template <int P>
__device__ __forceinline__ Item<P> make_item(const LossArgs& a, const BlvProblem& pr, int64_t k) {
  Item<P> it;
  it.count = 0;
  it.n = it.s0 = 0;
  if (k < a.items) {
    // one division per thread, in 32 bits where the indices fit
    it.n = a.items <= UINT32_MAX ? static_cast<uint32_t>(k) / static_cast<uint32_t>(a.per_image) : k / a.per_image;
    it.s0 = (k - it.n * a.per_image) * P;
    it.count = static_cast<int>(min(static_cast<int64_t>(P), pr.S - it.s0));
  }
  it.q0 = static_cast<uint64_t>(pr.offset + it.n * pr.S + it.s0);
  it.x_at = it.n * pr.stride_xn + it.s0 * pr.stride_xs;
  it.grad_at = it.n * a.stride_gn + it.s0 * a.stride_gs;
  return it;
}

// The item's labels, read once its logits are in registers (registers are short before). An
// out-of-range label is never used as an index: -1 like ignore_index.
template <int P>
__device__ __forceinline__ void load_labels(const BlvProblem& pr, Item<P>& it) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    it.label[p] = -1;
    if (p < it.count) {
      const int64_t t = load_label(pr.target, pr.target_dtype, it.n * pr.stride_tn + (it.s0 + p) * pr.stride_ts);
      if (t != pr.ignore_index && t >= 0 && t < pr.C) it.label[p] = static_cast<int>(t);
    }
  }
}

// The logits of group g: z[k][p] = x[c = 4g + k, s0 + p]; -inf for a class past C (it adds 0 to
// d), 0 for a position past the item's count (never stored). Runs are single vector accesses
// where the 4 positions of a class are contiguous and present (pixel), or the classes contiguous.
template <bool ALIGNED, typename T, bool PIXEL, int P>
__device__ __forceinline__ void load_group(const BlvProblem& pr, const Item<P>& it, int g, float z[kRun][P]) {
  // class 4g; the next classes a stride on (no multiply each)
  const T* row = static_cast<const T*>(pr.logits) + it.x_at + 4 * g * pr.stride_xc;
  if constexpr (PIXEL) {
    const bool runs = pr.stride_xs == 1 && it.count == kRun;
    const int C = static_cast<int>(pr.C);
#pragma unroll
    for (int k = 0; k < kRun; ++k, row += pr.stride_xc) {
      if (4 * g + k < C) {
        if (runs)
          load_vector<ALIGNED>(row, z[k]);
        else
          load_strided(row, pr.stride_xs, it.count, 0.0f, z[k]);
      } else {
#pragma unroll
        for (int p = 0; p < P; ++p) z[k][p] = -INFINITY;
      }
    }
  } else {
    float v[kRun];
    if (pr.stride_xc == 1 && 4 * g + kRun <= pr.C)
      load_vector<ALIGNED>(row, v);
    else
      load_strided(row, pr.stride_xc, static_cast<int>(pr.C) - 4 * g, -INFINITY, v);
#pragma unroll
    for (int k = 0; k < kRun; ++k) z[k][0] = v[k];
  }
}

template <bool ALIGNED, typename T, bool PIXEL, int P>
__device__ __forceinline__ void store_group(const BlvProblem& pr, const LossArgs& a, const Item<P>& it, int g,
                                            const float v[kRun][P]) {
  T* row = static_cast<T*>(a.grad) + it.grad_at + 4 * g * a.stride_gc;
  if constexpr (PIXEL) {
    const bool runs = a.stride_gs == 1 && it.count == kRun;
    const int C = static_cast<int>(pr.C);
#pragma unroll
    for (int k = 0; k < kRun; ++k, row += a.stride_gc) {
      if (4 * g + k < C) {
        if (runs)
          store_vector<ALIGNED>(row, v[k]);
        else
          store_strided(row, a.stride_gs, it.count, v[k]);
      }
    }
  } else {
    const float w[kRun] = {v[0][0], v[1][0], v[2][0], v[3][0]};
    if (a.stride_gc == 1 && 4 * g + kRun <= pr.C)
      store_vector<ALIGNED>(row, w);
    else
      store_strided(row, a.stride_gc, static_cast<int>(pr.C) - 4 * g, w);
  }
}

struct Noise {
  uint64_t seed;
  float scale, threshold;
  Mode mode;
  int kind;  // kPolyErfinv, kGilesErfinv or kNoVariation: read from variation_params, the same in every thread
};

// z[k][p] += v * w[k], v from word k of Philox(q0 + p, g).
template <int KIND, int P>
__device__ __forceinline__ void add_variation(const Noise& nz, uint64_t q0, int g, const float w[kRun],
                                              float z[kRun][P]) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    uint32_t words[4];
    philox_words(words, q0 + p, static_cast<uint32_t>(g), nz.seed);
#pragma unroll
    for (int k = 0; k < kRun; ++k)
      z[k][p] = fmaf(variation<KIND>(words[k], nz.scale, nz.threshold, nz.mode), w[k], z[k][p]);
  }
}

// The logits of group g with their variation. The alignment and the erfinv variant are uniform
// branches here, per group: the exp and gradient code around them exist once.
template <typename T, bool PIXEL, int P>
__device__ __forceinline__ void perturbed_group(const BlvProblem& pr, const LossArgs& a, const Noise& nz,
                                                const Item<P>& it, int g, float z[kRun][P]) {
  if (a.x_aligned)
    load_group<true, T, PIXEL, P>(pr, it, g, z);
  else
    load_group<false, T, PIXEL, P>(pr, it, g, z);
  if (nz.kind != kNoVariation) {
    float w[kRun];
    load_class_values(pr.variation_weight, g, static_cast<int>(pr.C), w);
    if (nz.kind == kPolyErfinv)
      add_variation<kPolyErfinv, P>(nz, it.q0, g, w, z);
    else
      add_variation<kGilesErfinv, P>(nz, it.q0, g, w, z);
  }
}

// cw_c of group g (1 without class weights), 0 past C.
__device__ __forceinline__ void class_weights(const BlvProblem& pr, int g, float cw[kRun]) {
  if (pr.class_weight != nullptr) {
    load_class_values(pr.class_weight, g, static_cast<int>(pr.C), cw);
  } else {
#pragma unroll
    for (int k = 0; k < kRun; ++k) cw[k] = 4 * g + k < pr.C ? 1.0f : 0.0f;
  }
}

// Per position, once the row is reduced (m, d = sum_c exp(z_c - m), z_t, and for label smoothing
// A = sum_c cw_c (m - z_c), W = sum_c cw_c): the loss, stored per position for "none", and the
// gradient's coefficients  dloss/dx_c = alpha e_c - beta [c == t] - gamma cw_c  (e_c = exp(z_c - m);
// all 0 where not valid). Returns the item's loss sum in its lane 0, 0 in the other lanes.
template <int P>
struct Coefficients {
  float alpha[P], beta[P], gamma[P];
};

// The per-position losses of an item, in L (float32 or the logits' type): one vector run where it
// is a whole pixel run.
template <bool PIXEL, typename L>
__device__ __forceinline__ void store_losses(L* out, int count, const float* loss) {
  if (PIXEL && count == kRun)
    store_run(out, loss);
  else
    store_strided(out, 1, count, loss);
}

template <typename T, bool PIXEL, int P>
__device__ __forceinline__ float finish(const BlvProblem& pr, const LossArgs& a, const Item<P>& it, bool leader,
                                        const float m[P], const float d[P], const float zt[P], const float A[P],
                                        float W, Coefficients<P>& co) {
  const float eps = pr.label_smoothing, keep = 1.0f - eps, C = static_cast<float>(pr.C);
  const bool smooth = eps > 0.0f;
  const float denom = a.denom != nullptr ? *a.denom : 1.0f;
  float loss[P], sum = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int t = it.label[p];
    const bool valid = t >= 0;
    const float cw_t = !valid ? 0.0f : pr.class_weight != nullptr ? pr.class_weight[t] : 1.0f;
    const float pw = pr.position_weight != nullptr && p < it.count
                         ? pr.position_weight[it.n * pr.stride_wn + (it.s0 + p) * pr.stride_ws]
                         : 1.0f;
    const float log_d = logf(d[p]);
    float l = 0.0f;
    if (valid) {
      l = keep * cw_t * ((m[p] - zt[p]) + log_d);  // m apart from log d: a shift of all logits cancels
      if (smooth) l += eps / C * (A[p] + W * log_d);
    }
    loss[p] = l * pw;  // a NaN position weight gives NaN even where not valid
    if (p < it.count) sum += loss[p];
    const float scale = valid ? pw / denom : 0.0f;
    co.alpha[p] = scale * (keep * cw_t + (smooth ? eps * W / C : 0.0f)) / d[p];
    co.beta[p] = scale * keep * cw_t;
    co.gamma[p] = scale * eps / C;
  }
  if (!leader) return 0.0f;
  if (a.loss_per_position != nullptr) {  // in loss_dtype: float32, or the logits' T
    const int64_t at = it.n * pr.S + it.s0;
    if (pr.loss_dtype == BLV_FLOAT32)
      store_losses<PIXEL>(static_cast<float*>(a.loss_per_position) + at, it.count, loss);
    else
      store_losses<PIXEL>(static_cast<T*>(a.loss_per_position) + at, it.count, loss);
  }
  return sum;
}

// dloss/dx of group g from e_c (in z), stored.
template <typename T, bool PIXEL, int P>
__device__ __forceinline__ void store_gradient(const BlvProblem& pr, const LossArgs& a, const Item<P>& it, int g,
                                               const Coefficients<P>& co,
                                               const float e[kRun][P]) {
  const bool smooth = pr.label_smoothing > 0.0f;
  float cw[kRun];
  if (smooth) class_weights(pr, g, cw);
  float v[kRun][P];
#pragma unroll
  for (int k = 0; k < kRun; ++k) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      v[k][p] = fmaf(co.alpha[p], e[k][p], 4 * g + k == it.label[p] ? -co.beta[p] : 0.0f);
      if (smooth) v[k][p] = fmaf(-co.gamma[p], cw[k], v[k][p]);
    }
  }
  if (a.dx_aligned)  // uniform
    store_group<true, T, PIXEL, P>(pr, a, it, g, v);
  else
    store_group<false, T, PIXEL, P>(pr, a, it, g, v);
}

// The row in registers: z, then m, then e = exp(z - m) in place of z, once per element.
template <typename T, bool PIXEL>
__device__ __forceinline__ float resident_row(const BlvProblem& pr, const LossArgs& a, const Noise& nz, int64_t k,
                                              int lane) {
  constexpr int P = PIXEL ? kRun : 1;
  constexpr int J = PIXEL ? kPixelGroups : kClassGroups;
  Item<P> it = make_item<P>(a, pr, k);
  const int L = a.lanes, groups = it.count > 0 ? a.groups : 0;
  float z[J][kRun][P], m[P];
#pragma unroll
  for (int p = 0; p < P; ++p) m[p] = -INFINITY;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int g = lane + j * L;
    if (g < groups) {
      perturbed_group<T, PIXEL, P>(pr, a, nz, it, g, z[j]);
#pragma unroll
      for (int c = 0; c < kRun; ++c)
#pragma unroll
        for (int p = 0; p < P; ++p) m[p] = fmaxf(m[p], z[j][c][p]);
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) m[p] = lanes_max(m[p], L);

  const bool smooth = pr.label_smoothing > 0.0f;
  float A[P] = {}, W = 0.0f;
  if (smooth) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int g = lane + j * L;
      if (g < groups) {
        float cw[kRun];
        class_weights(pr, g, cw);
#pragma unroll
        for (int c = 0; c < kRun; ++c) {
          if (4 * g + c < pr.C) {  // not z = -inf past C: 0 * inf
            W += cw[c];
#pragma unroll
            for (int p = 0; p < P; ++p) A[p] = fmaf(cw[c], m[p] - z[j][c][p], A[p]);
          }
        }
      }
    }
    W = lanes_sum(W, L);
#pragma unroll
    for (int p = 0; p < P; ++p) A[p] = lanes_sum(A[p], L);
  }

  load_labels(pr, it);
  float d[P] = {}, zt[P] = {};
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int g = lane + j * L;
    if (g < groups) {
#pragma unroll
      for (int c = 0; c < kRun; ++c) {
#pragma unroll
        for (int p = 0; p < P; ++p) {
          if (4 * g + c == it.label[p]) zt[p] = z[j][c][p];
          z[j][c][p] = exp_nonpositive(z[j][c][p] - m[p]);
          d[p] += z[j][c][p];
        }
      }
    }
  }
#pragma unroll
  for (int p = 0; p < P; ++p) {
    d[p] = lanes_sum(d[p], L);
    zt[p] = lanes_sum(zt[p], L);  // one lane holds z_t, the others 0
  }

  Coefficients<P> co;
  const float loss = finish<T, PIXEL, P>(pr, a, it, lane == 0, m, d, zt, A, W, co);
  if (a.grad != nullptr) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int g = lane + j * L;
      if (g < groups) store_gradient<T, PIXEL, P>(pr, a, it, g, co, z[j]);
    }
  }
  return loss;
}

// A row longer than the lanes' registers: an online (m, d) sweep, lanes merged, then with the
// gradient a second sweep that re-reads the logits and regenerates the noise.
template <typename T, bool PIXEL>
__device__ __forceinline__ float streamed_row(const BlvProblem& pr, const LossArgs& a, const Noise& nz, int64_t k,
                                              int lane) {
  constexpr int P = PIXEL ? kRun : 1;
  Item<P> it = make_item<P>(a, pr, k);
  load_labels(pr, it);
  const int L = a.lanes, groups = it.count > 0 ? a.groups : 0;
  const bool smooth = pr.label_smoothing > 0.0f;
  float m[P], d[P] = {}, zt[P] = {}, A[P] = {}, W = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) m[p] = -INFINITY;
#pragma unroll 1
  for (int g = lane; g < groups; g += L) {
    float z[kRun][P], cw[kRun];
    perturbed_group<T, PIXEL, P>(pr, a, nz, it, g, z);
    if (smooth) class_weights(pr, g, cw);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const float m_new = fmaxf(m[p], fmaxf(fmaxf(z[0][p], z[1][p]), fmaxf(z[2][p], z[3][p])));
      const float shift = m_new == -INFINITY ? 0.0f : m_new;  // every z so far -inf: exp(-inf) = 0, not NaN
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kRun; ++c) {
        if (4 * g + c == it.label[p]) zt[p] = z[c][p];
        sum += exp_nonpositive(z[c][p] - shift);
      }
      d[p] = fmaf(d[p], exp_nonpositive(m[p] - shift), sum);
      if (smooth) {  // A = sum cw (m - z) follows m: A += W (m_new - m)
        float add = W > 0.0f ? W * (m_new - m[p]) : 0.0f;
#pragma unroll
        for (int c = 0; c < kRun; ++c)
          if (4 * g + c < pr.C) add = fmaf(cw[c], m_new - z[c][p], add);
        A[p] += add;
      }
      m[p] = m_new;
    }
    if (smooth) W += (cw[0] + cw[1]) + (cw[2] + cw[3]);
  }
  // Merge the lanes: a butterfly of symmetric expressions (products rounded apart, __fmul_rn, so
  // that no lane fuses one of them into its add), so every lane gets the same bits.
  for (int o = 1; o < L; o <<= 1) {
    const float W2 = smooth ? __shfl_xor_sync(kFullMask, W, o) : 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const float m2 = __shfl_xor_sync(kFullMask, m[p], o), d2 = __shfl_xor_sync(kFullMask, d[p], o);
      const float m_new = fmaxf(m[p], m2), shift = m_new == -INFINITY ? 0.0f : m_new;
      d[p] = __fmul_rn(d[p], exp_nonpositive(m[p] - shift)) + __fmul_rn(d2, exp_nonpositive(m2 - shift));
      zt[p] += __shfl_xor_sync(kFullMask, zt[p], o);
      if (smooth) {
        const float A2 = __shfl_xor_sync(kFullMask, A[p], o);
        A[p] = (W > 0.0f ? fmaf(W, m_new - m[p], A[p]) : A[p]) + (W2 > 0.0f ? fmaf(W2, m_new - m2, A2) : A2);
      }
      m[p] = m_new;
    }
    W += W2;
  }

  Coefficients<P> co;
  const float loss = finish<T, PIXEL, P>(pr, a, it, lane == 0, m, d, zt, A, W, co);
  if (a.grad != nullptr) {
#pragma unroll 1
    for (int g = lane; g < groups; g += L) {
      float z[kRun][P];
      perturbed_group<T, PIXEL, P>(pr, a, nz, it, g, z);
#pragma unroll
      for (int c = 0; c < kRun; ++c)
#pragma unroll
        for (int p = 0; p < P; ++p) z[c][p] = exp_nonpositive(z[c][p] - m[p]);
      store_gradient<T, PIXEL, P>(pr, a, it, g, co, z);
    }
  }
  return loss;
}

// Blocks of kLossThreads per SM that __launch_bounds__ asks for: the resident pixel row (80 floats)
// needs about 150 registers a thread (3 blocks: up to 170); the others fit 128 (4 blocks).
template <bool PIXEL, bool STREAM>
constexpr int kMinBlocks = PIXEL && !STREAM ? 3 : 4;

template <typename T, bool PIXEL, bool STREAM>
__global__ void __launch_bounds__(kLossThreads, kMinBlocks<PIXEL, STREAM>)
    loss_kernel(const BlvProblem pr, const LossArgs a) {
  const int lane = threadIdx.x & (a.lanes - 1);
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (kLossThreads / a.lanes) + threadIdx.x / a.lanes;
  Noise nz;
  nz.scale = pr.variation_params[0];
  nz.threshold = pr.variation_params[1];
  nz.mode = mode_of(pr.clamp_mode != 0);
  nz.seed = static_cast<uint64_t>(*pr.seed);
  nz.kind = variation_kind(nz.scale, nz.threshold);
  float loss;
  if constexpr (STREAM)
    loss = streamed_row<T, PIXEL>(pr, a, nz, k, lane);
  else
    loss = resident_row<T, PIXEL>(pr, a, nz, k, lane);
  loss = block_sum<kLossThreads / kWarpSize>(loss);
  if (threadIdx.x == 0) a.loss_sums[blockIdx.x] = loss;
}

// ------------------------------------------------------------------ gradient scaling

// 16 bytes of T scaled by s in fp32.
template <typename T>
__device__ __forceinline__ uint4 scaled(uint4 v, float s) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(__uint_as_float(w[i]) * s);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = Run<T>::to_float2(w[i]);
      w[i] = Run<T>::pack(f.x * s, f.y * s);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(T* grad, int64_t numel, const float* grad_output) {
  const float s = *grad_output;
  if (s == 1.0f) return;  // every thread reads it and leaves: grad untouched, no host sync
  constexpr int64_t kPer = 16 / sizeof(T);
  // a scalar head up to the first 16-byte boundary, 16-byte vectors, a scalar tail
  const int64_t head = min(numel, static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(grad) % 16) % 16 / sizeof(T)));
  const int64_t vectors = (numel - head) / kPer, tail = head + vectors * kPer;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  uint4* body = reinterpret_cast<uint4*>(grad + head);
  for (int64_t i = first; i < vectors; i += stride) __stcs(body + i, scaled<T>(__ldcs(body + i), s));
  if (first < head) grad[first] = from_float<T>(to_float(grad[first]) * s);
  if (first < numel - tail) grad[tail + first] = from_float<T>(to_float(grad[tail + first]) * s);
}

// ------------------------------------------------------------------ host side

int status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? kOk : kCudaError + static_cast<int>(e);
}

bool known_float(int32_t dtype) { return dtype == BLV_FLOAT32 || dtype == BLV_FLOAT16 || dtype == BLV_BFLOAT16; }

int check(const BlvProblem& pr) {
  if (!known_float(pr.logits_dtype) || pr.target_dtype < BLV_UINT8 || pr.target_dtype > BLV_INT64) return kBadDtype;
  if (pr.loss_dtype != BLV_FLOAT32 && pr.loss_dtype != pr.logits_dtype) return kBadDtype;
  const bool sizes = pr.N >= 0 && pr.S >= 0 && pr.C >= 1 && pr.C <= INT32_MAX - kRun;
  return sizes ? kOk : kBadProblem;
}

// Every 4-element run of a tensor starts at a vector boundary: its base does, and so do the two
// strides between runs' starts (each over a dimension of size n).
bool runs_aligned(const void* base, int64_t element, int64_t stride1, int64_t n1, int64_t stride2, int64_t n2) {
  const bool strides = (n1 <= 1 || stride1 % kRun == 0) && (n2 <= 1 || stride2 % kRun == 0);
  return strides && reinterpret_cast<uintptr_t>(base) % (kRun * element) == 0;
}

struct Plan {
  bool pixel, stream;
  int lanes, groups;
  int64_t items, per_image, blocks;
};

Plan make_plan(const BlvProblem& pr) {
  Plan pl;
  // pixels contiguous (NCHW), or no contiguous axis: pixel layout; classes contiguous: class layout
  pl.pixel = pr.S > 1 ? pr.stride_xs == 1 || pr.stride_xc != 1 : pr.stride_xc != 1 && pr.C > 1;
  pl.groups = static_cast<int>((pr.C + kRun - 1) / kRun);
  const int per_lane = pl.pixel ? kPixelGroups : kClassGroups;
  pl.lanes = 1;
  while (pl.lanes < kWarpSize && pl.lanes * per_lane < pl.groups) pl.lanes *= 2;
  pl.stream = pl.lanes * per_lane < pl.groups;
  pl.per_image = pl.pixel ? (pr.S + kRun - 1) / kRun : pr.S;
  pl.items = pr.N * pl.per_image;
  const int64_t per_block = kLossThreads / pl.lanes;
  pl.blocks = (pl.items + per_block - 1) / per_block;
  return pl;
}

template <typename T>
int launch_loss(const BlvProblem& pr, const Plan& pl, const LossArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(pl.blocks));
  if (pl.pixel && !pl.stream) BLV_LAUNCH(grid, kLossThreads, stream, loss_kernel<T, true, false>)(pr, a);
  if (pl.pixel && pl.stream) BLV_LAUNCH(grid, kLossThreads, stream, loss_kernel<T, true, true>)(pr, a);
  if (!pl.pixel && !pl.stream) BLV_LAUNCH(grid, kLossThreads, stream, loss_kernel<T, false, false>)(pr, a);
  if (!pl.pixel && pl.stream) BLV_LAUNCH(grid, kLossThreads, stream, loss_kernel<T, false, true>)(pr, a);
  return status();
}

int64_t label_blocks(const BlvProblem& pr) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kLabelsPerThread;
  return (pr.N * pr.S + per_block - 1) / per_block;
}

template <typename T>
int launch_scale(void* grad, int64_t numel, const float* grad_output, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * (16 / sizeof(T));
  const int64_t blocks = (numel + per_block - 1) / per_block;
  const dim3 grid(static_cast<unsigned>(blocks < kScaleBlocks ? blocks : kScaleBlocks));
  BLV_LAUNCH(grid, kThreads, stream, scale_kernel<T>)(static_cast<T*>(grad), numel, grad_output);
  return status();
}

}  // namespace
}  // namespace blv

extern "C" int64_t blv_label_blocks(const BlvProblem* problem) { return blv::label_blocks(*problem); }

extern "C" int blv_label_pass(const BlvProblem* problem, float* weight_sums, int32_t* bad_counts, void* stream,
                              int /*num_threads*/) {
  const int checked = blv::check(*problem);
  if (checked != blv::kOk) return checked;
  const int64_t blocks = blv::label_blocks(*problem);
  if (blocks == 0) return blv::kOk;
  if (blocks > INT32_MAX) return blv::kGridTooLarge;
  BLV_LAUNCH(dim3(static_cast<unsigned>(blocks)), blv::kThreads, static_cast<cudaStream_t>(stream),
             blv::label_kernel)(*problem, weight_sums, bad_counts);
  return blv::status();
}

extern "C" int64_t blv_loss_blocks(const BlvProblem* problem) {
  return blv::check(*problem) == blv::kOk ? blv::make_plan(*problem).blocks : 0;
}

extern "C" int blv_loss_pass(const BlvProblem* problem, const float* denom, void* loss_per_position,
                             float* loss_sums, void* grad, int64_t stride_gn, int64_t stride_gc, int64_t stride_gs,
                             void* stream, int /*num_threads*/) {
  const BlvProblem& pr = *problem;
  const int checked = blv::check(pr);
  if (checked != blv::kOk) return checked;
  const blv::Plan pl = blv::make_plan(pr);
  if (pl.blocks == 0) return blv::kOk;
  if (pl.blocks > INT32_MAX) return blv::kGridTooLarge;
  // runs: along s at classes and images (pixel), along c at positions and images (class)
  const int64_t element = pr.logits_dtype == BLV_FLOAT32 ? 4 : 2;
  const int64_t sx = pl.pixel ? pr.stride_xc : pr.stride_xs, sg = pl.pixel ? stride_gc : stride_gs;
  const int64_t n2 = pl.pixel ? pr.C : pr.S;
  const blv::LossArgs a = {denom, loss_per_position, loss_sums, grad, stride_gn, stride_gc, stride_gs,
                           pl.items, pl.per_image, pl.lanes, pl.groups,
                           blv::runs_aligned(pr.logits, element, pr.stride_xn, pr.N, sx, n2),
                           blv::runs_aligned(grad, element, stride_gn, pr.N, sg, n2)};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (pr.logits_dtype) {
    case BLV_FLOAT32: return blv::launch_loss<float>(pr, pl, a, s);
    case BLV_FLOAT16: return blv::launch_loss<__half>(pr, pl, a, s);
    default: return blv::launch_loss<__nv_bfloat16>(pr, pl, a, s);
  }
}

extern "C" int blv_scale_grad(void* grad, int32_t dtype, int64_t numel, const float* grad_output, void* stream,
                              int /*num_threads*/) {
  if (!blv::known_float(dtype)) return blv::kBadDtype;
  if (numel <= 0) return blv::kOk;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case BLV_FLOAT32: return blv::launch_scale<float>(grad, numel, grad_output, s);
    case BLV_FLOAT16: return blv::launch_scale<__half>(grad, numel, grad_output, s);
    default: return blv::launch_scale<__nv_bfloat16>(grad, numel, grad_output, s);
  }
}

extern "C" const char* blv_error_string(int code) {
  switch (code) {
    case blv::kOk: return "no error";
    case blv::kBadDtype: return "unsupported logits, target or gradient dtype";
    case blv::kBadProblem: return "invalid problem: N, S >= 0 and 1 <= C < 2**31 - 4 are required";
    case blv::kGridTooLarge: return "too many positions for one launch (more than 2**31 - 1 blocks)";
    default:
      return code > blv::kCudaError ? cudaGetErrorString(static_cast<cudaError_t>(code - blv::kCudaError))
                                    : "unknown error code";
  }
}
