// CPU attention_importance: per (sample, kv head) task, the scores of the G*R query rows that share the kv head
// are one small GEMM ([G*R, D] x [D, L], fp32) into a per-task buffer; masked softmax per row; probabilities
// summed into a [B, Hkv, L] partial that is reduced over kv heads at the end. Never [B, H, R, L].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "epic_ext.h"

namespace epic_ext {

at::Tensor attention_importance_cpu(const at::Tensor& query_in,  // [B, Hq, R, D] post-RoPE query rows, float
                                    const at::Tensor& key_in,    // [B, Hkv, L, D] post-RoPE keys, float
                                    std::optional<double> scale_opt,
                                    const std::optional<at::Tensor>& query_positions,  // [B, R] int64
                                    const std::optional<at::Tensor>& key_padding_mask  // [B, L] bool
) {
  check_attention_importance_args(query_in, key_in, scale_opt, query_positions, key_padding_mask);
  const int64_t B = query_in.size(0), Hq = query_in.size(1), R = query_in.size(2), D = query_in.size(3);
  const int64_t Hkv = key_in.size(1), L = key_in.size(2), G = Hq / Hkv;
  at::Tensor out = at::zeros({B, L}, query_in.options().dtype(at::kFloat));  // [B, L] fp32
  if (B == 0 || L == 0 || R == 0 || Hq == 0) return out;

  at::Tensor positions;
  if (query_positions.has_value()) {
    positions = query_positions->contiguous();
    const int64_t* p = positions.const_data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < B * R; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    check_query_positions_range(lo, hi, L);
  }
  at::Tensor mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const double scale = scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(static_cast<double>(D));

  // fp32 copies of q and k (free when already fp32 and contiguous): the GEMM below wants fp32.
  const at::Tensor query = query_in.to(at::kFloat).contiguous();  // [B, Hq, R, D]
  const at::Tensor key = key_in.to(at::kFloat).contiguous();      // [B, Hkv, L, D]
  at::Tensor partial = at::zeros({B, Hkv, L}, out.options());     // [B, Hkv, L] summed probabilities
  std::vector<int64_t> valid_rows(static_cast<size_t>(B), 0);     // valid query rows per sample (same for all h)
  const int64_t* pos = positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr;
  const bool* real = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  float* partial_data = partial.data_ptr<float>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, hk = task % Hkv;
      // [G*R, D] rows of the query heads that read kv head hk, then [G*R, L] scores.
      const at::Tensor q_rows = query[b].narrow(0, hk * G, G).reshape({G * R, D});
      const at::Tensor scores = at::mm(q_rows, key[b][hk].t()).contiguous();
      const float* s = scores.const_data_ptr<float>();
      float* acc = partial_data + (b * Hkv + hk) * L;
      int64_t rows_seen = 0;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t row_pos = pos ? pos[b * R + r] : L - 1;
          if (row_pos < 0) continue;
          const float* srow = s + (g * R + r) * L;
          const int64_t last = row_pos;  // keys after the row's position are masked
          // Validity comes from positions and mask alone (as on CUDA), never from the scores.
          bool sees_key = false, has_nan = false;
          double row_max = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j <= last; ++j) {
            if (real && !real[b * L + j]) continue;
            const double x = scale * srow[j];
            sees_key = true;
            has_nan |= std::isnan(x);
            row_max = std::fmax(row_max, x);
          }
          if (!sees_key) continue;  // not a valid row
          if (g == 0) ++rows_seen;
          // A NaN or +inf score, or only -inf scores, make the row's softmax NaN (as torch.softmax does); the NaN
          // reaches every position of the sample through the mean, as in the reference.
          if (has_nan || !std::isfinite(row_max)) {
            std::fill(acc, acc + L, std::numeric_limits<float>::quiet_NaN());
            continue;
          }
          double denom = 0.0;
          for (int64_t j = 0; j <= last; ++j)
            if (!real || real[b * L + j]) denom += std::exp(scale * srow[j] - row_max);
          const double inv = 1.0 / denom;
          for (int64_t j = 0; j <= last; ++j)
            if (!real || real[b * L + j]) acc[j] += static_cast<float>(std::exp(scale * srow[j] - row_max) * inv);
        }
      }
      if (hk == 0) valid_rows[static_cast<size_t>(b)] = rows_seen;  // identical for every kv head
    }
  });

  float* out_data = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = valid_rows[static_cast<size_t>(b)] * Hq;
    if (n == 0) continue;
    const float inv = 1.0f / static_cast<float>(n);
    for (int64_t j = 0; j < L; ++j) {
      float total = 0.0f;
      for (int64_t hk = 0; hk < Hkv; ++hk) total += partial_data[(b * Hkv + hk) * L + j];
      out_data[b * L + j] = total * inv;
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(epic_ext, CPU, m) { m.impl("attention_importance", &attention_importance_cpu); }

}  // namespace epic_ext
