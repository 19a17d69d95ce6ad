// Portable row kernels of temperature_kl (any CPU). The AVX2 file has the same structure with 8-wide vectors;
// keep the two in step.
#include <cmath>
#include <limits>

#include "temperature_kl_rows.h"

namespace epic_ext::rows {

double kl_row_generic(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype,
                      int64_t V, float inv_temp, void* grad, float grad_coef, float* work) {
  float* t = work;      // teacher / T, then exp(t - max_t)
  float* s = work + V;  // student / T, then exp(s - max_s)
  float max_t = -std::numeric_limits<float>::infinity();
  float max_s = max_t;
  bool has_nan = false;
  for (int64_t v = 0; v < V; ++v) {
    t[v] = load_as_float(teacher, teacher_dtype, v) * inv_temp;
    s[v] = load_as_float(student, student_dtype, v) * inv_temp;
    has_nan |= std::isnan(t[v]) || std::isnan(s[v]);
    max_t = std::fmax(max_t, t[v]);
    max_s = std::fmax(max_s, s[v]);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // A row with no finite maximum (all -inf, or +inf present) has no defined distribution.
  if (has_nan || !std::isfinite(max_t) || !std::isfinite(max_s)) {
    if (grad != nullptr)
      for (int64_t v = 0; v < V; ++v) store_from_float(grad, student_dtype, v, static_cast<float>(nan));
    return nan;
  }
  double sum_t = 0.0, sum_s = 0.0, cross = 0.0;  // Zt, Zs, sum exp(t - max_t) * (t - s)
  for (int64_t v = 0; v < V; ++v) {
    const float et = std::exp(t[v] - max_t);
    const float es = std::exp(s[v] - max_s);
    sum_t += et;
    sum_s += es;
    if (t[v] != -std::numeric_limits<float>::infinity()) cross += static_cast<double>(et) * (t[v] - s[v]);
    t[v] = et;
    s[v] = es;
  }
  if (grad != nullptr) {
    const float coef_q = static_cast<float>(grad_coef / sum_s);
    const float coef_p = static_cast<float>(grad_coef / sum_t);
    for (int64_t v = 0; v < V; ++v) store_from_float(grad, student_dtype, v, coef_q * s[v] - coef_p * t[v]);
  }
  return cross / sum_t - (max_t + std::log(sum_t)) + (max_s + std::log(sum_s));
}

void scale_row_generic(const void* in, void* out, Dtype dtype, int64_t V, float factor) {
  for (int64_t v = 0; v < V; ++v) store_from_float(out, dtype, v, load_as_float(in, dtype, v) * factor);
}

}  // namespace epic_ext::rows
