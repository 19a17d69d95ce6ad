// CUDA kernels of select_tokens: per sample, the `keep` highest scores inside [span_start, span_start + span_length),
// returned as ascending absolute positions; ties to the lower position, NaN below every number.
//
// Every (score, position) pair becomes one unique 64-bit key whose unsigned order is exactly that ranking
// (token_keys.cuh), so the selection has a single answer whatever sort computes it.
//   Spans up to 8192 positions (72 KiB of shared memory, within the opt-in limit of sm_80 and later): one block per
//   sample sorts the span's keys with a bitonic network in shared memory, flags the top `keep` positions and
//   compacts the flags in ascending order with a block prefix scan.
//   Longer spans: the same keys in global memory, at::topk over them (exact, the keys being unique), and at::sort of
//   the chosen positions.
//
// Memory traffic: select_tokens_block_kernel reads the span's scores once and writes [keep] positions once, in
// whole sectors (reads and writes start at 32-byte boundaries); the sort, the flags and the compacted positions
// stay in shared memory. Counted by `make cuda-perf` (tools/cuda_emu/PERF.md): 1.0x the minimum, <= 1.1 bank ways. The long-span path writes and reads the [B, span] int64 keys once more
// plus what topk and sort move. Achieved time: not measured (no GPU was available when this was written).
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
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
#include <tuple>

#include "common.cuh"
#include "epic_ext.h"
#include "token_keys.cuh"

namespace epic_ext {
namespace {

namespace tk = token_keys;

constexpr int kMaxThreads = 1024;
// Largest span sorted in shared memory: 8 bytes of key plus 1 byte of flag per padded position, 72 KiB at 8192.
// Above that the network's log^2 steps stop paying against topk anyway.
constexpr int64_t kMaxBlockSpan = 8192;
constexpr int kKeyThreads = 256;

using dev::to_float;

// One block per sample. Shared memory: keys [padded] uint64, then flags [span_length] uint8.
// padded = power of two >= max(span_length, 64); blockDim.x = min(padded / 2, kMaxThreads) (a multiple of 32).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    select_tokens_block_kernel(const T* __restrict__ scores,           // [B, L], strides (score_sb, score_sl)
                               int64_t score_sb, int64_t score_sl,
                               const int64_t* __restrict__ span_start,  // [B], stride start_s
                               int64_t start_s, int span_length, int padded, int keep,
                               int64_t* __restrict__ out) {             // [B, keep] contiguous
  extern __shared__ uint64_t keys[];
  uint8_t* flags = reinterpret_cast<uint8_t*>(keys + padded);
  __shared__ int warp_counts[kMaxThreads / 32];

  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  const int threads = blockDim.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warps = threads / 32;
  const int64_t start = span_start[b * start_s];
  const T* row = scores + b * score_sb + start * score_sl;

  // Key 0 pads the network: it ranks after every real key (token_keys.cuh). A span starts anywhere (LLaVA's after
  // 35 prompt tokens): contiguous scores are read from the 32-byte boundary below the start, so that each warp's
  // request covers whole sectors instead of straddling one more.
  const int shift = score_sl == 1 ? static_cast<int>(reinterpret_cast<uintptr_t>(row) % 32 / sizeof(T)) : 0;
  for (int i = tid - shift; i < padded; i += threads) {
    if (i < 0) continue;
    keys[i] = i < span_length ? tk::token_key(to_float(row[i * score_sl]), static_cast<uint32_t>(i)) : 0ull;
  }
  for (int i = tid; i < span_length; i += threads) flags[i] = 0;
  __syncthreads();

  // Bitonic network, descending overall. Steps with j >= 32: each thread compare-exchanges pairs (i, i | j) with
  // bit j of i clear, in shared memory (a warp's 32 lower keys are consecutive: conflict-free 8-byte accesses).
  const int pairs = padded / 2;
  for (int k = 2; k <= padded; k <<= 1) {
    int j = k >> 1;
    for (; j >= 32; j >>= 1) {
      for (int pair = tid; pair < pairs; pair += threads) {
        const uint32_t i = tk::bitonic_lower_index(static_cast<uint32_t>(pair), static_cast<uint32_t>(j));
        const uint32_t ixj = i | static_cast<uint32_t>(j);
        const uint64_t lower = keys[i];
        const uint64_t upper = keys[ixj];
        if (tk::bitonic_must_swap(lower, upper, tk::bitonic_descending(i, static_cast<uint32_t>(k)))) {
          keys[i] = upper;
          keys[ixj] = lower;
        }
      }
      __syncthreads();
    }
    // Steps with j < 32: both keys of a pair belong to one warp. Each lane holds the key at its own position and
    // meets its partner by shuffle; in shared memory the same steps put two lanes' 8-byte keys on each bank (a
    // 2-way conflict on every access, 1.6 ways on average over the sort: tools/cuda_emu/PERF.md). Every lane of a
    // warp runs the same iterations: padded is a multiple of threads, and threads of 32.
    for (int e = tid; e < padded; e += threads) {
      uint64_t mine = keys[e];
      for (int jj = j; jj > 0; jj >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, mine, jj);
        const bool descending = tk::bitonic_descending(static_cast<uint32_t>(e & ~jj), static_cast<uint32_t>(k));
        const bool swap = (e & jj) == 0 ? tk::bitonic_must_swap(mine, other, descending)
                                        : tk::bitonic_must_swap(other, mine, descending);
        if (swap) mine = other;
      }
      keys[e] = mine;
    }
    __syncthreads();
  }

  // keys[0, keep) are the winners (all real keys: keep <= span_length and the padding sorts last).
  for (int i = tid; i < keep; i += threads) flags[tk::token_key_position(keys[i])] = 1;
  __syncthreads();

  // Ascending compaction: chunk after chunk of `threads` flags, a ballot per warp and a scan over the warp counts.
  // The positions gather in shared memory (the keys are no longer needed) and leave in one coalesced pass: written
  // straight out, each warp's run would start at an arbitrary offset and straddle a sector more per request.
  int64_t* out_b = out + static_cast<int64_t>(b) * keep;
  int64_t* staged = reinterpret_cast<int64_t*>(keys);
  int written = 0;  // block-uniform
  for (int base = 0; base < span_length && written < keep; base += threads) {
    const int i = base + tid;
    const bool chosen = i < span_length && flags[i] != 0;
    const uint32_t ballot = __ballot_sync(0xffffffffu, chosen);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0;
    int total = 0;
    for (int w = 0; w < warps; ++w) {
      const int c = warp_counts[w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (chosen) staged[written + before + __popc(ballot & ((1u << lane) - 1u))] = start + i;
    written += total;
    __syncthreads();  // warp_counts is rewritten by the next chunk; staged is complete after the last
  }
  const int out_shift = static_cast<int>(reinterpret_cast<uintptr_t>(out_b) % 32 / sizeof(int64_t));
  for (int i = tid - out_shift; i < keep; i += threads) {
    if (i >= 0) out_b[i] = staged[i];
  }
}

// Long spans: keys [B, span_length] as signed int64 (token_key_to_signed), for at::topk.
template <typename T>
__global__ void __launch_bounds__(kKeyThreads)
    span_keys_kernel(const T* __restrict__ scores, int64_t score_sb, int64_t score_sl,  // [B, L]
                     const int64_t* __restrict__ span_start, int64_t start_s,          // [B]
                     int64_t batch, int64_t span_length,
                     int64_t* __restrict__ keys) {                                     // [B, span_length]
  const int64_t total = batch * span_length;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kKeyThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kKeyThreads) {
    const int64_t b = e / span_length;
    const int64_t i = e - b * span_length;
    const int64_t pos = span_start[b * start_s] + i;
    keys[e] = tk::token_key_to_signed(
        tk::token_key(to_float(scores[b * score_sb + pos * score_sl]), static_cast<uint32_t>(i)));
  }
}

// positions[b, i] = span_start[b] + position encoded in the chosen key.
__global__ void __launch_bounds__(kKeyThreads)
    decode_positions_kernel(const int64_t* __restrict__ chosen,      // [B, keep] contiguous
                            const int64_t* __restrict__ span_start,  // [B], stride start_s
                            int64_t start_s, int64_t batch, int64_t keep,
                            int64_t* __restrict__ positions) {       // [B, keep] contiguous
  const int64_t total = batch * keep;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kKeyThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kKeyThreads) {
    const int64_t b = e / keep;
    positions[e] = span_start[b * start_s] + tk::token_key_position(tk::token_key_from_signed(chosen[e]));
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_score_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    default: TORCH_CHECK(false, "select_tokens: unsupported dtype ", dtype);
  }
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

unsigned int grid_for(int64_t elements, int sms) {
  const int64_t wanted = (elements + kKeyThreads - 1) / kKeyThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(sms) * 16)));
}

}  // namespace

at::Tensor select_tokens_cuda(const at::Tensor& scores,      // [B, L] fp32/bf16/fp16
                              const at::Tensor& span_start,  // [B] int64
                              int64_t span_length, int64_t keep) {
  constexpr const char* OP_NAME = "select_tokens";
  check_select_tokens_args(scores, span_start, span_length, keep);
  // Relative positions live in the low 32 bits of the key (same limit and message as the CPU kernel); with
  // span_length <= 0xFFFFFFFF the low word of a real key is >= 1, so key 0 can pad the sort network.
  TORCH_CHECK(span_length <= 0xffffffffll, OP_NAME, ": span_length must be < 2^32, got ", span_length);
  c10::cuda::CUDAGuard device_guard(scores.device());
  const int64_t batch = scores.size(0);
  const int64_t length = scores.size(1);
  if (batch > 0) {
    // One device reduction and one host sync: a span outside the sequence must fail here, not read out of bounds.
    const auto [min_start, max_start] = at::aminmax(span_start);
    check_span_start_range(min_start.item<int64_t>(), max_start.item<int64_t>(), span_length, length);
  }
  at::Tensor out = at::empty({batch, keep}, span_start.options());  // [B, keep] int64
  if (batch == 0 || keep == 0) return out;

  const int device = scores.device().index();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t* start_ptr = span_start.const_data_ptr<int64_t>();
  const int64_t start_s = span_start.stride(0);

  // The padded size the block kernel would need, and whether this device's shared memory holds it.
  int64_t padded = 64;
  while (padded < span_length) padded <<= 1;
  const int64_t shared_bytes = padded * static_cast<int64_t>(sizeof(uint64_t)) + span_length;
  const int64_t shared_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const bool in_block = span_length <= kMaxBlockSpan &&
                        shared_bytes + static_cast<int64_t>(kMaxThreads / 32 * sizeof(int)) <= shared_limit &&
                        batch <= std::numeric_limits<int>::max();

  dispatch_score_dtype(scores.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* score_ptr = static_cast<const T*>(scores.const_data_ptr());
    if (in_block) {
      const int threads = static_cast<int>(std::min<int64_t>(padded / 2, kMaxThreads));
      auto kernel = select_tokens_block_kernel<T>;
      if (shared_bytes > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared_bytes)));
      }
      kernel<<<static_cast<unsigned int>(batch), threads, static_cast<size_t>(shared_bytes), stream>>>(
          score_ptr, scores.stride(0), scores.stride(1), start_ptr, start_s, static_cast<int>(span_length),
          static_cast<int>(padded), static_cast<int>(keep), out.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
      at::Tensor keys = at::empty({batch, span_length}, span_start.options());  // [B, span_length] int64
      span_keys_kernel<T><<<grid_for(batch * span_length, sms), kKeyThreads, 0, stream>>>(
          score_ptr, scores.stride(0), scores.stride(1), start_ptr, start_s, batch, span_length,
          keys.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Unique keys: the top `keep` set is exact, whichever algorithm topk picks; order is restored by the sort.
      const at::Tensor chosen = std::get<0>(at::topk(keys, keep, /*dim=*/1, /*largest=*/true, /*sorted=*/false))
                                    .contiguous();  // [B, keep] int64
      at::Tensor positions = at::empty({batch, keep}, span_start.options());  // [B, keep] int64
      decode_positions_kernel<<<grid_for(batch * keep, sms), kKeyThreads, 0, stream>>>(
          chosen.const_data_ptr<int64_t>(), start_ptr, start_s, batch, keep, positions.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      out = std::get<0>(at::sort(positions, /*dim=*/1));
    }
  });
  return out;
}

}  // namespace epic_ext

TORCH_LIBRARY_IMPL(epic_ext, CUDA, m) { m.impl("select_tokens", &epic_ext::select_tokens_cuda); }
