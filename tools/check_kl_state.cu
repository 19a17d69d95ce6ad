// Host-side check of the per-row math in csrc/cuda/kl_state.cuh, the code temperature_kl_kernel runs per
// element and per merge. Runs on the CPU (no GPU needed): the header's functions are __host__ __device__.
//
// Each row is split over P "threads" the way the kernel splits it (element- or 8-element-chunk-strided, or at
// random), each thread folds its elements in order with kl_state_add, and the states are merged like the kernel
// merges them (xor butterflies within warps of 32, then over the warps), or in a random tree. The KL and the
// gradient are compared with a direct double-precision computation (softmax, then sum p (log p - log q)).
// Rows include -inf teacher entries, threads whose elements are all -inf, fully masked rows (NaN expected),
// student -inf under a live teacher entry (+inf expected, also where p underflows), identical rows, huge logits
// and V = 1.
//
//   nvcc -std=c++20 -O2 -Icsrc/cuda -x cu tools/check_kl_state.cu -o /tmp/check_kl_state && /tmp/check_kl_state
//
// Exits 1 when an error exceeds its tolerance. Float path: loss error <= 1e-5 * scale * max(1, |KL|) (the KL is a
// difference of log-sum-exp sized terms, so its absolute error does not shrink with it), gradient error <= 1e-5 of
// scale / T times the row's largest probability; either may instead be up to twice what plain fp32 code gets on
// the same row (logits / T in the hundreds: the fp32 inputs themselves are that coarse), and the loss up to 4x the
// rounding of fp32 t - s (see rounding_floor). Double path: 1e-12 (checks the logic, not the rounding).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "kl_state.cuh"

namespace {

using epic_ext::kl::KlRowStats;
using epic_ext::kl::KlState;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLog2e = 1.4426950408889634;

struct Reference {
  double kl;
  std::vector<double> grad;  // scale / T * (q - p)
  double max_prob;
};

Reference reference(const std::vector<float>& student, const std::vector<float>& teacher, double temperature,
                    double scale) {
  const size_t vocab = student.size();
  auto lse = [&](const std::vector<float>& x) {
    double m = -kInf;
    for (float v : x) m = std::max(m, v / temperature);
    if (m == -kInf) return -kInf;
    double z = 0.0;
    for (float v : x) z += std::exp(v / temperature - m);
    return m + std::log(z);
  };
  const double lse_t = lse(teacher);
  const double lse_s = lse(student);
  Reference ref{0.0, std::vector<double>(vocab), 0.0};
  for (size_t v = 0; v < vocab; ++v) {
    const double log_p = teacher[v] / temperature - lse_t;
    const double log_q = student[v] / temperature - lse_s;
    const double p = std::exp(log_p);
    const double q = std::exp(log_q);
    // p = 0 adds nothing; q = 0 under a teacher entry that is not -inf is +inf even where p underflowed.
    if (teacher[v] != -kInf) ref.kl += student[v] == -kInf ? kInf : p * (log_p - log_q);
    ref.grad[v] = scale / temperature * (q - p);
    ref.max_prob = std::max({ref.max_prob, p, q});
  }
  if (lse_t == -kInf) ref.kl = std::nan("");  // p undefined: the kernel yields NaN too
  return ref;
}

// What plain fp32 code (torch's log_softmax, then sum p (log p - log q); softmax differences for the gradient)
// achieves on the same row: the yardstick for rows whose fp32 inputs are themselves too coarse for 1e-5 (logits / T
// in the hundreds).
struct PlainFp32 {
  double kl;
  std::vector<double> grad;  // scale / T * (q - p)
};

PlainFp32 plain_fp32(const std::vector<float>& student, const std::vector<float>& teacher, double temperature,
                     double scale) {
  const float inv_t = static_cast<float>(1.0 / temperature);
  auto lse = [&](const std::vector<float>& x) {
    float m = -std::numeric_limits<float>::infinity();
    for (float v : x) m = std::max(m, v * inv_t);
    float z = 0.0f;
    for (float v : x) z += std::exp(v * inv_t - m);
    return m + std::log(z);
  };
  const float lse_t = lse(teacher);
  const float lse_s = lse(student);
  PlainFp32 out{0.0, std::vector<double>(student.size())};
  float kl = 0.0f;
  const float grad_scale = static_cast<float>(scale / temperature);
  for (size_t v = 0; v < student.size(); ++v) {
    const float log_p = teacher[v] * inv_t - lse_t;
    const float log_q = student[v] * inv_t - lse_s;
    const float p = std::exp(log_p);
    if (teacher[v] != -std::numeric_limits<float>::infinity()) kl += p * (log_p - log_q);
    out.grad[v] = grad_scale * (std::exp(log_q) - p);
  }
  out.kl = static_cast<float>(scale) * kl;
  return out;
}

enum class Split { kElementStrided, kChunkStrided, kRandom };

template <typename Acc>
KlState<Acc> butterfly(std::vector<KlState<Acc>> lanes, Acc k) {  // 32 lanes, like warp_merge's __shfl_xor_sync loop
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::vector<KlState<Acc>> next(32);
    for (int lane = 0; lane < 32; ++lane) next[lane] = epic_ext::kl::kl_state_merge(lanes[lane], lanes[lane ^ offset], k);
    lanes = next;
  }
  return lanes[0];
}

template <typename Acc>
KlState<Acc> row_state(const std::vector<float>& student, const std::vector<float>& teacher, Acc log2e_over_t,
                       int threads, Split split, bool tree_merge, std::mt19937_64& rng) {
  const int vocab = static_cast<int>(student.size());
  std::vector<KlState<Acc>> states(threads, epic_ext::kl::kl_state_empty<Acc>());
  std::uniform_int_distribution<int> pick(0, threads - 1);
  for (int v = 0; v < vocab; ++v) {
    const int thread = split == Split::kElementStrided ? v % threads
                       : split == Split::kChunkStrided ? (v / 8) % threads
                                                       : pick(rng);
    epic_ext::kl::kl_state_add(states[thread], static_cast<Acc>(teacher[v]), static_cast<Acc>(student[v]),
                               log2e_over_t);
  }
  if (tree_merge) {  // any order, any pairing
    while (states.size() > 1) {
      std::uniform_int_distribution<size_t> at(0, states.size() - 1);
      const size_t a = at(rng);
      size_t b = at(rng);
      if (a == b) continue;
      states[a] = epic_ext::kl::kl_state_merge(states[a], states[b], log2e_over_t);
      states.erase(states.begin() + static_cast<std::ptrdiff_t>(b));
    }
    return states[0];
  }
  // Kernel order: warps of 32 (missing lanes are empty states), then warp 0 over the warps' lane-0 results.
  const int warps = (threads + 31) / 32;
  std::vector<KlState<Acc>> warp_results(32, epic_ext::kl::kl_state_empty<Acc>());
  for (int w = 0; w < warps; ++w) {
    std::vector<KlState<Acc>> lanes(32, epic_ext::kl::kl_state_empty<Acc>());
    for (int lane = 0; lane < 32 && w * 32 + lane < threads; ++lane) lanes[lane] = states[w * 32 + lane];
    warp_results[w] = butterfly(lanes, log2e_over_t);
  }
  return butterfly(warp_results, log2e_over_t);
}

struct Stats {
  double max_kl_abs = 0.0;
  double max_kl_rel = 0.0;          // |err| / (scale * max(1, |KL|))
  double max_grad_rel = 0.0;        // |err| / (scale / T * max prob of the row)
  double max_plain_rel = 0.0;       // the same two for plain fp32 code on the same rows
  double max_plain_grad_rel = 0.0;
  double max_kernel_config_rel = 0.0;  // loss err / (scale * max(1,|KL|)) for 512 threads, butterfly merges
  double worst_fraction_of_tolerance = 0.0;
  int rows = 0;
  int failures = 0;
};

// Compares one special-valued KL (NaN or +inf expected) or a finite one; returns the normalised error.
bool same_special(double got, double want) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return true;
}

void check_row(const std::vector<float>& student, const std::vector<float>& teacher, double temperature,
               double scale, std::mt19937_64& rng, Stats& float_stats, Stats& double_stats, const char* label) {
  const Reference ref = reference(student, teacher, temperature, scale);
  const PlainFp32 plain = plain_fp32(student, teacher, temperature, scale);
  const double plain_err = std::fabs(plain.kl - scale * ref.kl);
  // Forming t - s in fp32 rounds by up to 2^-24 |t - s| (exact for bf16 / fp16 inputs, not for fp32 ones); the KL
  // takes it with weight 1 / T. Plain fp32 code escapes it only where it is exact by luck (one-hot rows).
  double max_gap = 0.0;
  for (size_t v = 0; v < student.size(); ++v) {
    if (std::isfinite(teacher[v]) && std::isfinite(student[v])) {
      max_gap = std::max(max_gap, std::fabs(static_cast<double>(teacher[v]) - student[v]));
    }
  }
  const double rounding_floor = scale * 4.0 * 0x1p-24 * max_gap / temperature;
  const double grad_norm = scale / temperature * ref.max_prob;
  double plain_grad_err = 0.0;
  for (size_t v = 0; v < student.size(); ++v) {
    plain_grad_err = std::max(plain_grad_err, std::fabs(plain.grad[v] - ref.grad[v]) / grad_norm);
  }
  static const int kThreadCounts[] = {1, 3, 32, 33, 100, 512};
  static const Split kSplits[] = {Split::kElementStrided, Split::kChunkStrided, Split::kRandom};
  for (int threads : kThreadCounts) {
    for (Split split : kSplits) {
      for (bool tree_merge : {false, true}) {
        // Float: exactly the kernel's arithmetic (apart from exp2: libm here, ex2.approx.ftz on the GPU).
        const float log2e_over_t = static_cast<float>(kLog2e / temperature);
        const float grad_scale = static_cast<float>(scale / temperature);
        const KlState<float> sf = row_state<float>(student, teacher, log2e_over_t, threads, split, tree_merge, rng);
        const double kl_f = static_cast<float>(scale * epic_ext::kl::kl_state_finish(sf, log2e_over_t));
        // Double: the same logic with rounding out of the way.
        const KlState<double> sd =
            row_state<double>(student, teacher, kLog2e / temperature, threads, split, tree_merge, rng);
        const double kl_d = scale * epic_ext::kl::kl_state_finish(sd, kLog2e / temperature);
        const double want = scale * ref.kl;

        ++float_stats.rows;
        ++double_stats.rows;
        if (!std::isfinite(want)) {
          const bool ok_f = same_special(kl_f, want);
          const bool ok_d = same_special(kl_d, want);
          if (!ok_f || !ok_d) {
            std::printf("FAIL %-28s threads=%d: want %g, float %g, double %g\n", label, threads, want, kl_f, kl_d);
            float_stats.failures += !ok_f;
            double_stats.failures += !ok_d;
          }
          continue;
        }
        const double norm = scale * std::max(1.0, std::fabs(ref.kl));
        const double err_f = std::fabs(kl_f - want);
        const double err_d = std::fabs(kl_d - want);
        float_stats.max_kl_abs = std::max(float_stats.max_kl_abs, err_f);
        float_stats.max_kl_rel = std::max(float_stats.max_kl_rel, err_f / norm);
        double_stats.max_kl_abs = std::max(double_stats.max_kl_abs, err_d);
        double_stats.max_kl_rel = std::max(double_stats.max_kl_rel, err_d / norm);
        float_stats.max_plain_rel = std::max(float_stats.max_plain_rel, plain_err / norm);
        const double tolerance = std::max({1e-5 * norm, 2.0 * plain_err, rounding_floor});
        bool bad_f = !(err_f <= tolerance);
        float_stats.worst_fraction_of_tolerance = std::max(float_stats.worst_fraction_of_tolerance, err_f / tolerance);
        if (threads == 512 && split != Split::kRandom && !tree_merge) {
          float_stats.max_kernel_config_rel = std::max(float_stats.max_kernel_config_rel, err_f / norm);
        }
        bool bad_d = !(err_d / norm <= 1e-12);

        const KlRowStats rs = epic_ext::kl::kl_row_stats(sf, grad_scale);
        double grad_err = 0.0;
        for (size_t v = 0; v < student.size(); ++v) {
          const double g = epic_ext::kl::kl_grad_element(student[v], teacher[v], log2e_over_t, rs);
          const double e = std::fabs(g - ref.grad[v]) / grad_norm;
          grad_err = std::isnan(e) ? kInf : std::max(grad_err, e);
        }
        float_stats.max_grad_rel = std::max(float_stats.max_grad_rel, grad_err);
        float_stats.max_plain_grad_rel = std::max(float_stats.max_plain_grad_rel, plain_grad_err);
        bad_f = bad_f || !(grad_err <= std::max(1e-5, 2.0 * plain_grad_err));
        if (bad_f || bad_d) {
          std::printf("FAIL %-28s V=%zu T=%g threads=%d split=%d tree=%d: want %.10g, float %.10g, double %.15g, "
                      "plain fp32 err %.3g, grad err %.3g\n",
                      label, student.size(), temperature, threads, static_cast<int>(split), tree_merge, want, kl_f,
                      kl_d, plain_err, grad_err);
          float_stats.failures += bad_f;
          double_stats.failures += bad_d;
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(20251122);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Stats float_stats;
  Stats double_stats;

  auto random_row = [&](size_t vocab, float spread) {
    std::vector<float> x(vocab);
    for (float& v : x) v = spread * normal(rng);
    return x;
  };

  const size_t kVocabs[] = {1, 2, 7, 8, 100, 1000, 4099};
  const double kTemperatures[] = {0.1, 1.0, 2.0, 4.0};
  const float kSpreads[] = {0.5f, 3.0f, 20.0f};
  for (size_t vocab : kVocabs) {
    for (double temperature : kTemperatures) {
      for (float spread : kSpreads) {
        const double scale = temperature * temperature;
        std::vector<float> teacher = random_row(vocab, spread);
        std::vector<float> student = teacher;
        for (float& v : student) v += 0.3f * spread * normal(rng);
        check_row(student, teacher, temperature, scale, rng, float_stats, double_stats, "random");

        // Independent student, plus an offset: the max-shift must cancel.
        std::vector<float> other = random_row(vocab, spread);
        for (float& v : other) v += 50.0f;
        check_row(other, teacher, temperature, scale, rng, float_stats, double_stats, "independent+offset");

        // Identical rows: KL = 0.
        check_row(teacher, teacher, temperature, scale, rng, float_stats, double_stats, "identical");

        if (vocab < 2) continue;
        // Scattered -inf teacher entries (p = 0), some under student -inf too.
        std::vector<float> masked = teacher;
        std::vector<float> student_masked = student;
        for (size_t v = 0; v + 1 < vocab; ++v) {  // keep the last entry live
          if (uniform(rng) < 0.4) {
            masked[v] = neg_inf;
            if (uniform(rng) < 0.5) student_masked[v] = neg_inf;
          }
        }
        check_row(student_masked, masked, temperature, scale, rng, float_stats, double_stats, "scattered -inf");

        // A leading block of -inf: with strided splits whole threads (and whole warps) see only -inf.
        std::vector<float> leading = teacher;
        std::fill(leading.begin(), leading.begin() + static_cast<std::ptrdiff_t>(vocab * 9 / 10), neg_inf);
        check_row(student, leading, temperature, scale, rng, float_stats, double_stats, "leading -inf block");

        // A single live teacher entry.
        std::vector<float> single(vocab, neg_inf);
        single[vocab / 2] = teacher[vocab / 2];
        check_row(student, single, temperature, scale, rng, float_stats, double_stats, "one live teacher entry");

        // Ties at the max.
        std::vector<float> ties = teacher;
        for (size_t v = 0; v < vocab; v += 3) ties[v] = 4.0f * spread;
        check_row(student, ties, temperature, scale, rng, float_stats, double_stats, "ties at max");
      }
    }
  }

  // Special values: fully masked teacher row -> NaN; student -inf under a live teacher entry -> +inf.
  for (size_t vocab : {size_t{5}, size_t{1000}}) {
    std::vector<float> teacher = random_row(vocab, 2.0f);
    std::vector<float> student = random_row(vocab, 2.0f);
    check_row(student, std::vector<float>(vocab, neg_inf), 1.0, 1.0, rng, float_stats, double_stats,
              "all teacher -inf");
    std::vector<float> hole = student;
    hole[vocab / 3] = neg_inf;
    check_row(hole, teacher, 1.0, 1.0, rng, float_stats, double_stats, "student -inf, teacher live");
    // The same where p underflows (fp32 and fp64): still +inf, never 0 * inf = NaN nor a finite value.
    std::vector<float> low = teacher;
    low[vocab / 3] = -3000.0f;
    check_row(hole, low, 1.0, 1.0, rng, float_stats, double_stats, "student -inf, teacher p underflows");
    // Student -inf first, then a larger teacher max arrives (rescale factor 0): still +inf.
    std::vector<float> first_hole = student;
    first_hole[0] = neg_inf;
    std::vector<float> rising = teacher;
    rising[0] = -200.0f;
    rising[vocab - 1] = 200.0f;
    check_row(first_hole, rising, 1.0, 1.0, rng, float_stats, double_stats, "student -inf, then a new teacher max");
  }

  std::printf("float  path: %d row checks, max |loss err| %.3e, max loss err / (scale * max(1,|KL|)) %.3e (plain fp32 "
              "on the same rows: %.3e), max grad err / (scale/T * max prob) %.3e (plain fp32: %.3e), failures %d\n",
              float_stats.rows, float_stats.max_kl_abs, float_stats.max_kl_rel, float_stats.max_plain_rel,
              float_stats.max_grad_rel, float_stats.max_plain_grad_rel, float_stats.failures);
  std::printf("float  path, kernel configuration (512 threads, strided, butterfly): max loss err / (scale * "
              "max(1,|KL|)) %.3e; worst error / tolerance over all checks %.3f\n",
              float_stats.max_kernel_config_rel, float_stats.worst_fraction_of_tolerance);
  std::printf("double path: %d row checks, max |loss err| %.3e, max loss err / (scale * max(1,|KL|)) %.3e, "
              "failures %d\n",
              double_stats.rows, double_stats.max_kl_abs, double_stats.max_kl_rel, double_stats.failures);
  const bool ok = float_stats.failures == 0 && double_stats.failures == 0;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
