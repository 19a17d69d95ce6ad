// Calibration of the memory-traffic counters (perf build, PERF.md): kernels whose figures are known exactly from
// the hardware's rules (32-byte sectors, 32 banks of 4-byte words), each checked to the exact value. Run by the
// self-test's main; in the other builds there are no counters and nothing runs.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr int kN = 4096;  // elements per array: 16 blocks of 256 threads
constexpr int kThreads = 256;

__global__ void copy_float_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}
__global__ void copy_float4_kernel(const float4* in, float4* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}
// The kernels' own vector path: __ldg / __stcs of a 16-byte type.
__global__ void copy_uint4_intrinsic_kernel(const uint4* in, uint4* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  __stcs(out + i, __ldg(in + i));
}
template <int kStride>
__global__ void strided_load_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[static_cast<long>(i) * kStride % (kN * 32)];
}
__global__ void broadcast_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[blockIdx.x];
}
// Shared memory: each thread writes its own word, then reads word (t * kStride) % kThreads.
template <int kStride>
__global__ void shared_stride_kernel(const float* in, float* out) {
  __shared__ float buffer[kThreads * 32];
  const int t = threadIdx.x;
  buffer[t * kStride] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buffer[(t * kStride + 1) % (kThreads * 32)] + 1.0f;
}
// 32x32 tiles through shared memory, 32x8 threads, each moving 4 elements; kPad = 1 keeps columns on distinct
// banks, kPad = 0 puts a whole column on one bank.
template <int kPad>
__global__ void transpose_kernel(const float* in, float* out, int width) {
  __shared__ float tile[32][32 + kPad];
  const int x = blockIdx.x * 32 + threadIdx.x;
  const int y = blockIdx.y * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * width + x];
  __syncthreads();
  const int tx = blockIdx.y * 32 + threadIdx.x;
  const int ty = blockIdx.x * 32 + threadIdx.y;
  for (int j = 0; j < 32; j += 8) out[(ty + j) * width + tx] = tile[threadIdx.x][threadIdx.y + j];
}

struct Expect {
  double load_sectors_per_request, load_efficiency, store_sectors_per_request, store_efficiency;
  double shared_ways, shared_worst_ways;  // 0: no shared accesses expected
};

std::string check(const char* what, const Expect& e) {
  const cuda_emu::PerfRecord* records = nullptr;
  const int n = cuda_emu_perf_records(&records);
  if (n != 1) return std::string(what) + ": " + std::to_string(n) + " launch records, expected 1";
  const cuda_emu::PerfCounters& c = records[0].counters;
  auto ratio = [](uint64_t a, uint64_t b) { return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b); };
  const double got[6] = {ratio(c.load_sectors, c.load_requests), ratio(c.load_bytes, 32 * c.load_sectors),
                         ratio(c.store_sectors, c.store_requests), ratio(c.store_bytes, 32 * c.store_sectors),
                         ratio(c.shared_wavefronts, c.shared_ideal_wavefronts), c.shared_worst_ways};
  const double want[6] = {e.load_sectors_per_request, e.load_efficiency, e.store_sectors_per_request,
                          e.store_efficiency, e.shared_ways, e.shared_worst_ways};
  const char* names[6] = {"load sectors/request", "load efficiency", "store sectors/request", "store efficiency",
                          "shared ways (mean)", "shared ways (worst)"};
  std::string errors;
  for (int i = 0; i < 6; ++i) {
    if (got[i] != want[i]) {  // exact: every figure here is a ratio of small integers
      char line[160];
      std::snprintf(line, sizeof(line), "%s%s %g, expected %g", errors.empty() ? "" : "; ", names[i], got[i],
                    want[i]);
      errors += line;
    }
  }
  return errors;
}

template <typename T>
T* device_array(size_t count) {
  void* p = std::aligned_alloc(256, count * sizeof(T));  // cudaMalloc aligns to 256 bytes
  std::memset(p, 0, count * sizeof(T));
  return static_cast<T*>(p);
}

}  // namespace

// Returns the number of failed calibrations (0 outside the perf build).
int perf_calibration() {
  if (!cuda_emu_perf_enabled()) return 0;
  float* in = device_array<float>(kN * 32);
  float* out = device_array<float>(kN * 32);
  const int blocks = kN / kThreads;
  struct Case {
    const char* name;
    std::function<void()> launch;
    Expect expect;
  };
  const std::vector<Case> cases = {
      {"coalesced float copy: 4 sectors per request, 100%",
       [&] { copy_float_kernel<<<blocks, kThreads>>>(in, out); }, {4, 1, 4, 1, 0, 0}},
      {"float4 copy: 16 sectors per request, 100%",
       [&] { copy_float4_kernel<<<blocks, kThreads>>>(reinterpret_cast<float4*>(in), reinterpret_cast<float4*>(out)); },
       {16, 1, 16, 1, 0, 0}},
      {"uint4 copy through __ldg / __stcs: 16 sectors per request, 100%",
       [&] { copy_uint4_intrinsic_kernel<<<blocks, kThreads>>>(reinterpret_cast<uint4*>(in),
                                                               reinterpret_cast<uint4*>(out)); },
       {16, 1, 16, 1, 0, 0}},
      {"stride-2 float load: 8 sectors per request, 50%",
       [&] { strided_load_kernel<2><<<blocks, kThreads>>>(in, out); }, {8, 0.5, 4, 1, 0, 0}},
      {"stride-32 float load: 32 sectors per request, 12.5%",
       [&] { strided_load_kernel<32><<<blocks, kThreads>>>(in, out); }, {32, 0.125, 4, 1, 0, 0}},
      {"broadcast load: 1 sector per request, 4 of 32 bytes used",
       [&] { broadcast_kernel<<<blocks, kThreads>>>(in, out); }, {1, 0.125, 4, 1, 0, 0}},
      {"shared memory, consecutive words: no conflict",
       [&] { shared_stride_kernel<1><<<blocks, kThreads>>>(in, out); }, {4, 1, 4, 1, 1, 1}},
      {"shared memory, stride 2 words: 2-way conflict",
       [&] { shared_stride_kernel<2><<<blocks, kThreads>>>(in, out); }, {4, 1, 4, 1, 2, 2}},
      {"shared memory, stride 32 words: 32-way conflict",
       [&] { shared_stride_kernel<32><<<blocks, kThreads>>>(in, out); }, {4, 1, 4, 1, 32, 32}},
      {"padded transpose (32 x 33 tile): no conflict",
       [&] { transpose_kernel<1><<<dim3(4, 4), dim3(32, 8)>>>(in, out, 128); }, {4, 1, 4, 1, 1, 1}},
      {"unpadded transpose (32 x 32 tile): column reads 32-way, row writes none",
       [&] { transpose_kernel<0><<<dim3(4, 4), dim3(32, 8)>>>(in, out, 128); }, {4, 1, 4, 1, 16.5, 32}},
  };
  int failed = 0;
  for (const Case& c : cases) {
    cuda_emu_perf_reset();
    std::string result;
    try {
      c.launch();
      result = check(c.name, c.expect);
    } catch (const std::exception& e) {
      result = std::string("unexpected exception: ") + e.what();
    }
    std::printf("%s perf calibration: %s%s%s\n", result.empty() ? "ok  " : "FAIL", c.name,
                result.empty() ? "" : ": ", result.c_str());
    failed += !result.empty();
  }
  std::free(in);
  std::free(out);
  return failed;
}
