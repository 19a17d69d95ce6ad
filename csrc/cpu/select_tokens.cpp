// CPU select_tokens: one task per sample; every candidate gets a unique 64-bit rank key (score order in the high
// word, lower position wins ties in the low word), nth_element picks the top `keep`, and they are returned sorted
// by position. The CUDA kernel ranks with the same keys, so both devices pick identical sets.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "epic_ext.h"

namespace epic_ext {
namespace {

// Monotone map float -> uint32 (larger float, larger key); -0.0 equals 0.0; NaN maps to 0, below -inf.
inline uint32_t ordered_score_bits(float score) {
  if (std::isnan(score)) return 0u;
  score += 0.0f;  // -0.0 -> +0.0
  uint32_t bits;
  std::memcpy(&bits, &score, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline uint64_t rank_key(float score, int64_t relative_position) {
  return (static_cast<uint64_t>(ordered_score_bits(score)) << 32) |
         (0xffffffffull - static_cast<uint64_t>(relative_position));
}

}  // namespace

at::Tensor select_tokens_cpu(const at::Tensor& scores_in,      // [B, L] float importance
                             const at::Tensor& span_start_in,  // [B] int64 first position of each span
                             int64_t span_length, int64_t keep) {
  check_select_tokens_args(scores_in, span_start_in, span_length, keep);
  TORCH_CHECK(span_length <= 0xffffffffll, "select_tokens: span_length must be < 2^32, got ", span_length);
  const int64_t B = scores_in.size(0), L = scores_in.size(1);
  at::Tensor out = at::empty({B, keep}, span_start_in.options());  // [B, keep] int64
  if (B == 0) return out;
  const at::Tensor span_start = span_start_in.contiguous();
  const int64_t* start = span_start.const_data_ptr<int64_t>();
  check_span_start_range(*std::min_element(start, start + B), *std::max_element(start, start + B), span_length, L);
  if (keep == 0) return out;
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const float* s = scores.const_data_ptr<float>();
  int64_t* result = out.data_ptr<int64_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(static_cast<size_t>(span_length));
    for (int64_t b = begin; b < end; ++b) {
      const float* row = s + b * L + start[b];
      for (int64_t i = 0; i < span_length; ++i) keys[static_cast<size_t>(i)] = rank_key(row[i], i);
      std::nth_element(keys.begin(), keys.begin() + (keep - 1), keys.end(), std::greater<uint64_t>());
      int64_t* dst = result + b * keep;
      for (int64_t i = 0; i < keep; ++i)
        dst[i] = start[b] + static_cast<int64_t>(0xffffffffull - (keys[static_cast<size_t>(i)] & 0xffffffffull));
      std::sort(dst, dst + keep);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(epic_ext, CPU, m) { m.impl("select_tokens", &select_tokens_cpu); }

}  // namespace epic_ext
