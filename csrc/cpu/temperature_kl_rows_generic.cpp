// Portable row kernels of temperature_kl (any CPU). The AVX2 file has the same structure with 8-wide vectors;
// keep the two in step.
#include <cmath>
#include <limits>

#include "temperature_kl_rows.h"

namespace epic_ext::rows {

double kl_row_generic(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype,
                      int64_t V, float inv_temp, void* grad, float grad_coef, float* work) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float* t = work;      // raw teacher logits, then exp((t - max_t) / T)
  float* s = work + V;  // raw student logits, then exp((s - max_s) / T)
  float max_t = kNegInf;
  float max_s = max_t;
  bool has_nan = false;
  for (int64_t v = 0; v < V; ++v) {
    t[v] = load_as_float(teacher, teacher_dtype, v);
    s[v] = load_as_float(student, student_dtype, v);
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
  // Only differences to the row max are scaled by 1 / T: logit / T itself may overflow fp32 for tiny T.
  double sum_t = 0.0, sum_s = 0.0, cross = 0.0;  // Zt, Zs, sum exp(dt) * (dt - ds) * T
  for (int64_t v = 0; v < V; ++v) {
    const float et = std::exp((t[v] - max_t) * inv_temp);
    const float es = std::exp((s[v] - max_s) * inv_temp);
    sum_t += et;
    sum_s += es;
    cross += kl_cross_term(t[v], s[v], et, max_t, max_s);
    t[v] = et;
    s[v] = es;
  }
  if (grad != nullptr) {
    const float coef_q = static_cast<float>(grad_coef / sum_s);
    const float coef_p = static_cast<float>(grad_coef / sum_t);
    for (int64_t v = 0; v < V; ++v) store_from_float(grad, student_dtype, v, coef_q * s[v] - coef_p * t[v]);
  }
  return cross * inv_temp / sum_t - std::log(sum_t) + std::log(sum_s);
}

void scale_row_generic(const void* in, void* out, Dtype dtype, int64_t V, float factor) {
  for (int64_t v = 0; v < V; ++v) store_from_float(out, dtype, v, load_as_float(in, dtype, v) * factor);
}

}  // namespace epic_ext::rows
