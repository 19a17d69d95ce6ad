// CUDA kernels of attention_importance: out[b, j] = mean over query heads h and valid rows r of
// softmax_j(scale * q[b, h, r] . k[b, h / G, j]) (G = Hq / Hkv), with causal limits from query_positions and
// padding from key_padding_mask, without ever holding the [B, Hq, R, L] probabilities.
//
// Two passes over the keys, because a probability needs its row's full softmax denominator first:
//   1. attention_row_stats_kernel: per (b, kv head, range of key tiles), the online-softmax state (max, sum of
//      exp) of every query row of that kv head over the range; attention_combine_kernel merges the ranges into
//      (max, 1 / sum) per row, decides which rows are valid and counts them per sample.
//   2. attention_importance_kernel: per (b, key tile, range of kv heads), recomputes every score of the tile and
//      adds up its probabilities over the rows, in a fixed order (no atomics: the result is deterministic);
//      attention_finalize_kernel adds up the head ranges when there is more than one and divides by the count.
// Scores use exp2: scale * log2(e) is folded into one multiply after the dot product, so max and sums live in the
// base-2 domain (the probabilities are the same).
//
// Where the speed comes from: a key tile is loaded once into shared memory (converted to fp32) and used by all
// G * R query rows of its kv head; each thread computes one key against 4 rows, reading its key with one
// conflict-free 16-byte load per 4 dims and the rows as broadcasts.
// Memory traffic: each pass reads K once while G * R fits in one chunk of query rows (8, 16 or 32 rows, see
// key_groups); beyond that each extra chunk re-reads the keys (from L2 when they are still there). Queries are
// re-read per key tile (from L2). Extra memory: the row statistics [B, Hq, R, splits] and [B, Hq, R], and the
// per-head-range partial sums [B, splits, L] when pass 2 splits the heads; all small next to K.
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "epic_ext.h"

namespace epic_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Query rows per thread: each thread scores one key against kRowsPerThread rows of the chunk in shared memory.
constexpr int kRowsPerThread = 4;
// Shared memory the kernels declare statically (warp_states, key_sums, reductions): kept out of the dynamic budget.
constexpr int kStaticSharedBytes = 2048;
constexpr int64_t kMaxHeadDim = 256;

// Everything the kernels need about the inputs and the tiling. Sizes are int: the host checks they fit.
struct AttnParams {
  const void* query;  // [B, Hq, R, D], unit stride along D
  int64_t q_sb, q_sh, q_sr;
  const void* key;  // [B, Hkv, L, D], unit stride along D
  int64_t k_sb, k_sh, k_sl;
  const int64_t* positions;  // [B, R] or nullptr (every row sees every key)
  int64_t pos_sb, pos_sr;
  const bool* mask;  // [B, L] or nullptr (every key is real)
  int64_t mask_sb, mask_sl;
  int hq, hkv, group, rows, length, dim;
  int dim4;        // D rounded up to 4: row length in shared memory, zero-padded
  int k_stride;    // floats between two keys in shared memory: round_up(D, 8) + 4 (see load_tile)
  int key_groups;  // warps side by side along the keys of a tile: 1, 2 or 4
  int tile_keys;   // 32 * key_groups
  int chunk_rows;  // query rows in shared memory at a time: kRowsPerThread * kWarps / key_groups
  float scale_log2e;
  // Picks the kVec kernels: every query and key row is 16-byte aligned and D is a whole number of 16-byte chunks.
  bool vec;
};

using dev::to_float;

// The 16 / sizeof(T) elements of one 16-byte load, in fp32, using register operations only (no byte addressing
// into the loaded value, which would put it in local memory).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[16 / sizeof(T)]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (std::is_same_v<T, float>) {
      v[w] = __uint_as_float(words[w]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      v[2 * w] = __uint_as_float(words[w] << 16);  // the lower half is the lower-address element
      v[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    } else {
      v[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] & 0xffffu)));
      v[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] >> 16)));
    }
  }
}

// Fills dst[r * stride + d], r < rows, d < dim4, with row r of a matrix (row_ptr(r), nullptr = zeros) in fp32;
// d >= dim is zero, so dot products over dim4 equal those over dim. dst rows are 16-byte aligned (stride % 4 == 0).
// The key tile uses stride = round_up(D, 8) + 4, an odd multiple of 4 floats: the 16-byte reads of 8 consecutive
// keys at the same d (a quarter warp) then fall in 8 different bank groups.
// kVec: 16-byte global loads (AttnParams::vec), else one element at a time. A template parameter rather than a
// branch: with both paths in one kernel ptxas spilled registers in pass 2.
template <typename T, bool kVec, typename RowPtr>
__device__ __forceinline__ void load_tile(const RowPtr& row_ptr, int rows, int dim, int dim4, int stride,
                                          float* __restrict__ dst) {
  if constexpr (kVec) {
    constexpr int kChunk = 16 / sizeof(T);  // elements per 16-byte load: 4 or 8, so dim4 == dim here
    constexpr int kUnroll = 4;              // loads issued before the first is used
    const int chunks = dim / kChunk;
    const int total = rows * chunks;
    for (int e0 = threadIdx.x; e0 < total; e0 += kUnroll * kThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = e0 + u * kThreads;
        raw[u] = make_uint4(0u, 0u, 0u, 0u);
        if (e < total) {
          const int r = e / chunks;
          const T* src = row_ptr(r);
          if (src != nullptr) raw[u] = __ldg(reinterpret_cast<const uint4*>(src + (e - r * chunks) * kChunk));
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int e = e0 + u * kThreads;
        if (e < total) {
          const int r = e / chunks;
          float v[kChunk];
          unpack16<T>(raw[u], v);
          float4* out = reinterpret_cast<float4*>(dst + r * stride + (e - r * chunks) * kChunk);
#pragma unroll
          for (int q = 0; q < kChunk / 4; ++q) out[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
        }
      }
    }
  } else {
    const int total = rows * dim4;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int r = e / dim4;
      const int d = e - r * dim4;
      const T* src = row_ptr(r);
      dst[r * stride + d] = (src != nullptr && d < dim) ? to_float(src[d]) : 0.0f;
    }
  }
}

// dots[i] = k . q_i over dim4 floats. Two partial sums per row (even / odd lanes of each float4) give the FMA pipe
// 2 * kRowsPerThread independent chains. Both passes call this, so a score is bit-identical in both.
__device__ __forceinline__ void dot_rows(const float* __restrict__ krow, const float* __restrict__ qrows,
                                         int dim4, float (&dots)[kRowsPerThread]) {
  float even[kRowsPerThread];
  float odd[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) even[i] = odd[i] = 0.0f;
#pragma unroll 2
  for (int d = 0; d < dim4; d += 4) {
    const float4 kv = *reinterpret_cast<const float4*>(krow + d);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const float4 qv = *reinterpret_cast<const float4*>(qrows + i * dim4 + d);
      even[i] = fmaf(kv.x, qv.x, even[i]);
      odd[i] = fmaf(kv.y, qv.y, odd[i]);
      even[i] = fmaf(kv.z, qv.z, even[i]);
      odd[i] = fmaf(kv.w, qv.w, odd[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) dots[i] = even[i] + odd[i];
}

// Score in the base-2 domain. __fmul_rn: never contracted into a following subtraction, so both passes round the
// same way.
__device__ __forceinline__ float score_log2(float dot, float scale_log2e) { return __fmul_rn(dot, scale_log2e); }

// Online softmax state (max m, sum s of 2^(x - m)); empty = (-inf, 0). -inf scores add nothing (they never become
// the max, so 2^(-inf - -inf) = NaN cannot appear); NaN and +inf scores make the sum NaN, as in torch.softmax.
__device__ __forceinline__ void state_add(float& m, float& s, float x) {
  if (x == -INFINITY) return;
  const float m_new = fmaxf(m, x);
  s = s * exp2f(m - m_new) + exp2f(x - m_new);
  m = m_new;
}

__device__ __forceinline__ void state_merge(float& m, float& s, float m2, float s2) {
  const float m_new = fmaxf(m, m2);
  if (m_new == -INFINITY) {  // neither side has a finite score; only a NaN sum can be there to carry on
    s += s2;
    return;
  }
  s = s * exp2f(m - m_new) + s2 * exp2f(m2 - m_new);
  m = m_new;
}

// Last key position query row gr of a kv head's group may see; -1 = none (padding row or position -1).
__device__ __forceinline__ int row_limit(const AttnParams& p, int b, int gr) {
  if (gr >= p.group * p.rows) return -1;
  if (p.positions == nullptr) return p.length - 1;
  const int r = gr % p.rows;
  return static_cast<int>(p.positions[b * p.pos_sb + r * p.pos_sr]);  // checked to be in [-1, L) on the host
}

__device__ __forceinline__ bool key_is_real(const AttnParams& p, int b, int j) {
  return j < p.length && (p.mask == nullptr || p.mask[b * p.mask_sb + j * p.mask_sl]);
}

// Row pointers for load_tile: query row gr of kv head kvh's group, and key j.
template <typename T>
struct QueryRows {
  const T* base;  // query + b * q_sb
  int64_t q_sh, q_sr;
  int group, rows;
  int kvh, row0;
  __device__ __forceinline__ QueryRows(const T* base_, const AttnParams& p, int kvh_, int row0_)
      : base(base_), q_sh(p.q_sh), q_sr(p.q_sr), group(p.group), rows(p.rows), kvh(kvh_), row0(row0_) {}
  __device__ __forceinline__ const T* operator()(int r) const {
    const int gr = row0 + r;
    if (gr >= group * rows) return nullptr;
    const int g = gr / rows;
    return base + (kvh * group + g) * q_sh + (gr - g * rows) * q_sr;
  }
};

template <typename T>
struct KeyRows {
  const T* base;  // key + b * k_sb + kvh * k_sh
  int64_t stride;
  int key0;
  int length;
  __device__ __forceinline__ const T* operator()(int r) const {
    return key0 + r < length ? base + (key0 + r) * stride : nullptr;
  }
};

// Pass 1. Grid (B * Hkv, splits): block (b, kvh, split) covers key tiles [split * tiles_per_split, ...).
// Writes partial[b, h, r, split] = (max, sum) over the visible keys of the range, for the G * R rows of kvh.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    attention_row_stats_kernel(const AttnParams p, int tiles_per_split,
                               float2* __restrict__ partial) {  // [B, Hq, R, splits]
  extern __shared__ float4 shared_tiles[];
  float* ks = reinterpret_cast<float*>(shared_tiles);  // [tile_keys, k_stride]
  float* qs = ks + p.tile_keys * p.k_stride;           // [chunk_rows, dim4]
  __shared__ float2 warp_states[kWarps][kRowsPerThread];

  const int splits = gridDim.y;
  const int split = blockIdx.y;
  const int b = blockIdx.x / p.hkv;
  const int kvh = blockIdx.x - b * p.hkv;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int key_group = warp % p.key_groups;
  const int row_quad = warp / p.key_groups;
  const int my_key = key_group * 32 + lane;  // in the tile
  const int group_rows = p.group * p.rows;
  const int num_tiles = (p.length + p.tile_keys - 1) / p.tile_keys;
  const int tile_begin = split * tiles_per_split;
  const int tile_end = min(num_tiles, tile_begin + tiles_per_split);
  const T* query_b = static_cast<const T*>(p.query) + b * p.q_sb;
  const T* key_bh = static_cast<const T*>(p.key) + b * p.k_sb + kvh * p.k_sh;

  for (int row0 = 0; row0 < group_rows; row0 += p.chunk_rows) {
    int limit[kRowsPerThread];
    float m[kRowsPerThread];
    float s[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      limit[i] = row_limit(p, b, row0 + row_quad * kRowsPerThread + i);
      m[i] = -INFINITY;
      s[i] = 0.0f;
    }
    __syncthreads();  // the previous chunk is done with qs and warp_states
    load_tile<T, kVec>(QueryRows<T>(query_b, p, kvh, row0), p.chunk_rows, p.dim, p.dim4, p.dim4, qs);
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int key0 = tile * p.tile_keys;
      __syncthreads();  // the previous tile is done with ks
      load_tile<T, kVec>(KeyRows<T>{key_bh, p.k_sl, key0, p.length}, p.tile_keys, p.dim, p.dim4, p.k_stride, ks);
      __syncthreads();
      float dots[kRowsPerThread];
      dot_rows(ks + my_key * p.k_stride, qs + row_quad * kRowsPerThread * p.dim4, p.dim4, dots);
      const int j = key0 + my_key;
      const bool real = key_is_real(p, b, j);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (real && j <= limit[i]) state_add(m[i], s[i], score_log2(dots[i], p.scale_log2e));
      }
    }
    // Merge over the 32 keys of the warp, then over the key groups (fixed order: deterministic).
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m[i], offset);
        const float s2 = __shfl_xor_sync(0xffffffffu, s[i], offset);
        state_merge(m[i], s[i], m2, s2);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) warp_states[warp][i] = make_float2(m[i], s[i]);
    }
    __syncthreads();
    if (threadIdx.x < p.chunk_rows) {
      const int quad = threadIdx.x / kRowsPerThread;
      const int i = threadIdx.x % kRowsPerThread;
      float2 st = warp_states[quad * p.key_groups][i];
      for (int g = 1; g < p.key_groups; ++g) {
        const float2 other = warp_states[quad * p.key_groups + g][i];
        state_merge(st.x, st.y, other.x, other.y);
      }
      const int gr = row0 + threadIdx.x;
      if (gr < group_rows) {
        const int g = gr / p.rows;
        const int r = gr - g * p.rows;
        const int h = kvh * p.group + g;
        partial[((static_cast<int64_t>(b) * p.hq + h) * p.rows + r) * splits + split] = st;
      }
    }
  }
}

// Block-wide sum (op = 0) or min (op = 1) of an int; every thread gets the result.
__device__ __forceinline__ int block_reduce_int(int v, bool take_min, int* scratch /* [kWarps + 1] */) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = take_min ? min(v, o) : v + o;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = take_min ? min(r, scratch[w]) : r + scratch[w];
    scratch[kWarps] = r;
  }
  __syncthreads();
  const int result = scratch[kWarps];
  __syncthreads();  // scratch may be reused right after
  return result;
}

// One block per sample: merges the splits of every row into stats[b, h, r] = (max, 1 / sum), or (0, 0) for a row
// that is not valid, and count[b] = number of valid (h, r) rows. A row is valid when its position is not -1 and
// some real key lies at or before it, i.e. when the first real key of the sample is <= its limit; this is decided
// from positions and mask alone, never from the scores (the CPU kernel's "row max is not -inf" is the same test
// for finite inputs). For valid rows 1 / sum is > 0, +inf or NaN, never 0. A valid row whose 1 / sum is not finite
// (a NaN or +inf score: NaN sum; only -inf scores: sum 0) has a NaN softmax, as in torch.softmax; as in the
// reference, that NaN reaches every position of the sample through the mean, so count[b] becomes NaN.
__global__ void __launch_bounds__(kThreads)
    attention_combine_kernel(const AttnParams p, const float2* __restrict__ partial,  // [B, Hq, R, splits]
                             int splits,
                             float2* __restrict__ stats,   // [B, Hq, R]
                             float* __restrict__ count) {  // [B]
  __shared__ int scratch[kWarps + 1];
  const int b = blockIdx.x;
  int first_real = 0;
  if (p.mask != nullptr) {
    first_real = p.length;
    for (int j = threadIdx.x; j < p.length; j += kThreads) {
      if (p.mask[b * p.mask_sb + j * p.mask_sl]) {
        first_real = j;
        break;
      }
    }
    first_real = block_reduce_int(first_real, /*take_min=*/true, scratch);
  }
  const int rows_b = p.hq * p.rows;
  int valid_rows = 0;
  int nan_rows = 0;
  for (int row = threadIdx.x; row < rows_b; row += kThreads) {
    const int r = row % p.rows;
    const int limit = p.positions != nullptr ? static_cast<int>(p.positions[b * p.pos_sb + r * p.pos_sr])
                                             : p.length - 1;
    float2 st = make_float2(0.0f, 0.0f);
    if (limit >= 0 && limit >= first_real) {
      const float2* part = partial + (static_cast<int64_t>(b) * rows_b + row) * splits;
      float m = -INFINITY;
      float s = 0.0f;
      for (int i = 0; i < splits; ++i) state_merge(m, s, part[i].x, part[i].y);
      st = make_float2(m, 1.0f / s);
      ++valid_rows;
      nan_rows += isfinite(st.y) ? 0 : 1;
    }
    stats[static_cast<int64_t>(b) * rows_b + row] = st;
  }
  valid_rows = block_reduce_int(valid_rows, /*take_min=*/false, scratch);
  nan_rows = block_reduce_int(nan_rows, /*take_min=*/false, scratch);
  if (threadIdx.x == 0) count[b] = nan_rows > 0 ? __int_as_float(0x7fc00000) : static_cast<float>(valid_rows);
}

// Pass 2. Grid (B * num_tiles, splits): block (b, tile, split) adds up, for each key of the tile, the probabilities
// over the rows of kv heads [split * heads_per_split, ...). Writes dst[b, split, j]; when there is one split, dst
// is the output and the sum is divided by count[b] here.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    attention_importance_kernel(const AttnParams p, int heads_per_split,
                                const float2* __restrict__ stats,  // [B, Hq, R]: (max, 1 / sum), 1 / sum = 0: skip
                                const float* __restrict__ count,   // [B]
                                bool normalise,
                                float* __restrict__ dst) {         // [B, splits, L]
  extern __shared__ float4 shared_tiles[];
  float* ks = reinterpret_cast<float*>(shared_tiles);
  float* qs = ks + p.tile_keys * p.k_stride;
  __shared__ float key_sums[kWarps][32];

  const int num_tiles = (p.length + p.tile_keys - 1) / p.tile_keys;
  const int b = blockIdx.x / num_tiles;
  const int tile = blockIdx.x - b * num_tiles;
  const int splits = gridDim.y;
  const int split = blockIdx.y;
  const int kv_begin = split * heads_per_split;
  const int kv_end = min(p.hkv, kv_begin + heads_per_split);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int key_group = warp % p.key_groups;
  const int row_quad = warp / p.key_groups;
  const int my_key = key_group * 32 + lane;
  const int key0 = tile * p.tile_keys;
  const int j = key0 + my_key;
  const bool real = key_is_real(p, b, j);
  const int group_rows = p.group * p.rows;
  const T* query_b = static_cast<const T*>(p.query) + b * p.q_sb;

  float acc = 0.0f;
  for (int kvh = kv_begin; kvh < kv_end; ++kvh) {
    const T* key_bh = static_cast<const T*>(p.key) + b * p.k_sb + kvh * p.k_sh;
    for (int row0 = 0; row0 < group_rows; row0 += p.chunk_rows) {
      __syncthreads();  // the previous (head, chunk) is done with ks and qs
      load_tile<T, kVec>(KeyRows<T>{key_bh, p.k_sl, key0, p.length}, p.tile_keys, p.dim, p.dim4, p.k_stride, ks);
      load_tile<T, kVec>(QueryRows<T>(query_b, p, kvh, row0), p.chunk_rows, p.dim, p.dim4, p.dim4, qs);
      // This thread's rows, read after the tile loads so that they do not hold registers across them.
      int limit[kRowsPerThread];
      float m[kRowsPerThread];
      float inv_sum[kRowsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int gr = row0 + row_quad * kRowsPerThread + i;
        limit[i] = row_limit(p, b, gr);
        m[i] = 0.0f;
        inv_sum[i] = 0.0f;
        if (gr < group_rows) {
          const int g = gr / p.rows;
          const int h = kvh * p.group + g;
          const float2 st = stats[(static_cast<int64_t>(b) * p.hq + h) * p.rows + (gr - g * p.rows)];
          m[i] = st.x;
          inv_sum[i] = st.y;
        }
      }
      __syncthreads();
      float dots[kRowsPerThread];
      dot_rows(ks + my_key * p.k_stride, qs + row_quad * kRowsPerThread * p.dim4, p.dim4, dots);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (real && j <= limit[i] && inv_sum[i] != 0.0f) {
          acc += exp2f(score_log2(dots[i], p.scale_log2e) - m[i]) * inv_sum[i];
        }
      }
    }
  }
  // Sum over the row quads that scored the same key (fixed order).
  key_sums[warp][lane] = acc;
  __syncthreads();
  if (threadIdx.x < p.tile_keys) {
    const int g = threadIdx.x / 32;
    const int l = threadIdx.x % 32;
    float sum = 0.0f;
    for (int q = 0; q < kWarps / p.key_groups; ++q) sum += key_sums[q * p.key_groups + g][l];
    const int jj = key0 + static_cast<int>(threadIdx.x);
    if (jj < p.length) {
      if (normalise) {
        const float n = count[b];
        sum = n != 0.0f ? sum / n : 0.0f;  // n NaN: NaN (a NaN row), n 0: no valid row
      }
      dst[(static_cast<int64_t>(b) * splits + split) * p.length + jj] = sum;
    }
  }
}

// out[b, j] = sum over splits of partial[b, split, j], divided by count[b] (0 when no row is valid, NaN when
// count[b] is NaN).
__global__ void __launch_bounds__(kThreads)
    attention_finalize_kernel(const float* __restrict__ partial,  // [B, splits, L]
                              int splits, int64_t batch, int length,
                              const float* __restrict__ count,    // [B]
                              float* __restrict__ out) {          // [B, L]
  const int64_t total = batch * length;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = e / length;
    const int64_t j = e - b * length;
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[(b * splits + s) * length + j];
    const float n = count[b];
    out[e] = n != 0.0f ? sum / n : 0.0f;  // n NaN: NaN (a NaN row), n 0: no valid row
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_attention_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    case at::kHalf: f(TypeTag<__half>{}); break;
    default: TORCH_CHECK(false, "attention_importance: unsupported dtype ", dtype);
  }
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Stride of dim d is a whole number of 16-byte chunks, or never used with a nonzero index.
bool stride_fits16(const at::Tensor& t, int64_t d) {
  return t.size(d) <= 1 || (t.stride(d) * static_cast<int64_t>(t.element_size())) % 16 == 0;
}

size_t tile_shared_bytes(int key_groups, int dim4, int k_stride) {
  const int tile_keys = 32 * key_groups;
  const int chunk_rows = kRowsPerThread * kWarps / key_groups;
  return static_cast<size_t>(tile_keys * k_stride + chunk_rows * dim4) * sizeof(float);
}

template <typename T>
void launch_attention_importance(const AttnParams& p, int64_t batch, int sms, int64_t rows_total, at::Tensor& out,
                                 cudaStream_t stream) {
  const size_t shared_bytes = tile_shared_bytes(p.key_groups, p.dim4, p.k_stride);
  auto stats_kernel = p.vec ? attention_row_stats_kernel<T, true> : attention_row_stats_kernel<T, false>;
  auto importance_kernel = p.vec ? attention_importance_kernel<T, true> : attention_importance_kernel<T, false>;
  // The 48 KiB a block gets without the opt-in hold its static shared memory too.
  if (shared_bytes + kStaticSharedBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(importance_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  // Both passes aim at a few blocks per SM: pass 1 splits the keys of a (b, kv head), pass 2 the kv heads of a
  // (b, key tile), only as far as needed to reach that.
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  const int64_t num_tiles = ceil_div(p.length, p.tile_keys);
  const int64_t bh = batch * p.hkv;
  int64_t key_splits = std::clamp<int64_t>(ceil_div(target_blocks, bh), 1, num_tiles);
  const int64_t tiles_per_split = ceil_div(num_tiles, key_splits);
  key_splits = ceil_div(num_tiles, tiles_per_split);
  int64_t head_splits = std::clamp<int64_t>(ceil_div(target_blocks, num_tiles * batch), 1, p.hkv);
  const int64_t heads_per_split = ceil_div(p.hkv, head_splits);
  head_splits = ceil_div(p.hkv, heads_per_split);

  const auto f32 = out.options();
  at::Tensor partial_stats = at::empty({rows_total * key_splits * 2}, f32);  // [B, Hq, R, key_splits] float2
  at::Tensor stats = at::empty({rows_total * 2}, f32);                       // [B, Hq, R] float2
  at::Tensor count = at::empty({batch}, f32);                                // [B]
  auto* partial_ptr = reinterpret_cast<float2*>(partial_stats.data_ptr<float>());
  auto* stats_ptr = reinterpret_cast<float2*>(stats.data_ptr<float>());

  stats_kernel<<<dim3(static_cast<unsigned int>(bh), static_cast<unsigned int>(key_splits)), kThreads, shared_bytes,
                 stream>>>(p, static_cast<int>(tiles_per_split), partial_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attention_combine_kernel<<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
      p, partial_ptr, static_cast<int>(key_splits), stats_ptr, count.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool one_split = head_splits == 1;
  at::Tensor head_partial = one_split ? out : at::empty({batch, head_splits, p.length}, f32);  // [B, splits, L]
  importance_kernel<<<dim3(static_cast<unsigned int>(batch * num_tiles), static_cast<unsigned int>(head_splits)),
                      kThreads, shared_bytes, stream>>>(p, static_cast<int>(heads_per_split), stats_ptr,
                                                        count.data_ptr<float>(), one_split,
                                                        head_partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!one_split) {
    const int64_t total = batch * p.length;
    const unsigned int grid =
        static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(total, kThreads), 16 * int64_t{sms})));
    attention_finalize_kernel<<<grid, kThreads, 0, stream>>>(head_partial.data_ptr<float>(),
                                                             static_cast<int>(head_splits), batch, p.length,
                                                             count.data_ptr<float>(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

at::Tensor attention_importance_cuda(const at::Tensor& query,                           // [B, Hq, R, D]
                                     const at::Tensor& key,                             // [B, Hkv, L, D]
                                     std::optional<double> scale,                       // default D^-0.5
                                     const std::optional<at::Tensor>& query_positions,  // [B, R] int64
                                     const std::optional<at::Tensor>& key_padding_mask  // [B, L] bool
) {
  constexpr const char* OP_NAME = "attention_importance";
  check_attention_importance_args(query, key, scale, query_positions, key_padding_mask);
  const int64_t batch = query.size(0);
  const int64_t hq = query.size(1);
  const int64_t rows = query.size(2);
  const int64_t dim = query.size(3);
  const int64_t hkv = key.size(1);
  const int64_t length = key.size(2);
  TORCH_CHECK(dim <= kMaxHeadDim, OP_NAME, ": head dim D must be <= ", kMaxHeadDim, " on CUDA, got ", dim);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  // Products as divisions: with an empty dimension elsewhere, sizes may be huge and a product could overflow.
  TORCH_CHECK(length < kIntMax && hq < kIntMax / std::max<int64_t>(rows, 1) &&
                  batch < kIntMax / std::max<int64_t>(hkv, 1),
              OP_NAME,
              ": sizes too large for the CUDA kernels (L, Hq * R and B * Hkv must be < 2^31), got query ",
              query.sizes(), " and key ", key.sizes());
  c10::cuda::CUDAGuard device_guard(query.device());

  const auto f32 = query.options().dtype(at::kFloat);
  // No row or no key anywhere: zeros, and (as on CPU) the positions are not looked at.
  if (batch == 0 || length == 0 || rows == 0 || hq == 0) return at::zeros({batch, length}, f32);

  at::Tensor positions;  // [B, R] int64
  if (query_positions.has_value()) {
    positions = *query_positions;
    // One device reduction and one host sync: an out-of-range position must fail here, not index past L.
    const auto [min_pos, max_pos] = at::aminmax(positions);
    check_query_positions_range(min_pos.item<int64_t>(), max_pos.item<int64_t>(), length);
  }
  at::Tensor out = at::empty({batch, length}, f32);  // [B, L] fp32, every entry written below

  // The kernels read rows along D: only that dimension has to be dense; the other strides are passed on.
  const at::Tensor q = dim <= 1 || query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = dim <= 1 || key.stride(3) == 1 ? key : key.contiguous();
  const int device = query.device().index();
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int shared_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  AttnParams p{};
  p.query = q.const_data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sr = q.stride(2);
  p.key = k.const_data_ptr();
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_sl = k.stride(2);
  if (query_positions.has_value()) {
    p.positions = positions.const_data_ptr<int64_t>();
    p.pos_sb = positions.stride(0);
    p.pos_sr = positions.stride(1);
  }
  if (key_padding_mask.has_value()) {
    p.mask = key_padding_mask->const_data_ptr<bool>();
    p.mask_sb = key_padding_mask->stride(0);
    p.mask_sl = key_padding_mask->stride(1);
  }
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  p.group = static_cast<int>(hq / hkv);
  p.rows = static_cast<int>(rows);
  p.length = static_cast<int>(length);
  p.dim = static_cast<int>(dim);
  p.dim4 = static_cast<int>((dim + 3) / 4 * 4);
  p.k_stride = static_cast<int>((dim + 7) / 8 * 8 + 4);
  const double scale_value = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(dim));
  p.scale_log2e = static_cast<float>(scale_value * 1.4426950408889634);
  const int64_t chunk_elems = 16 / static_cast<int64_t>(q.element_size());
  p.vec = dim % chunk_elems == 0 && reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 16 == 0 && stride_fits16(q, 0) && stride_fits16(q, 1) &&
          stride_fits16(q, 2) && stride_fits16(k, 0) && stride_fits16(k, 1) && stride_fits16(k, 2);

  // Few rows per kv head (the usual FastV case: R = 1, G <= 8): spread the warps along the keys so that several
  // of them have rows to score; many rows: spread them along the rows so that a key tile serves more of them.
  const int64_t group_rows = hq / hkv * rows;
  int key_groups = group_rows <= 8 ? 4 : (group_rows <= 16 ? 2 : 1);
  while (key_groups > 1 &&
         tile_shared_bytes(key_groups, p.dim4, p.k_stride) + kStaticSharedBytes > static_cast<size_t>(shared_limit)) {
    key_groups /= 2;
  }
  TORCH_CHECK(tile_shared_bytes(key_groups, p.dim4, p.k_stride) + kStaticSharedBytes <=
                  static_cast<size_t>(shared_limit),
              OP_NAME, ": head dim D=", dim, " needs more shared memory than this device has");
  p.key_groups = key_groups;
  p.tile_keys = 32 * key_groups;
  p.chunk_rows = kRowsPerThread * kWarps / key_groups;
  TORCH_CHECK(batch < kIntMax / ceil_div(length, p.tile_keys), OP_NAME, ": B * L too large for the CUDA kernels");

  dispatch_attention_dtype(q.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_attention_importance<T>(p, batch, sms, batch * hq * rows, out, stream);
  });
  return out;
}

}  // namespace epic_ext

TORCH_LIBRARY_IMPL(epic_ext, CUDA, m) { m.impl("attention_importance", &epic_ext::attention_importance_cuda); }
