// cuda_emu runtime: fibers, the per-block scheduler, the checks, and the few CUDA runtime API calls that the
// kernels' host code makes. No torch dependency (the self-test links it alone).
//
// Reported as errors (the launch throws cuda_emu::Error, and the error is kept in a log that the test harness
// reads, so a caught exception still fails the test):
//   - deadlock: a block whose threads all wait and none can go on;
//   - __syncthreads not reached by every thread of the block, or reached at different call sites, or reached
//     while some threads have exited;
//   - lanes of one warp at different warp operations (kind, call site or mask), a mask that names an exited lane,
//     a lane outside the block, or not the calling lane; a shuffle that reads a lane outside the mask;
//   - a misaligned __ldg / __ldcs / __stcs (vector) access;
//   - launch configuration: block size 0 or > 1024 threads (or > 1024 / 1024 / 64 per dimension), grid size 0 or
//     beyond 2^31-1 / 65535 / 65535, dynamic shared memory > 48 KiB without cudaFuncSetAttribute, or above the
//     attribute, or above the device's opt-in limit. These also set the "last error", as on a GPU, so that
//     C10_CUDA_KERNEL_LAUNCH_CHECK throws where the real code would.
//
// Environment (read at every launch / attribute query):
//   CUDA_EMU_ORDER      forward (default) | reverse | random: the order in which ready threads run, and blocks start
//   CUDA_EMU_SEED       seed of the random order (default 1)
//   CUDA_EMU_SMS        multiprocessor count the host code sees (default 132, an H100 SXM)
//   CUDA_EMU_L2_BYTES   L2 size (default 50 MiB)
//   CUDA_EMU_SMEM_OPTIN shared memory per block with opt-in (default 227 KiB)
//   CUDA_EMU_WORKERS    OS threads that run blocks (default 2)
//   CUDA_EMU_STACK_KB   stack per CUDA thread (default 64, 512 under AddressSanitizer)
//
// Memory-traffic counters (built with -DCUDA_EMU_PERF, emu.py --variant perf; PERF.md): the kernels are compiled
// with -fsanitize=thread, which makes every load and store call __tsan_readN / __tsan_writeN (atomics
// __tsan_atomicN_*) with its address. This file supplies those functions instead of the sanitizer's runtime (it is
// itself compiled without the instrumentation). An access by a CUDA thread that is not to its own stack nor to the
// launch's parameters is to shared memory (the block's dynamic buffer or a static __shared__ variable) or else to
// global memory. Each lane numbers its executions of each instruction (the return address of the callback) since
// the block's last __syncthreads; the k-th executions of one instruction by the lanes of a warp form one
// warp-level request, evaluated when the block reaches its next __syncthreads or ends.
#include "cuda_emu/cuda_emu.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <dlfcn.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if defined(CUDA_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {
namespace detail {

thread_local const ThreadCtx* tls_thread = nullptr;

namespace {

// ---- configuration -------------------------------------------------------------------------------------------
long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long parsed = std::strtol(v, &end, 0);
  if (end == v || *end != '\0') {
    std::fprintf(stderr, "cuda_emu: cannot read %s=%s, using %ld\n", name, v, fallback);
    return fallback;
  }
  return parsed;
}

enum class Order { kForward, kReverse, kRandom };

Order env_order() {
  const char* v = std::getenv("CUDA_EMU_ORDER");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "forward") == 0) return Order::kForward;
  if (std::strcmp(v, "reverse") == 0) return Order::kReverse;
  if (std::strcmp(v, "random") == 0) return Order::kRandom;
  throw Error(std::string("cuda_emu: CUDA_EMU_ORDER must be forward, reverse or random, got ") + v);
}

constexpr long kDefaultSms = 132;
constexpr long kDefaultL2 = 50l << 20;
constexpr long kDefaultSmemOptin = 227l << 10;
constexpr size_t kSmemNoOptin = 48u << 10;

// ---- the error log -------------------------------------------------------------------------------------------
std::mutex g_log_mutex;
std::vector<std::string> g_log;
thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local std::string tls_last_message;

void log_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.push_back(message);
}

std::string where(const Site& site) {
  std::ostringstream out;
  out << site.file_name() << ":" << site.line();
  return out.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

// ---- fibers --------------------------------------------------------------------------------------------------
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void cuda_emu_switch_context(Context* from, Context* to);
extern "C" void cuda_emu_fiber_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack pointer
// in *from, and resumes *to the same way. A new fiber's stack is prepared to "return" into the trampoline, which
// passes r12 (the thread) to fiber_main.
asm(R"(
.text
.globl cuda_emu_switch_context
.type cuda_emu_switch_context,@function
cuda_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq (%rsi), %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emu_switch_context,.-cuda_emu_switch_context
.globl cuda_emu_fiber_trampoline
.type cuda_emu_fiber_trampoline,@function
cuda_emu_fiber_trampoline:
  movq %r12, %rdi
  jmp cuda_emu_fiber_main
.size cuda_emu_fiber_trampoline,.-cuda_emu_fiber_trampoline
)");
#else
struct Context {
  ucontext_t uc;
};
#endif

struct Stack {
  char* base = nullptr;  // lowest address (guard page included)
  size_t size = 0;       // usable bytes above the guard page
  char* lo() const { return base + page(); }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
};

size_t stack_bytes() {
#if defined(CUDA_EMU_ASAN)
  const long kb = env_long("CUDA_EMU_STACK_KB", 512);
#else
  const long kb = env_long("CUDA_EMU_STACK_KB", 64);
#endif
  const size_t page = Stack::page();
  return (static_cast<size_t>(std::max(16l, kb)) * 1024 + page - 1) / page * page;
}

enum class State : uint8_t { kReady, kBarrier, kWarp, kExited, kFaulted };

// ---- memory-traffic counters: data --------------------------------------------------------------------------
enum class Access : uint8_t { kLoad, kStore, kAtomic };

struct LaneAccess {
  uintptr_t address;
  uint32_t size;
};

// One warp-level request being assembled: the lanes' accesses of one (instruction, execution index).
struct Request {
  Access access;
  bool shared;
  uint32_t lanes;
  LaneAccess lane[32];
};

struct RequestKey {
  uintptr_t pc;
  uint32_t k;
  bool operator==(const RequestKey& o) const { return pc == o.pc && k == o.k; }
};
struct RequestKeyHash {
  size_t operator()(const RequestKey& key) const { return std::hash<uintptr_t>()(key.pc * 31 + key.k); }
};

// Per instruction (return address of the callback), summed over a launch.
struct SiteCounters {
  Access access = Access::kLoad;
  bool shared = false;
  uint64_t requests = 0, sectors = 0, bytes = 0, wavefronts = 0, ideal = 0;
  double worst_ways = 0;
};

struct PerfState {
  PerfCounters totals{};
  std::unordered_map<uintptr_t, SiteCounters> sites;
  void merge(const PerfState& o) {
    PerfCounters& a = totals;
    const PerfCounters& b = o.totals;
    a.load_requests += b.load_requests, a.load_sectors += b.load_sectors, a.load_bytes += b.load_bytes;
    a.store_requests += b.store_requests, a.store_sectors += b.store_sectors, a.store_bytes += b.store_bytes;
    a.atomic_requests += b.atomic_requests, a.atomic_sectors += b.atomic_sectors, a.atomic_bytes += b.atomic_bytes;
    a.shared_requests += b.shared_requests, a.shared_wavefronts += b.shared_wavefronts;
    a.shared_ideal_wavefronts += b.shared_ideal_wavefronts;
    a.shared_worst_ways = std::max(a.shared_worst_ways, b.shared_worst_ways);
    for (const auto& [pc, c] : o.sites) {
      SiteCounters& m = sites[pc];
      m.access = c.access, m.shared = c.shared;
      m.requests += c.requests, m.sectors += c.sectors, m.bytes += c.bytes;
      m.wavefronts += c.wavefronts, m.ideal += c.ideal;
      m.worst_ways = std::max(m.worst_ways, c.worst_ways);
    }
  }
};

struct EmuThread {
  ThreadCtx ctx;
  int linear = 0;
  Context context;
  Stack stack;
  State state = State::kReady;
  void* asan_fake_stack = nullptr;
  // the operation it waits at
  Site site;
  WarpOp op = WarpOp::kSyncWarp;
  BarrierOp barrier_op = BarrierOp::kSync;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
  // perf: (instruction, executions since the block's last __syncthreads); few instructions per barrier interval.
  std::vector<std::pair<uintptr_t, uint32_t>> executions;
};

// A warp operation that some lanes of a warp wait at.
struct WarpGroup {
  unsigned mask;
  unsigned arrived;
  WarpOp op;
  Site site;
};

struct Job;

struct Worker {
  Context scheduler;
  void* asan_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  std::vector<EmuThread> threads;  // the first `count` take part in the current block; the rest keep their stacks
  int count = 0;
  std::vector<std::vector<WarpGroup>> warp_groups;
  // Per warp: lanes that exist, have exited, wait at __syncthreads.
  std::vector<unsigned> lanes_present, lanes_exited, lanes_at_barrier;
  std::vector<int> released;  // scratch
  bool stacks_dirty = false;  // a block was abandoned mid-run: its frames are still marked on the stacks (ASan)
  std::vector<int> ready;
  size_t ready_head = 0;
  std::vector<unsigned char> dynamic_shared;
  std::vector<const void*> static_shared_seen;  // static __shared__ variables met in this block
  std::vector<size_t> static_shared_sizes;       // their sizes (perf: an access there is a shared one)
  std::vector<std::unordered_map<RequestKey, Request, RequestKeyHash>> pending;  // perf: per warp
  PerfState perf;  // perf: this worker's share of the current launch
  size_t static_shared_bytes = 0;
  std::mt19937_64 rng;
  Order order = Order::kForward;
  Job* job = nullptr;
  std::string error;  // first error of the current block
  int exited = 0;
  int at_barrier = 0;
  Site barrier_site;

  ~Worker() {
    for (EmuThread& t : threads) {
      if (t.stack.base != nullptr) munmap(t.stack.base, t.stack.size + Stack::page());
    }
  }
};

thread_local Worker* tls_worker = nullptr;
thread_local EmuThread* tls_emu_thread = nullptr;

struct Job {
  LaunchConfig config;
  const void* kernel_id;
  InvokeFn invoke;
  const void* closure;
  size_t closure_bytes;
  PerfState perf;  // merged from the workers at the end
  std::vector<uint3> block_order;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::string error;
  Order order;
  uint64_t seed;
  uint64_t launch_index;
  size_t dynamic_limit;  // the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, or 48 KiB
  bool opted_in;         // that attribute was set
  size_t optin;          // the device's shared memory per block with opt-in
};

std::string describe_thread(const Job& job, const EmuThread& t) {
  std::ostringstream out;
  out << "block (" << t.ctx.block_idx.x << "," << t.ctx.block_idx.y << "," << t.ctx.block_idx.z << ") thread ("
      << t.ctx.thread_idx.x << "," << t.ctx.thread_idx.y << "," << t.ctx.thread_idx.z << ") [warp " << t.linear / 32
      << " lane " << t.linear % 32 << "] of kernel '" << job.config.kernel << "' launched at " << job.config.file
      << ":" << job.config.line;
  return out.str();
}

std::string lanes_string(unsigned bits) {
  std::ostringstream out;
  bool first = true;
  for (int lane = 0; lane < 32;) {
    if (!(bits >> lane & 1u)) {
      ++lane;
      continue;
    }
    int end = lane;
    while (end + 1 < 32 && (bits >> (end + 1) & 1u)) ++end;
    out << (first ? "" : ",") << lane;
    if (end > lane) out << "-" << end;
    first = false;
    lane = end + 1;
  }
  return out.str();
}

// Saves the running context in `from` and resumes `to`, whose stack is [to_bottom, to_bottom + to_size); under
// AddressSanitizer the switch is announced, and `from`'s fake stack kept in *fake_stack_save until it runs again
// (fake_stack_save = nullptr: `from` never runs again).
void switch_stack(Context& from, Context& to, void** fake_stack_save, const void* to_bottom, size_t to_size) {
#if defined(CUDA_EMU_ASAN)
  __sanitizer_start_switch_fiber(fake_stack_save, to_bottom, to_size);
#else
  (void)fake_stack_save, (void)to_bottom, (void)to_size;
#endif
#if defined(__x86_64__)
  cuda_emu_switch_context(&from, &to);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_save != nullptr ? *fake_stack_save : nullptr, nullptr, nullptr);
#endif
}

void switch_to_fiber(Worker& w, EmuThread& t) {
  tls_thread = &t.ctx;
  tls_emu_thread = &t;
  switch_stack(w.scheduler, t.context, &w.asan_fake_stack, t.stack.lo(), t.stack.size);
  tls_thread = nullptr;
  tls_emu_thread = nullptr;
}

// Called on the fiber: hands control back to the scheduler until the thread is resumed (never, once exited).
void park(EmuThread& t) {
  Worker& w = *tls_worker;
  switch_stack(t.context, w.scheduler, t.state == State::kExited ? nullptr : &t.asan_fake_stack,
               w.scheduler_stack_bottom, w.scheduler_stack_size);
}

[[noreturn]] void fiber_body(EmuThread* t) {
  Worker& w = *tls_worker;
#if defined(CUDA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.scheduler_stack_bottom, &w.scheduler_stack_size);
#endif
  w.job->invoke(w.job->closure);
  t->state = State::kExited;
  park(*t);
  std::abort();  // an exited thread is never resumed
}

}  // namespace
}  // namespace detail
}  // namespace cuda_emu

extern "C" [[noreturn]] void cuda_emu_fiber_main(cuda_emu::detail::EmuThread* t) { cuda_emu::detail::fiber_body(t); }

#if !defined(__x86_64__)
static void cuda_emu_fiber_entry_uc(unsigned lo, unsigned hi) {
  cuda_emu_fiber_main(reinterpret_cast<cuda_emu::detail::EmuThread*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

namespace cuda_emu {
namespace detail {
namespace {

void prepare_fiber(EmuThread& t, size_t bytes, bool dirty) {
  if (t.stack.base == nullptr || t.stack.size != bytes) {
    if (t.stack.base != nullptr) munmap(t.stack.base, t.stack.size + Stack::page());
    void* p = mmap(nullptr, bytes + Stack::page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw Error("cuda_emu: cannot map a thread stack");
    mprotect(p, Stack::page(), PROT_NONE);  // overflow faults instead of corrupting the neighbour
    t.stack.base = static_cast<char*>(p);
    t.stack.size = bytes;
  }
#if defined(CUDA_EMU_ASAN)
  // An abandoned block leaves its frames poisoned on the stacks that are reused now; a finished one only the
  // outermost frames, near the top.
  const size_t clean = dirty ? t.stack.size : std::min<size_t>(t.stack.size, 64 * 1024);
  __asan_unpoison_memory_region(t.stack.lo() + t.stack.size - clean, clean);
#else
  (void)dirty;
#endif
  t.asan_fake_stack = nullptr;
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uint64_t*>(t.stack.lo() + t.stack.size);  // 16-byte aligned (page aligned)
  top[-1] = 0;                                                              // return address of fiber_main: none
  top[-2] = reinterpret_cast<uint64_t>(&cuda_emu_fiber_trampoline);
  top[-3] = 0;                                      // rbp
  top[-4] = 0;                                      // rbx
  top[-5] = reinterpret_cast<uint64_t>(&t);         // r12
  top[-6] = 0;                                      // r13
  top[-7] = 0;                                      // r14
  top[-8] = 0;                                      // r15
  top[-9] = 0x1f80ull | (0x037full << 32);          // MXCSR, x87 control word: the defaults
  t.context.sp = &top[-9];
#else
  getcontext(&t.context.uc);
  t.context.uc.uc_stack.ss_sp = t.stack.lo();
  t.context.uc.uc_stack.ss_size = t.stack.size;
  t.context.uc.uc_link = nullptr;
  const uintptr_t self = reinterpret_cast<uintptr_t>(&t);
  makecontext(&t.context.uc, reinterpret_cast<void (*)()>(&cuda_emu_fiber_entry_uc), 2,
              static_cast<unsigned>(self & 0xffffffffu), static_cast<unsigned>(self >> 32));
#endif
}

// Appends released threads to the ready list in the order's sense.
void make_ready(Worker& w, std::vector<int>& ids) {
  if (w.order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  for (int id : ids) {
    w.threads[id].state = State::kReady;
    w.ready.push_back(id);
  }
}

int next_ready(Worker& w) {
  const size_t pending = w.ready.size() - w.ready_head;
  if (pending == 0) return -1;
  if (w.order == Order::kRandom) {
    const size_t pick = w.ready_head + static_cast<size_t>(w.rng() % pending);
    std::swap(w.ready[pick], w.ready[w.ready_head]);
  }
  return w.ready[w.ready_head++];
}

void fail(Worker& w, const std::string& message) {
  if (w.error.empty()) w.error = message;
}

// ---- memory-traffic counters: evaluation ----------------------------------------------------------------------
constexpr uintptr_t kSectorBytes = 32;

void evaluate_request(const Request& r, uintptr_t pc, PerfState& perf) {
  SiteCounters& site = perf.sites[pc];
  site.access = r.access;
  site.shared = r.shared;
  ++site.requests;
  PerfCounters& c = perf.totals;
  if (!r.shared) {
    // Distinct sectors touched, and distinct bytes asked for (a broadcast asks for its bytes once).
    uintptr_t sectors[64];
    int n_sectors = 0;
    std::pair<uintptr_t, uintptr_t> spans[32];
    for (uint32_t i = 0; i < r.lanes; ++i) {
      const uintptr_t a = r.lane[i].address;
      const uintptr_t end = a + r.lane[i].size;
      spans[i] = {a, end};
      for (uintptr_t s = a / kSectorBytes; s <= (end - 1) / kSectorBytes && n_sectors < 64; ++s) sectors[n_sectors++] = s;
    }
    std::sort(sectors, sectors + n_sectors);
    const uint64_t distinct_sectors = static_cast<uint64_t>(std::unique(sectors, sectors + n_sectors) - sectors);
    std::sort(spans, spans + r.lanes);
    uint64_t bytes = 0;
    uintptr_t covered = 0;
    for (uint32_t i = 0; i < r.lanes; ++i) {
      const uintptr_t from = std::max(spans[i].first, covered);
      if (spans[i].second > from) bytes += spans[i].second - from;
      covered = std::max(covered, spans[i].second);
    }
    site.sectors += distinct_sectors;
    site.bytes += bytes;
    switch (r.access) {
      case Access::kLoad: ++c.load_requests, c.load_sectors += distinct_sectors, c.load_bytes += bytes; break;
      case Access::kStore: ++c.store_requests, c.store_sectors += distinct_sectors, c.store_bytes += bytes; break;
      case Access::kAtomic: ++c.atomic_requests, c.atomic_sectors += distinct_sectors, c.atomic_bytes += bytes; break;
    }
    return;
  }
  // Shared memory: 32 banks of 4-byte words; lanes that read the same word share it (broadcast); distinct words
  // in one bank are served one after another (one wavefront each).
  uintptr_t words[128];
  int n_words = 0;
  for (uint32_t i = 0; i < r.lanes; ++i) {
    const uintptr_t a = r.lane[i].address;
    for (uintptr_t wd = a / 4; wd <= (a + r.lane[i].size - 1) / 4 && n_words < 128; ++wd) words[n_words++] = wd;
  }
  std::sort(words, words + n_words);
  n_words = static_cast<int>(std::unique(words, words + n_words) - words);
  int per_bank[32] = {};
  int wavefronts = 0;
  for (int i = 0; i < n_words; ++i) wavefronts = std::max(wavefronts, ++per_bank[words[i] % 32]);
  const int ideal = std::max(1, (n_words + 31) / 32);
  const double ways = static_cast<double>(wavefronts) / ideal;
  ++c.shared_requests;
  c.shared_wavefronts += static_cast<uint64_t>(wavefronts);
  c.shared_ideal_wavefronts += static_cast<uint64_t>(ideal);
  c.shared_worst_ways = std::max(c.shared_worst_ways, ways);
  site.wavefronts += static_cast<uint64_t>(wavefronts);
  site.ideal += static_cast<uint64_t>(ideal);
  site.worst_ways = std::max(site.worst_ways, ways);
}

// At a __syncthreads that every thread has reached, and at the block's end: the requests are complete.
void flush_requests(Worker& w) {
#if defined(CUDA_EMU_PERF)
  for (auto& warp : w.pending) {
    for (const auto& [key, request] : warp) evaluate_request(request, key.pc, w.perf);
    warp.clear();
  }
  for (int i = 0; i < w.count; ++i) w.threads[i].executions.clear();
#else
  (void)w;
#endif
}

// Computes every lane's result of a complete warp operation and releases the lanes.
void complete_warp_group(Worker& w, int warp, const WarpGroup& g) {
  EmuThread* lanes = &w.threads[static_cast<size_t>(warp) * 32];
  std::vector<int>& released = w.released;
  released.clear();
  for (int lane = 0; lane < 32; ++lane) {
    if (!(g.mask >> lane & 1u)) continue;
    EmuThread& t = lanes[lane];
    uint64_t r = 0;
    switch (g.op) {
      case WarpOp::kShflIdx:
      case WarpOp::kShflUp:
      case WarpOp::kShflDown:
      case WarpOp::kShflXor: {
        const int width = t.width;
        if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
          fail(w, "cuda_emu: " + std::string(warp_op_name(g.op)) + " with width " + std::to_string(width) +
                      " (must be a power of two <= 32) at " + where(t.site) + " in " +
                      describe_thread(*w.job, t));
          return;
        }
        const int segment = lane & ~(width - 1);
        int src = lane;
        if (g.op == WarpOp::kShflIdx) {
          src = segment + ((t.arg % width) + width) % width;
        } else if (g.op == WarpOp::kShflUp) {
          src = lane - t.arg >= segment ? lane - t.arg : lane;
        } else if (g.op == WarpOp::kShflDown) {
          src = lane + t.arg < segment + width ? lane + t.arg : lane;
        } else {
          const int x = lane ^ t.arg;
          src = x >= 0 && x < segment + width && x < 32 ? x : lane;
        }
        if (!(g.mask >> src & 1u)) {
          fail(w, "cuda_emu: " + std::string(warp_op_name(g.op)) + " at " + where(t.site) + " reads lane " +
                      std::to_string(src) + ", which is not in the mask 0x" +
                      [&] { std::ostringstream o; o << std::hex << g.mask; return o.str(); }() +
                      " (its value is undefined on a GPU), in " + describe_thread(*w.job, t));
          return;
        }
        r = lanes[src].value;
        break;
      }
      case WarpOp::kBallot:
      case WarpOp::kAny:
      case WarpOp::kAll: {
        unsigned ballot = 0;
        for (int j = 0; j < 32; ++j) {
          if ((g.mask >> j & 1u) && lanes[j].value != 0) ballot |= 1u << j;
        }
        r = g.op == WarpOp::kBallot ? ballot : (g.op == WarpOp::kAny ? ballot != 0 : ballot == g.mask);
        break;
      }
      case WarpOp::kMatchAny: {
        unsigned same = 0;
        for (int j = 0; j < 32; ++j) {
          if ((g.mask >> j & 1u) && lanes[j].value == t.value) same |= 1u << j;
        }
        r = same;
        break;
      }
      case WarpOp::kSyncWarp:
        break;
    }
    t.result = r;
    released.push_back(t.linear);
  }
  make_ready(w, released);
}

// A warp lane arrived at a warp operation (its request is in t).
void arrive_warp(Worker& w, EmuThread& t) {
  const int n = w.count;
  const int warp = t.linear / 32;
  const int lane = t.linear % 32;
  const char* op = warp_op_name(t.op);  // strings are built on the error paths only
  auto hex = [](unsigned m) {
    std::ostringstream o;
    o << "0x" << std::hex << m;
    return o.str();
  };
  if (!(t.mask >> lane & 1u)) {
    return fail(w, std::string("cuda_emu: ") + op + " at " + where(t.site) + " with mask " + hex(t.mask) +
                       " that does not name the calling lane, in " + describe_thread(*w.job, t));
  }
  if (const unsigned missing = t.mask & ~w.lanes_present[warp]) {
    return fail(w, std::string("cuda_emu: ") + op + " at " + where(t.site) + " with mask " + hex(t.mask) + " names lane " +
                       std::to_string(__builtin_ctz(missing)) + ", which does not exist (the block has " +
                       std::to_string(n) + " threads), in " + describe_thread(*w.job, t));
  }
  if (const unsigned gone = t.mask & w.lanes_exited[warp]) {
    return fail(w, std::string("cuda_emu: ") + op + " at " + where(t.site) + " waits for lane " +
                       std::to_string(__builtin_ctz(gone)) +
                       ", which has exited (a GPU hangs or returns garbage), in " + describe_thread(*w.job, t));
  }
  if (const unsigned waiting = t.mask & w.lanes_at_barrier[warp]) {
    const int j = __builtin_ctz(waiting);
    return fail(w, "cuda_emu: deadlock: lanes of warp " + std::to_string(warp) + " at different operations: lane " +
                       std::to_string(lane) + " at " + std::string(op) + " (" + where(t.site) + "), lane " + std::to_string(j) +
                       " at __syncthreads (" + where(w.threads[warp * 32 + j].site) + "), in " +
                       describe_thread(*w.job, t));
  }
  std::vector<WarpGroup>& groups = w.warp_groups[warp];
  WarpGroup* group = nullptr;
  for (WarpGroup& g : groups) {
    if ((g.mask & t.mask) == 0) continue;
    if (g.mask != t.mask || g.op != t.op || !same_site(g.site, t.site)) {
      // lowest lane of g that waits there, for the message
      int other = __builtin_ctz(g.arrived);
      return fail(w, "cuda_emu: lanes of warp " + std::to_string(warp) + " at different warp operations: lane " +
                         std::to_string(lane) + " at " + std::string(op) + " (" + where(t.site) + ", mask " + hex(t.mask) +
                         "), lanes " + lanes_string(g.arrived) + " at " + warp_op_name(g.op) + " (" +
                         where(g.site) + ", mask " + hex(g.mask) + "); lane " + std::to_string(other) +
                         " waits for it, in " + describe_thread(*w.job, t));
    }
    group = &g;
    break;
  }
  if (group == nullptr) {
    groups.push_back(WarpGroup{t.mask, 0u, t.op, t.site});
    group = &groups.back();
  }
  group->arrived |= 1u << lane;
  if (group->arrived == group->mask) {
    const WarpGroup done = *group;
    groups.erase(groups.begin() + (group - groups.data()));
    complete_warp_group(w, warp, done);
  }
}

// A thread that waits at a barrier, or has exited, must not be needed by a warp operation of its warp.
// (t is at a barrier, or has exited.)
void check_not_awaited(Worker& w, const EmuThread& t) {
  const int warp = t.linear / 32;
  const int lane = t.linear % 32;
  for (const WarpGroup& g : w.warp_groups[warp]) {
    if (!(g.mask >> lane & 1u)) continue;
    const std::string what = t.state == State::kExited ? "exited" : "reached __syncthreads at " + where(t.site);
    return fail(w, "cuda_emu: deadlock: lane " + std::to_string(lane) + " of warp " + std::to_string(warp) + " " +
                       what + ", but lanes " +
                       lanes_string(g.arrived) + " wait for it at " + warp_op_name(g.op) + " (" + where(g.site) +
                       "), in " + describe_thread(*w.job, t));
  }
}

void arrive_barrier(Worker& w, EmuThread& t) {
  const int n = w.count;
  check_not_awaited(w, t);
  if (!w.error.empty()) return;
  if (w.exited > 0) {
    return fail(w, "cuda_emu: __syncthreads at " + where(t.site) + " reached after " + std::to_string(w.exited) +
                       " threads of the block exited (they never arrive: a GPU hangs or skips the barrier), in " +
                       describe_thread(*w.job, t));
  }
  if (w.at_barrier == 0) {
    w.barrier_site = t.site;
  } else if (!same_site(w.barrier_site, t.site)) {
    return fail(w, "cuda_emu: threads at different __syncthreads call sites: " + where(t.site) + " and " +
                       where(w.barrier_site) + " (divergent barrier), in " + describe_thread(*w.job, t));
  }
  ++w.at_barrier;
  w.lanes_at_barrier[t.linear / 32] |= 1u << (t.linear % 32);
  if (w.at_barrier < n) return;
  int count = 0;
  for (int i = 0; i < n; ++i) count += w.threads[i].value != 0;
  flush_requests(w);
  std::fill(w.lanes_at_barrier.begin(), w.lanes_at_barrier.end(), 0u);
  std::vector<int>& released = w.released;
  released.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    EmuThread& other = w.threads[i];
    switch (other.barrier_op) {
      case BarrierOp::kSync: other.result = 0; break;
      case BarrierOp::kCount: other.result = static_cast<uint64_t>(count); break;
      case BarrierOp::kAnd: other.result = count == n; break;
      case BarrierOp::kOr: other.result = count > 0; break;
    }
    released[i] = i;
  }
  w.at_barrier = 0;
  make_ready(w, released);
}

void thread_exited(Worker& w, EmuThread& t) {
  ++w.exited;
  w.lanes_exited[t.linear / 32] |= 1u << (t.linear % 32);
  check_not_awaited(w, t);
  if (!w.error.empty()) return;
  if (w.at_barrier > 0) {
    fail(w, "cuda_emu: a thread exited while " + std::to_string(w.at_barrier) + " threads wait at __syncthreads (" +
                where(w.barrier_site) + "): the barrier can never complete, in " + describe_thread(*w.job, t));
  }
}

std::string deadlock_report(Worker& w) {
  std::ostringstream out;
  out << "cuda_emu: deadlock in kernel '" << w.job->config.kernel << "' launched at " << w.job->config.file << ":"
      << w.job->config.line << ": no thread can go on;";
  int shown = 0;
  for (int i = 0; i < w.count; ++i) {
    const EmuThread& t = w.threads[i];
    if (t.state == State::kExited || shown >= 8) continue;
    ++shown;
    out << " thread " << t.linear << " waits at "
        << (t.state == State::kBarrier ? "__syncthreads" : warp_op_name(t.op)) << " (" << where(t.site) << ");";
  }
  return out.str();
}

void run_block(Worker& w, Job& job, const uint3& block_idx, size_t stack_size) {
  const LaunchConfig& cfg = job.config;
  const int n = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  if (w.threads.size() < static_cast<size_t>(n)) w.threads.resize(static_cast<size_t>(n));
  w.count = n;

  for (int i = 0; i < n; ++i) {
    EmuThread& t = w.threads[i];
    t.linear = i;
    t.ctx.thread_idx = make_uint3(i % cfg.block.x, (i / cfg.block.x) % cfg.block.y, i / (cfg.block.x * cfg.block.y));
    t.ctx.block_idx = block_idx;
    t.ctx.block_dim = cfg.block;
    t.ctx.grid_dim = cfg.grid;
    t.state = State::kReady;
    t.value = 0;
    t.executions.clear();
    prepare_fiber(t, stack_size, w.stacks_dirty);
  }
  w.stacks_dirty = false;
  const size_t warps = static_cast<size_t>((n + 31) / 32);
  w.warp_groups.assign(warps, {});
  w.lanes_present.assign(warps, 0xffffffffu);
  if (n % 32 != 0) w.lanes_present.back() = (1u << (n % 32)) - 1u;
  w.lanes_exited.assign(warps, 0u);
  w.lanes_at_barrier.assign(warps, 0u);
#if defined(CUDA_EMU_PERF)
  w.pending.resize(warps);
  for (auto& warp : w.pending) warp.clear();
#endif
  w.ready.clear();
  w.ready_head = 0;
  w.error.clear();
  w.exited = 0;
  w.at_barrier = 0;
  w.order = job.order;
  const uint64_t block_linear = block_idx.x + static_cast<uint64_t>(cfg.grid.x) *
                                                  (block_idx.y + static_cast<uint64_t>(cfg.grid.y) * block_idx.z);
  w.rng.seed(job.seed * 0x9E3779B97F4A7C15ull ^ (job.launch_index << 20) ^ block_linear);
  // Dynamic shared memory starts as 0xFF bytes: a read before any write sees NaN / -1, not a lucky zero.
  w.dynamic_shared.assign(cfg.shared_bytes, 0xFF);
  w.static_shared_seen.clear();
  w.static_shared_sizes.clear();
  w.static_shared_bytes = 0;
  {
    std::vector<int> all(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) all[i] = i;
    make_ready(w, all);
  }
  w.job = &job;
  while (w.error.empty()) {
    const int id = next_ready(w);
    if (id < 0) break;
    EmuThread& t = w.threads[id];
    switch_to_fiber(w, t);
    switch (t.state) {
      case State::kExited: thread_exited(w, t); break;
      case State::kBarrier: arrive_barrier(w, t); break;
      case State::kWarp: arrive_warp(w, t); break;
      case State::kFaulted: break;  // w.error is set
      case State::kReady: fail(w, "cuda_emu: internal error: a thread yielded without waiting"); break;
    }
  }
  if (w.error.empty() && w.exited < n) w.error = deadlock_report(w);
  if (w.error.empty()) flush_requests(w);
  if (!w.error.empty()) w.stacks_dirty = true;
}

// ---- crashes inside a kernel ------------------------------------------------------------------------------------
// A kernel that writes far out of bounds takes the process down. Before it goes, say which kernel, block and thread
// it was (and whether the thread's stack overflowed), then hand the signal to whoever had it before (Python's
// faulthandler prints the Python stack). Not in the ASan build, whose own report says more.
struct sigaction g_previous_segv;
struct sigaction g_previous_bus;

void crash_handler(int sig, siginfo_t* info, void*) {
  const EmuThread* t = tls_emu_thread;
  const Worker* w = tls_worker;
  if (t != nullptr && w != nullptr && w->job != nullptr) {
    const LaunchConfig& c = w->job->config;
    const char* address = static_cast<const char*>(info->si_addr);
    const bool overflow = address >= t->stack.base && address < t->stack.lo();
    char message[768];
    const int n = std::snprintf(
        message, sizeof(message),
        "\ncuda_emu: %s in kernel '%s' launched at %s:%d, block (%u,%u,%u) thread (%u,%u,%u): %s\n",
        sig == SIGSEGV ? "segmentation fault" : "bus error", c.kernel, c.file, c.line, t->ctx.block_idx.x,
        t->ctx.block_idx.y, t->ctx.block_idx.z, t->ctx.thread_idx.x, t->ctx.thread_idx.y, t->ctx.thread_idx.z,
        overflow ? "the thread's stack overflowed (CUDA_EMU_STACK_KB)"
                 : "an access outside any mapping (the ASan build, emu.py test --variant asan, says where)");
    if (n > 0) (void)!write(2, message, static_cast<size_t>(std::min<int>(n, sizeof(message) - 1)));
  }
  // Returning re-runs the faulting access under the previous handler.
  sigaction(sig, sig == SIGSEGV ? &g_previous_segv : &g_previous_bus, nullptr);
}

void install_crash_handler() {
#if !defined(CUDA_EMU_ASAN)
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = crash_handler;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &g_previous_segv);
    sigaction(SIGBUS, &action, &g_previous_bus);
  });
#endif
}

// An alternate signal stack for a worker, so that the handler also runs when a fiber's stack has overflowed.
void install_signal_stack() {
  static constexpr size_t kBytes = 64 * 1024;
  stack_t alternate{};
  alternate.ss_sp = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (alternate.ss_sp == MAP_FAILED) return;
  alternate.ss_size = kBytes;
  sigaltstack(&alternate, nullptr);
}

// ---- worker pool -------------------------------------------------------------------------------------------
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may still be parked at process exit
    return *pool;
  }

  void run(Job& job) {
    install_crash_handler();
    const size_t blocks = job.block_order.size();
    const size_t wanted = std::max<size_t>(1, std::min<size_t>(blocks, static_cast<size_t>(workers_wanted())));
    std::unique_lock<std::mutex> lock(mutex_);
    while (threads_.size() < wanted) {
      threads_.emplace_back([this] { loop(); });
    }
    job_ = &job;
    active_ = wanted;
    running_ = wanted;
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [this] { return running_ == 0; });
    job_ = nullptr;
  }

 private:
  static long workers_wanted() { return std::max(1l, env_long("CUDA_EMU_WORKERS", 2)); }

  void loop() {
    Worker worker;
    tls_worker = &worker;
    install_signal_stack();
    uint64_t seen = 0;
    size_t my_index = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      my_index = index_counter_++;
    }
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (my_index >= active_) continue;
        job = job_;
      }
      const size_t stack_size = stack_bytes();
      for (;;) {
        if (job->failed.load()) break;
        const size_t i = job->next.fetch_add(1);
        if (i >= job->block_order.size()) break;
        try {
          run_block(worker, *job, job->block_order[i], stack_size);
        } catch (const std::exception& e) {
          worker.error = std::string("cuda_emu: ") + e.what();
        }
        if (!worker.error.empty()) {
          std::lock_guard<std::mutex> lock(job->mutex);
          if (job->error.empty()) job->error = worker.error;
          job->failed.store(true);
        }
      }
#if defined(CUDA_EMU_PERF)
      {
        std::lock_guard<std::mutex> lock(job->mutex);
        job->perf.merge(worker.perf);
        worker.perf = PerfState{};
      }
#endif
      std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> threads_;
  Job* job_ = nullptr;
  size_t active_ = 0;
  size_t running_ = 0;
  size_t index_counter_ = 0;
  uint64_t generation_ = 0;
};

std::mutex g_attr_mutex;
// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel, with the opt-in limit it was set under: a test that
// changes the emulated device (CUDA_EMU_SMEM_OPTIN) mid-process does not inherit another device's attributes.
std::map<const void*, std::pair<int, long>> g_max_dynamic_shared;
std::atomic<uint64_t> g_launches{0};

cudaError_t launch_error(cudaError_t code, const std::string& message) {
  log_error(message);
  tls_last_error = code;
  tls_last_message = message;
  return code;
}

}  // namespace

void* block_dynamic_shared() {
  if (tls_worker == nullptr || tls_thread == nullptr) throw Error("cuda_emu: dynamic shared memory outside a kernel");
  return tls_worker->dynamic_shared.data();
}

void fault(const char* what, const void* address, const Site& site) {
  Worker* w = tls_worker;
  if (w == nullptr || tls_thread == nullptr) throw Error(std::string("cuda_emu: ") + what + " outside a kernel");
  EmuThread& t = *tls_emu_thread;
  std::ostringstream out;
  out << "cuda_emu: " << what << " at address " << address << " (" << where(site) << "), in "
      << describe_thread(*w->job, t);
  fail(*w, out.str());
  t.state = State::kFaulted;
  park(t);
  std::abort();  // a faulted block is never resumed
}

void static_shared(void* address, size_t bytes, const char* name, const Site& site) {
  Worker* w = tls_worker;
  if (w == nullptr || tls_emu_thread == nullptr) return;  // a __shared__ declaration run outside a kernel
  for (const void* seen : w->static_shared_seen) {
    if (seen == address) return;
  }
  w->static_shared_seen.push_back(address);
  w->static_shared_sizes.push_back(bytes);
  w->static_shared_bytes += bytes;
  std::memset(address, 0xFF, bytes);  // like dynamic shared memory: a read before any write shows
  const Job& job = *w->job;
  const size_t total = w->static_shared_bytes + job.config.shared_bytes;
  std::ostringstream why;
  if (!job.opted_in && total > kSmemNoOptin) {
    why << "static shared memory (" << w->static_shared_bytes << " bytes, the last being '" << name
        << "') plus " << job.config.shared_bytes << " bytes of dynamic shared memory exceed 48 KiB without "
        << "cudaFuncSetAttribute(MaxDynamicSharedMemorySize): the launch fails on a GPU";
  } else if (job.opted_in && w->static_shared_bytes + job.dynamic_limit > job.optin) {
    why << "static shared memory (" << w->static_shared_bytes << " bytes, the last being '" << name
        << "') plus the kernel's MaxDynamicSharedMemorySize (" << job.dynamic_limit << ") exceed the device's "
        << job.optin << " bytes per block: the launch fails on a GPU";
  } else {
    return;
  }
  fault(why.str().c_str(), address, site);
}

namespace {
EmuThread& current_emu_thread(const char* what, const Site& site) {
  if (tls_worker == nullptr || tls_emu_thread == nullptr) {
    throw Error(std::string("cuda_emu: ") + what + " called outside a kernel at " + where(site));
  }
  return *tls_emu_thread;
}
}  // namespace

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const Site& site) {
  EmuThread& t = current_emu_thread(warp_op_name(op), site);
  t.state = State::kWarp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  t.width = width;
  t.site = site;
  park(t);
  return t.result;
}

int barrier(BarrierOp op, int predicate, const Site& site) {
  EmuThread& t = current_emu_thread("__syncthreads", site);
  t.state = State::kBarrier;
  t.barrier_op = op;
  t.value = predicate != 0;
  t.site = site;
  park(t);
  return static_cast<int>(t.result);
}

#if defined(CUDA_EMU_PERF)
struct StoredRecord {
  PerfRecord record;
  std::vector<std::pair<uintptr_t, SiteCounters>> sites;
};
std::mutex g_perf_mutex;
std::vector<StoredRecord> g_perf_records;
std::vector<PerfRecord> g_perf_flat;  // what cuda_emu_perf_records hands out
std::string g_perf_json;
#endif

void launch(const LaunchConfig& config, const void* kernel_id, InvokeFn invoke, const void* closure,
            size_t closure_bytes) {
  std::ostringstream at;
  at << "kernel '" << config.kernel << "' launched at " << config.file << ":" << config.line;
  const dim3& b = config.block;
  const dim3& g = config.grid;
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    std::ostringstream m;
    m << "cuda_emu: invalid block size (" << b.x << "," << b.y << "," << b.z << ") = " << threads
      << " threads (1..1024, at most 1024 x 1024 x 64) for " << at.str();
    launch_error(cudaErrorInvalidConfiguration, m.str());
    return;
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    std::ostringstream m;
    m << "cuda_emu: invalid grid size (" << g.x << "," << g.y << "," << g.z
      << ") (each at least 1, at most 2^31-1 x 65535 x 65535) for " << at.str();
    launch_error(cudaErrorInvalidConfiguration, m.str());
    return;
  }
  const size_t optin = static_cast<size_t>(env_long("CUDA_EMU_SMEM_OPTIN", kDefaultSmemOptin));
  size_t allowed = kSmemNoOptin;
  bool opted_in = false;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    const auto it = g_max_dynamic_shared.find(kernel_id);
    if (it != g_max_dynamic_shared.end() && it->second.second == static_cast<long>(optin)) {
      allowed = static_cast<size_t>(it->second.first);
      opted_in = true;
    }
  }
  if (config.shared_bytes > allowed) {
    std::ostringstream m;
    m << "cuda_emu: " << config.shared_bytes << " bytes of dynamic shared memory requested but the kernel allows "
      << allowed
      << (!opted_in ? " (48 KiB: more needs cudaFuncSetAttribute(kernel, "
                                    "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first)"
                                  : " (its cudaFuncAttributeMaxDynamicSharedMemorySize)")
      << ", for " << at.str();
    launch_error(cudaErrorInvalidValue, m.str());
    return;
  }
  if (config.shared_bytes > optin) {
    std::ostringstream m;
    m << "cuda_emu: " << config.shared_bytes << " bytes of dynamic shared memory exceed the device's "
      << optin << " (CUDA_EMU_SMEM_OPTIN), for " << at.str();
    launch_error(cudaErrorInvalidValue, m.str());
    return;
  }

  Job job;
  job.config = config;
  job.kernel_id = kernel_id;
  job.invoke = invoke;
  job.closure = closure;
  job.closure_bytes = closure_bytes;
  job.order = env_order();
  job.seed = static_cast<uint64_t>(env_long("CUDA_EMU_SEED", 1));
  job.launch_index = g_launches.fetch_add(1);
  job.dynamic_limit = allowed;
  job.opted_in = opted_in;
  job.optin = optin;
  job.block_order.reserve(static_cast<size_t>(g.x) * g.y * g.z);
  for (unsigned z = 0; z < g.z; ++z) {
    for (unsigned y = 0; y < g.y; ++y) {
      for (unsigned x = 0; x < g.x; ++x) job.block_order.push_back(make_uint3(x, y, z));
    }
  }
  if (job.order == Order::kReverse) std::reverse(job.block_order.begin(), job.block_order.end());
  if (job.order == Order::kRandom) {
    std::mt19937_64 rng(job.seed ^ (job.launch_index * 0xD1B54A32D192ED03ull));
    std::shuffle(job.block_order.begin(), job.block_order.end(), rng);
  }
  Pool::get().run(job);
  if (!job.error.empty()) {
    log_error(job.error);
    throw Error(job.error);
  }
#if defined(CUDA_EMU_PERF)
  StoredRecord stored{PerfRecord{config.kernel, config.file, config.line, g.x, g.y, g.z, b.x, b.y, b.z,
                                 job.perf.totals},
                      {job.perf.sites.begin(), job.perf.sites.end()}};
  std::sort(stored.sites.begin(), stored.sites.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  std::lock_guard<std::mutex> lock(g_perf_mutex);
  g_perf_records.push_back(std::move(stored));
#endif
}

#if defined(CUDA_EMU_PERF)
namespace {
// The callbacks of -fsanitize=thread. pc: the instrumented instruction (the callback's return address).
inline void perf_access(const void* address, uint32_t size, Access access, uintptr_t pc) {
  EmuThread* t = tls_emu_thread;
  if (t == nullptr || size == 0) return;  // host code
  Worker& w = *tls_worker;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a - reinterpret_cast<uintptr_t>(t->stack.base) < t->stack.size + Stack::page()) return;  // registers, spills
  if (a - reinterpret_cast<uintptr_t>(w.job->closure) < w.job->closure_bytes) return;  // kernel parameters
  bool shared = a - reinterpret_cast<uintptr_t>(w.dynamic_shared.data()) < w.dynamic_shared.size();
  for (size_t i = 0; !shared && i < w.static_shared_seen.size(); ++i) {
    shared = a - reinterpret_cast<uintptr_t>(w.static_shared_seen[i]) < w.static_shared_sizes[i];
  }
  uint32_t k = 0;
  bool seen = false;
  for (auto& [site, executions] : t->executions) {
    if (site == pc) {
      k = executions++;
      seen = true;
      break;
    }
  }
  if (!seen) t->executions.emplace_back(pc, 1u);
  Request& r = w.pending[static_cast<size_t>(t->linear / 32)][RequestKey{pc, k}];
  if (r.lanes == 0) {
    r.access = access;
    r.shared = shared;
  }
  if (r.lanes < 32) r.lane[r.lanes++] = LaneAccess{a, size};
}
}  // namespace
#endif

}  // namespace detail
}  // namespace cuda_emu

// ---- CUDA runtime API: what the kernels' host code calls -------------------------------------------------------
using cuda_emu::detail::env_long;

extern "C" {

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int /*device*/) {
  using namespace cuda_emu::detail;
  const long optin = env_long("CUDA_EMU_SMEM_OPTIN", kDefaultSmemOptin);
  long v = 0;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: v = env_long("CUDA_EMU_SMS", kDefaultSms); break;
    case cudaDevAttrL2CacheSize: v = env_long("CUDA_EMU_L2_BYTES", kDefaultL2); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: v = optin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: v = static_cast<long>(kSmemNoOptin); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: v = optin + 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: v = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: v = 2048; break;
    case cudaDevAttrWarpSize: v = 32; break;
    case cudaDevAttrMaxBlockDimX:
    case cudaDevAttrMaxBlockDimY: v = 1024; break;
    case cudaDevAttrMaxBlockDimZ: v = 64; break;
    case cudaDevAttrMaxGridDimX: v = 0x7fffffff; break;
    case cudaDevAttrMaxGridDimY:
    case cudaDevAttrMaxGridDimZ: v = 65535; break;
    case cudaDevAttrComputeCapabilityMajor: v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: v = 0; break;
    case cudaDevAttrMaxRegistersPerBlock:
    case cudaDevAttrMaxRegistersPerMultiprocessor: v = 65536; break;
    default:
      return launch_error(cudaErrorInvalidValue,
                          "cuda_emu: cudaDeviceGetAttribute(" + std::to_string(static_cast<int>(attr)) +
                              ") is not emulated; add it to tools/cuda_emu/runtime.cpp");
  }
  *value = static_cast<int>(v);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  using namespace cuda_emu::detail;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    const long optin = env_long("CUDA_EMU_SMEM_OPTIN", kDefaultSmemOptin);
    if (value < 0 || value > optin) {
      return launch_error(cudaErrorInvalidValue, "cuda_emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                                                     std::to_string(value) + ") above the device's opt-in limit " +
                                                     std::to_string(optin));
    }
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    g_max_dynamic_shared[func] = {value, optin};
  }
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* /*func*/, int block_size,
                                                          size_t dynamic_shared_bytes) {
  // Registers are unknown here: threads and shared memory are the only limits modelled.
  using namespace cuda_emu::detail;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  long blocks = std::min(32l, 2048l / block_size);
  if (dynamic_shared_bytes > 0) {
    const long per_sm = env_long("CUDA_EMU_SMEM_OPTIN", kDefaultSmemOptin) + 1024;
    blocks = std::min(blocks, per_sm / static_cast<long>(dynamic_shared_bytes));
  }
  *num_blocks = static_cast<int>(blocks);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_emu::detail::tls_last_error;
  cuda_emu::detail::tls_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return cuda_emu::detail::tls_last_error; }
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaError (emulated)";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  // The detailed message of the last failed call on this thread, when it is the one asked about.
  if (error != cudaSuccess && !cuda_emu::detail::tls_last_message.empty()) {
    return cuda_emu::detail::tls_last_message.c_str();
  }
  return cudaGetErrorName(error);
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// For the test harness (ctypes): kernels launched, and every error reported, since the library was loaded.
__attribute__((visibility("default"))) unsigned long long cuda_emu_launch_count(void) {
  return cuda_emu::detail::g_launches.load();
}
// For the test harness (ctypes): every error reported since the library was loaded.
__attribute__((visibility("default"))) int cuda_emu_error_count(void) {
  std::lock_guard<std::mutex> lock(cuda_emu::detail::g_log_mutex);
  return static_cast<int>(cuda_emu::detail::g_log.size());
}
__attribute__((visibility("default"))) int cuda_emu_perf_enabled(void) {
#if defined(CUDA_EMU_PERF)
  return 1;
#else
  return 0;
#endif
}

__attribute__((visibility("default"))) void cuda_emu_perf_reset(void) {
#if defined(CUDA_EMU_PERF)
  std::lock_guard<std::mutex> lock(cuda_emu::detail::g_perf_mutex);
  cuda_emu::detail::g_perf_records.clear();
#endif
}

__attribute__((visibility("default"))) int cuda_emu_perf_records(const cuda_emu::PerfRecord** records) {
#if defined(CUDA_EMU_PERF)
  using namespace cuda_emu::detail;
  std::lock_guard<std::mutex> lock(g_perf_mutex);
  g_perf_flat.clear();
  for (const StoredRecord& r : g_perf_records) g_perf_flat.push_back(r.record);
  *records = g_perf_flat.data();
  return static_cast<int>(g_perf_flat.size());
#else
  *records = nullptr;
  return 0;
#endif
}

// [{kernel, file, line, grid, block, counters..., sites: [{site: "object+0xoffset", access, shared, ...}]}]
__attribute__((visibility("default"))) const char* cuda_emu_perf_json(void) {
#if defined(CUDA_EMU_PERF)
  using namespace cuda_emu::detail;
  std::lock_guard<std::mutex> lock(g_perf_mutex);
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < g_perf_records.size(); ++i) {
    const cuda_emu::PerfRecord& r = g_perf_records[i].record;
    const cuda_emu::PerfCounters& c = r.counters;
    out << (i ? "," : "") << "{\"kernel\":\"";
    for (const char* ch = r.kernel; *ch; ++ch) out << (*ch == '"' || *ch == '\\' ? "\\" : "") << *ch;
    out << "\",\"file\":\"" << r.file << "\",\"line\":" << r.line << ",\"grid\":[" << r.grid_x << "," << r.grid_y
        << "," << r.grid_z << "],\"block\":[" << r.block_x << "," << r.block_y << "," << r.block_z << "]"
        << ",\"load_requests\":" << c.load_requests << ",\"load_sectors\":" << c.load_sectors
        << ",\"load_bytes\":" << c.load_bytes << ",\"store_requests\":" << c.store_requests
        << ",\"store_sectors\":" << c.store_sectors << ",\"store_bytes\":" << c.store_bytes
        << ",\"atomic_requests\":" << c.atomic_requests << ",\"atomic_sectors\":" << c.atomic_sectors
        << ",\"atomic_bytes\":" << c.atomic_bytes << ",\"shared_requests\":" << c.shared_requests
        << ",\"shared_wavefronts\":" << c.shared_wavefronts
        << ",\"shared_ideal_wavefronts\":" << c.shared_ideal_wavefronts
        << ",\"shared_worst_ways\":" << c.shared_worst_ways << ",\"sites\":[";
    bool first = true;
    for (const auto& [pc, s] : g_perf_records[i].sites) {
      Dl_info info{};
      std::ostringstream where_at;
      if (dladdr(reinterpret_cast<void*>(pc), &info) != 0 && info.dli_fname != nullptr) {
        where_at << info.dli_fname << "+0x" << std::hex << (pc - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1);
      } else {
        where_at << "0x" << std::hex << pc;
      }
      out << (first ? "" : ",") << "{\"site\":\"" << where_at.str() << "\",\"access\":\""
          << (s.access == Access::kLoad ? "load" : s.access == Access::kStore ? "store" : "atomic")
          << "\",\"shared\":" << (s.shared ? "true" : "false") << ",\"requests\":" << s.requests
          << ",\"sectors\":" << s.sectors << ",\"bytes\":" << s.bytes << ",\"wavefronts\":" << s.wavefronts
          << ",\"ideal\":" << s.ideal << ",\"worst_ways\":" << s.worst_ways << "}";
      first = false;
    }
    out << "]}";
  }
  out << "]";
  g_perf_json = out.str();
  return g_perf_json.c_str();
#else
  return "[]";
#endif
}

__attribute__((visibility("default"))) const char* cuda_emu_error(int i) {
  std::lock_guard<std::mutex> lock(cuda_emu::detail::g_log_mutex);
  if (i < 0 || static_cast<size_t>(i) >= cuda_emu::detail::g_log.size()) return nullptr;
  return cuda_emu::detail::g_log[static_cast<size_t>(i)].c_str();
}

}  // extern "C"

#if defined(CUDA_EMU_PERF)
// ---- the -fsanitize=thread callbacks (no sanitizer runtime is linked) ------------------------------------------
// Every instrumented access lands here; only those of CUDA threads are counted (tls_emu_thread is null in host
// code). Atomics must still be atomic: each is done here with the compiler's builtin, sequentially consistent.
namespace {
using cuda_emu::detail::Access;
#define CUDA_EMU_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))
}  // namespace

extern "C" {
__attribute__((visibility("default"))) void cuda_emu_perf_access(const void* address, unsigned size, int store,
                                                                  const void* pc) {
  cuda_emu::detail::perf_access(address, size, store ? Access::kStore : Access::kLoad,
                                reinterpret_cast<uintptr_t>(pc));
}
__attribute__((visibility("default"))) void __tsan_init(void) {}
__attribute__((visibility("default"))) void __tsan_func_entry(void*) {}
__attribute__((visibility("default"))) void __tsan_func_exit(void) {}
__attribute__((visibility("default"))) void __tsan_vptr_update(void**, void*) {}
__attribute__((visibility("default"))) void __tsan_vptr_read(void**) {}
#define CUDA_EMU_TSAN_RW(n)                                                                                   \
  __attribute__((visibility("default"))) void __tsan_read##n(void* p) {                                      \
    cuda_emu::detail::perf_access(p, n, Access::kLoad, CUDA_EMU_PC);                                        \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_write##n(void* p) {                                     \
    cuda_emu::detail::perf_access(p, n, Access::kStore, CUDA_EMU_PC);                                       \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_unaligned_read##n(void* p) {                            \
    cuda_emu::detail::perf_access(p, n, Access::kLoad, CUDA_EMU_PC);                                        \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_unaligned_write##n(void* p) {                           \
    cuda_emu::detail::perf_access(p, n, Access::kStore, CUDA_EMU_PC);                                       \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_volatile_read##n(void* p) {                             \
    cuda_emu::detail::perf_access(p, n, Access::kLoad, CUDA_EMU_PC);                                        \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_volatile_write##n(void* p) {                            \
    cuda_emu::detail::perf_access(p, n, Access::kStore, CUDA_EMU_PC);                                       \
  }
CUDA_EMU_TSAN_RW(1)
CUDA_EMU_TSAN_RW(2)
CUDA_EMU_TSAN_RW(4)
CUDA_EMU_TSAN_RW(8)
CUDA_EMU_TSAN_RW(16)
#undef CUDA_EMU_TSAN_RW
__attribute__((visibility("default"))) void __tsan_read_range(void* p, unsigned long size) {
  cuda_emu::detail::perf_access(p, static_cast<uint32_t>(size), Access::kLoad, CUDA_EMU_PC);
}
__attribute__((visibility("default"))) void __tsan_write_range(void* p, unsigned long size) {
  cuda_emu::detail::perf_access(p, static_cast<uint32_t>(size), Access::kStore, CUDA_EMU_PC);
}

#define CUDA_EMU_TSAN_ATOMIC(n, T)                                                                            \
  __attribute__((visibility("default"))) T __tsan_atomic##n##_load(const volatile T* a, int) {              \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kLoad, CUDA_EMU_PC);              \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                              \
  }                                                                                                           \
  __attribute__((visibility("default"))) void __tsan_atomic##n##_store(volatile T* a, T v, int) {           \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kStore, CUDA_EMU_PC);             \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                 \
  }                                                                                                           \
  __attribute__((visibility("default"))) T __tsan_atomic##n##_exchange(volatile T* a, T v, int) {           \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kAtomic, CUDA_EMU_PC);            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                           \
  CUDA_EMU_TSAN_FETCH(n, T, add)                                                                              \
  CUDA_EMU_TSAN_FETCH(n, T, sub)                                                                              \
  CUDA_EMU_TSAN_FETCH(n, T, and)                                                                              \
  CUDA_EMU_TSAN_FETCH(n, T, or)                                                                               \
  CUDA_EMU_TSAN_FETCH(n, T, xor)                                                                              \
  CUDA_EMU_TSAN_FETCH(n, T, nand)                                                                             \
  __attribute__((visibility("default"))) int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, \
                                                                                        T v, int, int) {      \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kAtomic, CUDA_EMU_PC);            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
  }                                                                                                           \
  __attribute__((visibility("default"))) int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c,   \
                                                                                      T v, int, int) {        \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kAtomic, CUDA_EMU_PC);            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                 \
  }                                                                                                           \
  __attribute__((visibility("default"))) T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v,  \
                                                                                   int, int) {                \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kAtomic, CUDA_EMU_PC);            \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                       \
    return c;                                                                                                 \
  }
#define CUDA_EMU_TSAN_FETCH(n, T, op)                                                                         \
  __attribute__((visibility("default"))) T __tsan_atomic##n##_fetch_##op(volatile T* a, T v, int) {         \
    cuda_emu::detail::perf_access(const_cast<const T*>(a), n / 8, Access::kAtomic, CUDA_EMU_PC);            \
    return __atomic_fetch_##op(a, v, __ATOMIC_SEQ_CST);                                                       \
  }
CUDA_EMU_TSAN_ATOMIC(8, char)
CUDA_EMU_TSAN_ATOMIC(16, short)
CUDA_EMU_TSAN_ATOMIC(32, int)
CUDA_EMU_TSAN_ATOMIC(64, long long)
#undef CUDA_EMU_TSAN_FETCH
#undef CUDA_EMU_TSAN_ATOMIC
__attribute__((visibility("default"))) void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__attribute__((visibility("default"))) void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}  // extern "C"
#endif
