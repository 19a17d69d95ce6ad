// epic_ext: op declarations shared by the CPU and CUDA kernels, and the argument checks both run.
//
// Every check names the argument it is about, because these ops are called from training code far from the
// place where a wrong tensor was built. The schemas live in bindings.cpp; this header only declares the
// per-device implementations and holds the checks so that CPU and CUDA reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cfloat>
#include <cmath>
#include <string>
#include <tuple>

#define EPIC_CHECK_DIM(x, name, d)                                                                         \
  TORCH_CHECK((x).dim() == (d), OP_NAME, ": ", name, " must be ", d, "-D, got ", (x).dim(), "-D tensor of " \
              "shape ", (x).sizes())

#define EPIC_CHECK_FLOAT_DTYPE(x, name)                                                                    \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||                     \
                  (x).scalar_type() == at::kHalf,                                                          \
              OP_NAME, ": ", name, " must be float32, bfloat16 or float16, got ", (x).scalar_type())

#define EPIC_CHECK_SAME_DEVICE(x, xname, y, yname)                                                         \
  TORCH_CHECK((x).device() == (y).device(), OP_NAME, ": ", xname, " is on ", (x).device(), " but ", yname, \
              " is on ", (y).device(), "; move both to the same device")

namespace epic_ext {

// ---------------------------------------------------------------------------------------------------------
// temperature_kl
//
// Returns (row_loss [N] fp32, grad [N, V] in the student's dtype, or [0] when compute_grad is false).
//   row_loss[i] = scale * KL(softmax(teacher[r_i] / T) || softmax(student[i] / T)), r_i = row_index[i] or i;
//                 0 for rows with r_i == -1.
//   grad[i]     = d row_loss[i] / d student[i] = scale / T * (softmax(student[i] / T) - softmax(teacher[r_i] / T)),
//                 0 for ignored rows.
// The reduction over rows, and the product with the incoming gradient, happen outside (ops.py and
// temperature_kl_backward), so the heavy kernel sees every row exactly once.
std::tuple<at::Tensor, at::Tensor> temperature_kl_cpu(const at::Tensor& student,                   // [N, V]
                                                      const at::Tensor& teacher,                   // [M, V]
                                                      const std::optional<at::Tensor>& row_index,  // [N] int64
                                                      double temperature, double scale, bool compute_grad);
// grad [N, V] (any float dtype) times grad_rows [N] fp32, row-wise, computed in fp32, returned in grad's dtype.
at::Tensor temperature_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_rows);

#ifdef EPIC_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> temperature_kl_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                       const std::optional<at::Tensor>& row_index,
                                                       double temperature, double scale, bool compute_grad);
at::Tensor temperature_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_rows);
#endif

// Checks shared by both devices. Checking row_index *values* is device specific (CPU reads them directly,
// CUDA does one min/max reduction) and happens in the kernels' files through check_row_index_range.
// Smallest temperature the kernels can compute with: log2(e) / T must be a finite fp32 (about 4.24e-39).
constexpr double kMinTemperature = 1.4426950408889634 / static_cast<double>(FLT_MAX);

inline void check_temperature_kl_args(const at::Tensor& student, const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& row_index, double temperature,
                                      double scale) {
  constexpr const char* OP_NAME = "temperature_kl";
  EPIC_CHECK_DIM(student, "student_logits", 2);
  EPIC_CHECK_DIM(teacher, "teacher_logits", 2);
  EPIC_CHECK_FLOAT_DTYPE(student, "student_logits");
  EPIC_CHECK_FLOAT_DTYPE(teacher, "teacher_logits");
  EPIC_CHECK_SAME_DEVICE(student, "student_logits", teacher, "teacher_logits");
  TORCH_CHECK(student.size(1) == teacher.size(1), OP_NAME,
              ": student_logits and teacher_logits must have the same vocabulary size V, got ", student.size(1),
              " and ", teacher.size(1));
  // The kernels scale logit differences by log2(e) / T (CUDA) or 1 / T (CPU) held in fp32: below this bound the
  // factor is inf and every result would be NaN. Above it both devices compute the loss (tested down to the bound).
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature) && temperature >= kMinTemperature, OP_NAME,
              ": temperature must be a finite number > 0 and >= ", kMinTemperature,
              " (log2(e) / temperature must be finite in fp32), got ", temperature);
  TORCH_CHECK(std::isfinite(scale), OP_NAME, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::fabs(scale / temperature) <= static_cast<double>(FLT_MAX), OP_NAME,
              ": scale / temperature must be finite in fp32 (it multiplies the gradient), got scale=", scale,
              " temperature=", temperature);
  if (row_index.has_value()) {
    const at::Tensor& ri = *row_index;
    TORCH_CHECK(ri.scalar_type() == at::kLong, OP_NAME, ": row_index must be int64, got ", ri.scalar_type());
    EPIC_CHECK_DIM(ri, "row_index", 1);
    TORCH_CHECK(ri.size(0) == student.size(0), OP_NAME, ": row_index must have one entry per student row (",
                student.size(0), "), got ", ri.size(0));
    EPIC_CHECK_SAME_DEVICE(ri, "row_index", student, "student_logits");
  } else {
    TORCH_CHECK(student.size(0) == teacher.size(0), OP_NAME,
                ": without row_index, student_logits and teacher_logits must have the same number of rows, got ",
                student.size(0), " and ", teacher.size(0), "; pass row_index to pair rows explicitly");
  }
}

inline void check_temperature_kl_backward_args(const at::Tensor& grad, const at::Tensor& grad_rows) {
  constexpr const char* OP_NAME = "temperature_kl_backward";
  EPIC_CHECK_DIM(grad, "grad", 2);
  EPIC_CHECK_DIM(grad_rows, "grad_rows", 1);
  EPIC_CHECK_FLOAT_DTYPE(grad, "grad");
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat, OP_NAME, ": grad_rows must be float32, got ",
              grad_rows.scalar_type());
  TORCH_CHECK(grad_rows.size(0) == grad.size(0), OP_NAME, ": grad_rows must have ", grad.size(0),
              " entries (one per row of grad), got ", grad_rows.size(0));
  EPIC_CHECK_SAME_DEVICE(grad, "grad", grad_rows, "grad_rows");
}

// Called with the row_index range already reduced to (min, max) on the host.
inline void check_row_index_range(int64_t min_value, int64_t max_value, int64_t num_teacher_rows) {
  constexpr const char* OP_NAME = "temperature_kl";
  TORCH_CHECK(min_value >= -1 && max_value < num_teacher_rows, OP_NAME,
              ": row_index entries must be -1 (ignore) or in [0, ", num_teacher_rows,
              ") (teacher_logits rows), got values in [", min_value, ", ", max_value, "]");
}

// ---------------------------------------------------------------------------------------------------------
// Token ranking and pruning
//
// attention_importance: out[b, j] = mean over query heads h and valid rows r of softmax_j(scale * q[b,h,r] . k[b,h',j])
//   with h' = h / (Hq / Hkv). A row is valid when its position is not -1 and it sees at least one key; keys after a
//   row's position (causal) and keys with key_padding_mask false get probability 0. A sample with no valid row
//   gets zeros. Returns [B, L] fp32; extra memory O(B * L) (+ O(B * Hq * R) row statistics).
at::Tensor attention_importance_cpu(const at::Tensor& query,                           // [B, Hq, R, D]
                                    const at::Tensor& key,                             // [B, Hkv, L, D]
                                    std::optional<double> scale,                       // default D^-0.5
                                    const std::optional<at::Tensor>& query_positions,  // [B, R] int64, -1 = skip
                                    const std::optional<at::Tensor>& key_padding_mask  // [B, L] bool, true = real
);
// select_tokens: the `keep` highest scores inside [span_start[b], span_start[b] + span_length), returned as
//   ascending absolute positions [B, keep] int64. Ties go to the lower position; NaN ranks below every number.
at::Tensor select_tokens_cpu(const at::Tensor& scores,      // [B, L] float
                             const at::Tensor& span_start,  // [B] int64
                             int64_t span_length, int64_t keep);
// gather_tokens: out = x with dimension `dim` (>= 1) indexed by index[b, k]; index -1 gives zeros.
at::Tensor gather_tokens_cpu(const at::Tensor& x,      // [B, ..., L, ...]
                             const at::Tensor& index,  // [B, K] int64 in [-1, L)
                             int64_t dim);
// gather_tokens_backward: zeros of x's shape (length L at dim) with grad rows added at index (repeats accumulate).
at::Tensor gather_tokens_backward_cpu(const at::Tensor& grad,   // [B, ..., K, ...]
                                      const at::Tensor& index,  // [B, K] int64
                                      int64_t dim, int64_t length);

#ifdef EPIC_EXT_WITH_CUDA
at::Tensor attention_importance_cuda(const at::Tensor& query, const at::Tensor& key, std::optional<double> scale,
                                     const std::optional<at::Tensor>& query_positions,
                                     const std::optional<at::Tensor>& key_padding_mask);
at::Tensor select_tokens_cuda(const at::Tensor& scores, const at::Tensor& span_start, int64_t span_length,
                              int64_t keep);
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index, int64_t dim);
at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t dim, int64_t length);
#endif

// Shape/dtype/device checks shared by both devices. Value checks (positions, index ranges) that need the data are
// done by the device files: CPU reads the values; CUDA does one min/max reduction and a host sync.
inline void check_attention_importance_args(const at::Tensor& query, const at::Tensor& key,
                                            std::optional<double> scale,
                                            const std::optional<at::Tensor>& query_positions,
                                            const std::optional<at::Tensor>& key_padding_mask) {
  constexpr const char* OP_NAME = "attention_importance";
  EPIC_CHECK_DIM(query, "query", 4);
  EPIC_CHECK_DIM(key, "key", 4);
  EPIC_CHECK_FLOAT_DTYPE(query, "query");
  EPIC_CHECK_FLOAT_DTYPE(key, "key");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), OP_NAME, ": query and key must have the same dtype, got ",
              query.scalar_type(), " and ", key.scalar_type());
  EPIC_CHECK_SAME_DEVICE(query, "query", key, "key");
  TORCH_CHECK(query.size(0) == key.size(0), OP_NAME, ": query and key must have the same batch size B, got ",
              query.size(0), " and ", key.size(0));
  TORCH_CHECK(query.size(3) == key.size(3), OP_NAME, ": query and key must have the same head dim D, got ",
              query.size(3), " and ", key.size(3));
  // D = 0 has no default scale (D^-0.5) and no meaningful score.
  TORCH_CHECK(query.size(3) > 0, OP_NAME, ": query and key must have a head dim D > 0, got query shape ",
              query.sizes());
  TORCH_CHECK(key.size(1) > 0 && query.size(1) % key.size(1) == 0, OP_NAME,
              ": query heads Hq must be a multiple of key heads Hkv (grouped-query attention), got Hq=", query.size(1),
              " Hkv=", key.size(1));
  if (scale.has_value())
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0.0, OP_NAME, ": scale must be a finite number > 0, got ", *scale);
  if (query_positions.has_value()) {
    const at::Tensor& qp = *query_positions;
    TORCH_CHECK(qp.scalar_type() == at::kLong, OP_NAME, ": query_positions must be int64, got ", qp.scalar_type());
    EPIC_CHECK_DIM(qp, "query_positions", 2);
    TORCH_CHECK(qp.size(0) == query.size(0) && qp.size(1) == query.size(2), OP_NAME,
                ": query_positions must have shape [B, R] = [", query.size(0), ", ", query.size(2), "], got ",
                qp.sizes());
    EPIC_CHECK_SAME_DEVICE(qp, "query_positions", query, "query");
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& km = *key_padding_mask;
    TORCH_CHECK(km.scalar_type() == at::kBool, OP_NAME, ": key_padding_mask must be bool (true = real token), got ",
                km.scalar_type());
    EPIC_CHECK_DIM(km, "key_padding_mask", 2);
    TORCH_CHECK(km.size(0) == key.size(0) && km.size(1) == key.size(2), OP_NAME,
                ": key_padding_mask must have shape [B, L] = [", key.size(0), ", ", key.size(2), "], got ",
                km.sizes());
    EPIC_CHECK_SAME_DEVICE(km, "key_padding_mask", key, "key");
  }
}

inline void check_query_positions_range(int64_t min_value, int64_t max_value, int64_t L) {
  constexpr const char* OP_NAME = "attention_importance";
  TORCH_CHECK(min_value >= -1 && max_value < L, OP_NAME, ": query_positions entries must be -1 (skip) or in [0, ",
              L, ") (key positions), got values in [", min_value, ", ", max_value, "]");
}

inline void check_select_tokens_args(const at::Tensor& scores, const at::Tensor& span_start, int64_t span_length,
                                     int64_t keep) {
  constexpr const char* OP_NAME = "select_tokens";
  EPIC_CHECK_DIM(scores, "scores", 2);
  EPIC_CHECK_FLOAT_DTYPE(scores, "scores");
  TORCH_CHECK(span_start.scalar_type() == at::kLong, OP_NAME, ": span_start must be int64, got ",
              span_start.scalar_type());
  EPIC_CHECK_DIM(span_start, "span_start", 1);
  TORCH_CHECK(span_start.size(0) == scores.size(0), OP_NAME, ": span_start must have one entry per sample (",
              scores.size(0), "), got ", span_start.size(0));
  EPIC_CHECK_SAME_DEVICE(span_start, "span_start", scores, "scores");
  TORCH_CHECK(span_length >= 0 && span_length <= scores.size(1), OP_NAME, ": span_length must be in [0, L=",
              scores.size(1), "], got ", span_length);
  TORCH_CHECK(keep >= 0 && keep <= span_length, OP_NAME, ": keep must be in [0, span_length=", span_length,
              "], got ", keep);
}

inline void check_span_start_range(int64_t min_value, int64_t max_value, int64_t span_length, int64_t L) {
  constexpr const char* OP_NAME = "select_tokens";
  // L - span_length >= 0 (checked with the arguments): written this way, no sum can overflow. span_start near
  // 2^63 once wrapped max_value + span_length around to a negative number that passed.
  TORCH_CHECK(min_value >= 0 && max_value <= L - span_length, OP_NAME,
              ": every span [span_start, span_start + span_length) must lie inside the sequence [0, L=", L,
              "); got span_start in [", min_value, ", ", max_value, "] with span_length ", span_length);
}

// Returns dim normalised to [1, x.dim()).
inline int64_t check_gather_tokens_args(const char* OP_NAME, const at::Tensor& x, const char* x_name,
                                        const at::Tensor& index, int64_t dim) {
  TORCH_CHECK(x.dim() >= 2, OP_NAME, ": ", x_name, " must have at least 2 dimensions [B, L, ...], got shape ",
              x.sizes());
  const int64_t nd = x.dim();
  const int64_t d = dim < 0 ? dim + nd : dim;
  TORCH_CHECK(d >= 1 && d < nd, OP_NAME, ": dim must index a non-batch dimension of ", x_name, " (1 <= dim < ", nd,
              ", or negative), got ", dim);
  TORCH_CHECK(index.scalar_type() == at::kLong, OP_NAME, ": index must be int64, got ", index.scalar_type());
  EPIC_CHECK_DIM(index, "index", 2);
  TORCH_CHECK(index.size(0) == x.size(0), OP_NAME, ": index must have shape [B, K] with B=", x.size(0),
              " (the batch of ", x_name, "), got ", index.sizes());
  EPIC_CHECK_SAME_DEVICE(index, "index", x, x_name);
  return d;
}

inline void check_gather_index_range(const char* OP_NAME, int64_t min_value, int64_t max_value, int64_t L) {
  TORCH_CHECK(min_value >= -1 && max_value < L, OP_NAME, ": index entries must be -1 (zero row) or in [0, ", L,
              ") (the size of dim), got values in [", min_value, ", ", max_value, "]");
}

}  // namespace epic_ext
