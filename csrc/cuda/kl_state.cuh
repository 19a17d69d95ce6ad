// Per-row math of temperature_kl: a one-pass (online) softmax state for teacher and student together, its merge,
// and the final KL. Kept apart from the kernel, and __host__ __device__, so tools/check_kl_state.cu can run the
// exact code the kernel runs on the CPU (no GPU needed) against a double-precision direct computation.
//
// Exponentials are exp2 of k * (logit difference), k = log2(e) / T: one MUFU.EX2 on the GPU, no range reduction.
// Maxima are kept as raw logits and only differences are scaled, (v - max) * k: the max's own term is exactly 1
// in both sweeps, and a difference carries a rounding error relative to itself rather than to logit / T (which
// would cost ~1e-5 of every probability at logits / T ~ 500).
//
// State of a set of (teacher, student) logit pairs (t, s):
//   teacher_max = max t            teacher_sum = sum 2^(k (t - teacher_max))
//   student_max = max s            student_sum = sum 2^(k (s - student_max))
//   cross       = sum 2^(k (t - teacher_max)) * (t - s - shift)    (rescaled together with teacher_sum)
// so that, with p = softmax(teacher / T), q = softmax(student / T), and 1 / T = ln2 * k:
//   KL(p || q) = ln2 * k * (cross / teacher_sum + shift - (teacher_max - student_max)) - ln(teacher_sum)
//                + ln(student_sum).
// shift is the first finite t - s the state saw (0 before that). Without it, cross / teacher_sum = E_p[t - s] and
// teacher_max - student_max would cancel: a student whose logits sit 50 above the teacher's would lose digits of
// the KL in fp32. With it, cross holds only the spread of t - s around a typical value.
//
// -inf handling: a teacher entry of -inf has p = 0 and is skipped (never 2^-inf * (-inf - s) = NaN); a student
// entry of -inf adds nothing to student_sum. A student -inf under a teacher entry that is not -inf means q = 0 < p:
// the KL is +inf. That is recorded in `infinite` (0 or +inf) instead of cross, where an inf would turn into NaN
// as soon as a rescale factor underflows to 0 (inf * 0), and where p itself may have underflowed in fp32. A state whose max is still -inf has sum 0 and cross 0, and merging
// two such states must not compute (-inf) - (-inf). NaN inputs propagate to the result (through the sums; a max is
// never NaN, it only takes a value v with v - max > 0).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define EPIC_KL_HD __host__ __device__ __forceinline__
#else
#define EPIC_KL_HD inline
#endif

namespace epic_ext {
namespace kl {

// Overloads rather than std:: calls: the same names must resolve in device code (CUDA math builtins) and on the
// host (libm), for float (the kernel) and double (the self-check's exact-logic run).
// On the device, exp2 is the bare ex2.approx.ftz instruction (max relative error about 2^-22): exp2f adds a
// denormal-range fix-up around it that only changes terms below 2^-126 of the row's largest one, i.e. nothing
// the sums can see, at three extra instructions per exponential in the hottest loop.
EPIC_KL_HD float kl_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return ::exp2f(x);
#endif
}
EPIC_KL_HD double kl_exp2(double x) { return ::exp2(x); }
EPIC_KL_HD float kl_fma(float a, float b, float c) { return ::fmaf(a, b, c); }
EPIC_KL_HD double kl_fma(double a, double b, double c) { return ::fma(a, b, c); }
EPIC_KL_HD float kl_abs(float x) { return ::fabsf(x); }
EPIC_KL_HD double kl_abs(double x) { return ::fabs(x); }

template <typename Acc>
EPIC_KL_HD Acc kl_neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

template <typename Acc>
struct KlState {
  Acc teacher_max;
  Acc teacher_sum;
  Acc student_max;
  Acc student_sum;
  Acc cross;
  Acc shift;     // always finite
  Acc infinite;  // +inf once a student -inf met a teacher entry that is not -inf, else 0
};

template <typename Acc>
EPIC_KL_HD KlState<Acc> kl_state_empty() {
  return KlState<Acc>{kl_neg_inf<Acc>(), Acc(0), kl_neg_inf<Acc>(), Acc(0), Acc(0), Acc(0), Acc(0)};
}

// One (teacher, student) pair of raw logits; k = log2(e) / T > 0. One exp2 per distribution: when the value is a
// new max the old sums are rescaled by 2^(k (old_max - v)) and the new term is 1, otherwise the new term is
// 2^(k (v - max)); both are 2^-|k (v - max)|. While the max is -inf, v - max = +inf and the rescale factor is
// 2^-inf = 0 (the sums are 0 then). Branch-free (selects, no divergent -inf branch): this runs once per element.
template <typename Acc>
EPIC_KL_HD void kl_state_add(KlState<Acc>& st, Acc teacher, Acc student, Acc k) {
  const Acc zero(0);
  const Acc one(1);
  {
    // teacher = -inf: p = 0. Its gap is -inf or NaN, so it is never a new max; e and diff are forced to 0 so that
    // neither 2^NaN (max also -inf) nor 0 * (-inf - student) can reach the sums.
    const bool present = teacher != kl_neg_inf<Acc>();
    const Acc gap = teacher - st.teacher_max;
    const bool is_new_max = gap > zero;
    const Acc e_raw = kl_exp2(-kl_abs(gap * k));  // computed unconditionally: selecting is cheaper than predicating
    const Acc e = present ? e_raw : zero;
    // Student -inf under a present teacher entry: `infinite` takes it, and diff stays finite (0) so that cross
    // never holds an inf. (|diff| is also inf for a teacher +inf, which must reach cross to make the row NaN.)
    const bool q_zero = student == kl_neg_inf<Acc>();
    const Acc diff_raw = present ? teacher - student : zero;
    const Acc diff = q_zero ? zero : diff_raw;
    st.infinite = present && q_zero ? static_cast<Acc>(INFINITY) : st.infinite;
    // teacher_sum == 0 only until the first present entry (afterwards the max's own term keeps it >= 1): cross is
    // still 0 then, so the shift can be chosen freely. |diff| = inf (teacher +inf) must not become the shift.
    // (Two selects rather than one `&&` condition: the short-circuit compiled to a branch per element.)
    const Acc shift_candidate = kl_abs(diff) < static_cast<Acc>(INFINITY) ? diff : zero;
    st.shift = st.teacher_sum == zero ? shift_candidate : st.shift;
    const Acc shifted = diff - st.shift;
    st.teacher_sum = is_new_max ? kl_fma(st.teacher_sum, e, one) : st.teacher_sum + e;
    st.cross = is_new_max ? kl_fma(st.cross, e, shifted) : kl_fma(e, shifted, st.cross);
    st.teacher_max = is_new_max ? teacher : st.teacher_max;
  }
  {
    const bool present = student != kl_neg_inf<Acc>();
    const Acc gap = student - st.student_max;
    const bool is_new_max = gap > zero;
    const Acc e_raw = kl_exp2(-kl_abs(gap * k));
    const Acc e = present ? e_raw : zero;
    st.student_sum = is_new_max ? kl_fma(st.student_sum, e, one) : st.student_sum + e;
    st.student_max = is_new_max ? student : st.student_max;
  }
}

// Merges (max_b, sum_b, cross_b) into (max_a, sum_a, cross_a): the side with the smaller max is rescaled by
// 2^-|k (max_a - max_b)|. Both -inf is the only case where the gap is NaN without a NaN input; both sums (and
// crosses) are then 0, or NaN from a NaN input, and adding them keeps either.
template <typename Acc>
EPIC_KL_HD void kl_merge_softmax(Acc& max_a, Acc& sum_a, Acc& cross_a, Acc max_b, Acc sum_b, Acc cross_b, Acc k) {
  if (max_a == kl_neg_inf<Acc>() && max_b == kl_neg_inf<Acc>()) {
    sum_a += sum_b;
    cross_a += cross_b;
    return;
  }
  const Acc gap = max_b - max_a;
  const bool b_is_larger = gap > Acc(0);
  const Acc e = kl_exp2(-kl_abs(gap * k));
  sum_a = b_is_larger ? kl_fma(sum_a, e, sum_b) : kl_fma(sum_b, e, sum_a);
  cross_a = b_is_larger ? kl_fma(cross_a, e, cross_b) : kl_fma(cross_b, e, cross_a);
  max_a = b_is_larger ? max_b : max_a;
}

// The crosses are first brought to one shift: sum e (diff - s_b) = sum e (diff - s_a) + (s_b - s_a) * sum e.
// s_b - s_a is small whenever the shift matters (both near the typical t - s), so this adds no cancellation.
// a keeps its shift unless it has seen nothing yet. Shifts are finite, so an empty side's term is exactly 0.
template <typename Acc>
EPIC_KL_HD KlState<Acc> kl_state_merge(KlState<Acc> a, const KlState<Acc>& b, Acc k) {
  const Acc shift = a.teacher_sum == Acc(0) ? b.shift : a.shift;
  a.cross = kl_fma(a.shift - shift, a.teacher_sum, a.cross);
  const Acc cross_b = kl_fma(b.shift - shift, b.teacher_sum, b.cross);
  a.shift = shift;
  a.infinite += b.infinite;  // 0 or +inf each
  kl_merge_softmax(a.teacher_max, a.teacher_sum, a.cross, b.teacher_max, b.teacher_sum, cross_b, k);
  Acc unused_cross = Acc(0);
  kl_merge_softmax(a.student_max, a.student_sum, unused_cross, b.student_max, b.student_sum, Acc(0), k);
  return a;
}

// KL(p || q) in nats. Double: the terms are of the size of the log-sum-exps while the KL can be far smaller.
// ln2 * k rather than 1 / T: the sums were built with this k, so the result is exact for the temperature
// ln2 / (ln2 * k) that the exponentials actually used (it differs from T by float rounding of k only).
template <typename Acc>
EPIC_KL_HD double kl_state_finish(const KlState<Acc>& st, Acc k) {
  constexpr double kLn2 = 0.69314718055994530942;
  const double teacher_sum = static_cast<double>(st.teacher_sum);
  const double student_sum = static_cast<double>(st.student_sum);
  // shift and the max gap are both O(logit) and nearly cancel when the student is a shifted teacher.
  const double offset = static_cast<double>(st.shift) -
                        (static_cast<double>(st.teacher_max) - static_cast<double>(st.student_max));
  // + infinite: a NaN row stays NaN (NaN + inf), any other row with q = 0 < p somewhere becomes +inf.
  return kLn2 * static_cast<double>(k) * (static_cast<double>(st.cross) / teacher_sum + offset) -
         ::log(teacher_sum) + ::log(student_sum) + static_cast<double>(st.infinite);
}

// What the gradient sweep needs from a finished row:
//   grad = student_coeff * 2^(k (s - student_max)) - teacher_coeff * 2^(k (t - teacher_max)),
// coeff = (scale / T) / sum, i.e. scale / T * (q - p).
struct KlRowStats {
  float teacher_max;
  float student_max;
  float teacher_coeff;
  float student_coeff;
};

template <typename Acc>
EPIC_KL_HD KlRowStats kl_row_stats(const KlState<Acc>& st, float grad_scale) {
  return KlRowStats{static_cast<float>(st.teacher_max), static_cast<float>(st.student_max),
                    grad_scale / static_cast<float>(st.teacher_sum), grad_scale / static_cast<float>(st.student_sum)};
}

// Differences to the raw max again, as in kl_state_add: the max's own term is exactly 1 in both sweeps, so q and p
// agree with the pass-1 sums to rounding of the terms themselves. A teacher -inf gives 2^-inf = 0, i.e. p = 0, as long as the row has a finite teacher entry (else everything is NaN, as
// is the loss).
EPIC_KL_HD float kl_grad_element(float student, float teacher, float k, const KlRowStats& rs) {
  const float q_scaled = kl_exp2((student - rs.student_max) * k);
  const float p_scaled = kl_exp2((teacher - rs.teacher_max) * k);
  return kl_fma(q_scaled, rs.student_coeff, -(p_scaled * rs.teacher_coeff));
}

}  // namespace kl
}  // namespace epic_ext
