// Op schemas (one place for all of them) and the _C Python module, which carries build information only:
// tensors cross into C++ through the dispatcher (torch.ops.epic_ext.*), never through pybind11, so the ops
// stay visible to torch.compile, FakeTensor and opcheck.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "epic_ext.h"

#ifndef EPIC_EXT_VERSION
#define EPIC_EXT_VERSION "0.0.0"
#endif
#ifndef EPIC_EXT_CUDA_ARCHS
#define EPIC_EXT_CUDA_ARCHS ""
#endif
#ifndef EPIC_EXT_TORCH_VERSION
#define EPIC_EXT_TORCH_VERSION ""
#endif

TORCH_LIBRARY(epic_ext, m) {
  // Fused temperature-scaled KL(teacher || student) per row plus d(row_loss)/d(student) in the same pass.
  m.def("temperature_kl(Tensor student, Tensor teacher, Tensor? row_index, float temperature, float scale, "
        "bool compute_grad) -> (Tensor, Tensor)");
  // Row-wise product of the stored student gradient with the incoming per-row gradient (fp32 math).
  m.def("temperature_kl_backward(Tensor grad, Tensor grad_rows) -> Tensor");
  // FastV importance of every key: head- and row-mean of softmax(scale q.k) without the [B, H, R, L] matrix.
  m.def("attention_importance(Tensor query, Tensor key, float? scale, Tensor? query_positions, "
        "Tensor? key_padding_mask) -> Tensor");
  // Per-sample top-`keep` positions inside a span, ascending, ties to the lower position.
  m.def("select_tokens(Tensor scores, Tensor span_start, int span_length, int keep) -> Tensor");
  // Rows of x along `dim` picked by index [B, K]; -1 gives a zero row.
  m.def("gather_tokens(Tensor x, Tensor index, int dim) -> Tensor");
  // Scatter-add of gather_tokens' output gradient into zeros of the input's shape (`length` = size of dim).
  m.def("gather_tokens_backward(Tensor grad, Tensor index, int dim, int length) -> Tensor");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "epic_ext compiled extension: build information (ops are under torch.ops.epic_ext)";
  m.def("version", []() { return std::string(EPIC_EXT_VERSION); }, "Package version the extension was built as.");
  m.def(
      "cuda_built",
      []() {
#ifdef EPIC_EXT_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this build.");
  m.def("archs", []() { return std::string(EPIC_EXT_CUDA_ARCHS); },
        "CUDA architectures compiled (CMAKE_CUDA_ARCHITECTURES), empty for a CPU-only build.");
  m.def("torch_version", []() { return std::string(EPIC_EXT_TORCH_VERSION); },
        "torch version the extension was compiled against; it must equal the one imported.");
}
