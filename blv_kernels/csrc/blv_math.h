// The BLV variation stream, element by element: Philox4x32-10 and the word -> v transform; and
// the label load. Shared by the CPU and CUDA kernels.
//
// The same float32 operations as blv_kernels/noise.py (and the Triton kernel), so the words
// are bit-identical and v agrees to float32 rounding. Host-and-device code with no CUDA or
// torch header, so the host tests can compile it with a plain C++ compiler and compare it
// with the PyTorch implementation.
#pragma once

#include <math.h>
#include <stdint.h>

#include "blv_kernel.h"

#ifdef __CUDACC__
#define BLV_HD __host__ __device__ __forceinline__
#define BLV_UNROLL _Pragma("unroll")
#else
#define BLV_HD inline
#define BLV_UNROLL  // host compilers unroll and vectorise the fixed-count loops on their own
#endif

namespace blv {

// Philox4x32 constants (Salmon et al., SC'11), as in tl.philox and noise.PHILOX_*.
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The transform's parameters, [scale, threshold] = [sigma*sqrt(2), erf(1 / (sigma*sqrt(2)))] in
// float32 (blv_kernels.noise.variation_params; [0, 1] for sigma = 0, which gives v = 0). The
// polynomial erfinv serves when threshold <= kErfinvPolyMax, else Giles' (one log).
constexpr float kErfinvPolyMax = 0.7f;
enum VariationKind { kNoVariation = 0, kPolyErfinv = 1, kGilesErfinv = 2 };

// The kind of a call's variation, the same for every word: sigma = 0 ([scale, threshold] = [0, 1])
// gives v = 0 for every word, so z = x without the stream; else the erfinv that serves threshold.
BLV_HD int variation_kind(float scale, float threshold) {
  if (scale == 0.0f && threshold >= 1.0f) return kNoVariation;
  return threshold <= kErfinvPolyMax ? kPolyErfinv : kGilesErfinv;
}

// The 64-bit product a * b as its high and low words. On a GPU the high word is __umulhi, so
// the round stays in 32-bit registers (ptxas fuses the pair into one IMAD.WIDE.U32); a 64-bit
// product makes NVVM widen the round's mixing to 64 bits. A host compiler gets one wide multiply.
BLV_HD void mul_wide(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = (uint64_t)a * b;
  hi = (uint32_t)(product >> 32);
  lo = (uint32_t)product;
#endif
}

// Philox4x32-10 on counter (c[0], c[1], c[2], c[3]) with key (k0, k1), in place.
BLV_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  BLV_UNROLL
  for (int i = 0; i < kPhiloxRounds; ++i) {
    uint32_t hi_a, lo_a, hi_b, lo_b;
    mul_wide(kPhiloxRoundA, c[0], hi_a, lo_a);
    mul_wide(kPhiloxRoundB, c[2], hi_b, lo_b);
    c[0] = hi_b ^ c[1] ^ k0;
    c[1] = lo_b;
    c[2] = hi_a ^ c[3] ^ k1;
    c[3] = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The four words of position q (= offset + n*S + s) for class group g (classes 4g..4g+3).
BLV_HD void philox_words(uint32_t words[4], uint64_t q, uint32_t g, uint64_t seed) {
  words[0] = (uint32_t)q;
  words[1] = (uint32_t)(q >> 32);
  words[2] = g;
  words[3] = 0u;
  philox4x32_10(words, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// erfinv(t) = t * P(t^2) on [0, 0.7]: noise.ERFINV_POLY.
BLV_HD float erfinv_poly(float t) {
  const float x = t * t;
  float p = 0.3621198236942291f;
  p = p * x + -0.39945346117019653f;
  p = p * x + 0.3013332486152649f;
  p = p * x + -0.031526193022727966f;
  p = p * x + 0.08014745265245438f;
  p = p * x + 0.08502992242574692f;
  p = p * x + 0.12763145565986633f;
  p = p * x + 0.23201224207878113f;
  p = p * x + 0.8862269520759583f;
  return t * p;
}

// Giles' single-precision erfinv on [0, 1): noise.ERFINV_GILES_CENTRAL / _TAIL.
BLV_HD float erfinv_giles(float t) {
  const float w = -logf((1.0f - t) * (1.0f + t));
  const float x = w - 2.5f;
  float central = 2.81022636e-08f;
  central = central * x + 3.43273939e-07f;
  central = central * x + -3.5233877e-06f;
  central = central * x + -4.39150654e-06f;
  central = central * x + 0.00021858087f;
  central = central * x + -0.00125372503f;
  central = central * x + -0.00417768164f;
  central = central * x + 0.246640727f;
  central = central * x + 1.50140941f;
  const float y = sqrtf(w) - 3.0f;
  float tail = -0.000200214257f;
  tail = tail * y + 0.000100950558f;
  tail = tail * y + 0.00134934322f;
  tail = tail * y + -0.00367342844f;
  tail = tail * y + 0.00573950773f;
  tail = tail * y + -0.0076224613f;
  tail = tail * y + 0.00943887047f;
  tail = tail * y + 1.00167406f;
  tail = tail * y + 2.83297682f;
  return t * (w < 5.0f ? central : tail);
}

// The mode as arithmetic, t = max(t_scale * u + t_shift, 0): (1, 0) for "abs" (exactly u, u >= 0)
// and (2, -1) for "clamp" (exactly max(2u - 1, 0)), so that no branch on the mode is in a hot loop.
struct Mode {
  float t_scale, t_shift;
};
BLV_HD Mode mode_of(bool clamp_mode) { return clamp_mode ? Mode{2.0f, -1.0f} : Mode{1.0f, 0.0f}; }

// word -> v (noise.variation_from_words):
//   u = (word >> 8) * 2^-24;  t = u (abs) or max(2u - 1, 0) (clamp)
//   v = t >= threshold ? 1 : min(scale * erfinv(t), 1)
// in operations a host compiler vectorises across lanes: selects rather than fminf/fmaxf (x86
// min/max lack their NaN rule; the values are the same for every input), a signed conversion
// (word >> 8 < 2^24 is exact either way).
template <int KIND>
BLV_HD float variation(uint32_t word, float scale, float threshold, Mode mode) {
  const float u = (float)(int32_t)(word >> 8) * 5.9604644775390625e-08f;  // 2^-24
  const float shifted = mode.t_scale * u + mode.t_shift;
  const float t = shifted > 0.0f ? shifted : 0.0f;
  const float e = KIND == kPolyErfinv ? erfinv_poly(t) : erfinv_giles(t);
  const float v = scale * e;
  return t < threshold ? (v < 1.0f ? v : 1.0f) : 1.0f;
}

// Label i of a target of dtype BlvIntType: a decision tree on the dtype (the same for every label
// of a call), not a switch, which nvcc compiles to an indirect jump through a table.
BLV_HD int64_t load_label(const void* target, int32_t dtype, int64_t i) {
  if (dtype >= BLV_INT32)
    return dtype == BLV_INT64 ? static_cast<const int64_t*>(target)[i] : static_cast<const int32_t*>(target)[i];
  if (dtype == BLV_INT16) return static_cast<const int16_t*>(target)[i];
  return dtype == BLV_INT8 ? static_cast<const int8_t*>(target)[i] : static_cast<const uint8_t*>(target)[i];
}

}  // namespace blv
