// CUDA kernels of temperature_kl: per-row KL(softmax(teacher / T) || softmax(student / T)) and, in the same
// pass, d(row_loss)/d(student); plus the backward's row-wise rescale of that stored gradient.
//
// Memory traffic of temperature_kl_kernel: reads teacher and student once from DRAM, writes the gradient once.
// The gradient sweep reads the row a second time right after the row's reduction; the grid is sized so that the
// rows in flight fit in L2 (see launch_temperature_kl), so that second read is meant to come from L2.
// temperature_kl_backward_kernel reads grad once and writes the result once.
// Achieved bandwidth: not measured yet (no GPU was available when this was written); bench/ measures it against
// the copy bandwidth of the same device, and the grid / block choices below are to be tuned from those numbers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "epic_ext.h"
#include "kl_state.cuh"

namespace epic_ext {
namespace {

// 512 threads, at most 2 blocks per SM (64 registers per thread): one block per row, and 16 warps per row keep
// enough 16-byte loads in flight per SM with only one or two rows per SM, which is what the L2 budget allows for
// LLM vocabularies (a bf16 row pair of V = 32k is 128 KiB). Two blocks per SM let one block's reduction overlap
// the other's streaming.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSm = 2;
// Elements per vector step of a kernel over element types A and B: 16 bytes of the wider one (4 when either is fp32,
// else 8), so that each lane's step is one access per tensor and a warp's request is contiguous: 512 bytes of the
// wider type (16 sectors, all used) and 256 of a narrower one. A fixed 8 elements made an fp32 step two float4
// loads 32 bytes apart per lane: every request touched 32 sectors and used half of each (50%, make cuda-perf).
template <typename A, typename B = A>
inline constexpr int kChunkOf = 16 / static_cast<int>(sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
// Vector steps whose loads are issued before any of them is used: more bytes in flight per thread.
constexpr int kUnroll = 2;
// Indices inside a row are int; this keeps every loop bound (index + kUnroll * kThreads * kChunk) far from overflow.
constexpr int64_t kMaxVocab = int64_t{1} << 30;

constexpr int kBackwardThreads = 256;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

using dev::from_float;
using dev::to_float;

// N consecutive elements, p aligned to their N * sizeof(T) bytes (16, or 8 for a 16-bit type beside an fp32 one).
// kStreaming marks the line evict-first in L2: used for data that is read for the last time (the gradient sweep,
// the backward) so it does not push out rows still awaiting their second read.
template <typename T, int N>
struct Chunk;

template <int N>
struct Chunk<float, N> {
  static_assert(N == 4, "fp32 is always the wider type: one float4 per step");
  template <bool kStreaming>
  static __device__ __forceinline__ void load(const float* p, float (&v)[N]) {
    const float4* q = reinterpret_cast<const float4*>(p);
    const float4 a = kStreaming ? __ldcs(q) : __ldg(q);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  }
  static __device__ __forceinline__ void store(float* p, const float (&v)[N]) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  }
};

// bf16 and fp16: a uint4 (8 elements) or uint2 (4, beside fp32) of packed pairs; the lower half of each 32-bit word
// is the lower-address element.
template <typename T, typename T2, int N>
struct PackedChunk {
  static_assert(sizeof(T2) == 4, "packed pair must be 32 bits");
  static_assert(N == 8 || N == 4, "a step is 16 or 8 bytes");
  using Raw = std::conditional_t<N == 8, uint4, uint2>;
  template <bool kStreaming>
  static __device__ __forceinline__ void load(const T* p, float (&v)[N]) {
    const Raw* q = reinterpret_cast<const Raw*>(p);
    const Raw raw = kStreaming ? __ldcs(q) : __ldg(q);
    const T2* pairs = reinterpret_cast<const T2*>(&raw);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      const float2 f = to_float2(pairs[j]);
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
  }
  static __device__ __forceinline__ void store(T* p, const float (&v)[N]) {
    Raw raw;
    T2* pairs = reinterpret_cast<T2*>(&raw);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) pairs[j] = from_float2(v[2 * j], v[2 * j + 1]);
    __stcs(reinterpret_cast<Raw*>(p), raw);
  }
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }
  static __device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
  static __device__ __forceinline__ T2 from_float2(float lo, float hi) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __floats2bfloat162_rn(lo, hi);
    } else {
      return __floats2half2_rn(lo, hi);
    }
  }
};

template <int N>
struct Chunk<__nv_bfloat16, N> : PackedChunk<__nv_bfloat16, __nv_bfloat162, N> {};
template <int N>
struct Chunk<__half, N> : PackedChunk<__half, __half2, N> {};

// Fills a grad row of an ignored (0) or invalid (NaN) row.
template <typename S, bool kVec>
__device__ __forceinline__ void fill_row(S* row, int vocab, float value) {
  constexpr int kChunk = kChunkOf<S>;
  const int num_chunks = kVec ? vocab / kChunk : 0;
  float v[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) v[j] = value;
  for (int c = threadIdx.x; c < num_chunks; c += kThreads) Chunk<S, kChunk>::store(row + c * kChunk, v);
  const S fill = from_float<S>(value);
  for (int i = num_chunks * kChunk + threadIdx.x; i < vocab; i += kThreads) row[i] = fill;
}

__device__ __forceinline__ kl::KlState<float> warp_merge(kl::KlState<float> st, float log2e_over_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    kl::KlState<float> other;
    other.teacher_max = __shfl_xor_sync(0xffffffffu, st.teacher_max, offset);
    other.teacher_sum = __shfl_xor_sync(0xffffffffu, st.teacher_sum, offset);
    other.student_max = __shfl_xor_sync(0xffffffffu, st.student_max, offset);
    other.student_sum = __shfl_xor_sync(0xffffffffu, st.student_sum, offset);
    other.cross = __shfl_xor_sync(0xffffffffu, st.cross, offset);
    other.shift = __shfl_xor_sync(0xffffffffu, st.shift, offset);
    other.infinite = __shfl_xor_sync(0xffffffffu, st.infinite, offset);
    st = kl::kl_state_merge(st, other, log2e_over_t);
  }
  return st;
}

// One block per row (grid-stride over rows; the grid is capped on the host, see launch_temperature_kl).
// Pass 1 folds the row into a per-thread online-softmax state, the block merges the states, thread 0 writes the
// loss; pass 2 (compute_grad only) reads the row again, now from L2, and writes the gradient.
// kVec: every row start of student, teacher (and grad) is 16-byte aligned, so whole chunks use vector accesses;
// the vocab % kChunk tail, and everything when !kVec, goes element by element (still coalesced).
template <typename S, typename Tt, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    temperature_kl_kernel(const S* __restrict__ student,           // [N, V] row stride student_row_stride
                          int64_t student_row_stride,
                          const Tt* __restrict__ teacher,          // [M, V] row stride teacher_row_stride
                          int64_t teacher_row_stride,
                          const int64_t* __restrict__ row_index,   // [N] or nullptr (row i pairs with row i)
                          int64_t num_rows, int64_t num_teacher_rows, int vocab, float log2e_over_t, double scale,
                          float grad_scale,
                          float* __restrict__ row_loss,            // [N]
                          S* __restrict__ grad) {                  // [N, V] contiguous, or nullptr: no gradient
  __shared__ kl::KlState<float> warp_states[kWarps];
  __shared__ kl::KlRowStats row_stats;

  constexpr int kChunk = kChunkOf<S, Tt>;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int num_chunks = kVec ? vocab / kChunk : 0;

  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    // Block-uniform: the early `continue` below skips no __syncthreads for only part of the block.
    const int64_t teacher_row = row_index != nullptr ? row_index[row] : row;
    S* grad_row = grad != nullptr ? grad + row * static_cast<int64_t>(vocab) : nullptr;
    if (teacher_row < 0 || teacher_row >= num_teacher_rows) {
      // -1 ignores the row. Anything else was rejected on the host; should one slip through, NaN makes it visible
      // without reading outside teacher.
      const float fill = teacher_row == -1 ? 0.0f : quiet_nan();
      if (threadIdx.x == 0) row_loss[row] = fill;
      if (grad_row != nullptr) fill_row<S, kVec>(grad_row, vocab, fill);
      continue;
    }
    const S* student_row = student + row * student_row_stride;
    const Tt* teacher_row_ptr = teacher + teacher_row * teacher_row_stride;

    kl::KlState<float> st = kl::kl_state_empty<float>();
    int c = threadIdx.x;
    for (; c + (kUnroll - 1) * kThreads < num_chunks; c += kUnroll * kThreads) {
      float s[kUnroll][kChunk];
      float t[kUnroll][kChunk];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        Chunk<S, kChunk>::template load<false>(student_row + (c + u * kThreads) * kChunk, s[u]);
        Chunk<Tt, kChunk>::template load<false>(teacher_row_ptr + (c + u * kThreads) * kChunk, t[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) kl::kl_state_add(st, t[u][j], s[u][j], log2e_over_t);
      }
    }
    for (; c < num_chunks; c += kThreads) {
      float s[kChunk];
      float t[kChunk];
      Chunk<S, kChunk>::template load<false>(student_row + c * kChunk, s);
      Chunk<Tt, kChunk>::template load<false>(teacher_row_ptr + c * kChunk, t);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) kl::kl_state_add(st, t[j], s[j], log2e_over_t);
    }
    for (int i = num_chunks * kChunk + threadIdx.x; i < vocab; i += kThreads) {
      kl::kl_state_add(st, to_float(teacher_row_ptr[i]), to_float(student_row[i]), log2e_over_t);
    }

    // Block merge: warps by shuffles, then warp 0 over the per-warp states. warp_states is rewritten for the next
    // row only after this row's second barrier, by which time warp 0 has read it; row_stats is rewritten only after
    // the next row's first barrier, by which time every thread has read it.
    st = warp_merge(st, log2e_over_t);
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? warp_states[lane] : kl::kl_state_empty<float>();
      st = warp_merge(st, log2e_over_t);
      if (lane == 0) {
        const double loss = kl::kl_state_finish(st, log2e_over_t);
        row_loss[row] = static_cast<float>(scale * loss);
        kl::KlRowStats stats = kl::kl_row_stats(st, grad_scale);
        // A NaN row (NaN or +inf entries, or a teacher row of -inf only) has a NaN gradient everywhere, as in the
        // reference; left alone, the finite entries would get finite values (found by the CPU emulator).
        if (isnan(loss)) stats.teacher_coeff = stats.student_coeff = quiet_nan();
        row_stats = stats;
      }
    }
    __syncthreads();

    if (grad_row != nullptr) {
      const kl::KlRowStats rs = row_stats;
      for (int cc = threadIdx.x; cc < num_chunks; cc += kThreads) {
        float s[kChunk];
        float t[kChunk];
        float g[kChunk];
        Chunk<S, kChunk>::template load<true>(student_row + cc * kChunk, s);
        Chunk<Tt, kChunk>::template load<true>(teacher_row_ptr + cc * kChunk, t);
#pragma unroll
        for (int j = 0; j < kChunk; ++j) g[j] = kl::kl_grad_element(s[j], t[j], log2e_over_t, rs);
        Chunk<S, kChunk>::store(grad_row + cc * kChunk, g);
      }
      for (int i = num_chunks * kChunk + threadIdx.x; i < vocab; i += kThreads) {
        grad_row[i] = from_float<S>(
            kl::kl_grad_element(to_float(student_row[i]), to_float(teacher_row_ptr[i]), log2e_over_t, rs));
      }
    }
  }
}

// out[i, :] = grad[i, :] * grad_rows[i], fp32 math. One block per row, grid-stride over rows.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kBackwardThreads)
    temperature_kl_backward_kernel(const T* __restrict__ grad,             // [N, V] row stride grad_row_stride
                                   int64_t grad_row_stride,
                                   const float* __restrict__ grad_rows,    // [N] stride grad_rows_stride
                                   int64_t grad_rows_stride, int64_t num_rows, int vocab,
                                   T* __restrict__ out) {                  // [N, V] contiguous
  constexpr int kChunk = kChunkOf<T>;
  const int num_chunks = kVec ? vocab / kChunk : 0;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const float factor = grad_rows[row * grad_rows_stride];
    const T* in_row = grad + row * grad_row_stride;
    T* out_row = out + row * static_cast<int64_t>(vocab);
    for (int c = threadIdx.x; c < num_chunks; c += kBackwardThreads) {
      float v[kChunk];
      Chunk<T, kChunk>::template load<true>(in_row + c * kChunk, v);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] *= factor;
      Chunk<T, kChunk>::store(out_row + c * kChunk, v);
    }
    for (int i = num_chunks * kChunk + threadIdx.x; i < vocab; i += kBackwardThreads) {
      out_row[i] = from_float<T>(to_float(in_row[i]) * factor);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<element type>) for the three logit dtypes (the argument checks already rejected the rest).
template <typename F>
void dispatch_logit_dtype(at::ScalarType dtype, const char* op_name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    default:
      TORCH_CHECK(false, op_name, ": unsupported dtype ", dtype);
  }
}

bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row of a [rows, V] matrix with this base pointer and row stride starts 16-byte aligned.
bool rows_aligned16(const void* base, int64_t row_stride, int64_t rows, size_t element_size) {
  return is_aligned16(base) && (rows <= 1 || (row_stride * static_cast<int64_t>(element_size)) % 16 == 0);
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// Kernels read rows along the vocabulary: only the last dimension has to be dense, any row stride is fine.
at::Tensor with_unit_last_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

template <typename S, typename Tt>
void launch_temperature_kl(const at::Tensor& student,   // [N, V] S, unit stride along V
                           const at::Tensor& teacher,   // [M, V] Tt, unit stride along V
                           const int64_t* row_index,    // [N] or nullptr, values checked
                           double temperature, double scale,
                           at::Tensor& row_loss,        // [N] fp32
                           S* grad,                     // [N, V] contiguous, or nullptr
                           int device, cudaStream_t stream) {
  const int64_t num_rows = student.size(0);
  const int64_t num_teacher_rows = teacher.size(0);
  const int64_t vocab = student.size(1);
  const S* student_ptr = static_cast<const S*>(student.data_ptr());
  const Tt* teacher_ptr = static_cast<const Tt*>(teacher.data_ptr());
  const bool vec = rows_aligned16(student_ptr, student.stride(0), num_rows, sizeof(S)) &&
                   rows_aligned16(teacher_ptr, teacher.stride(0), num_teacher_rows, sizeof(Tt)) &&
                   (grad == nullptr || rows_aligned16(grad, vocab, num_rows, sizeof(S)));
  auto kernel = vec ? temperature_kl_kernel<S, Tt, true> : temperature_kl_kernel<S, Tt, false>;

  // Grid: the gradient sweep re-reads each row about one row-time after its first read, during which the rows in
  // flight stream roughly (rows in flight) * (row bytes) through L2. Cap the rows in flight so that this fits in
  // 3/4 of L2, but keep at least one row per SM; when even that does not fit, L2 cannot serve the second read
  // anyway and the kernel runs at full occupancy instead.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int l2_bytes = device_attribute(cudaDevAttrL2CacheSize, device);
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const int64_t resident = static_cast<int64_t>(sms) * std::max(blocks_per_sm, 1);
  const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(S) + sizeof(Tt));
  const int64_t l2_rows = static_cast<int64_t>(l2_bytes) * 3 / 4 / row_bytes;
  const int64_t rows_in_flight = l2_rows >= sms ? std::min(resident, l2_rows) : resident;
  const unsigned int grid = static_cast<unsigned int>(std::max<int64_t>(1, std::min(num_rows, rows_in_flight)));

  const float log2e_over_t = static_cast<float>(1.4426950408889634 / temperature);
  const float grad_scale = static_cast<float>(scale / temperature);
  kernel<<<grid, kThreads, 0, stream>>>(student_ptr, student.stride(0), teacher_ptr, teacher.stride(0), row_index,
                                        num_rows, num_teacher_rows, static_cast<int>(vocab), log2e_over_t,
                                        scale, grad_scale, row_loss.data_ptr<float>(), grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_temperature_kl_backward(const at::Tensor& grad,       // [N, V] T, unit stride along V
                                    const at::Tensor& grad_rows,  // [N] fp32
                                    at::Tensor& out,              // [N, V] T, contiguous
                                    int device, cudaStream_t stream) {
  const int64_t num_rows = grad.size(0);
  const int64_t vocab = grad.size(1);
  const T* grad_ptr = static_cast<const T*>(grad.data_ptr());
  T* out_ptr = static_cast<T*>(out.data_ptr());
  const bool vec = rows_aligned16(grad_ptr, grad.stride(0), num_rows, sizeof(T)) &&
                   rows_aligned16(out_ptr, vocab, num_rows, sizeof(T));
  auto kernel = vec ? temperature_kl_backward_kernel<T, true> : temperature_kl_backward_kernel<T, false>;
  // Pure streaming: enough blocks to fill every SM, each looping over rows.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t resident = static_cast<int64_t>(sms) * (2048 / kBackwardThreads);
  const unsigned int grid = static_cast<unsigned int>(std::max<int64_t>(1, std::min(num_rows, resident)));
  kernel<<<grid, kBackwardThreads, 0, stream>>>(grad_ptr, grad.stride(0), grad_rows.data_ptr<float>(),
                                                grad_rows.stride(0), num_rows, static_cast<int>(vocab), out_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> temperature_kl_cuda(const at::Tensor& student,   // [N, V] fp32/bf16/fp16
                                                       const at::Tensor& teacher,   // [M, V] fp32/bf16/fp16
                                                       const std::optional<at::Tensor>& row_index,  // [N] int64
                                                       double temperature, double scale, bool compute_grad) {
  constexpr const char* OP_NAME = "temperature_kl";
  check_temperature_kl_args(student, teacher, row_index, temperature, scale);
  const int64_t num_rows = student.size(0);
  const int64_t num_teacher_rows = teacher.size(0);
  const int64_t vocab = student.size(1);
  TORCH_CHECK(vocab > 0, OP_NAME, ": student_logits must have a vocabulary size V > 0, got shape ", student.sizes());
  TORCH_CHECK(vocab < kMaxVocab, OP_NAME, ": student_logits vocabulary size V must be < ", kMaxVocab, ", got ",
              vocab);
  c10::cuda::CUDAGuard device_guard(student.device());

  at::Tensor row_loss = at::empty({num_rows}, student.options().dtype(at::kFloat));  // [N] fp32
  // [N, V] in the student's dtype, or [0] when no gradient is wanted.
  at::Tensor grad = compute_grad ? at::empty({num_rows, vocab}, student.options()) : at::empty({0}, student.options());
  if (num_rows == 0) return {row_loss, grad};

  at::Tensor row_index_dense;  // [N] int64, contiguous
  if (row_index.has_value()) {
    row_index_dense = row_index->contiguous();
    // One device reduction and one sync: out-of-range indices must fail loudly here rather than read outside
    // teacher (the kernel would only write NaN for them).
    const auto [min_index, max_index] = at::aminmax(row_index_dense);
    check_row_index_range(min_index.item<int64_t>(), max_index.item<int64_t>(), num_teacher_rows);
  }

  const at::Tensor student_dense = with_unit_last_stride(student);
  const at::Tensor teacher_dense = with_unit_last_stride(teacher);
  const int64_t* row_index_ptr = row_index.has_value() ? row_index_dense.data_ptr<int64_t>() : nullptr;
  const int device = student.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  dispatch_logit_dtype(student.scalar_type(), OP_NAME, [&](auto student_tag) {
    using S = typename decltype(student_tag)::type;
    dispatch_logit_dtype(teacher.scalar_type(), OP_NAME, [&](auto teacher_tag) {
      using Tt = typename decltype(teacher_tag)::type;
      S* grad_ptr = compute_grad ? static_cast<S*>(grad.data_ptr()) : nullptr;
      launch_temperature_kl<S, Tt>(student_dense, teacher_dense, row_index_ptr, temperature, scale, row_loss, grad_ptr,
                                   device, stream);
    });
  });
  return {row_loss, grad};
}

at::Tensor temperature_kl_backward_cuda(const at::Tensor& grad,         // [N, V] fp32/bf16/fp16
                                        const at::Tensor& grad_rows) {  // [N] fp32
  constexpr const char* OP_NAME = "temperature_kl_backward";
  check_temperature_kl_backward_args(grad, grad_rows);
  const int64_t num_rows = grad.size(0);
  const int64_t vocab = grad.size(1);
  TORCH_CHECK(vocab < kMaxVocab, OP_NAME, ": grad vocabulary size V must be < ", kMaxVocab, ", got ", vocab);
  c10::cuda::CUDAGuard device_guard(grad.device());

  at::Tensor out = at::empty({num_rows, vocab}, grad.options());  // [N, V] contiguous, grad's dtype
  if (num_rows == 0 || vocab == 0) return out;

  const at::Tensor grad_dense = with_unit_last_stride(grad);
  const int device = grad.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  dispatch_logit_dtype(grad.scalar_type(), OP_NAME, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_temperature_kl_backward<T>(grad_dense, grad_rows, out, device, stream);
  });
  return out;
}

}  // namespace epic_ext

TORCH_LIBRARY_IMPL(epic_ext, CUDA, m) {
  m.impl("temperature_kl", &epic_ext::temperature_kl_cuda);
  m.impl("temperature_kl_backward", &epic_ext::temperature_kl_backward_cuda);
}
