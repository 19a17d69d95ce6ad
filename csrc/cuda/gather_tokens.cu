// CUDA kernels of gather_tokens (rows of x picked along one dimension) and its backward (those rows added back
// into zeros of x's shape, repeated indices accumulating in a fixed order).
//
// Both view the tensor as [B, outer, L, inner] (outer = product of the sizes between the batch and `dim`, inner =
// product of the sizes after it), so that a "row" is `inner` contiguous elements and the gather moves whole rows.
//
// Memory traffic:
//   gather_rows_kernel: reads each selected row of x once (a row selected twice is read twice) and index once per
//     row; writes the output once. Rows are copied as raw bytes in the widest unit (16 bytes down to 1) that the
//     row size and both base pointers allow.
//   build_inverse_kernel: reads index once (twice when it is non-decreasing: the check, then binary searches that
//     L1 serves) and writes the bucket ends [B, length] and sources [B, K] (int32) once; for an index that is not
//     non-decreasing the counts live in shared memory when `length` fits in 48 KiB, else in the global bucket-end
//     array (L2).
//   scatter_rows_kernel: reads every grad row once (through the inverse lists) and writes every output row once,
//     zeros included, so the output needs no separate zero fill.
// Achieved bandwidth: not measured (no GPU was available when this was written); bench/ is where it belongs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.cuh"
#include "epic_ext.h"
#include "token_keys.cuh"

namespace epic_ext {
namespace {

constexpr int kThreads = 256;
// build_inverse_kernel keeps the per-destination counters in shared memory up to this many destinations (48 KiB,
// the limit without an opt-in, which also holds its static warp_totals); longer sequences count in global memory
// instead (same code, generic pointers).
constexpr int64_t kMaxSharedDestinations = (48 * 1024 - kThreads / 32 * sizeof(int)) / sizeof(int);

// ---------------------------------------------------------------------------------------------------------------
// Row layout shared by the kernels.

struct RowShape {
  int64_t rows;   // B * outer * (K or length): rows of the tensor that is written
  int64_t count;  // rows per (b, o) block of the written tensor: K (forward) or length (backward)
  int64_t outer;
  int64_t src_count;  // rows per (b, o) block of the tensor that is read: L (forward) or K (backward)
};

// A 2-D block: threadIdx.x walks along a row, threadIdx.y picks the row. One division pair per row, not per
// element: rows of one element (inner = 1) then cost the same as a flat copy.
struct BlockShape {
  dim3 block;
  unsigned int grid;
};

BlockShape block_shape(int64_t rows, int64_t units_per_row, int sms) {
  int bx = 1;
  while (bx < units_per_row && bx < kThreads) bx <<= 1;
  const int by = kThreads / bx;
  const int64_t wanted = (rows + by - 1) / by;
  // Enough blocks to keep every SM busy several times over; the kernels loop over the rest.
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return {dim3(bx, by), static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)))};
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: copy rows.

// out[b, o, k, :] = x[b, o, index[b, k], :], or zeros for index -1. U is the copy unit (uint4 ... uint8_t).
template <typename U>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const U* __restrict__ x,              // [B, outer, L, units_per_row] contiguous
                       const int64_t* __restrict__ index,    // [B, K] contiguous, values in [-1, L)
                       RowShape shape, int64_t units_per_row,
                       U* __restrict__ out) {                // [B, outer, K, units_per_row] contiguous
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < shape.rows;
       row += row_step) {
    const int64_t k = row % shape.count;
    const int64_t bo = row / shape.count;
    const int64_t b = bo / shape.outer;
    const int64_t src = index[b * shape.count + k];
    U* dst = out + row * units_per_row;
    if (src < 0) {
      for (int64_t c = threadIdx.x; c < units_per_row; c += blockDim.x) dst[c] = U{};
    } else {
      const U* from = x + (bo * shape.src_count + src) * units_per_row;
      for (int64_t c = threadIdx.x; c < units_per_row; c += blockDim.x) dst[c] = from[c];
    }
  }
}

template <typename U>
void launch_gather(const at::Tensor& x, const at::Tensor& index, const RowShape& shape, int64_t row_bytes,
                   at::Tensor& out, int sms, cudaStream_t stream) {
  const int64_t units_per_row = row_bytes / static_cast<int64_t>(sizeof(U));
  const BlockShape bs = block_shape(shape.rows, units_per_row, sms);
  gather_rows_kernel<U><<<bs.grid, bs.block, 0, stream>>>(static_cast<const U*>(x.const_data_ptr()),
                                                          index.const_data_ptr<int64_t>(), shape, units_per_row,
                                                          static_cast<U*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, step 1: per sample, the inverse of index (sources of every destination, ascending), as a counting sort.
// One block per sample. See token_keys.cuh for the layout; the fill walks k in order in one warp, so that every
// bucket lists its sources in ascending k whatever the scheduling.

__device__ __forceinline__ int warp_inclusive_scan(int x, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x += y;
  }
  return x;
}

// The number of entries <= x in the non-decreasing a[0, n).
__device__ __forceinline__ int count_at_most(const int64_t* a, int n, int64_t x) {
  int lo = 0;
  int hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (a[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads)
    build_inverse_kernel(const int64_t* __restrict__ index,  // [B, K] contiguous, values in [-1, length)
                         int K, int length, bool counters_in_shared,
                         int* __restrict__ bucket_ends,      // [B, length]: end of each destination's bucket
                         int* __restrict__ sources) {        // [B, K]: source rows, bucket after bucket
  extern __shared__ int shared_counters[];
  __shared__ int warp_totals[kThreads / 32];
  namespace tk = token_keys;

  const int b = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t* idx = index + static_cast<int64_t>(b) * K;
  int* ends_b = bucket_ends + static_cast<int64_t>(b) * length;
  int* srcs_b = sources + static_cast<int64_t>(b) * K;
  // Generic pointer: shared or global, the same code below either way.
  int* offs = counters_in_shared ? shared_counters : ends_b;

  // 0. A non-decreasing index, what compression produces (kept positions in ascending order, -1 padding only in
  // front), needs no counting sort: the sources are its valid entries in order, and bucket p ends at the number of
  // valid entries <= p. Its accesses are coalesced global ones and binary searches in which neighbouring lanes
  // (neighbouring destinations) read the same or adjacent entries. The counting sort below has to scatter atomics
  // and cursor reads/writes over shared counters indexed by token position, which no layout keeps free of bank
  // conflicts: 1.19-1.21 ways on average at the cuda_perf shapes (tools/cuda_emu/PERF.md).
  bool ascending = true;
  for (int k = threadIdx.x; k + 1 < K; k += kThreads) ascending &= idx[k] <= idx[k + 1];
  if (__syncthreads_and(ascending)) {  // block-uniform: the whole block returns here or none of it
    const int skipped = count_at_most(idx, K, -1);  // leading -1 entries: zero rows, no destination
    for (int k = threadIdx.x; k + skipped < K; k += kThreads) srcs_b[k] = k + skipped;
    for (int p = threadIdx.x; p < length; p += kThreads) ends_b[p] = count_at_most(idx, K, p) - skipped;
    return;
  }

  // 1. Counts per destination. Integer atomics: the counts do not depend on their order.
  for (int p = threadIdx.x; p < length; p += kThreads) offs[p] = 0;
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads) {
    const int64_t v = idx[k];
    if (v >= 0) atomicAdd(offs + v, 1);
  }
  __syncthreads();

  // 2. Exclusive scan in place: offs[p] = start of bucket p. Chunks of kThreads with a carry.
  int carry = 0;
  for (int base = 0; base < length; base += kThreads) {
    const int p = base + threadIdx.x;
    const int v = p < length ? offs[p] : 0;
    const int inclusive = warp_inclusive_scan(v, lane);
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const int t = lane < kThreads / 32 ? warp_totals[lane] : 0;
      const int scanned = warp_inclusive_scan(t, lane);
      if (lane < kThreads / 32) warp_totals[lane] = scanned;  // each lane rewrites only the slot it read
    }
    __syncthreads();
    const int warp_prefix = warp > 0 ? warp_totals[warp - 1] : 0;
    if (p < length) offs[p] = carry + warp_prefix + inclusive - v;
    carry += warp_totals[kThreads / 32 - 1];
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }

  // 3. Fill, one warp, 32 sources at a time in ascending k. Afterwards offs[p] = end of bucket p.
  if (warp == 0) {
    for (int base = 0; base < K; base += 32) {
      const int k = base + lane;
      const int64_t v = k < K ? idx[k] : -1;
      const uint32_t peers = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(v));
      int cursor = 0;
      if (v >= 0) {
        cursor = offs[v];
        srcs_b[tk::inverse_fill_slot(cursor, peers, lane)] = k;
      }
      __syncwarp();  // every peer has read the cursor before the leader moves it
      if (v >= 0 && tk::inverse_group_leader(peers, lane)) offs[v] = tk::inverse_advance_cursor(cursor, peers);
      __syncwarp();  // the moved cursors are visible to the next chunk
    }
  }
  if (counters_in_shared) {
    __syncthreads();
    for (int p = threadIdx.x; p < length; p += kThreads) ends_b[p] = offs[p];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, step 2: every destination row sums its sources (ascending k) in Acc and is written once.

// Accumulation type: fp32 for fp32/bf16/fp16, fp64 for fp64.
template <typename T>
__device__ __forceinline__ float to_acc(T x) { return dev::to_float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T>
__device__ __forceinline__ T from_acc(float x) { return dev::from_float<T>(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return x; }

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// kVec: each thread moves 16 bytes (16 / sizeof(T) elements); otherwise one element.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const T* __restrict__ grad,          // [B, outer, K, inner] contiguous
                        const int* __restrict__ bucket_ends, // [B, length]
                        const int* __restrict__ sources,     // [B, K]
                        RowShape shape, int64_t inner,
                        T* __restrict__ out) {               // [B, outer, length, inner] contiguous
  using Acc = typename AccType<T>::type;
  constexpr int kWidth = kVec ? static_cast<int>(16 / sizeof(T)) : 1;
  const int64_t K = shape.src_count;
  const int64_t length = shape.count;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < shape.rows;
       row += row_step) {
    const int64_t p = row % length;
    const int64_t bo = row / length;
    const int64_t b = bo / shape.outer;
    const int* ends_b = bucket_ends + b * length;
    const int begin = token_keys::inverse_bucket_begin(ends_b, p);
    const int end = token_keys::inverse_bucket_end(ends_b, p);
    const int* srcs_b = sources + b * K;
    const T* grad_bo = grad + bo * K * inner;
    T* dst = out + row * inner;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * kWidth; c < inner;
         c += static_cast<int64_t>(blockDim.x) * kWidth) {
      Acc acc[kWidth];
#pragma unroll
      for (int i = 0; i < kWidth; ++i) acc[i] = Acc(0);
      for (int e = begin; e < end; ++e) {
        const T* from = grad_bo + static_cast<int64_t>(srcs_b[e]) * inner + c;
        if constexpr (kVec) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(from));
          const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int i = 0; i < kWidth; ++i) acc[i] += to_acc(v[i]);
        } else {
          acc[0] += to_acc(from[0]);
        }
      }
      if constexpr (kVec) {
        union {
          uint4 raw;
          T v[kWidth];
        } packed;
#pragma unroll
        for (int i = 0; i < kWidth; ++i) packed.v[i] = from_acc<T>(acc[i]);
        *reinterpret_cast<uint4*>(dst + c) = packed.raw;
      } else {
        dst[0 + c] = from_acc<T>(acc[0]);
      }
    }
  }
}

template <typename T>
void launch_scatter(const at::Tensor& grad, const at::Tensor& bucket_ends, const at::Tensor& sources,
                    const RowShape& shape, int64_t inner, at::Tensor& out, int sms, cudaStream_t stream) {
  constexpr int64_t kWidth = 16 / sizeof(T);
  const T* grad_ptr = static_cast<const T*>(grad.const_data_ptr());
  T* out_ptr = static_cast<T*>(out.data_ptr());
  const bool vec = inner % kWidth == 0 && reinterpret_cast<uintptr_t>(grad_ptr) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out_ptr) % 16 == 0;
  const int64_t units_per_row = vec ? inner / kWidth : inner;
  const BlockShape bs = block_shape(shape.rows, units_per_row, sms);
  auto kernel = vec ? scatter_rows_kernel<T, true> : scatter_rows_kernel<T, false>;
  kernel<<<bs.grid, bs.block, 0, stream>>>(grad_ptr, bucket_ends.const_data_ptr<int>(),
                                           sources.const_data_ptr<int>(), shape, inner, out_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Host helpers

int multiprocessor_count(int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
  return value;
}

int64_t product(at::IntArrayRef sizes, int64_t begin, int64_t end) {
  int64_t p = 1;
  for (int64_t i = begin; i < end; ++i) p *= sizes[i];
  return p;
}

// One device reduction and one host sync; skipped for an empty index (nothing to check, nothing to read).
void check_index_values(const char* op_name, const at::Tensor& index, int64_t length) {
  if (index.numel() == 0) return;
  const auto [min_value, max_value] = at::aminmax(index);
  check_gather_index_range(op_name, min_value.item<int64_t>(), max_value.item<int64_t>(), length);
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x,      // [B, ..., L, ...] any dtype
                              const at::Tensor& index,  // [B, K] int64 in [-1, L)
                              int64_t dim) {
  constexpr const char* OP_NAME = "gather_tokens";
  const int64_t d = check_gather_tokens_args(OP_NAME, x, "x", index, dim);
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t length = x.size(d);
  const int64_t K = index.size(1);
  check_index_values(OP_NAME, index, length);

  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes[d] = K;
  at::Tensor out = at::empty(out_sizes, x.options());  // contiguous
  if (out.numel() == 0) return out;

  const at::Tensor x_dense = x.contiguous();
  const at::Tensor index_dense = index.contiguous();
  const int64_t inner = product(x.sizes(), d + 1, x.dim());
  const RowShape shape{x.size(0) * product(x.sizes(), 1, d) * K, K, product(x.sizes(), 1, d), length};
  const int64_t row_bytes = inner * static_cast<int64_t>(x.element_size());
  // Widest unit dividing the row size and both base addresses: every row start is then aligned to it too.
  const uintptr_t addresses =
      reinterpret_cast<uintptr_t>(x_dense.const_data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
  int64_t unit = 16;
  while (unit > 1 && (row_bytes % unit != 0 || addresses % static_cast<uintptr_t>(unit) != 0)) unit >>= 1;

  const int device = x.device().index();
  const int sms = multiprocessor_count(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  switch (unit) {
    case 16: launch_gather<uint4>(x_dense, index_dense, shape, row_bytes, out, sms, stream); break;
    case 8: launch_gather<uint2>(x_dense, index_dense, shape, row_bytes, out, sms, stream); break;
    case 4: launch_gather<uint32_t>(x_dense, index_dense, shape, row_bytes, out, sms, stream); break;
    case 2: launch_gather<uint16_t>(x_dense, index_dense, shape, row_bytes, out, sms, stream); break;
    default: launch_gather<uint8_t>(x_dense, index_dense, shape, row_bytes, out, sms, stream); break;
  }
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad,   // [B, ..., K, ...] fp32/bf16/fp16/fp64
                                       const at::Tensor& index,  // [B, K] int64 in [-1, length)
                                       int64_t dim, int64_t length) {
  constexpr const char* OP_NAME = "gather_tokens_backward";
  // Same checks, order and messages as gather_tokens_backward_cpu.
  const int64_t d = check_gather_tokens_args(OP_NAME, grad, "grad", index, dim);
  TORCH_CHECK(length >= 0, OP_NAME, ": length must be >= 0, got ", length);
  const int64_t K = index.size(1);
  TORCH_CHECK(K == grad.size(d), OP_NAME, ": index has K=", K, " entries per sample but grad has size ",
              grad.size(d), " at dim ", d);
  TORCH_CHECK(grad.is_floating_point(), OP_NAME, ": grad must be a floating tensor, got ", grad.scalar_type());
  const at::ScalarType dtype = grad.scalar_type();
  // The CPU kernel's dispatch covers these four too (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16)).
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, OP_NAME,
              ": unsupported dtype ", dtype, " (float32, bfloat16, float16 or float64)");
  // Bucket bounds and source numbers are int32.
  TORCH_CHECK(K <= std::numeric_limits<int>::max() && length <= std::numeric_limits<int>::max() &&
                  grad.size(0) <= std::numeric_limits<int>::max(),
              OP_NAME, ": B (", grad.size(0), "), K (", K, ") and length (", length, ") must be < 2^31 on CUDA");
  c10::cuda::CUDAGuard device_guard(grad.device());
  check_index_values(OP_NAME, index, length);

  std::vector<int64_t> out_sizes = grad.sizes().vec();
  out_sizes[d] = length;
  const auto options = grad.options();
  if (K == 0) return at::zeros(out_sizes, options);  // nothing points anywhere
  at::Tensor out = at::empty(out_sizes, options);
  if (out.numel() == 0) return out;

  const int64_t B = grad.size(0);
  const int64_t outer = product(grad.sizes(), 1, d);
  const int64_t inner = product(grad.sizes(), d + 1, grad.dim());
  const at::Tensor grad_dense = grad.contiguous();
  const at::Tensor index_dense = index.contiguous();
  const auto int_options = index.options().dtype(at::kInt);
  at::Tensor bucket_ends = at::empty({B, length}, int_options);  // [B, length] int32
  at::Tensor sources = at::empty({B, K}, int_options);           // [B, K] int32

  const int device = grad.device().index();
  const int sms = multiprocessor_count(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  const bool counters_in_shared = length <= kMaxSharedDestinations;
  const size_t shared_bytes = counters_in_shared ? static_cast<size_t>(length) * sizeof(int) : 0;
  build_inverse_kernel<<<static_cast<unsigned int>(B), kThreads, shared_bytes, stream>>>(
      index_dense.const_data_ptr<int64_t>(), static_cast<int>(K), static_cast<int>(length), counters_in_shared,
      bucket_ends.data_ptr<int>(), sources.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const RowShape shape{B * outer * length, length, outer, K};
  switch (dtype) {
    case at::kFloat: launch_scatter<float>(grad_dense, bucket_ends, sources, shape, inner, out, sms, stream); break;
    case at::kDouble: launch_scatter<double>(grad_dense, bucket_ends, sources, shape, inner, out, sms, stream); break;
    case at::kHalf: launch_scatter<__half>(grad_dense, bucket_ends, sources, shape, inner, out, sms, stream); break;
    default: launch_scatter<__nv_bfloat16>(grad_dense, bucket_ends, sources, shape, inner, out, sms, stream); break;
  }
  return out;
}

}  // namespace epic_ext

TORCH_LIBRARY_IMPL(epic_ext, CUDA, m) {
  m.impl("gather_tokens", &epic_ext::gather_tokens_cuda);
  m.impl("gather_tokens_backward", &epic_ext::gather_tokens_backward_cuda);
}
