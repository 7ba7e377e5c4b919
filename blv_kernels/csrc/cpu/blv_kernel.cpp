// The fused BLV cross-entropy on the CPU: the C interface of blv_kernel.h for host memory.
//
// Work is cut into blocks of consecutive positions p = n*S + s, their size a function of C
// alone, so every block's partial sums are the same whatever num_threads (deterministic);
// std::threads take blocks in turn from an atomic counter. Within a block the SIMD lanes are
// either positions or classes:
//
// - tiles (NCHW, and any layout with few classes): kWideTile consecutive positions of one
//   sample where they are consecutive in memory, else kNarrowTile positions through
//   per-position offsets; every loop runs over the tile's positions j:
//     1. z[c][j] = x + v * w_c: per class group g, Philox4x32-10 on the tile's counters
//        (blv_math.h), the word -> v transform, the add; m[j] = max_c z[c][j]
//     2. e[c][j] = exp(z - m) in place, d[j] = sum_c e, and for label smoothing
//        sum_c cw_c (m - z_c); z_t is read before
//     3. the loss and the gradient, class row by class row
// - rows (class-contiguous layouts with at least kRowsMinClasses classes: (N, C) rows,
//   channels_last): one position at a time, the same steps over its classes, maxima and sums
//   kept per lane (c % kLanes) and combined in a fixed order.
//
// Both apply blv_kernel.h's formulas: l = (1-eps) cw_t ((m - z_t) + log d) + (eps/C) (sum_c
// cw_c (m - z_c) + W log d), loss = l * pw, and dloss/dx_c = a e_c - b cw_c - [c == t] tc with
// a = pw ((1-eps) cw_t + eps W / C) / (d denom), b = pw eps / (C denom), tc = pw (1-eps) cw_t / denom.
// All arithmetic is fp32, without -ffast-math: the transform gives v to float32 rounding of
// noise.py; exp and the half conversions are below.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "blv_kernel.h"
#include "blv_math.h"

namespace blv {
namespace cpu {
namespace {

constexpr int kWideTile = 64;    // positions per tile where they are consecutive in memory (NCHW)
constexpr int kNarrowTile = 16;  // positions per tile elsewhere (few classes, sample boundaries)
constexpr int64_t kRowsMinClasses = 64;  // class-contiguous layouts with this many classes: a position at a time
constexpr int kLanes = 16;               // per-lane maxima and sums of the rows path
constexpr int64_t kBlockElements = int64_t{1} << 15;     // about this many logits per loss block
constexpr int64_t kLabelBlockPositions = int64_t{1} << 14;
constexpr int64_t kScaleBlockElements = int64_t{1} << 16;
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;  // below this a thread costs more than it saves

enum ErrorCode { kSuccess = 0, kInvalidProblem = 1, kInvalidOutputs = 2, kOutOfMemory = 3 };

// ------------------------------------------------------------------ scalar helpers

inline uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// The logits' storage types, converted exactly as torch does (c10/util/Half.h, BFloat16.h):
// halves widen exactly; floats narrow with round-to-nearest-even, overflow to inf, NaN stays NaN.
struct Float32 {
  using Storage = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
};

struct Float16 {
  using Storage = uint16_t;
  static float load(uint16_t h) {  // fp16_ieee_to_fp32_value
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
  }
  static uint16_t store(float f) {  // fp16_ieee_from_fp32_value: the rounding is done by the fp32 adds
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_of(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// exp(x) for x <= 0 (NaN stays NaN), in operations that vectorise: n = round(x / ln 2) by the
// 1.5 * 2^23 trick, r = x - n ln 2 in two parts (Cody-Waite), exp(r) by Cephes' expf
// polynomial (about 1 ulp), times 2^n built in the exponent bits. Below -87 the result would
// be subnormal: 0, as exp(-inf).
inline float exp_nonpositive(float x) {
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + kRoundMagic;
  const float n = shifted - kRoundMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float two_n = float_of((bits_of(shifted) - bits_of(kRoundMagic) + 127u) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

// f(L{}): a tag of L, the label type of dtype (BlvIntType), so that the dtype is decided once,
// outside the loops over labels.
template <typename F>
inline void with_label_type(int32_t dtype, const F& f) {
  switch (dtype) {
    case BLV_UINT8: return f(uint8_t{});
    case BLV_INT8: return f(int8_t{});
    case BLV_INT16: return f(int16_t{});
    case BLV_INT32: return f(int32_t{});
    default: return f(int64_t{});
  }
}

// out[j] = the label at offset[j], for j < count.
inline void load_labels(const void* target, int32_t dtype, const int64_t* __restrict offset, int count,
                        int64_t* __restrict out) {
  with_label_type(dtype, [&](auto tag) {
    const auto* __restrict labels = static_cast<const decltype(tag)*>(target);
    for (int j = 0; j < count; ++j) out[j] = labels[offset[j]];
  });
}

// ------------------------------------------------------------------ threads

// body(block, scratch) for every block in [0, blocks), on up to `threads` threads (the
// caller's included), each with its own scratch of scratch_floats floats. A thread that
// cannot be started leaves its blocks to the others.
template <typename Body>
int parallel_blocks(int64_t blocks, int64_t threads, int64_t scratch_floats, const Body& body) {
  std::atomic<int64_t> next{0};
  std::atomic<int> status{kSuccess};
  auto work = [&]() noexcept {
    try {
      const std::unique_ptr<float[]> scratch(new float[static_cast<size_t>(scratch_floats)]);
      for (int64_t b = next.fetch_add(1); b < blocks; b = next.fetch_add(1)) body(b, scratch.get());
    } catch (const std::bad_alloc&) {
      status = kOutOfMemory;
      next = blocks;
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<size_t>(threads));
    for (int64_t i = 1; i < threads; ++i) pool.emplace_back(work);
  } catch (const std::exception&) {  // no thread (or no memory for one): fewer threads
  }
  work();
  for (std::thread& thread : pool) thread.join();
  return status;
}

int64_t thread_count(int num_threads, int64_t blocks, int64_t elements) {
  const int64_t useful = std::max<int64_t>(1, elements / kMinElementsPerThread);
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(num_threads), blocks, useful}));
}

// ------------------------------------------------------------------ problem

int64_t positions_of(const BlvProblem& pr) { return pr.N * pr.S; }

bool valid_problem(const BlvProblem* pr) {
  if (pr == nullptr || pr->N < 0 || pr->C < 0 || pr->S < 0 || pr->C > INT32_MAX) return false;
  if (pr->S != 0 && pr->N > INT64_MAX / pr->S) return false;
  if (pr->logits_dtype < BLV_FLOAT32 || pr->logits_dtype > BLV_BFLOAT16) return false;
  if (pr->loss_dtype != BLV_FLOAT32 && pr->loss_dtype != pr->logits_dtype) return false;
  if (pr->target_dtype < BLV_UINT8 || pr->target_dtype > BLV_INT64) return false;
  if (pr->reduction < BLV_REDUCTION_NONE || pr->reduction > BLV_REDUCTION_MEAN) return false;
  if (positions_of(*pr) == 0) return true;
  return pr->C >= 1 && pr->logits != nullptr && pr->target != nullptr && pr->variation_weight != nullptr &&
         pr->seed != nullptr && pr->variation_params != nullptr;
}

int64_t loss_block_positions(int64_t classes) {
  return std::max<int64_t>(kWideTile, kBlockElements / std::max<int64_t>(classes, 1) / kWideTile * kWideTile);
}

// What every block of one loss pass shares: the problem, its outputs and per-call constants.
struct LossCall {
  BlvProblem pr;
  const float* class_weights;  // cw_c: the problem's, or ones
  // cw_c of the gradient's smoothing term b cw_c and of W: class_weights with label smoothing, else
  // ones (b = 0 then, and 0 * an infinite weight, even of a class no label has, would be NaN)
  const float* smoothing_weights;
  bool rows;                   // the rows path (else tiles)
  float* loss_sums;
  void* loss_per_position;  // "none" only, in the problem's loss_dtype
  void* grad;
  int64_t stride_gn, stride_gc, stride_gs;
  int64_t block_positions;
  uint64_t seed;  // the Philox key
  float scale, threshold;
  blv::Mode mode;          // "abs" or "clamp" as arithmetic (blv::mode_of)
  float denom;             // "mean": the divisor; else 1
  float keep;              // 1 - eps
  float smoothing;         // eps / C (0 without label smoothing)
  float weight_sum;        // W = sum_c cw_c (of smoothing_weights)
};

// Philox words of class group g for a tile's positions: words[k][j] is word k of position j
// (philox_words over the tile, its counters' halves in arrays, so the loop vectorises).
template <int TILE>
inline void tile_words(const uint32_t* __restrict q_lo, const uint32_t* __restrict q_hi, uint32_t g, uint64_t seed,
                       uint32_t (*__restrict words)[TILE]) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int j = 0; j < TILE; ++j) {
    uint32_t counter[4] = {q_lo[j], q_hi[j], g, 0u};
    philox4x32_10(counter, k0, k1);
    for (int k = 0; k < 4; ++k) words[k][j] = counter[k];
  }
}

// Class c's row of a tile, x[offset_j + c_offset] for its positions j, in fp32. CONTIGUOUS: the
// positions are consecutive elements (offset_j = offset_0 + j): vector loads.
template <typename D, int TILE, bool CONTIGUOUS>
inline void load_row(const typename D::Storage* __restrict x, const int64_t* __restrict offset, int64_t c_offset,
                     float* __restrict row) {
  if (CONTIGUOUS) {
    const typename D::Storage* __restrict src = x + offset[0] + c_offset;
    for (int j = 0; j < TILE; ++j) row[j] = D::load(src[j]);
  } else {
    for (int j = 0; j < TILE; ++j) row[j] = D::load(x[offset[j] + c_offset]);
  }
}

// The first `count` values of a row to out[offset_j + c_offset], rounded to the storage type.
template <typename D, int TILE, bool CONTIGUOUS>
inline void store_row(typename D::Storage* __restrict out, const int64_t* __restrict offset, int64_t c_offset,
                      const float* __restrict row, int count) {
  if (CONTIGUOUS) {
    typename D::Storage* __restrict dst = out + offset[0] + c_offset;
    for (int j = 0; j < TILE; ++j) dst[j] = D::store(row[j]);
  } else {
    for (int j = 0; j < count; ++j) out[offset[j] + c_offset] = D::store(row[j]);
  }
}

// The per-position values of a tile of `count` positions from p0. Lanes past count repeat
// position p0 (so every load stays in bounds) without a label; nothing of them is stored.
template <int TILE>
struct Tile {
  alignas(64) int64_t x_offset[TILE];
  alignas(64) int64_t grad_offset[TILE];
  alignas(64) uint32_t q_lo[TILE];
  alignas(64) uint32_t q_hi[TILE];
  alignas(64) int32_t label[TILE];        // the label where valid, else -1
  alignas(64) float weight_t[TILE];       // cw_t where valid, else 0
  alignas(64) float position_weight[TILE];
};

template <int TILE, bool CONTIGUOUS>
void load_tile(const LossCall& k, int64_t p0, int count, Tile<TILE>& tile) {
  const BlvProblem& pr = k.pr;
  int64_t n[TILE], s[TILE], target_offset[TILE], raw_label[TILE];
  const int64_t n0 = p0 / pr.S, s0 = p0 - n0 * pr.S;
  if (CONTIGUOUS) {  // one sample: s0 + TILE <= S
    for (int j = 0; j < TILE; ++j) {
      n[j] = n0;
      s[j] = s0 + j;
    }
  } else {  // positions may run into the next sample
    int64_t nj = n0, sj = s0;
    for (int j = 0; j < TILE; ++j) {
      n[j] = j < count ? nj : n0;
      s[j] = j < count ? sj : s0;
      if (++sj == pr.S) {
        sj = 0;
        ++nj;
      }
    }
  }
  for (int j = 0; j < TILE; ++j) {
    tile.x_offset[j] = n[j] * pr.stride_xn + s[j] * pr.stride_xs;
    tile.grad_offset[j] = n[j] * k.stride_gn + s[j] * k.stride_gs;
    target_offset[j] = n[j] * pr.stride_tn + s[j] * pr.stride_ts;
    const uint64_t q = static_cast<uint64_t>(pr.offset) + static_cast<uint64_t>(n[j] * pr.S + s[j]);
    tile.q_lo[j] = static_cast<uint32_t>(q);
    tile.q_hi[j] = static_cast<uint32_t>(q >> 32);
  }
  load_labels(pr.target, pr.target_dtype, target_offset, TILE, raw_label);
  for (int j = 0; j < TILE; ++j) {
    const int64_t t = raw_label[j];
    const bool valid = j < count && t != pr.ignore_index && t >= 0 && t < pr.C;
    tile.label[j] = valid ? static_cast<int32_t>(t) : -1;
    tile.weight_t[j] = valid ? k.class_weights[t] : 0.0f;
    tile.position_weight[j] =
        pr.position_weight != nullptr ? pr.position_weight[n[j] * pr.stride_wn + s[j] * pr.stride_ws] : 1.0f;
  }
}

// loss_per_position[p] = loss, in the problem's loss_dtype: float32, or the logits' (D's) storage.
template <typename D>
inline void store_loss(const LossCall& k, int64_t p, float loss) {
  if (k.pr.loss_dtype == BLV_FLOAT32)
    static_cast<float*>(k.loss_per_position)[p] = loss;
  else
    static_cast<typename D::Storage*>(k.loss_per_position)[p] = D::store(loss);
}

// One tile (see the top of the file); z: C*TILE floats of scratch. Returns the sum of its losses.
template <typename D, int KIND, int TILE, bool CONTIGUOUS>
float loss_tile(const LossCall& k, int64_t p0, int count, float* __restrict z) {
  using T = typename D::Storage;
  const BlvProblem& pr = k.pr;
  const int64_t C = pr.C, sxc = pr.stride_xc, sgc = k.stride_gc;
  const float scale = k.scale, threshold = k.threshold;
  const blv::Mode mode = k.mode;
  const float smoothing = k.smoothing, denom = k.denom;
  const float* __restrict variation_weight = pr.variation_weight;
  Tile<TILE> tile;
  load_tile<TILE, CONTIGUOUS>(k, p0, count, tile);
  alignas(64) float m[TILE], d[TILE], smooth[TILE], z_t[TILE], row[TILE];
  for (int j = 0; j < TILE; ++j) {
    m[j] = -INFINITY;
    d[j] = smooth[j] = 0.0f;
  }

  // 1. z = x + v * w and its maximum
  const T* __restrict x = static_cast<const T*>(pr.logits);
  for (int64_t g = 0; 4 * g < C; ++g) {
    alignas(64) uint32_t words[4][TILE];
    if (KIND != kNoVariation) tile_words<TILE>(tile.q_lo, tile.q_hi, static_cast<uint32_t>(g), k.seed, words);
    for (int64_t c = 4 * g; c < std::min(4 * g + 4, C); ++c) {
      load_row<D, TILE, CONTIGUOUS>(x, tile.x_offset, c * sxc, row);
      const uint32_t* __restrict word = words[c - 4 * g];
      const float w = variation_weight[c];
      float* __restrict z_c = z + c * TILE;
      for (int j = 0; j < TILE; ++j) {
        const float z_cj = KIND == kNoVariation
                               ? row[j]
                               : row[j] + variation<KIND>(word[j], scale, threshold, mode) * w;
        z_c[j] = z_cj;
        m[j] = z_cj > m[j] ? z_cj : m[j];  // a NaN z leaves m, but makes its e and d NaN below
      }
    }
  }

  // 2. e = exp(z - m) in place, d = sum e, smooth = sum cw_c (m - z_c)
  for (int j = 0; j < TILE; ++j) z_t[j] = tile.label[j] >= 0 ? z[tile.label[j] * TILE + j] : 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict z_c = z + c * TILE;
    if (smoothing > 0.0f) {
      const float cw = k.class_weights[c];
      for (int j = 0; j < TILE; ++j) {
        const float below_max = m[j] - z_c[j];
        smooth[j] += cw * below_max;
        z_c[j] = exp_nonpositive(-below_max);
        d[j] += z_c[j];
      }
    } else {
      for (int j = 0; j < TILE; ++j) {
        z_c[j] = exp_nonpositive(z_c[j] - m[j]);
        d[j] += z_c[j];
      }
    }
  }

  // 3. the losses
  float tile_sum = 0.0f;
  for (int j = 0; j < count; ++j) {
    const float log_d = logf(d[j]);
    float l = 0.0f;
    if (tile.label[j] >= 0) {
      l = k.keep * tile.weight_t[j] * ((m[j] - z_t[j]) + log_d);
      if (smoothing > 0.0f) l += smoothing * (smooth[j] + k.weight_sum * log_d);
    }
    const float loss = l * tile.position_weight[j];  // a NaN position weight gives NaN even where not valid
    if (k.loss_per_position != nullptr) store_loss<D>(k, p0 + j, loss);
    tile_sum += loss;
  }
  if (k.grad == nullptr) return tile_sum;

  // ... and the gradient, 0 where not valid (whatever e is there)
  alignas(64) float a[TILE], b[TILE], target_term[TILE];
  for (int j = 0; j < TILE; ++j) {
    const float weighted = tile.position_weight[j] / denom;
    const float per_denom = tile.label[j] >= 0 ? weighted : 0.0f;
    a[j] = per_denom * (k.keep * tile.weight_t[j] + smoothing * k.weight_sum) / d[j];
    b[j] = per_denom * smoothing;
    target_term[j] = per_denom * k.keep * tile.weight_t[j];
  }
  T* __restrict grad = static_cast<T*>(k.grad);
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict e_c = z + c * TILE;
    const float cw = k.smoothing_weights[c];
    const int32_t c32 = static_cast<int32_t>(c);
    for (int j = 0; j < TILE; ++j) {
      const float g = a[j] * e_c[j] - b[j] * cw - (tile.label[j] == c32 ? target_term[j] : 0.0f);
      row[j] = tile.label[j] >= 0 ? g : 0.0f;
    }
    store_row<D, TILE, CONTIGUOUS>(grad, tile.grad_offset, c * sgc, row, count);
  }
  return tile_sum;
}

// f(c, c % kLanes) for every class: whole groups of kLanes classes (the vectorised loop), then the rest.
template <typename F>
inline void for_classes(int64_t C, const F& f) {
  const int64_t whole = C / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < whole; c0 += kLanes)
    for (int i = 0; i < kLanes; ++i) f(c0 + i, i);
  for (int64_t c = whole; c < C; ++c) f(c, static_cast<int>(c - whole));
}

// One position of a class-contiguous layout (x[c] at x + offset + c, the gradient likewise):
// the rows path. scratch: C + 4 floats, v then z. Returns its loss.
template <typename D, int KIND>
float loss_row(const LossCall& k, int64_t p, float* __restrict scratch) {
  using T = typename D::Storage;
  const BlvProblem& pr = k.pr;
  const int64_t C = pr.C, n = p / pr.S, s = p - n * pr.S;
  const int64_t t = load_label(pr.target, pr.target_dtype, n * pr.stride_tn + s * pr.stride_ts);
  const float position_weight =
      pr.position_weight != nullptr ? pr.position_weight[n * pr.stride_wn + s * pr.stride_ws] : 1.0f;
  T* __restrict grad = k.grad == nullptr ? nullptr : static_cast<T*>(k.grad) + n * k.stride_gn + s * k.stride_gs;
  if (t == pr.ignore_index || t < 0 || t >= C) {  // not valid: loss 0 (times pw), gradient 0
    if (grad != nullptr)
      for (int64_t c = 0; c < C; ++c) grad[c] = D::store(0.0f);
    return 0.0f * position_weight;
  }
  const T* __restrict x = static_cast<const T*>(pr.logits) + n * pr.stride_xn + s * pr.stride_xs;
  const float* __restrict variation_weight = pr.variation_weight;
  const float* __restrict class_weights = k.class_weights;
  const float scale = k.scale, threshold = k.threshold;
  const blv::Mode mode = k.mode;
  float* __restrict z = scratch;

  // 1. v (word c % 4 of class group c / 4; the last group's words past C land in the slack),
  //    then z = x + v * w over it and its maximum
  if (KIND != kNoVariation) {
    const uint64_t q = static_cast<uint64_t>(pr.offset) + static_cast<uint64_t>(p);
    for (int64_t g = 0; 4 * g < C; ++g) {
      uint32_t words[4];
      philox_words(words, q, static_cast<uint32_t>(g), k.seed);
      for (int i = 0; i < 4; ++i) z[4 * g + i] = variation<KIND>(words[i], scale, threshold, mode);
    }
  }
  alignas(64) float lane_max[kLanes], lane_d[kLanes], lane_smooth[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    lane_max[i] = -INFINITY;
    lane_d[i] = lane_smooth[i] = 0.0f;
  }
  for_classes(C, [&](int64_t c, int i) {
    const float x_c = D::load(x[c]);
    const float z_c = KIND == kNoVariation ? x_c : x_c + z[c] * variation_weight[c];
    z[c] = z_c;
    lane_max[i] = z_c > lane_max[i] ? z_c : lane_max[i];
  });
  float m = lane_max[0];
  for (int i = 1; i < kLanes; ++i) m = lane_max[i] > m ? lane_max[i] : m;

  // 2. e = exp(z - m) in place, d = sum e, smooth = sum cw_c (m - z_c)
  const float z_t = z[t];
  if (k.smoothing > 0.0f) {
    for_classes(C, [&](int64_t c, int i) {
      const float below_max = m - z[c];
      lane_smooth[i] += class_weights[c] * below_max;
      z[c] = exp_nonpositive(-below_max);
      lane_d[i] += z[c];
    });
  } else {
    for_classes(C, [&](int64_t c, int i) {
      z[c] = exp_nonpositive(z[c] - m);
      lane_d[i] += z[c];
    });
  }
  float d = 0.0f, smooth = 0.0f;
  for (int i = 0; i < kLanes; ++i) {
    d += lane_d[i];
    smooth += lane_smooth[i];
  }

  // 3. the loss and the gradient
  const float log_d = logf(d), weight_t = class_weights[t];
  float l = k.keep * weight_t * ((m - z_t) + log_d);
  if (k.smoothing > 0.0f) l += k.smoothing * (smooth + k.weight_sum * log_d);
  if (grad != nullptr) {
    const float per_denom = position_weight / k.denom;
    const float a = per_denom * (k.keep * weight_t + k.smoothing * k.weight_sum) / d;
    const float b = per_denom * k.smoothing, target_term = per_denom * k.keep * weight_t;
    for_classes(C, [&](int64_t c, int) {
      grad[c] = D::store(a * z[c] - b * k.smoothing_weights[c] - (c == t ? target_term : 0.0f));
    });
  }
  return l * position_weight;
}

// One block: the rows path, or tiles: wide ones where kWideTile positions of one sample are
// consecutive in the logits (and the gradient), as in NCHW, narrow ones elsewhere.
template <typename D, int KIND>
void loss_block(const LossCall& k, int64_t block, float* scratch) {
  const BlvProblem& pr = k.pr;
  const int64_t begin = block * k.block_positions;
  const int64_t end = std::min(begin + k.block_positions, positions_of(pr));
  float block_sum = 0.0f;
  if (k.rows) {
    for (int64_t p = begin; p < end; ++p) {
      const float loss = loss_row<D, KIND>(k, p, scratch);
      if (k.loss_per_position != nullptr) store_loss<D>(k, p, loss);
      block_sum += loss;
    }
    k.loss_sums[block] = block_sum;
    return;
  }
  float* z = scratch;
  const bool unit_stride = pr.stride_xs == 1 && (k.grad == nullptr || k.stride_gs == 1);
  for (int64_t p0 = begin; p0 < end;) {
    if (unit_stride && end - p0 >= kWideTile && p0 % pr.S + kWideTile <= pr.S) {
      block_sum += loss_tile<D, KIND, kWideTile, true>(k, p0, kWideTile, z);
      p0 += kWideTile;
    } else {
      const int count = static_cast<int>(std::min<int64_t>(kNarrowTile, end - p0));
      block_sum += loss_tile<D, KIND, kNarrowTile, false>(k, p0, count, z);
      p0 += count;
    }
  }
  k.loss_sums[block] = block_sum;
}

template <typename D>
void (*loss_block_for(int kind))(const LossCall&, int64_t, float*) {
  switch (kind) {
    case kPolyErfinv: return loss_block<D, kPolyErfinv>;
    case kGilesErfinv: return loss_block<D, kGilesErfinv>;
    default: return loss_block<D, kNoVariation>;
  }
}

template <typename D>
void scale_block(void* grad, int64_t numel, float factor, int64_t block) {
  typename D::Storage* g = static_cast<typename D::Storage*>(grad);
  const int64_t begin = block * kScaleBlockElements;
  const int64_t end = std::min(begin + kScaleBlockElements, numel);
  for (int64_t i = begin; i < end; ++i) g[i] = D::store(D::load(g[i]) * factor);
}

}  // namespace
}  // namespace cpu
}  // namespace blv

using namespace blv::cpu;

extern "C" int64_t blv_label_blocks(const BlvProblem* problem) {
  if (!valid_problem(problem)) return 0;
  return (positions_of(*problem) + kLabelBlockPositions - 1) / kLabelBlockPositions;
}

extern "C" int blv_label_pass(const BlvProblem* problem, float* weight_sums, int32_t* bad_counts, void* /*stream*/,
                              int num_threads) {
  if (!valid_problem(problem)) return kInvalidProblem;
  const BlvProblem pr = *problem;
  const int64_t positions = positions_of(pr), blocks = blv_label_blocks(problem);
  if (blocks > 0 && (weight_sums == nullptr || bad_counts == nullptr)) return kInvalidOutputs;
  const auto body = [&](int64_t block, float*) {
    const int64_t begin = block * kLabelBlockPositions;
    const int64_t end = std::min(begin + kLabelBlockPositions, positions);
    int64_t n = begin / pr.S, s = begin - n * pr.S;
    float weight_sum = 0.0f;
    int32_t bad = 0, count = 0;
    with_label_type(pr.target_dtype, [&](auto tag) {
      const auto* labels = static_cast<const decltype(tag)*>(pr.target);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t t = labels[n * pr.stride_tn + s * pr.stride_ts];
        const bool labelled = t != pr.ignore_index, in_range = t >= 0 && t < pr.C;
        if (labelled && in_range) {  // without class weights a count: no loop-carried float add
          if (pr.class_weight != nullptr)
            weight_sum += pr.class_weight[t];
          else
            ++count;
        }
        bad += labelled && !in_range;
        if (++s == pr.S) {
          s = 0;
          ++n;
        }
      }
    });
    weight_sums[block] = pr.class_weight != nullptr ? weight_sum : static_cast<float>(count);
    bad_counts[block] = bad;
  };
  return parallel_blocks(blocks, thread_count(num_threads, blocks, positions), 0, body);
}

extern "C" int64_t blv_loss_blocks(const BlvProblem* problem) {
  if (!valid_problem(problem)) return 0;
  const int64_t block_positions = loss_block_positions(problem->C);
  return (positions_of(*problem) + block_positions - 1) / block_positions;
}

extern "C" int blv_loss_pass(const BlvProblem* problem, const float* denom, void* loss_per_position,
                             float* loss_sums, void* grad, int64_t stride_gn, int64_t stride_gc, int64_t stride_gs,
                             void* /*stream*/, int num_threads) {
  if (!valid_problem(problem)) return kInvalidProblem;
  const int64_t blocks = blv_loss_blocks(problem);
  if (blocks == 0) return kSuccess;
  const bool none = problem->reduction == BLV_REDUCTION_NONE, mean = problem->reduction == BLV_REDUCTION_MEAN;
  if (loss_sums == nullptr || (none && loss_per_position == nullptr) || (mean && denom == nullptr))
    return kInvalidOutputs;
  LossCall k;
  k.pr = *problem;
  k.loss_sums = loss_sums;
  k.loss_per_position = none ? loss_per_position : nullptr;
  k.grad = grad;
  k.stride_gn = stride_gn;
  k.stride_gc = stride_gc;
  k.stride_gs = stride_gs;
  k.block_positions = loss_block_positions(k.pr.C);
  k.seed = static_cast<uint64_t>(*k.pr.seed);
  k.scale = k.pr.variation_params[0];
  k.threshold = k.pr.variation_params[1];
  k.mode = blv::mode_of(k.pr.clamp_mode != 0);
  k.denom = mean ? *denom : 1.0f;
  const float eps = k.pr.label_smoothing;
  k.keep = 1.0f - eps;
  k.smoothing = eps / static_cast<float>(k.pr.C);
  std::vector<float> ones;
  if (k.pr.class_weight == nullptr || eps == 0.0f) ones.assign(static_cast<size_t>(k.pr.C), 1.0f);
  k.class_weights = k.pr.class_weight != nullptr ? k.pr.class_weight : ones.data();
  k.smoothing_weights = eps > 0.0f ? k.class_weights : ones.data();
  k.weight_sum = 0.0f;
  for (int64_t c = 0; c < k.pr.C; ++c) k.weight_sum += k.smoothing_weights[c];
  k.rows = k.pr.stride_xc == 1 && (grad == nullptr || stride_gc == 1) && k.pr.C >= kRowsMinClasses;

  const int kind = blv::variation_kind(k.scale, k.threshold);
  void (*block_fn)(const LossCall&, int64_t, float*) =
      k.pr.logits_dtype == BLV_FLOAT32   ? loss_block_for<Float32>(kind)
      : k.pr.logits_dtype == BLV_FLOAT16 ? loss_block_for<Float16>(kind)
                                         : loss_block_for<BFloat16>(kind);
  const int64_t threads = thread_count(num_threads, blocks, positions_of(k.pr) * k.pr.C);
  // rows: v and z, with slack for the last class group; tiles: z
  const int64_t scratch_floats = k.rows ? k.pr.C + 4 : k.pr.C * kWideTile;
  return parallel_blocks(blocks, threads, scratch_floats,
                         [&](int64_t block, float* scratch) { block_fn(k, block, scratch); });
}

extern "C" int blv_scale_grad(void* grad, int32_t dtype, int64_t numel, const float* grad_output, void* /*stream*/,
                              int num_threads) {
  if (numel < 0 || dtype < BLV_FLOAT32 || dtype > BLV_BFLOAT16) return kInvalidProblem;
  if (numel == 0) return kSuccess;
  if (grad == nullptr || grad_output == nullptr) return kInvalidOutputs;
  const float factor = *grad_output;
  if (factor == 1.0f) return kSuccess;
  void (*block_fn)(void*, int64_t, float, int64_t) = dtype == BLV_FLOAT32   ? scale_block<Float32>
                                                     : dtype == BLV_FLOAT16 ? scale_block<Float16>
                                                                            : scale_block<BFloat16>;
  const int64_t blocks = (numel + kScaleBlockElements - 1) / kScaleBlockElements;
  return parallel_blocks(blocks, thread_count(num_threads, blocks, numel), 0,
                         [&](int64_t block, float*) { block_fn(grad, numel, factor, block); });
}

extern "C" const char* blv_error_string(int code) {
  switch (code) {
    case kSuccess: return "no error";
    case kInvalidProblem:
      return "invalid problem: a null pointer, a negative or too large size, or an unknown dtype, label dtype or "
             "reduction";
    case kInvalidOutputs:
      return "missing output: every pass needs its per-block sums, \"none\" the per-position losses, \"mean\" denom";
    case kOutOfMemory: return "out of memory for the per-thread scratch";
    default: return "unknown error code";
  }
}
