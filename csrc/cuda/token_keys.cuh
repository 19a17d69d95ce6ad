// Index and ordering logic of select_tokens and gather_tokens_backward, kept apart from the kernels and
// __host__ __device__ so that tools/check_token_keys.cu runs exactly this code on the CPU (no GPU needed).
//
// 1. Ranking keys (select_tokens). A (score, relative position) pair becomes one 64-bit key whose unsigned order
//    is the order select_tokens ranks by: score descending, NaN below every number (below -inf too), -0.0 equal to
//    +0.0, ties to the lower position. The keys of one span are unique (the position is part of them), so sorting
//    them, or taking the top k of them, has exactly one answer: no tie-breaking is left to the sort.
//      high 32 bits: the float's bits mapped so that unsigned order is numeric order (negatives complemented,
//                    non-negatives with the sign bit set); NaN -> 0, -0.0 -> the key of +0.0.
//      low 32 bits:  0xFFFFFFFF - relative position, so a lower position is a larger key.
//    Every real key is > 0 when the relative position is < 0xFFFFFFFF (the low half is then >= 1), so 0 can pad
//    a sort network: it ranks after every real key.
//
// 2. Inverse lists (gather_tokens_backward). For one sample, index[k] (k < K) in [-1, L) names the destination
//    row of source row k. The inverse is a counting sort: counts per destination, an exclusive scan (bucket
//    starts), then a fill that walks k in ascending order 32 at a time (one warp), so each bucket lists its
//    sources in ascending k and the backward's per-row sums always add in the same order (deterministic). A chunk
//    of 32 lanes groups equal destinations (peers, from __match_any_sync on the GPU); each lane's slot is the
//    bucket's cursor plus the number of peers in lower lanes, and the lowest peer advances the cursor by the group
//    size. After the fill, cursor[p] is the end of bucket p, so bucket p is [ends[p - 1], ends[p]) (begin 0 for
//    p = 0): no second array is needed.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#if defined(__CUDACC__)
#define EPIC_TK_HD __host__ __device__ __forceinline__
#else
#define EPIC_TK_HD inline
#endif

namespace epic_ext {
namespace token_keys {

EPIC_TK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

EPIC_TK_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// Unsigned order of the result = numeric order of x; NaN ranks lowest (0; -inf maps to 0x007FFFFF).
EPIC_TK_HD uint32_t score_rank_bits(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) return 0x80000000u;  // -0.0 and +0.0 are the same score: the position decides between them
  const uint32_t u = float_bits(x);
  return (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
}

// rel_pos < 0xFFFFFFFF (the callers limit span_length to that).
EPIC_TK_HD uint64_t token_key(float score, uint32_t rel_pos) {
  return (static_cast<uint64_t>(score_rank_bits(score)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - rel_pos);
}

EPIC_TK_HD uint32_t token_key_position(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

// at::topk compares int64: flipping the top bit maps unsigned order onto signed order.
EPIC_TK_HD int64_t token_key_to_signed(uint64_t key) { return static_cast<int64_t>(key ^ 0x8000000000000000ull); }
EPIC_TK_HD uint64_t token_key_from_signed(int64_t key) {
  return static_cast<uint64_t>(key) ^ 0x8000000000000000ull;
}

// Bitonic sort network over n = 2^m keys, as the select_tokens kernel runs it: for k = 2, 4, ..., n and
// j = k/2, ..., 1, the n/2 pairs (i, i | j) with bit j of i clear are compare-exchanged, descending where
// (i & k) == 0 and ascending elsewhere; the last stage (k = n) is all descending, so the result is descending.
EPIC_TK_HD uint32_t bitonic_lower_index(uint32_t pair, uint32_t j) {
  return ((pair & ~(j - 1u)) << 1) | (pair & (j - 1u));
}
EPIC_TK_HD bool bitonic_descending(uint32_t i, uint32_t k) { return (i & k) == 0u; }
// Returns whether keys[i] and keys[i | j] must swap.
EPIC_TK_HD bool bitonic_must_swap(uint64_t lower, uint64_t upper, bool descending) {
  return descending ? lower < upper : lower > upper;
}

// Counting-sort fill step for one lane of a 32-lane chunk; peers = lanes of the chunk with the same destination.
EPIC_TK_HD uint32_t peers_below(uint32_t peers, int lane) { return peers & ((1u << lane) - 1u); }
EPIC_TK_HD int inverse_fill_slot(int cursor, uint32_t peers, int lane) {
  return cursor + popcount32(peers_below(peers, lane));
}
EPIC_TK_HD bool inverse_group_leader(uint32_t peers, int lane) { return peers_below(peers, lane) == 0u; }
EPIC_TK_HD int inverse_advance_cursor(int cursor, uint32_t peers) { return cursor + popcount32(peers); }
// Bucket of destination p once the fill is done (ends = the cursors).
EPIC_TK_HD int inverse_bucket_begin(const int* ends, int64_t p) { return p > 0 ? ends[p - 1] : 0; }
EPIC_TK_HD int inverse_bucket_end(const int* ends, int64_t p) { return ends[p]; }

}  // namespace token_keys
}  // namespace epic_ext
