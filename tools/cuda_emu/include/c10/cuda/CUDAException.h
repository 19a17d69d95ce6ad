// cuda_emu stand-in for c10/cuda/CUDAException.h: the same macros over the emulated runtime's error codes.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                                              \
  do {                                                                                                    \
    const cudaError_t cuda_emu_error_ = (EXPR);                                                           \
    TORCH_CHECK(cuda_emu_error_ == cudaSuccess, "CUDA error (cuda_emu): ", cudaGetErrorString(cuda_emu_error_), \
                " from ", #EXPR);                                                                         \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
