// AVX2 + FMA + F16C row kernels of temperature_kl (compiled with -mavx2 -mfma -mf16c; temperature_kl.cpp only
// calls them after checking the CPU supports all three). Same structure as the generic file, 8 lanes wide.
//
// Memory traffic per row: reads teacher and student once from memory into a 2*V float scratch row that stays in
// the core's L2 (256 KB at V = 32000), sweeps the scratch twice, writes the gradient once.
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "temperature_kl_rows.h"

namespace epic_ext::rows {
namespace {

// exp(x) for x <= 0 (all our arguments are value - row max): Cephes-style range reduction x = n ln2 + r and a
// degree-6 polynomial, ~1 ulp. Arguments below -87 (including -inf) give exactly 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);
  const __m256 xc = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
  return _mm256_and_ps(result, _mm256_cmp_ps(x, lowest, _CMP_GE_OQ));
}

// The dtype is a template parameter so the hot loops carry no branch on it.
template <Dtype D>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (D == Dtype::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (D == Dtype::kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

template <Dtype D>
inline void store8(void* base, int64_t i, __m256 value) {
  if constexpr (D == Dtype::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, value);
  } else if constexpr (D == Dtype::kBFloat16) {
    {
      // round to nearest even; NaN -> canonical quiet NaN
      const __m256i bits = _mm256_castps_si256(value);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), is_nan);
      const __m128i packed =
          _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), packed);
    }
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i),
                     _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline double hsum(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double total = 0.0;
  for (float lane : lanes) total += lane;
  return total;
}

template <Dtype SD, Dtype TD>
double kl_row_impl(const void* student, const void* teacher, int64_t V, float inv_temp, void* grad, float grad_coef,
                   float* work) {
  constexpr Dtype student_dtype = SD, teacher_dtype = TD;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float* t = work;
  float* s = work + V;
  const int64_t V8 = V - V % 8;
  const __m256 scale = _mm256_set1_ps(inv_temp);
  __m256 max_t8 = _mm256_set1_ps(kNegInf), max_s8 = max_t8;
  __m256 nan8 = _mm256_setzero_ps();
  // Raw logits first: only differences to the row max are scaled by 1 / T (logit / T may overflow for tiny T).
  for (int64_t v = 0; v < V8; v += 8) {
    const __m256 tv = load8<TD>(teacher, v);
    const __m256 sv = load8<SD>(student, v);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(tv, sv, _CMP_UNORD_Q));
    max_t8 = _mm256_max_ps(max_t8, tv);
    max_s8 = _mm256_max_ps(max_s8, sv);
    _mm256_storeu_ps(t + v, tv);
    _mm256_storeu_ps(s + v, sv);
  }
  float max_t = hmax(max_t8), max_s = hmax(max_s8);
  bool has_nan = _mm256_movemask_ps(nan8) != 0;
  for (int64_t v = V8; v < V; ++v) {
    t[v] = load_as_float(teacher, teacher_dtype, v);
    s[v] = load_as_float(student, student_dtype, v);
    has_nan |= std::isnan(t[v]) || std::isnan(s[v]);
    max_t = std::fmax(max_t, t[v]);
    max_s = std::fmax(max_s, s[v]);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (has_nan || !std::isfinite(max_t) || !std::isfinite(max_s)) {
    if (grad != nullptr)
      for (int64_t v = 0; v < V; ++v) store_from_float(grad, student_dtype, v, static_cast<float>(nan));
    return nan;
  }

  // Sums are kept in 8 fp32 lanes and flushed to double every 4096 elements, so a 152k vocabulary loses nothing.
  const __m256 max_t_v = _mm256_set1_ps(max_t), max_s_v = _mm256_set1_ps(max_s);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const bool keep_exps = grad != nullptr;
  double sum_t = 0.0, sum_s = 0.0, cross = 0.0;
  __m256 infinite8 = _mm256_setzero_ps();
  for (int64_t block = 0; block < V8; block += 4096) {
    const int64_t block_end = block + 4096 < V8 ? block + 4096 : V8;
    __m256 zt = _mm256_setzero_ps(), zs = _mm256_setzero_ps(), ac = _mm256_setzero_ps();
    for (int64_t v = block; v < block_end; v += 8) {
      const __m256 tv = _mm256_loadu_ps(t + v);
      const __m256 sv = _mm256_loadu_ps(s + v);
      const __m256 t_gap = _mm256_sub_ps(tv, max_t_v);
      const __m256 s_gap = _mm256_sub_ps(sv, max_s_v);
      const __m256 et = exp_nonpositive(_mm256_mul_ps(t_gap, scale));
      const __m256 es = exp_nonpositive(_mm256_mul_ps(s_gap, scale));
      zt = _mm256_add_ps(zt, et);
      zs = _mm256_add_ps(zs, es);
      // kl_cross_term, 8 lanes: the term only where exp(dt) > 0 (p = 0 where the teacher is -inf, and never
      // 0 * inf); +inf (infinite8) where the student is -inf under a teacher entry that is not.
      const __m256 counted = _mm256_cmp_ps(et, _mm256_setzero_ps(), _CMP_GT_OQ);
      ac = _mm256_add_ps(ac, _mm256_and_ps(counted, _mm256_mul_ps(et, _mm256_sub_ps(t_gap, s_gap))));
      const __m256 q_zero =
          _mm256_and_ps(_mm256_cmp_ps(sv, neg_inf, _CMP_EQ_OQ), _mm256_cmp_ps(tv, neg_inf, _CMP_NEQ_OQ));
      infinite8 = _mm256_or_ps(infinite8, q_zero);
      if (keep_exps) {
        _mm256_storeu_ps(t + v, et);
        _mm256_storeu_ps(s + v, es);
      }
    }
    sum_t += hsum(zt);
    sum_s += hsum(zs);
    cross += hsum(ac);
  }
  if (_mm256_movemask_ps(infinite8) != 0) cross = std::numeric_limits<double>::infinity();
  for (int64_t v = V8; v < V; ++v) {
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
    const __m256 cq = _mm256_set1_ps(coef_q), cp = _mm256_set1_ps(coef_p);
    for (int64_t v = 0; v < V8; v += 8) {
      const __m256 g = _mm256_fmsub_ps(cq, _mm256_loadu_ps(s + v), _mm256_mul_ps(cp, _mm256_loadu_ps(t + v)));
      store8<SD>(grad, v, g);
    }
    for (int64_t v = V8; v < V; ++v) store_from_float(grad, student_dtype, v, coef_q * s[v] - coef_p * t[v]);
  }
  return cross * inv_temp / sum_t - std::log(sum_t) + std::log(sum_s);
}

template <Dtype D>
void scale_row_impl(const void* in, void* out, int64_t V, float factor) {
  const int64_t V8 = V - V % 8;
  const __m256 f = _mm256_set1_ps(factor);
  for (int64_t v = 0; v < V8; v += 8) store8<D>(out, v, _mm256_mul_ps(load8<D>(in, v), f));
  for (int64_t v = V8; v < V; ++v) store_from_float(out, D, v, load_as_float(in, D, v) * factor);
}

template <Dtype SD>
double kl_row_dispatch_teacher(const void* student, const void* teacher, Dtype teacher_dtype, int64_t V,
                               float inv_temp, void* grad, float grad_coef, float* work) {
  switch (teacher_dtype) {
    case Dtype::kFloat32: return kl_row_impl<SD, Dtype::kFloat32>(student, teacher, V, inv_temp, grad, grad_coef, work);
    case Dtype::kBFloat16:
      return kl_row_impl<SD, Dtype::kBFloat16>(student, teacher, V, inv_temp, grad, grad_coef, work);
    default: return kl_row_impl<SD, Dtype::kFloat16>(student, teacher, V, inv_temp, grad, grad_coef, work);
  }
}

}  // namespace

double kl_row_avx2(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype, int64_t V,
                   float inv_temp, void* grad, float grad_coef, float* work) {
  switch (student_dtype) {
    case Dtype::kFloat32:
      return kl_row_dispatch_teacher<Dtype::kFloat32>(student, teacher, teacher_dtype, V, inv_temp, grad, grad_coef,
                                                      work);
    case Dtype::kBFloat16:
      return kl_row_dispatch_teacher<Dtype::kBFloat16>(student, teacher, teacher_dtype, V, inv_temp, grad,
                                                       grad_coef, work);
    default:
      return kl_row_dispatch_teacher<Dtype::kFloat16>(student, teacher, teacher_dtype, V, inv_temp, grad, grad_coef,
                                                      work);
  }
}

void scale_row_avx2(const void* in, void* out, Dtype dtype, int64_t V, float factor) {
  switch (dtype) {
    case Dtype::kFloat32: return scale_row_impl<Dtype::kFloat32>(in, out, V, factor);
    case Dtype::kBFloat16: return scale_row_impl<Dtype::kBFloat16>(in, out, V, factor);
    default: return scale_row_impl<Dtype::kFloat16>(in, out, V, factor);
  }
}

}  // namespace epic_ext::rows
