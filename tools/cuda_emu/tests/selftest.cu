// cuda_emu's own tests: one small kernel per intrinsic (checked against the value a GPU gives) and one per reported
// error (checked to be reported, with the right words). Built by `emu.py selftest` through the same rewrite as the
// kernels (launches with <<<>>>, extern __shared__), without torch; run under every thread order.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

extern "C" int cuda_emu_error_count(void);

namespace {

// ---- kernels: intrinsics ---------------------------------------------------------------------------------------
__global__ void shfl_kernel(int* out) {  // out[5][32]
  const int lane = threadIdx.x % 32;
  int sum = lane;
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  out[lane] = sum;  // 496 everywhere
  int scan = lane;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, scan, offset);
    if (lane >= offset) scan += y;
  }
  out[32 + lane] = scan;  // lane (lane + 1) / 2
  out[64 + lane] = __shfl_down_sync(0xffffffffu, lane * 10, 3);  // lane + 3 < 32 ? 10 (lane + 3) : 10 lane
  out[96 + lane] = __shfl_sync(0xffffffffu, lane * 2, 5, 16);  // lane 5 of each 16-lane segment
  out[128 + lane] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 1.5f * lane, 1));  // float through the shuffle
}

__global__ void vote_kernel(unsigned* out) {  // out[6][32]
  const int lane = threadIdx.x % 32;
  out[lane] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[32 + lane] = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(lane / 4));
  out[64 + lane] = __any_sync(0xffffffffu, lane == 7);
  out[96 + lane] = __all_sync(0xffffffffu, lane < 31);
  // Disjoint masks at different call sites: each half is its own group.
  if (lane < 16) {
    out[128 + lane] = __ballot_sync(0x0000ffffu, lane % 2 == 0);
    __syncwarp(0x0000ffffu);
  } else {
    out[128 + lane] = __ballot_sync(0xffff0000u, lane % 2 == 1);
    __syncwarp(0xffff0000u);
  }
  out[160 + lane] = __popc(out[lane]);
}

__global__ void barrier_kernel(int* out) {  // out[4]: count, and, or, reversed check
  extern __shared__ int values[];
  __shared__ int static_values[64];
  const int t = threadIdx.x;
  const int fresh = values[t];  // never written: 0xFFFFFFFF
  values[t] = t;
  static_values[t] = 2 * t;
  const int count = __syncthreads_count(t % 4 == 0);
  const int all = __syncthreads_and(t < 64);
  const int any = __syncthreads_or(t == 63);
  const bool ok = values[63 - t] == 63 - t && static_values[63 - t] == 2 * (63 - t) && fresh == -1;
  __syncthreads();
  if (t == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
    out[3] = 0;
  }
  __syncthreads();
  if (!ok) atomicAdd(out + 3, 1);
}

__global__ void index_kernel(int* out) {  // one int4-ish record per thread: linear thread id, block linear, warp
  const int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  // Lanes of one warp are 32 consecutive linear ids: lane 0 of each warp gathers the warp's ids.
  const int first = __shfl_sync(0xffffffffu, linear, 0);
  out[(block * threads + linear) * 2] = linear;
  out[(block * threads + linear) * 2 + 1] = first;
}

__global__ void atomic_kernel(unsigned long long* total, float* fsum) {
  atomicAdd(total, 1ull + blockIdx.x);
  atomicAdd(fsum, 1.0f);
}

__global__ void aligned_load_kernel(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void racy_kernel(int* out) {  // a missing barrier: reads a neighbour's slot in the same interval
  extern __shared__ int slots[];
  const int t = threadIdx.x;
  slots[t] = t;
  out[t] = slots[(t + 1) % blockDim.x];
}

__global__ void empty_kernel() {}

__global__ void static_shared_kernel(int* out) {  // static shared memory starts as 0xFF in every block
  __shared__ int slots[32];
  const int before = slots[threadIdx.x];
  __syncthreads();
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = before + 2 * slots[31 - threadIdx.x];
}

__global__ void static_plus_dynamic_kernel(int* out) {  // 64 bytes static + the launch's dynamic bytes
  extern __shared__ int dynamic[];
  __shared__ int counters[16];
  counters[threadIdx.x % 16] = 0;
  dynamic[threadIdx.x] = 1;
  out[threadIdx.x] = dynamic[threadIdx.x];
}

// ---- kernels: errors ------------------------------------------------------------------------------------------
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_after_exit_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void partial_barrier_kernel() {  // lanes of the block wait; the rest exit
  if (threadIdx.x >= 40) __syncthreads();
}

__global__ void mixed_warp_ops_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane < 16) {
    out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
  } else {
    out[lane] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
  }
}

__global__ void warp_op_after_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void foreign_mask_kernel() { __syncwarp(threadIdx.x == 0 ? 0x2u : 0xffffffffu); }

__global__ void shfl_outside_mask_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 16);
}

__global__ void warp_op_vs_barrier_kernel(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void missing_lane_kernel(int* out) {  // 48 threads: warp 1 has 16 lanes
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void big_shared_kernel(int* out) {
  extern __shared__ int big[];
  big[threadIdx.x] = 1;
  out[threadIdx.x] = big[threadIdx.x];
}

// ---- harness ---------------------------------------------------------------------------------------------------
struct Case {
  const char* name;
  std::function<std::string()> run;  // "" = passed
};

template <typename F>
std::string expect_error(F&& launch, const char* words) {
  const int before = cuda_emu_error_count();
  try {
    launch();
  } catch (const cuda_emu::Error& e) {
    if (std::strstr(e.what(), words) == nullptr) return std::string("wrong error: ") + e.what();
    if (cuda_emu_error_count() != before + 1) return "error not logged";
    return "";
  }
  return std::string("no error reported (expected '") + words + "')";
}

template <typename T>
std::string expect_equal(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      return std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(got[i]) + ", expected " +
             std::to_string(want[i]);
    }
  }
  return "";
}

std::vector<Case> cases() {
  std::vector<Case> all;
  all.push_back({"shuffles", []() -> std::string {
    std::vector<int> out(160), want(160);
    shfl_kernel<<<1, 32>>>(out.data());
    for (int l = 0; l < 32; ++l) {
      want[l] = 496;
      want[32 + l] = l * (l + 1) / 2;
      want[64 + l] = 10 * (l + 3 < 32 ? l + 3 : l);
      want[96 + l] = 2 * ((l & ~15) + 5);
      want[128 + l] = static_cast<int>(1.5f * (l ^ 1));
    }
    return expect_equal(out, want, "shfl");
  }});
  all.push_back({"votes and syncwarp", []() -> std::string {
    std::vector<unsigned> out(192), want(192);
    vote_kernel<<<1, 32>>>(out.data());
    unsigned ballot = 0, even = 0, odd = 0;
    for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
    for (int l = 0; l < 16; ++l) even |= (l % 2 == 0 ? 1u : 0u) << l;
    for (int l = 16; l < 32; ++l) odd |= (l % 2 == 1 ? 1u : 0u) << l;
    for (int l = 0; l < 32; ++l) {
      want[l] = ballot;
      want[32 + l] = 0xfu << (l / 4 * 4);
      want[64 + l] = 1;
      want[96 + l] = 0;
      want[128 + l] = l < 16 ? even : odd;
      want[160 + l] = __builtin_popcount(ballot);
    }
    return expect_equal(out, want, "vote");
  }});
  all.push_back({"barriers, shared memory, 0xFF fill", []() -> std::string {
    std::vector<int> out(4);
    barrier_kernel<<<1, 64, 64 * sizeof(int)>>>(out.data());
    return expect_equal(out, std::vector<int>{16, 1, 1, 0}, "barrier");
  }});
  all.push_back({"thread and block indices, warps of linear ids", []() -> std::string {
    const dim3 grid(2, 3, 2), block(8, 4, 3);  // 96 threads: 3 warps spanning y and z
    const int threads = 96, blocks = 12;
    std::vector<int> out(static_cast<size_t>(2 * threads * blocks));
    index_kernel<<<grid, block>>>(out.data());
    for (int i = 0; i < threads * blocks; ++i) {
      const int linear = i % threads;
      if (out[2 * i] != linear || out[2 * i + 1] != linear / 32 * 32) {
        return "thread " + std::to_string(i) + ": linear " + std::to_string(out[2 * i]) + ", warp's lane 0 " +
               std::to_string(out[2 * i + 1]);
      }
    }
    return std::string();
  }});
  all.push_back({"atomics across blocks and OS threads", []() -> std::string {
    unsigned long long total = 0;
    float fsum = 0.0f;
    atomic_kernel<<<64, 128>>>(&total, &fsum);
    const unsigned long long want = 128ull * (64 + 64 * 63 / 2);
    if (total != want || fsum != 64.0f * 128.0f) return "total " + std::to_string(total) + ", fsum " + std::to_string(fsum);
    return std::string();
  }});
  all.push_back({"device shape from the environment", []() -> std::string {
    setenv("CUDA_EMU_SMS", "7", 1);
    int sms = 0, optin = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
    unsetenv("CUDA_EMU_SMS");
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
    if (sms != 7 || optin <= 48 * 1024) return "sms " + std::to_string(sms) + " optin " + std::to_string(optin);
    return std::string();
  }});
  all.push_back({"aligned vector load", []() -> std::string {
    alignas(16) float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    std::vector<float> out(32);
    aligned_load_kernel<<<1, 32>>>(data, out.data());
    return out[31] == 10.0f ? "" : "sum " + std::to_string(out[31]);
  }});
  all.push_back({"a race in one barrier interval shows as a wrong value", []() -> std::string {
    std::vector<int> out(64);
    racy_kernel<<<1, 64, 64 * sizeof(int)>>>(out.data());
    for (int t = 0; t < 64; ++t) {
      if (out[t] != (t + 1) % 64) return std::string();  // a neighbour not yet written: 0xFFFFFFFF
    }
    return std::string("the racy kernel happened to read only written slots");
  }});
  all.push_back({"dynamic shared memory above 48 KiB with cudaFuncSetAttribute", []() -> std::string {
    std::vector<int> out(32);
    cudaFuncSetAttribute(big_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    big_shared_kernel<<<1, 32, 64 * 1024>>>(out.data());
    return cudaGetLastError() == cudaSuccess && out[0] == 1 ? "" : "launch failed";
  }});
  all.push_back({"static shared memory: one copy per block, 0xFF at each block start", []() -> std::string {
    std::vector<int> out(4 * 32), want(4 * 32);
    static_shared_kernel<<<4, 32>>>(out.data());
    for (int i = 0; i < 4 * 32; ++i) want[i] = -1 + 2 * (31 - i % 32);
    return expect_equal(out, want, "static shared");
  }});
  // ---- each reported error ----
  all.push_back({"error: divergent __syncthreads", []() -> std::string {
    return expect_error([] { divergent_barrier_kernel<<<1, 32>>>(); }, "different __syncthreads call sites");
  }});
  all.push_back({"error: __syncthreads after threads exited", []() -> std::string {
    return expect_error([] { barrier_after_exit_kernel<<<1, 64>>>(); }, "exited");
  }});
  all.push_back({"error: __syncthreads that part of the block never reaches", []() -> std::string {
    return expect_error([] { partial_barrier_kernel<<<1, 64>>>(); }, "__syncthreads");
  }});
  all.push_back({"error: lanes at different warp operations", []() -> std::string {
    std::vector<int> out(32);
    return expect_error([&] { mixed_warp_ops_kernel<<<1, 32>>>(out.data()); }, "different warp operations");
  }});
  all.push_back({"error: warp operation waiting for an exited lane", []() -> std::string {
    std::vector<int> out(32);
    return expect_error([&] { warp_op_after_exit_kernel<<<1, 32>>>(out.data()); }, "exited");
  }});
  all.push_back({"error: mask without the calling lane", []() -> std::string {
    return expect_error([] { foreign_mask_kernel<<<1, 32>>>(); }, "does not name the calling lane");
  }});
  all.push_back({"error: shuffle from a lane outside the mask", []() -> std::string {
    std::vector<int> out(32);
    return expect_error([&] { shfl_outside_mask_kernel<<<1, 32>>>(out.data()); }, "not in the mask");
  }});
  all.push_back({"error: warp operation while a lane waits at __syncthreads", []() -> std::string {
    std::vector<int> out(32);
    return expect_error([&] { warp_op_vs_barrier_kernel<<<1, 32>>>(out.data()); }, "deadlock");
  }});
  all.push_back({"error: full mask in a partial warp", []() -> std::string {
    std::vector<int> out(48);
    return expect_error([&] { missing_lane_kernel<<<1, 48>>>(out.data()); }, "does not exist");
  }});
  all.push_back({"error: misaligned vector load", []() -> std::string {
    alignas(16) float data[12] = {};
    std::vector<float> out(32);
    return expect_error([&] { aligned_load_kernel<<<1, 32>>>(data + 1, out.data()); }, "misaligned");
  }});
  all.push_back({"error: dynamic shared memory above 48 KiB without cudaFuncSetAttribute", []() -> std::string {
    const int before = cuda_emu_error_count();
    std::vector<int> out(32);
    racy_kernel<<<1, 32, 49 * 1024>>>(out.data());
    const cudaError_t e = cudaGetLastError();
    if (e != cudaErrorInvalidValue) return std::string("launch error ") + cudaGetErrorName(e);
    if (std::strstr(cudaGetErrorString(e), "cudaFuncSetAttribute") == nullptr) return std::string("message");
    return cuda_emu_error_count() == before + 1 ? "" : "not logged";
  }});
  all.push_back({"error: static + dynamic shared memory above 48 KiB without cudaFuncSetAttribute",
                 []() -> std::string {
    std::vector<int> out(32);
    static_plus_dynamic_kernel<<<1, 32, 48 * 1024 - 64>>>(out.data());  // exactly 48 KiB: fine
    if (cudaGetLastError() != cudaSuccess || out[0] != 1) return "the 48 KiB launch failed";
    return expect_error([&] { static_plus_dynamic_kernel<<<1, 32, 48 * 1024 - 60>>>(out.data()); },
                        "static shared memory (64 bytes");
  }});
  all.push_back({"error: dynamic shared memory above the opt-in limit", []() -> std::string {
    setenv("CUDA_EMU_SMEM_OPTIN", "65536", 1);
    const cudaError_t set = cudaFuncSetAttribute(big_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 100 * 1024);
    unsetenv("CUDA_EMU_SMEM_OPTIN");
    return set == cudaErrorInvalidValue ? "" : "cudaFuncSetAttribute accepted 100 KiB on a 64 KiB device";
  }});
  all.push_back({"error: invalid launch sizes", []() -> std::string {
    empty_kernel<<<1, 1025>>>();
    const cudaError_t too_many = cudaGetLastError();
    empty_kernel<<<dim3(1, 1, 0), 32>>>();
    const cudaError_t empty_grid = cudaGetLastError();
    empty_kernel<<<dim3(1, 70000), 32>>>();
    const cudaError_t tall_grid = cudaGetLastError();
    if (too_many != cudaErrorInvalidConfiguration || empty_grid != cudaErrorInvalidConfiguration ||
        tall_grid != cudaErrorInvalidConfiguration) {
      return std::string("invalid sizes were launched");
    }
    return std::string();
  }});
  return all;
}

}  // namespace

int perf_calibration();  // perf_calibration.cu

int main() {
  int passed = 0;
  int failed = 0;
  for (const Case& c : cases()) {
    std::string result;
    try {
      result = c.run();
    } catch (const std::exception& e) {
      result = std::string("unexpected exception: ") + e.what();
    }
    if (result.empty()) {
      ++passed;
      std::printf("ok   %s\n", c.name);
    } else {
      ++failed;
      std::printf("FAIL %s: %s\n", c.name, result.c_str());
    }
  }
  failed += perf_calibration();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
