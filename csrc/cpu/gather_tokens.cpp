// CPU gather_tokens and its backward. x is viewed as [B, outer, L, inner] (outer: the dims between the batch and
// `dim`, inner: the dims after it), so hidden states [B, L, D] (dim 1) and KV caches [B, H, L, D] (dim 2) are
// the same loop: one contiguous row of `inner` elements copied per (b, o, k).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "epic_ext.h"

namespace epic_ext {
namespace {

struct GatherGeometry {
  int64_t B, outer, L, inner;
};

GatherGeometry geometry(const at::Tensor& x, int64_t dim) {
  GatherGeometry g{x.size(0), 1, x.size(dim), 1};
  for (int64_t d = 1; d < dim; ++d) g.outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) g.inner *= x.size(d);
  return g;
}

void check_index_values(const char* op, const at::Tensor& index, int64_t L) {
  if (index.numel() == 0) return;
  const int64_t* p = index.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(p, p + index.numel());
  check_gather_index_range(op, *lo, *hi, L);
}

}  // namespace

at::Tensor gather_tokens_cpu(const at::Tensor& x_in,      // [B, ..., L, ...] any dtype
                             const at::Tensor& index_in,  // [B, K] int64 in [-1, L)
                             int64_t dim_in) {
  const int64_t dim = check_gather_tokens_args("gather_tokens", x_in, "x", index_in, dim_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const GatherGeometry g = geometry(x, dim);
  const int64_t K = index.size(1);
  check_index_values("gather_tokens", index, g.L);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes[static_cast<size_t>(dim)] = K;
  at::Tensor out = at::empty(out_sizes, x.options());  // [B, ..., K, ...]
  if (out.numel() == 0) return out;
  const int64_t row_bytes = g.inner * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const int64_t rows = g.B * g.outer * K;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t k = r % K, bo = r / K, b = bo / g.outer;
                       const int64_t l = idx[b * K + k];
                       char* d = dst + r * row_bytes;
                       if (l < 0) std::memset(d, 0, static_cast<size_t>(row_bytes));
                       else std::memcpy(d, src + (bo * g.L + l) * row_bytes, static_cast<size_t>(row_bytes));
                     }
                   });
  return out;
}

at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad_in,   // [B, ..., K, ...] float
                                      const at::Tensor& index_in,  // [B, K] int64
                                      int64_t dim_in, int64_t length) {
  const int64_t dim = check_gather_tokens_args("gather_tokens_backward", grad_in, "grad", index_in, dim_in);
  TORCH_CHECK(length >= 0, "gather_tokens_backward: length must be >= 0, got ", length);
  TORCH_CHECK(index_in.size(1) == grad_in.size(dim), "gather_tokens_backward: index has K=", index_in.size(1),
              " entries per sample but grad has size ", grad_in.size(dim), " at dim ", dim);
  TORCH_CHECK(grad_in.is_floating_point(), "gather_tokens_backward: grad must be a floating tensor, got ",
              grad_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  check_index_values("gather_tokens_backward", index, length);
  const int64_t B = grad.size(0), K = index.size(1);
  std::vector<int64_t> out_sizes = grad.sizes().vec();
  out_sizes[static_cast<size_t>(dim)] = length;
  at::Tensor out = at::zeros(out_sizes, grad.options());  // [B, ..., L, ...]
  if (out.numel() == 0 || K == 0) return out;
  GatherGeometry g = geometry(out, dim);

  // Per sample, the k's pointing at each destination row, in increasing k (a counting sort): every destination
  // row is then summed in one place, in a fixed order, in fp32 or better — deterministic, no atomics.
  std::vector<int64_t> offsets(static_cast<size_t>(B * (length + 1)), 0), sources(static_cast<size_t>(B * K));
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t* off = offsets.data() + b * (length + 1);
    for (int64_t k = 0; k < K; ++k)
      if (idx[b * K + k] >= 0) ++off[idx[b * K + k] + 1];
    for (int64_t l = 0; l < length; ++l) off[l + 1] += off[l];
    std::vector<int64_t> fill(off, off + length);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t l = idx[b * K + k];
      if (l >= 0) sources[static_cast<size_t>(b * K + fill[static_cast<size_t>(l)]++)] = k;
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_tokens_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.outer, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(g.inner));
      for (int64_t bo = begin; bo < end; ++bo) {
        const int64_t b = bo / g.outer;
        const int64_t* off = offsets.data() + b * (length + 1);
        for (int64_t l = 0; l < length; ++l) {
          if (off[l] == off[l + 1]) continue;  // nobody points here: stays zero
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t s = off[l]; s < off[l + 1]; ++s) {
            const scalar_t* row = src + (bo * K + sources[static_cast<size_t>(b * K + s)]) * g.inner;
            for (int64_t i = 0; i < g.inner; ++i) acc[static_cast<size_t>(i)] += static_cast<acc_t>(row[i]);
          }
          scalar_t* out_row = dst + (bo * g.L + l) * g.inner;
          for (int64_t i = 0; i < g.inner; ++i) out_row[i] = static_cast<scalar_t>(acc[static_cast<size_t>(i)]);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(epic_ext, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("gather_tokens_backward", &gather_tokens_backward_cpu);
}

}  // namespace epic_ext
