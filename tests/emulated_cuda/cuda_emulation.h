// CUDA emulated on the host, so that g++ compiles an unmodified .cu file and the tests run its
// kernels on a CPU:  g++ -x c++ -I tests/emulated_cuda/include file.cu  (the include/ headers
// <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> bring this one in). It provides what our kernels use.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, on one OS thread per
// worker; blocks are spread over the workers. A fiber runs until it reaches a barrier:
// __syncthreads (every thread of the block, at the same call site) or a warp shuffle (every lane
// named in the mask, at the same call site, with the same mask), where it leaves its value and
// yields. The last arrival completes the barrier (computes every lane's shuffle result) and
// goes on; the others are resumed in turn. So a barrier that not every named thread reaches is
// found the moment no fiber can run, with no timeout: the launch fails with which block, warp,
// lanes and call sites. Fibers rather than OS threads: a switch is a function call's cost, the
// schedule is deterministic, and a deadlock is certain, not a guess from a timer.
//
// Vector accesses go through the intrinsics (__ldg, __ldcs, __stcs), each checked for the
// alignment of its type (uint4: 16 bytes, uint2: 8, ...): a misaligned one fails the launch with
// cudaErrorMisalignedAddress, as on a GPU. The launch macro BLV_LAUNCH(grid, block, stream,
// kernel)(args...) replaces <<<...>>>; a launch runs to completion before it returns, and
// cudaGetLastError / cudaGetErrorString report it (the string with the emulation's details).
// __shared__ is per worker thread, i.e. per block. Half and bfloat16 conversions round to
// nearest even, bit for bit like the hardware; the other math is the host's libm.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // a worker runs one block at a time: per block

// ------------------------------------------------------------------ types

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchTimeout = 702,  // a deadlock: on a GPU the launch would hang
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,  // an invalid warp-synchronous call
};
typedef enum cudaError cudaError_t;

constexpr int warpSize = 32;

namespace blv_emu {

// ------------------------------------------------------------------ half and bfloat16

template <typename To, typename From>
inline To bits(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

inline uint16_t float_to_half_rn(float f) {
  const uint32_t x = bits<uint32_t>(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7fffu);  // NaN: CUDA's canonical one
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u)  // a normal half: round the low 13 bits to even, rebias the exponent by 112
    return static_cast<uint16_t>(sign | ((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13));
  // a subnormal half: |f| / 2^-24 is exact in float; rint rounds it to even
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(std::fabs(f) * 16777216.0f)));
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits<float>(sign | 0x7f800000u | (mantissa << 13));
  return bits<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_bfloat16_rn(float f) {
  const uint32_t x = bits<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: CUDA's canonical one
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace blv_emu

struct __half {
  uint16_t raw;
};
struct __nv_bfloat16 {
  uint16_t raw;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) { return blv_emu::half_to_float(h.raw); }
inline __half __float2half_rn(float f) { return {blv_emu::float_to_half_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return blv_emu::bits<float>(static_cast<uint32_t>(b.raw) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {blv_emu::float_to_bfloat16_rn(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ------------------------------------------------------------------ math and bit intrinsics

inline float __uint_as_float(unsigned u) { return blv_emu::bits<float>(u); }
inline unsigned __float_as_uint(float f) { return blv_emu::bits<unsigned>(f); }
inline float __fmul_rn(float a, float b) { return a * b; }  // the emulation builds with -ffp-contract=off
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((static_cast<uint64_t>(hi) << 32) | lo) >> (shift & 31u));
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}

// ------------------------------------------------------------------ threads, blocks, barriers

namespace blv_emu {

struct Site {  // where a barrier was called
  const char* op;
  const char* file;
  int line;
  bool operator==(const Site& o) const { return line == o.line && !std::strcmp(op, o.op) && !std::strcmp(file, o.file); }
};

inline std::string where(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(s.op) + " at " + (slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

inline std::string lane_list(uint32_t lanes) {  // "0-15, 17"
  std::string out;
  for (int i = 0; i < 32;) {
    if (!(lanes >> i & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (lanes >> (j + 1) & 1u)) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(i) + (j > i ? "-" + std::to_string(j) : "");
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

enum class State { kReady, kWaiting, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  dim3 thread_idx;
  Site waiting_at = {"", "", 0};
  uint64_t result = 0;  // a shuffle's value for this lane
};

enum class ShuffleKind { kDown, kXor };

struct Shuffle {  // a warp's pending shuffle at one call site
  Site site;
  ShuffleKind kind;
  unsigned mask;
  uint32_t arrived = 0;
  int size = 0;  // of the value type
  uint64_t value[32] = {};
  int operand[32] = {}, width[32] = {};
};

struct SyncThreads {  // the block's pending __syncthreads at one call site
  Site site;
  int arrived = 0;
};

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  int threads = 0, current = 0, done = 0;
  std::vector<Fiber> fibers;
  std::vector<int> ready;  // a FIFO, drained from `next`
  size_t next = 0;
  std::vector<std::vector<Shuffle>> shuffles;  // per warp
  std::vector<SyncThreads> syncs;
  ucontext_t scheduler;
  bool failed = false;
  const std::function<void()>* body = nullptr;
};

struct Failure {
  cudaError_t code = cudaSuccess;
  std::string message;
  uint64_t block = UINT64_MAX;  // the lowest failing block is reported: the same with any worker count
};

inline thread_local Block* tls_block = nullptr;

struct Launch {
  std::mutex mutex;
  Failure failure;
  std::atomic<bool> stop{false};
  void record(cudaError_t code, const std::string& message, uint64_t block) {
    std::lock_guard<std::mutex> lock(mutex);
    if (block < failure.block) failure = {code, message, block};
    stop = true;
  }
};
inline thread_local Launch* tls_launch = nullptr;

inline uint64_t linear(const dim3& i, const dim3& n) { return (static_cast<uint64_t>(i.z) * n.y + i.y) * n.x + i.x; }

inline std::string block_name(const Block& b) {
  return "block (" + std::to_string(b.block_idx.x) + "," + std::to_string(b.block_idx.y) + "," +
         std::to_string(b.block_idx.z) + ")";
}

inline std::string thread_name(const Block& b, int t) {
  return block_name(b) + " thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) + " lane " +
         std::to_string(t % 32) + ")";
}

// Leave the fiber for the scheduler until a barrier makes it ready again.
inline void yield_waiting(Block& b, int me, const Site& site) {
  b.fibers[me].state = State::kWaiting;
  b.fibers[me].waiting_at = site;
  swapcontext(&b.fibers[me].context, &b.scheduler);
}

inline void make_ready(Block& b, int t) {
  b.fibers[t].state = State::kReady;
  b.ready.push_back(t);
}

// Fails the launch from inside a kernel: the block stops here, its fibers are abandoned.
[[noreturn]] inline void fail(cudaError_t code, const std::string& what) {
  Block& b = *tls_block;
  const int me = b.current;
  tls_launch->record(code, thread_name(b, me) + ": " + what, linear(b.block_idx, b.grid_dim));
  b.failed = true;
  b.fibers[me].state = State::kDone;
  swapcontext(&b.fibers[me].context, &b.scheduler);
  std::abort();  // never resumed
}

inline void syncthreads(const Site& site) {
  Block& b = *tls_block;
  const int me = b.current;
  auto it = std::find_if(b.syncs.begin(), b.syncs.end(), [&](const SyncThreads& s) { return s.site == site; });
  if (it == b.syncs.end()) it = b.syncs.insert(b.syncs.end(), SyncThreads{site, 0});
  if (++it->arrived < b.threads) return yield_waiting(b, me, site);
  b.syncs.erase(it);  // complete: every thread goes on
  for (int t = 0; t < b.threads; ++t)
    if (t != me) make_ready(b, t);
}

inline int source_lane(ShuffleKind kind, int lane, int operand, int width) {
  const int base = lane / width * width, offset = lane % width;
  switch (kind) {
    case ShuffleKind::kDown: return offset + operand < width ? lane + operand : lane;
    default: {
      const int source = lane ^ operand;
      return source / width * width == base ? source : lane;
    }
  }
}

template <typename V>
V shuffle(ShuffleKind kind, unsigned mask, V value, int operand, int width, const Site& site) {
  static_assert(sizeof(V) <= 8 && std::is_trivially_copyable_v<V>, "shuffle of a value over 8 bytes");
  Block& b = *tls_block;
  const int me = b.current, warp = me / 32, lane = me % 32;
  const int lanes = std::min(32, b.threads - warp * 32);
  if (!(mask >> lane & 1u)) fail(cudaErrorLaunchFailure, where(site) + " with a mask that excludes the calling lane");
  if (lanes < 32 && (mask >> lanes) != 0) fail(cudaErrorLaunchFailure, where(site) + " names lanes past the block");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(cudaErrorLaunchFailure, where(site) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  std::vector<Shuffle>& pending = b.shuffles[warp];
  auto it = std::find_if(pending.begin(), pending.end(), [&](const Shuffle& s) { return s.site == site; });
  if (it == pending.end()) it = pending.insert(pending.end(), Shuffle{site, kind, mask});
  if (it->mask != mask)
    fail(cudaErrorLaunchFailure, where(site) + ": lanes disagree on the mask (0x" + std::to_string(it->mask) + ")");
  uint64_t raw = 0;
  std::memcpy(&raw, &value, sizeof(V));
  it->value[lane] = raw;
  it->operand[lane] = operand;
  it->width[lane] = width;
  it->size = sizeof(V);
  it->arrived |= 1u << lane;
  if (it->arrived != mask) {
    yield_waiting(b, me, site);
  } else {  // complete: every lane's result, then the others go on
    const Shuffle s = *it;
    pending.erase(it);
    for (int l = 0; l < 32; ++l) {
      if (!(s.mask >> l & 1u)) continue;
      const int source = source_lane(s.kind, l, s.operand[l], s.width[l]);
      if (!(s.mask >> source & 1u))
        fail(cudaErrorLaunchFailure, where(site) + ": lane " + std::to_string(l) + " reads lane " +
                                         std::to_string(source) + ", which the mask excludes");
      b.fibers[warp * 32 + l].result = s.value[source];
      if (l != lane) make_ready(b, warp * 32 + l);
    }
  }
  V out;
  std::memcpy(&out, &b.fibers[me].result, sizeof(V));
  return out;
}

// No fiber can run but some have not finished: say who waits where, and who is missing.
inline std::string deadlock_report(const Block& b) {
  auto doing = [&](int t) {
    const Fiber& f = b.fibers[t];
    return f.state == State::kDone ? std::string("exited") : "waiting at " + where(f.waiting_at);
  };
  std::string out = block_name(b) + " deadlocks:";
  for (const SyncThreads& s : b.syncs) {
    out += " " + where(s.site) + " reached by " + std::to_string(s.arrived) + " of " + std::to_string(b.threads) +
           " threads;";
    for (int t = 0; t < b.threads; ++t)
      if (!(b.fibers[t].state == State::kWaiting && b.fibers[t].waiting_at == s.site)) {
        out += " thread " + std::to_string(t) + " " + doing(t) + ";";
        break;  // the first is enough to point at the divergence
      }
  }
  for (size_t w = 0; w < b.shuffles.size(); ++w) {
    for (const Shuffle& s : b.shuffles[w]) {
      const uint32_t missing = s.mask & ~s.arrived;
      out += " warp " + std::to_string(w) + ": " + where(s.site) + " reached by lanes " + lane_list(s.arrived) +
             ", not by lanes " + lane_list(missing);
      for (int l = 0; l < 32; ++l)
        if (missing >> l & 1u) {
          out += " (lane " + std::to_string(l) + " " + doing(static_cast<int>(w) * 32 + l) + ")";
          break;
        }
      out += ";";
    }
  }
  return out;
}

// ------------------------------------------------------------------ launches

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

// Fiber stacks, each below a PROT_NONE guard page (an overflow faults instead of corrupting).
class Stacks {
 public:
  explicit Stacks(int count) : count_(count) {
    bytes_ = static_cast<size_t>(count) * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<char*>(p);
    for (int i = 0; i < count; ++i) mprotect(base_ + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(int i) const { return base_ + i * (kStackBytes + kGuardBytes) + kGuardBytes; }
  int count() const { return count_; }

 private:
  char* base_;
  size_t bytes_;
  int count_;
};

inline void fiber_main() {
  Block& b = *tls_block;
  const int me = b.current;
  (*b.body)();
  b.fibers[me].state = State::kDone;
  ++b.done;
}  // returns to uc_link: the scheduler

inline void run_block(Block& b, const Stacks& stacks) {
  b.done = 0;
  b.failed = false;
  b.ready.clear();
  b.next = 0;
  for (auto& w : b.shuffles) w.clear();
  b.syncs.clear();
  for (int t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = State::kReady;
    f.thread_idx = dim3(t % b.block_dim.x, t / b.block_dim.x % b.block_dim.y, t / (b.block_dim.x * b.block_dim.y));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks.stack(t);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
    b.ready.push_back(t);
  }
  while (b.next < b.ready.size() && !b.failed) {
    b.current = b.ready[b.next++];
    swapcontext(&b.scheduler, &b.fibers[b.current].context);
  }
  if (!b.failed && b.done < b.threads) {
    tls_launch->record(cudaErrorLaunchTimeout, deadlock_report(b), linear(b.block_idx, b.grid_dim));
    b.failed = true;
  }
}

struct LastError {
  std::mutex mutex;
  cudaError_t code = cudaSuccess;     // cleared by cudaGetLastError
  cudaError_t described = cudaSuccess;  // the code `message` belongs to
  std::string message;
};
inline LastError last_error;

inline int workers_for(uint64_t blocks) {
  const char* env = std::getenv("BLV_EMULATION_WORKERS");
  const unsigned cores = env ? static_cast<unsigned>(std::atoi(env)) : std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min<uint64_t>(blocks, std::max(1u, cores)));
}

// Runs every block of the grid to completion (or to the first failure).
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  auto set = [](cudaError_t code, const std::string& message) {
    std::lock_guard<std::mutex> lock(last_error.mutex);
    last_error.code = code;
    if (code != cudaSuccess) last_error.described = code, last_error.message = message;
  };
  if (blocks == 0 || threads == 0 || threads > 1024 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
      block.z > 64)
    return set(cudaErrorInvalidConfiguration, "invalid launch configuration");
  Launch launch;
  std::atomic<uint64_t> next_block{0};
  auto work = [&] {
    tls_launch = &launch;
    Stacks stacks(static_cast<int>(threads));
    Block b;
    b.block_dim = block;
    b.grid_dim = grid;
    b.threads = static_cast<int>(threads);
    b.fibers.resize(threads);
    b.shuffles.resize((threads + 31) / 32);
    b.body = &body;
    tls_block = &b;
    for (uint64_t i; !launch.stop && (i = next_block++) < blocks;) {
      b.block_idx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                         static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
      run_block(b, stacks);
    }
    tls_block = nullptr;
    tls_launch = nullptr;
  };
  const int workers = workers_for(blocks);
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  set(launch.failure.code, launch.failure.message);
}

// BLV_LAUNCH(grid, block, stream, kernel)(args...): the arguments converted to the kernel's
// parameter types once, as a launch copies them, then every thread calls the kernel with them.
template <typename... P>
struct Launcher {
  dim3 grid, block;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, body);
  }
};

template <typename... P>
Launcher<P...> launcher(dim3 grid, dim3 block, cudaStream_t, void (*kernel)(P...)) {
  return {grid, block, kernel};
}

inline const Block& block() { return *tls_block; }

// ------------------------------------------------------------------ checked memory accesses

// Accesses through the intrinsics, by size in bytes (1..16): what a test reads to see which
// accesses a kernel vectorised (blv_emulation_accesses below).
struct Counts {
  std::atomic<uint64_t> loads[17], stores[17];
};
inline Counts counts;

template <typename V>
inline V load(const V* p, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V))
    fail(cudaErrorMisalignedAddress, std::string(op) + ": misaligned " + std::to_string(sizeof(V)) + "-byte load at " +
                                         std::to_string(reinterpret_cast<uintptr_t>(p)));
  counts.loads[sizeof(V)].fetch_add(1, std::memory_order_relaxed);
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(V* p, const V& v, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(V))
    fail(cudaErrorMisalignedAddress, std::string(op) + ": misaligned " + std::to_string(sizeof(V)) +
                                         "-byte store at " + std::to_string(reinterpret_cast<uintptr_t>(p)));
  counts.stores[sizeof(V)].fetch_add(1, std::memory_order_relaxed);
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace blv_emu

#define threadIdx (::blv_emu::block().fibers[::blv_emu::block().current].thread_idx)
#define blockIdx (::blv_emu::block().block_idx)
#define blockDim (::blv_emu::block().block_dim)
#define gridDim (::blv_emu::block().grid_dim)

#ifndef BLV_LAUNCH
#define BLV_LAUNCH(grid, block, stream, ...) ::blv_emu::launcher((grid), (block), (stream), __VA_ARGS__)
#endif

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(blv_emu::last_error.mutex);
  const cudaError_t code = blv_emu::last_error.code;
  blv_emu::last_error.code = cudaSuccess;
  return code;
}

// The emulation's description of the last failure with this code (block, thread, site), else its name.
inline const char* cudaGetErrorString(cudaError_t code) {
  std::lock_guard<std::mutex> lock(blv_emu::last_error.mutex);
  if (code != cudaSuccess && code == blv_emu::last_error.described) return blv_emu::last_error.message.c_str();
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchTimeout: return "the launch timed out and was terminated";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  blv_emu::syncthreads({"__syncthreads", file, line});
}

template <typename V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return blv_emu::shuffle(blv_emu::ShuffleKind::kDown, mask, v, static_cast<int>(delta), width,
                          {"__shfl_down_sync", file, line});
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return blv_emu::shuffle(blv_emu::ShuffleKind::kXor, mask, v, lane_mask, width, {"__shfl_xor_sync", file, line});
}

// The counts of intrinsic loads and stores of each size since the last reset: loads[b], stores[b]
// for b in 0..16 bytes (17 values each); reset zeroes them after reading. `used`: an inline
// function, emitted (weak) in every library built on this header.
extern "C" __attribute__((used)) inline void blv_emulation_accesses(uint64_t* loads, uint64_t* stores, int reset) {
  for (int b = 0; b <= 16; ++b) {
    loads[b] = reset ? blv_emu::counts.loads[b].exchange(0) : blv_emu::counts.loads[b].load();
    stores[b] = reset ? blv_emu::counts.stores[b].exchange(0) : blv_emu::counts.stores[b].load();
  }
}

// Loads and stores with a cache hint: the hint is dropped, the alignment checked.
template <typename V>
inline V __ldg(const V* p) {
  return blv_emu::load(p, "__ldg");
}
template <typename V>
inline V __ldcs(const V* p) {
  return blv_emu::load(p, "__ldcs");
}
template <typename V>
inline void __stcs(V* p, V v) {
  blv_emu::store(p, v, "__stcs");
}
