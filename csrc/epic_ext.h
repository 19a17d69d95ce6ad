// epic_ext: op declarations shared by the CPU and CUDA kernels, and the argument checks both run.
//
// Every check names the argument it is about, because these ops are called from training code far from the
// place where a wrong tensor was built. The schemas live in bindings.cpp; this header only declares the
// per-device implementations and holds the checks so that CPU and CUDA reject exactly the same inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

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
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), OP_NAME,
              ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(std::isfinite(scale), OP_NAME, ": scale must be finite, got ", scale);
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

}  // namespace epic_ext
