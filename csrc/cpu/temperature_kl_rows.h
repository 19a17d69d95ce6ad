// Row kernels of the CPU temperature_kl op. Plain C++ with no torch headers: this file is compiled twice, once
// for any CPU and once with AVX2/FMA/F16C, and temperature_kl.cpp picks the variant at run time.
#pragma once

#include <cstdint>

namespace epic_ext::rows {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One row of temperature_kl.
//   student, teacher: V logits each, contiguous, in their own dtypes.
//   Returns KL(softmax(teacher * inv_temp) || softmax(student * inv_temp)) in nats: NaN when either row holds a
//   NaN or +inf or has no finite entry; +inf when the student is -inf where the teacher is not.
//   If grad != nullptr, writes grad_coef * (q - p) in the student's dtype.
//   work: 2 * V floats of scratch owned by the calling thread.
using KlRowFn = double (*)(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype,
                           int64_t V, float inv_temp, void* grad, float grad_coef, float* work);
// out[v] = in[v] * factor for one row of V values of dtype `dtype`, computed in fp32.
using ScaleRowFn = void (*)(const void* in, void* out, Dtype dtype, int64_t V, float factor);

double kl_row_generic(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype,
                      int64_t V, float inv_temp, void* grad, float grad_coef, float* work);
void scale_row_generic(const void* in, void* out, Dtype dtype, int64_t V, float factor);

#ifdef EPIC_EXT_HAVE_AVX2_KERNELS
double kl_row_avx2(const void* student, Dtype student_dtype, const void* teacher, Dtype teacher_dtype, int64_t V,
                   float inv_temp, void* grad, float grad_coef, float* work);
void scale_row_avx2(const void* in, void* out, Dtype dtype, int64_t V, float factor);
#endif

// One element's share of sum_v exp(dt_v) ((t_v - max_t) - (s_v - max_s)), where dt = (t - max_t) / T and et =
// exp(dt); the caller multiplies the sum by 1 / T once, so a tiny T cannot overflow the terms. A teacher -inf has
// p = 0 and adds nothing; a student -inf under a teacher entry that is not -inf has q = 0 < p, so the KL is +inf
// (even where p underflowed in fp32: it is not 0). A term whose exp underflowed adds nothing.
inline double kl_cross_term(float t, float s, float et, float max_t, float max_s) {
  constexpr float kNegInf = -__builtin_inff();
  if (t == kNegInf) return 0.0;
  if (s == kNegInf) return __builtin_inf();
  if (et == 0.0f) return 0.0;
  return static_cast<double>(et) * ((t - max_t) - (s - max_s));
}

// Scalar conversions shared by both variants (bf16 and fp16 are stored as raw 16-bit patterns).
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {  // round to nearest even, overflow to inf
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (abs_bits >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs_bits >= 0x38800000u) {                                              // normal half
    uint32_t v = abs_bits - 0x38000000u;                                       // rebias exponent 127 -> 15
    v += 0xfffu + ((v >> 13) & 1u);
    return static_cast<uint16_t>(sign | (v >> 13));
  }
  if (abs_bits < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
  // subnormal half: shift the full mantissa, round to nearest even
  const uint32_t exponent = abs_bits >> 23;
  const uint32_t mantissa = (abs_bits & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exponent;  // 14..24
  uint32_t v = mantissa >> shift;
  const uint32_t rem = mantissa & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (v & 1u))) ++v;
  return static_cast<uint16_t>(sign | v);
}

inline float load_as_float(const void* base, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat32: return static_cast<const float*>(base)[i];
    case Dtype::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
}

inline void store_from_float(void* base, Dtype dtype, int64_t i, float value) {
  switch (dtype) {
    case Dtype::kFloat32: static_cast<float*>(base)[i] = value; break;
    case Dtype::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(value); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_fp16(value); break;
  }
}

}  // namespace epic_ext::rows
