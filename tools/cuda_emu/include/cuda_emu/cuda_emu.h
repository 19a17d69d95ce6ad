// cuda_emu: runs CUDA kernels on the CPU, for tests. Force-included (g++ -include) ahead of every emulated .cu,
// which is compiled as host C++ after two mechanical rewrites (tools/cuda_emu/emu.py): `k<<<cfg>>>(args)` becomes
// `k * ::cuda_emu::launch_config("k", __FILE__, __LINE__, cfg)(args)`, and `extern __shared__ T name[];` becomes a
// pointer to the block's dynamic shared memory. Everything else is provided here under CUDA's own names.
//
// Model: every CUDA thread is a fiber with its own stack; fibers of a block run on one OS thread and switch only
// at __syncthreads and at warp operations, so a block's memory is sequentially consistent and a race inside one
// barrier interval shows only as an order dependence (see the orders in runtime.cpp). A warp is 32 consecutive
// linear thread ids; warp operations rendezvous the lanes named in the mask. Misuse is reported as an error that
// fails the launch (runtime.cpp lists them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>

// Host compilers get empty __device__/__global__/__shared__ from the toolkit's host_defines.h; shared variables
// must be one per block instead of one per call. A block runs on one OS thread, so a thread-local static is the
// block's copy (refilled with 0xFF at each block's start, see static_shared).
#undef __shared__
#define __shared__ static thread_local
#define __launch_bounds__(...)

namespace cuda_emu {

using Site = std::source_location;

// Thrown by a launch in which the emulator found an error (it is also kept in the log that the tests read).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The fiber now running on this OS thread (null outside kernels). A fiber always sees itself here, so a value
// cached across a switch is still right.
extern thread_local const ThreadCtx* tls_thread;
// The perf build (emu.py --variant perf) compiles the kernels with -fsanitize=thread so that every load and store
// reports its address (runtime.cpp, "memory-traffic counters"). The emulator's own bookkeeping that kernel code
// reads, such as the thread's indices, is no CUDA memory access: these functions are left uninstrumented (GCC
// does not inline them into instrumented callers) and return by value, so the caller reads no runtime memory.
#define CUDA_EMU_NOT_COUNTED __attribute__((no_sanitize_thread))
CUDA_EMU_NOT_COUNTED inline uint3 thread_idx() { return tls_thread->thread_idx; }
CUDA_EMU_NOT_COUNTED inline uint3 block_idx() { return tls_thread->block_idx; }
CUDA_EMU_NOT_COUNTED inline dim3 block_dim() { return tls_thread->block_dim; }
CUDA_EMU_NOT_COUNTED inline dim3 grid_dim() { return tls_thread->grid_dim; }
void* block_dynamic_shared();

enum class WarpOp : uint8_t { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatchAny, kSyncWarp };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const Site& site);
enum class BarrierOp : uint8_t { kSync, kCount, kAnd, kOr };
int barrier(BarrierOp op, int predicate, const Site& site);
[[noreturn]] void fault(const char* what, const void* address, const Site& site);
// Called right after each static __shared__ declaration (third rewrite): the first thread of a block to pass it
// fills the variable with 0xFF and adds its size to the block's static shared memory, which counts against the
// same limits as on a GPU (static + dynamic <= 48 KiB without cudaFuncSetAttribute).
void static_shared(void* address, size_t bytes, const char* name, const Site& site);

template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuda_emu: warp operations take <= 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

template <typename T>
inline void check_aligned(const T* p, const Site& site) {
  // x86 forgives a misaligned vector load; a GPU faults on it.
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) fault("misaligned vector access", p, site);
}

// ---- launches ----------------------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  const char* kernel;  // the kernel expression as written before <<<
  const char* file;
  int line;
};
using InvokeFn = void (*)(const void* closure);
// closure_bytes: the kernel parameters live there (constant memory on a GPU): the perf counters skip reads of it.
void launch(const LaunchConfig& config, const void* kernel_id, InvokeFn invoke, const void* closure,
            size_t closure_bytes);

}  // namespace detail

template <typename T>
inline T* dynamic_shared() {
  return static_cast<T*>(detail::block_dynamic_shared());
}

template <typename... A>
struct PendingLaunch {
  detail::LaunchConfig config;
  std::tuple<A...> args;
};

struct LaunchBuilder {
  detail::LaunchConfig config;
  template <typename... A>
  PendingLaunch<std::decay_t<A>...> operator()(A&&... args) const {
    return {config, std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
  }
};

inline LaunchBuilder launch_config(const char* kernel, const char* file, int line, dim3 grid, dim3 block,
                                   size_t shared_bytes = 0, cudaStream_t /*stream*/ = nullptr) {
  return {detail::LaunchConfig{grid, block, shared_bytes, kernel, file, line}};
}

// `kernel * launch_config(...)(args...)`: the rewritten `kernel<<<...>>>(args...)`. Arguments are converted to the
// kernel's parameter types once; every thread then receives its own copies, as by-value kernel parameters are.
template <typename... P, typename... A>
void operator*(void (*kernel)(P...), PendingLaunch<A...>&& pending) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_emu: kernel launched with the wrong number of arguments");
  using Params = std::tuple<std::remove_cvref_t<P>...>;
  struct Closure {
    void (*kernel)(P...);
    Params params;
  };
  const Closure closure{kernel, std::apply([](auto&... a) { return Params(a...); }, pending.args)};
  detail::launch(
      pending.config, reinterpret_cast<const void*>(kernel),
      [](const void* c) {
        const Closure* cl = static_cast<const Closure*>(c);
        std::apply(cl->kernel, cl->params);
      },
      &closure, sizeof(closure));
}

// ---- memory-traffic counters (perf build only; runtime.cpp) ------------------------------------------------------
// One record per kernel launch. A request is one warp-level memory instruction: the k-th execution of one load or
// store instruction by the lanes of a warp between two __syncthreads. Sectors are 32-byte aligned segments; bytes
// are the distinct bytes the lanes asked for. Shared memory: wavefronts = the most distinct 4-byte words that one
// of the 32 banks must serve; ideal = distinct words / 32, rounded up (a 64- or 128-bit access needs 2 or 4).
struct PerfCounters {
  uint64_t load_requests, load_sectors, load_bytes;
  uint64_t store_requests, store_sectors, store_bytes;
  uint64_t atomic_requests, atomic_sectors, atomic_bytes;  // read-modify-write, global memory
  uint64_t shared_requests, shared_wavefronts, shared_ideal_wavefronts;
  double shared_worst_ways;  // the worst request's wavefronts / ideal
};
struct PerfRecord {
  const char* kernel;  // as written before <<<
  const char* file;
  int line;
  unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z;
  PerfCounters counters;
};

}  // namespace cuda_emu

extern "C" {
// 1 in the perf build. Records are kept from the last reset on; cuda_emu_perf_json adds per-instruction figures.
int cuda_emu_perf_enabled(void);
void cuda_emu_perf_reset(void);
int cuda_emu_perf_records(const cuda_emu::PerfRecord** records);
const char* cuda_emu_perf_json(void);
}

// The kernel-pointer overloads that cuda_runtime.h declares only for nvcc.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, void (*kernel)(P...), int block_size,
                                                                 size_t dynamic_shared_bytes) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, reinterpret_cast<const void*>(kernel), block_size,
                                                         dynamic_shared_bytes);
}

#define threadIdx (::cuda_emu::detail::thread_idx())
#define blockIdx (::cuda_emu::detail::block_idx())
#define blockDim (::cuda_emu::detail::block_dim())
#define gridDim (::cuda_emu::detail::grid_dim())
constexpr int warpSize = 32;

// ---- barriers and warp operations (each one a possible switch to another thread) ------------------------------
inline void __syncthreads(cuda_emu::Site site = cuda_emu::Site::current()) {
  cuda_emu::detail::barrier(cuda_emu::detail::BarrierOp::kSync, 0, site);
}
inline int __syncthreads_count(int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::detail::barrier(cuda_emu::detail::BarrierOp::kCount, predicate, site);
}
inline int __syncthreads_and(int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::detail::barrier(cuda_emu::detail::BarrierOp::kAnd, predicate, site);
}
inline int __syncthreads_or(int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::detail::barrier(cuda_emu::detail::BarrierOp::kOr, predicate, site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, cuda_emu::Site site = cuda_emu::Site::current()) {
  cuda_emu::detail::warp_op(cuda_emu::detail::WarpOp::kSyncWarp, mask, 0, 0, warpSize, site);
}

#define CUDA_EMU_SHFL(name, op, Arg)                                                                         \
  template <typename T>                                                                                      \
  inline T name(unsigned mask, T var, Arg arg, int width = warpSize,                                         \
                cuda_emu::Site site = cuda_emu::Site::current()) {                                           \
    return cuda_emu::detail::from_bits<T>(cuda_emu::detail::warp_op(                                         \
        cuda_emu::detail::WarpOp::op, mask, cuda_emu::detail::to_bits(var), static_cast<int>(arg), width, site)); \
  }
CUDA_EMU_SHFL(__shfl_sync, kShflIdx, int)
CUDA_EMU_SHFL(__shfl_up_sync, kShflUp, unsigned)
CUDA_EMU_SHFL(__shfl_down_sync, kShflDown, unsigned)
CUDA_EMU_SHFL(__shfl_xor_sync, kShflXor, int)
#undef CUDA_EMU_SHFL
inline unsigned __ballot_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return static_cast<unsigned>(
      cuda_emu::detail::warp_op(cuda_emu::detail::WarpOp::kBallot, mask, predicate != 0, 0, warpSize, site));
}
inline int __any_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return static_cast<int>(
      cuda_emu::detail::warp_op(cuda_emu::detail::WarpOp::kAny, mask, predicate != 0, 0, warpSize, site));
}
inline int __all_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return static_cast<int>(
      cuda_emu::detail::warp_op(cuda_emu::detail::WarpOp::kAll, mask, predicate != 0, 0, warpSize, site));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, cuda_emu::Site site = cuda_emu::Site::current()) {
  static_assert(std::is_arithmetic_v<T>, "cuda_emu: __match_any_sync takes an integer or floating value");
  return static_cast<unsigned>(cuda_emu::detail::warp_op(cuda_emu::detail::WarpOp::kMatchAny, mask,
                                                         cuda_emu::detail::to_bits(value), 0, warpSize, site));
}

// ---- memory: cached / streaming loads and stores, atomics, fences ------------------------------------------------
#if defined(CUDA_EMU_PERF)
extern "C" void cuda_emu_perf_access(const void* address, unsigned size, int store, const void* pc);
namespace cuda_emu::detail {
// A GPU moves a vector (float4, uint4) in one access; the host compiler splits the copy into its fields, which
// the instrumentation would count as four strided requests. These report the whole vector once, as one
// instruction of the caller (they are not inlined: the return address is the call site).
template <typename T>
CUDA_EMU_NOT_COUNTED __attribute__((noinline)) T counted_load(const T* p) {
  cuda_emu_perf_access(p, sizeof(T), 0, __builtin_return_address(0));
  T v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(T));
  return v;
}
template <typename T>
CUDA_EMU_NOT_COUNTED __attribute__((noinline)) void counted_store(T* p, const T& value) {
  cuda_emu_perf_access(p, sizeof(T), 1, __builtin_return_address(0));
  std::memcpy(static_cast<void*>(p), &value, sizeof(T));
}
}  // namespace cuda_emu::detail
#define CUDA_EMU_LOAD_VALUE(p) ::cuda_emu::detail::counted_load(p)
#define CUDA_EMU_STORE_VALUE(p, value) ::cuda_emu::detail::counted_store(p, value)
#else
#define CUDA_EMU_LOAD_VALUE(p) (*(p))
#define CUDA_EMU_STORE_VALUE(p, value) (*(p) = (value))
#endif
#define CUDA_EMU_LOAD(name)                                                                \
  template <typename T>                                                                    \
  inline T name(const T* p, cuda_emu::Site site = cuda_emu::Site::current()) {             \
    cuda_emu::detail::check_aligned(p, site);                                              \
    return CUDA_EMU_LOAD_VALUE(p);                                                         \
  }
CUDA_EMU_LOAD(__ldg)
CUDA_EMU_LOAD(__ldcg)
CUDA_EMU_LOAD(__ldca)
CUDA_EMU_LOAD(__ldcs)
CUDA_EMU_LOAD(__ldlu)
CUDA_EMU_LOAD(__ldcv)
#undef CUDA_EMU_LOAD
#define CUDA_EMU_STORE(name)                                                               \
  template <typename T>                                                                    \
  inline void name(T* p, T value, cuda_emu::Site site = cuda_emu::Site::current()) {       \
    cuda_emu::detail::check_aligned(p, site);                                              \
    CUDA_EMU_STORE_VALUE(p, value);                                                        \
  }
CUDA_EMU_STORE(__stcg)
CUDA_EMU_STORE(__stcs)
CUDA_EMU_STORE(__stwb)
CUDA_EMU_STORE(__stwt)
#undef CUDA_EMU_STORE

// Blocks run concurrently on several OS threads: atomics are real atomics.
#define CUDA_EMU_ATOMIC(name, method)                    \
  template <typename T>                                  \
  inline T name(T* address, T value) {                   \
    return std::atomic_ref<T>(*address).method(value);   \
  }
CUDA_EMU_ATOMIC(atomicAdd, fetch_add)
CUDA_EMU_ATOMIC(atomicSub, fetch_sub)
CUDA_EMU_ATOMIC(atomicExch, exchange)
CUDA_EMU_ATOMIC(atomicOr, fetch_or)
CUDA_EMU_ATOMIC(atomicAnd, fetch_and)
#undef CUDA_EMU_ATOMIC
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
namespace cuda_emu::detail {
// Replaces *address by value while better(value, *address); returns the old value.
template <typename T, typename Better>
inline T atomic_replace_if(T* address, T value, Better better) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (better(value, old) && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
}  // namespace cuda_emu::detail
template <typename T>
inline T atomicMax(T* address, T value) {
  return cuda_emu::detail::atomic_replace_if(address, value, [](T a, T b) { return b < a; });
}
template <typename T>
inline T atomicMin(T* address, T value) {
  return cuda_emu::detail::atomic_replace_if(address, value, [](T a, T b) { return a < b; });
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- integer and bit intrinsics -------------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }

// ---- float intrinsics: IEEE round-to-nearest on the CPU (the GPU's approximate ones are not modelled) ------------
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// isfinite / isnan / isinf at global scope, as CUDA's math headers declare them for device code (<cmath> puts them
// in std:: only).
using std::isfinite;
using std::isinf;
using std::isnan;

// min / max as CUDA's math headers declare them for device code (the host has only std::min / std::max).
#define CUDA_EMU_MINMAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
