// CPU temperature_kl: rows in parallel (at::parallel_for), each row handled by a row kernel from
// temperature_kl_rows_{avx2,generic}.cpp with fp32 math and a per-thread 2*V float scratch row (never an [N, V]
// fp32 temporary).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "epic_ext.h"
#include "temperature_kl_rows.h"

namespace epic_ext {
namespace {

rows::Dtype to_row_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return rows::Dtype::kFloat32;
    case at::kBFloat16: return rows::Dtype::kBFloat16;
    default: return rows::Dtype::kFloat16;  // the argument checks admit only these three
  }
}

// EPIC_EXT_CPU_KERNELS=generic forces the portable kernels (tests use it to cover both variants).
bool cpu_has_avx2_fma_f16c() {
#if defined(EPIC_EXT_HAVE_AVX2_KERNELS)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  const char* forced = std::getenv("EPIC_EXT_CPU_KERNELS");
  return supported && !(forced != nullptr && std::string(forced) == "generic");
#else
  return false;
#endif
}

rows::KlRowFn pick_kl_row() {
#if defined(EPIC_EXT_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2_fma_f16c()) return rows::kl_row_avx2;
#endif
  return rows::kl_row_generic;
}

rows::ScaleRowFn pick_scale_row() {
#if defined(EPIC_EXT_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2_fma_f16c()) return rows::scale_row_avx2;
#endif
  return rows::scale_row_generic;
}

// Rows are independent and each costs O(V); aim for a few rows per task so threads share the work evenly.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> temperature_kl_cpu(const at::Tensor& student_in,  // [N, V] fp32/bf16/fp16
                                                      const at::Tensor& teacher_in,  // [M, V] fp32/bf16/fp16
                                                      const std::optional<at::Tensor>& row_index_in,  // [N] int64
                                                      double temperature, double scale, bool compute_grad) {
  constexpr const char* OP_NAME = "temperature_kl";
  check_temperature_kl_args(student_in, teacher_in, row_index_in, temperature, scale);
  TORCH_CHECK(student_in.is_cpu(), OP_NAME, ": student_logits must be a CPU tensor for the CPU kernel");
  // Row kernels need unit stride along V; any row stride is fine.
  const at::Tensor student = student_in.stride(1) == 1 ? student_in : student_in.contiguous();
  const at::Tensor teacher = teacher_in.stride(1) == 1 ? teacher_in : teacher_in.contiguous();
  const int64_t N = student.size(0), M = teacher.size(0), V = student.size(1);
  at::Tensor row_index;
  if (row_index_in.has_value()) {
    row_index = row_index_in->contiguous();
    if (N > 0) {
      const int64_t* ri = row_index.data_ptr<int64_t>();
      int64_t lo = ri[0], hi = ri[0];
      for (int64_t i = 1; i < N; ++i) {
        lo = std::min(lo, ri[i]);
        hi = std::max(hi, ri[i]);
      }
      check_row_index_range(lo, hi, M);
    }
  }
  at::Tensor row_loss = at::empty({N}, student.options().dtype(at::kFloat));  // [N] fp32
  at::Tensor grad = compute_grad ? at::empty({N, V}, student.options().memory_format(at::MemoryFormat::Contiguous))
                                 : at::empty({0}, student.options());  // [N, V] student dtype
  TORCH_CHECK(V > 0, OP_NAME, ": student_logits must have a vocabulary dimension V > 0, got shape ",
              student.sizes());
  if (N == 0) return {row_loss, grad};

  const rows::Dtype sdt = to_row_dtype(student.scalar_type()), tdt = to_row_dtype(teacher.scalar_type());
  const int64_t s_elem = student.element_size(), t_elem = teacher.element_size(), g_elem = student.element_size();
  const char* s_base = static_cast<const char*>(student.const_data_ptr());
  const char* t_base = static_cast<const char*>(teacher.const_data_ptr());
  char* g_base = compute_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  const int64_t s_stride = student.stride(0) * s_elem, t_stride = teacher.stride(0) * t_elem;
  const int64_t* ri = row_index.defined() ? row_index.const_data_ptr<int64_t>() : nullptr;
  float* loss = row_loss.data_ptr<float>();
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const float grad_coef = static_cast<float>(scale / temperature);
  const rows::KlRowFn kl_row = pick_kl_row();

  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<float> work(static_cast<size_t>(2 * V));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = ri ? ri[i] : i;
      void* g_row = g_base ? g_base + i * V * g_elem : nullptr;
      if (r < 0) {
        loss[i] = 0.0f;
        if (g_row) std::memset(g_row, 0, static_cast<size_t>(V * g_elem));
        continue;
      }
      const double kl = kl_row(s_base + i * s_stride, sdt, t_base + r * t_stride, tdt, V, inv_temp, g_row,
                               grad_coef, work.data());
      loss[i] = static_cast<float>(scale * kl);
    }
  });
  return {row_loss, grad};
}

at::Tensor temperature_kl_backward_cpu(const at::Tensor& grad_in,    // [N, V] stored student gradient
                                       const at::Tensor& grad_rows_in  // [N] fp32 incoming gradient per row
) {
  check_temperature_kl_backward_args(grad_in, grad_rows_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const int64_t N = grad.size(0), V = grad.size(1);
  at::Tensor out = at::empty({N, V}, grad.options());
  if (N == 0 || V == 0) return out;
  const rows::Dtype dt = to_row_dtype(grad.scalar_type());
  const int64_t row_bytes = V * grad.element_size();
  const char* in_base = static_cast<const char*>(grad.const_data_ptr());
  char* out_base = static_cast<char*>(out.data_ptr());
  const float* factor = grad_rows.const_data_ptr<float>();
  const rows::ScaleRowFn scale_row = pick_scale_row();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      scale_row(in_base + i * row_bytes, out_base + i * row_bytes, dt, V, factor[i]);
  });
  return out;
}

TORCH_LIBRARY_IMPL(epic_ext, CPU, m) {
  m.impl("temperature_kl", &temperature_kl_cpu);
  m.impl("temperature_kl_backward", &temperature_kl_backward_cpu);
}

}  // namespace epic_ext
