// SPDX-License-Identifier: Apache-2.0
//
// The scheduler behind simt_host.h and the CUDA runtime subset of
// include/cuda_runtime_api.h, on the CPU.
//
// A block's threads are fibers. On x86-64 a fiber switch is a few
// instructions (tcf_emu_switch below); elsewhere, or with -DTCF_EMU_UCONTEXT,
// swapcontext (which costs a signal-mask system call per switch). Under
// AddressSanitizer every switch is announced with the sanitizer's fiber API,
// so stack accesses are checked on the fiber stacks too.
//
// Control API for tests (extern "C", exported next to the C API):
//   tcf_emu_set_device(device, sm_count)  current device of this host thread,
//                                         and its SM count (fixed once read)
//   tcf_emu_set_grid_limits(x, y, z)      the largest launchable grid
//   tcf_emu_set_order(threads, blocks)    the order in which runnable threads
//                                         (0 forward, 1 reverse, 2 forward but
//                                         one barrier opened at a time, so the
//                                         first warp runs ahead of the others)
//                                         and blocks (0 forward, 1 reverse) run
//   tcf_emu_counters(out[4])              launches, blocks, threads, barriers
//   tcf_emu_last_message()                the last launch failure, explained
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "simt_host.h"

#if defined(__SANITIZE_ADDRESS__)
#define TCF_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TCF_EMU_ASAN 1
#endif
#endif
#ifdef TCF_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define TCF_EMU_NO_ASAN __attribute__((no_sanitize_address))
#else
#define TCF_EMU_NO_ASAN
#endif

#if defined(__x86_64__) && !defined(TCF_EMU_UCONTEXT)
#define TCF_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

#ifdef TCF_EMU_ASM_SWITCH
// tcf_emu_switch(save, next): push the callee-saved registers and the FP
// control words, store the stack pointer in *save, continue on `next`.
// A new fiber's stack starts with a frame that "returns" into the trampoline,
// which calls r13(r12).
extern "C" void tcf_emu_switch(void **save, void *next);
extern "C" void tcf_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl tcf_emu_switch
  .hidden tcf_emu_switch
  .type tcf_emu_switch, @function
tcf_emu_switch:
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
  movq %rsi, %rsp
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
  .size tcf_emu_switch, .-tcf_emu_switch

  .p2align 4
  .globl tcf_emu_trampoline
  .hidden tcf_emu_trampoline
  .type tcf_emu_trampoline, @function
tcf_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size tcf_emu_trampoline, .-tcf_emu_trampoline
)");
#endif

namespace tcf_emu {
namespace {

constexpr int kMaxDevices = 64;
constexpr size_t kStackBytes = 256 * 1024;

// ------------------------------------------------------------------ configuration
std::atomic<int> g_sm_count[kMaxDevices];  // 0: the default
std::atomic<bool> g_sm_read[kMaxDevices];
constexpr int kDefaultSmCount = 2;
std::atomic<unsigned> g_grid_limit[3] = {{2147483647u}, {65535u}, {65535u}};
std::atomic<int> g_thread_order{0}, g_block_order{0};
std::atomic<unsigned long long> g_counters[4];  // launches, blocks, threads, barriers

thread_local int t_device = 0;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaError_t t_message_code = cudaSuccess;
thread_local std::string t_message;

void set_error(cudaError_t code, const std::string &message) {
  t_last_error = code;
  t_message_code = code;
  t_message = message;
}

std::string format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char *fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

[[noreturn]] void fatal(const char *what) {
  std::fprintf(stderr, "tcf_emu: fatal: %s\n", what);
  std::abort();
}

// ------------------------------------------------------------------ fiber stacks
struct Stack {
  char *base = nullptr;  // usable [base, base + kStackBytes); a guard page below
};

thread_local std::vector<Stack> t_stacks;  // free stacks, kept across launches

Stack take_stack() {
  if (!t_stacks.empty()) {
    Stack s = t_stacks.back();
    t_stacks.pop_back();
    return s;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void *p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fatal("cannot map a fiber stack");
  if (mprotect(p, page, PROT_NONE) != 0) fatal("cannot protect a fiber stack's guard page");
  return Stack{static_cast<char *>(p) + page};
}

void give_stack(Stack s, bool dirty) {
#ifdef TCF_EMU_ASAN
  // A fiber abandoned mid-kernel leaves its frames' redzones poisoned.
  if (dirty) __asan_unpoison_memory_region(s.base, kStackBytes);
#else
  (void)dirty;
#endif
  t_stacks.push_back(s);
}

// ------------------------------------------------------------------ threads of a block
enum class State : unsigned char { New, Runnable, BlockWait, WarpWait, Done };

struct Fiber {
  State state = State::New;
  uint3 idx{};
  unsigned linear = 0;
  Stack stack;
  bool has_stack = false;
#ifdef TCF_EMU_ASM_SWITCH
  void *sp = nullptr;
#else
  ucontext_t ctx;
#endif
  void *fake_stack = nullptr;  // ASan's per-fiber state
  // where it waits
  const char *file = nullptr;
  int line = 0;
  int op = 0;
  unsigned mask = 0;
  int arg = 0, width = 32;
  unsigned long long value = 0, result = 0;
};

struct Run {
  LaunchConfig config;
  Body body = nullptr;
  void *ctx = nullptr;
  std::vector<Fiber> fibers;
  unsigned nthreads = 0;
  Fiber *current = nullptr;
#ifdef TCF_EMU_ASM_SWITCH
  void *sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  void *sched_fake = nullptr;
  const void *sched_bottom = nullptr;
  size_t sched_size = 0;
  std::string error;  // why the block failed
};

thread_local Run *t_run = nullptr;

const char *op_name(int op) {
  switch (op) {
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kSyncWarp: return "__syncwarp";
    default: return "?";
  }
}

const char *base_name(const char *path) {
  const char *slash = path ? std::strrchr(path, '/') : nullptr;
  return slash ? slash + 1 : (path ? path : "?");
}

std::string where(const Fiber &f) {
  switch (f.state) {
    case State::New: return "not started";
    case State::Runnable: return "runnable";
    case State::Done: return "exited";
    case State::BlockWait: return format("wait at __syncthreads() (%s:%d)", base_name(f.file), f.line);
    case State::WarpWait:
      return format("wait at %s(mask 0x%08x) (%s:%d)", op_name(f.op), f.mask, base_name(f.file), f.line);
  }
  return "?";
}

// "threads 0-31: wait at ...; threads 32-255: exited"
std::string describe(const Run &r) {
  std::string out;
  unsigned i = 0;
  while (i < r.nthreads) {
    const std::string w = where(r.fibers[i]);
    unsigned j = i + 1;
    while (j < r.nthreads && where(r.fibers[j]) == w) ++j;
    if (!out.empty()) out += "; ";
    out += j - i == 1 ? format("thread %u: ", i) : format("threads %u-%u: ", i, j - 1);
    out += w;
    i = j;
  }
  return out;
}

// ------------------------------------------------------------------ switching
TCF_EMU_NO_ASAN void fiber_main(Fiber *f);

TCF_EMU_NO_ASAN void resume(Run &r, Fiber &f) {
  r.current = &f;
  threadIdx = f.idx;
#ifdef TCF_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake, f.stack.base, kStackBytes);
#endif
#ifdef TCF_EMU_ASM_SWITCH
  tcf_emu_switch(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched_ctx, &f.ctx);
#endif
#ifdef TCF_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake, nullptr, nullptr);
#endif
  r.current = nullptr;
}

TCF_EMU_NO_ASAN void suspend(Run &r, Fiber &f, bool exiting) {
#ifdef TCF_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, r.sched_bottom, r.sched_size);
#else
  (void)exiting;
#endif
#ifdef TCF_EMU_ASM_SWITCH
  tcf_emu_switch(&f.sp, r.sched_sp);
#else
  swapcontext(&f.ctx, &r.sched_ctx);
#endif
#ifdef TCF_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

#ifndef TCF_EMU_ASM_SWITCH
void fiber_entry(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber *>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

TCF_EMU_NO_ASAN void start(Run &r, Fiber &f) {
  f.stack = take_stack();
  f.has_stack = true;
#ifdef TCF_EMU_ASM_SWITCH
  char *top = f.stack.base + kStackBytes;  // 16-byte aligned (page aligned)
  void **frame = reinterpret_cast<void **>(top - 64);
  unsigned csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  csr[1] &= 0xffffu;
  std::memcpy(&frame[0], csr, 8);                                    // mxcsr, x87 control word
  frame[1] = nullptr;                                                // r15
  frame[2] = nullptr;                                                // r14
  frame[3] = reinterpret_cast<void *>(&fiber_main);                  // r13
  frame[4] = &f;                                                     // r12
  frame[5] = nullptr;                                                // rbx
  frame[6] = nullptr;                                                // rbp
  frame[7] = reinterpret_cast<void *>(&tcf_emu_trampoline);          // return address
  f.sp = frame;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.base;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 2,
              static_cast<unsigned>(p & 0xffffffffu), static_cast<unsigned>(p >> 32));
#endif
  f.state = State::Runnable;
  (void)r;
}

TCF_EMU_NO_ASAN void fiber_main(Fiber *f) {
  Run &r = *t_run;
#ifdef TCF_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  r.body(r.ctx);
  f->state = State::Done;
  suspend(r, *f, true);
  fatal("an exited fiber was resumed");
}

Fiber &current_fiber(const char *what) {
  Run *r = t_run;
  if (r == nullptr || r->current == nullptr) {
    std::fprintf(stderr, "tcf_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *r->current;
}

// ------------------------------------------------------------------ barrier release
// Lane `lane`'s source lane for a shuffle, or -1 when it keeps its own value.
int source_lane(const Fiber &f, int lane) {
  const int width = f.width;
  const int seg = lane / width * width;
  switch (f.op) {
    case kShflIdx: return seg + ((f.arg % width) + width) % width;
    case kShflUp: return lane - f.arg >= seg ? lane - f.arg : -1;
    case kShflDown: return lane + f.arg < seg + width ? lane + f.arg : -1;
    case kShflXor: {
      const int src = lane ^ f.arg;
      return src < seg + width ? src : -1;  // later groups are out of reach
    }
    default: return -1;
  }
}

// Opens every barrier whose threads have all arrived (only the first one when
// `one` is set). Returns the number of threads released; sets r.error (and
// returns 0) on a misuse.
unsigned release(Run &r, bool one) {
  unsigned released = 0;
  const unsigned n = r.nthreads;
  const unsigned nwarps = (n + 31) / 32;
  for (unsigned w = 0; w < nwarps; ++w) {
    const unsigned first = w * 32, lanes = n - first < 32 ? n - first : 32;
    const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    unsigned handled = 0;
    for (unsigned l = 0; l < lanes; ++l) {
      const Fiber &f = r.fibers[first + l];
      if (f.state != State::WarpWait || (handled >> l & 1u)) continue;
      const unsigned m = f.mask;
      if (!(m >> l & 1u)) {
        r.error = format("thread %u (warp %u lane %u) calls %s with mask 0x%08x, which does not name "
                         "its own lane (%s:%d)", first + l, w, l, op_name(f.op), m, base_name(f.file), f.line);
        return 0;
      }
      if (m & ~present) {
        r.error = format("thread %u calls %s with mask 0x%08x, but warp %u has only lanes 0x%08x "
                         "(%u threads per block) (%s:%d)", first + l, op_name(f.op), m, w, present, n,
                         base_name(f.file), f.line);
        return 0;
      }
      if (f.op != kSyncWarp && (f.width < 1 || f.width > 32 || (f.width & (f.width - 1)))) {
        r.error = format("thread %u calls %s with width %d (a power of two <= 32 expected) (%s:%d)",
                         first + l, op_name(f.op), f.width, base_name(f.file), f.line);
        return 0;
      }
      bool ready = true;
      for (unsigned k = 0; k < 32 && ready; ++k)
        if (m >> k & 1u) ready = r.fibers[first + k].state == State::WarpWait;
      if (!ready) continue;  // may still arrive, else the deadlock check reports it
      for (unsigned k = 0; k < 32; ++k) {
        if (!(m >> k & 1u)) continue;
        const Fiber &g = r.fibers[first + k];
        if (g.mask != m || g.op != f.op || g.line != f.line || std::strcmp(g.file, f.file) != 0 ||
            (f.op != kSyncWarp && g.width != f.width)) {
          r.error = format("divergent warp %u: thread %u does %s, thread %u does %s", w, first + l,
                           where(f).c_str(), first + k, where(g).c_str());
          return 0;
        }
      }
      for (unsigned k = 0; k < 32; ++k) {
        if (!(m >> k & 1u)) continue;
        Fiber &g = r.fibers[first + k];
        g.result = g.value;
        if (g.op != kSyncWarp) {
          const int src = source_lane(g, static_cast<int>(k));
          if (src >= 0) {
            if (src >= 32 || !(m >> src & 1u)) {
              r.error = format("thread %u reads lane %d through %s, which mask 0x%08x does not name (%s:%d)",
                               first + k, src, op_name(g.op), m, base_name(g.file), g.line);
              return 0;
            }
            g.result = r.fibers[first + src].value;
          }
        }
      }
      for (unsigned k = 0; k < 32; ++k)
        if (m >> k & 1u) r.fibers[first + k].state = State::Runnable;
      handled |= m;
      released += static_cast<unsigned>(__builtin_popcount(m));
      g_counters[3].fetch_add(1, std::memory_order_relaxed);
      if (one) return released;
    }
  }
  if (released) return released;

  unsigned at_barrier = 0, done = 0;
  const Fiber *first_waiter = nullptr;
  for (const Fiber &f : r.fibers) {
    if (f.state == State::BlockWait) {
      ++at_barrier;
      if (!first_waiter) first_waiter = &f;
    } else if (f.state == State::Done) {
      ++done;
    }
  }
  if (at_barrier == 0) return 0;
  if (at_barrier + done == n && done > 0) {
    r.error = format("%u of %u threads exited without reaching the __syncthreads() (%s:%d) the others "
                     "wait at: %s", done, n, base_name(first_waiter->file), first_waiter->line,
                     describe(r).c_str());
    return 0;
  }
  if (at_barrier != n) return 0;
  for (const Fiber &f : r.fibers) {
    if (f.line != first_waiter->line || std::strcmp(f.file, first_waiter->file) != 0) {
      r.error = format("threads wait at different __syncthreads() calls: %s", describe(r).c_str());
      return 0;
    }
  }
  for (Fiber &f : r.fibers) f.state = State::Runnable;
  g_counters[3].fetch_add(1, std::memory_order_relaxed);
  return n;
}

// Runs one block to completion; false (with r.error) when it cannot finish.
bool run_block(Run &r) {
  const dim3 b = r.config.block;
  for (unsigned z = 0, i = 0; z < b.z; ++z)
    for (unsigned y = 0; y < b.y; ++y)
      for (unsigned x = 0; x < b.x; ++x, ++i) {
        Fiber &f = r.fibers[i];
        f.state = State::New;
        f.idx = uint3{x, y, z};
        f.linear = i;
        f.has_stack = false;
        f.fake_stack = nullptr;
      }
  const int order = g_thread_order.load(std::memory_order_relaxed);
  const bool reverse = order == 1, one_at_a_time = order == 2;
  unsigned done = 0;
  for (;;) {
    for (unsigned k = 0; k < r.nthreads; ++k) {
      Fiber &f = r.fibers[reverse ? r.nthreads - 1 - k : k];
      if (f.state == State::New) start(r, f);
      if (f.state != State::Runnable) continue;
      resume(r, f);
      if (f.state == State::Done) {
        give_stack(f.stack, false);
        f.has_stack = false;
        ++done;
      }
    }
    if (done == r.nthreads) return true;
    if (release(r, one_at_a_time) == 0) {
      if (r.error.empty()) r.error = "deadlock: " + describe(r);
      for (Fiber &f : r.fibers)
        if (f.has_stack) {
          give_stack(f.stack, true);
          f.has_stack = false;
        }
      return false;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ entry points of simt_host.h
void sync_block(const char *file, int line) {
  Fiber &f = current_fiber("__syncthreads()");
  f.state = State::BlockWait;
  f.file = file;
  f.line = line;
  suspend(*t_run, f, false);
}

unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                           const char *file, int line) {
  Fiber &f = current_fiber(op_name(op));
  f.state = State::WarpWait;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
  suspend(*t_run, f, false);
  return f.result;
}

void launch(const LaunchConfig &config, Body body, void *ctx) {
  const dim3 g = config.grid, b = config.block;
  const unsigned gx = g_grid_limit[0], gy = g_grid_limit[1], gz = g_grid_limit[2];
  const unsigned long long threads = static_cast<unsigned long long>(b.x) * b.y * b.z;
  std::string bad;
  if (t_run != nullptr)
    bad = "a kernel launched from inside a kernel (dynamic parallelism is not emulated)";
  else if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    bad = format("block (%u, %u, %u) is not a valid block shape (at most 1024 threads)", b.x, b.y, b.z);
  else if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > gx || g.y > gy || g.z > gz)
    bad = format("grid (%u, %u, %u) exceeds the device's limits (1..%u, 1..%u, 1..%u)", g.x, g.y, g.z,
                 gx, gy, gz);
  else if (config.smem != 0)
    bad = format("%zu bytes of dynamic shared memory requested (not emulated)", config.smem);
  if (!bad.empty()) {
    set_error(cudaErrorInvalidConfiguration, format("launch of %s: %s", config.kernel, bad.c_str()));
    return;
  }
  g_counters[0].fetch_add(1, std::memory_order_relaxed);

  Run r;
  r.config = config;
  r.body = body;
  r.ctx = ctx;
  r.nthreads = static_cast<unsigned>(threads);
  r.fibers.resize(r.nthreads);
  t_run = &r;
  gridDim = g;
  blockDim = b;
  const unsigned long long nblocks = static_cast<unsigned long long>(g.x) * g.y * g.z;
  const bool reverse = g_block_order.load(std::memory_order_relaxed) != 0;
  bool ok = true;
  for (unsigned long long k = 0; k < nblocks && ok; ++k) {
    const unsigned long long i = reverse ? nblocks - 1 - k : k;
    blockIdx = uint3{static_cast<unsigned>(i % g.x), static_cast<unsigned>(i / g.x % g.y),
                     static_cast<unsigned>(i / g.x / g.y)};
    ok = run_block(r);
    g_counters[1].fetch_add(1, std::memory_order_relaxed);
    g_counters[2].fetch_add(r.nthreads, std::memory_order_relaxed);
  }
  t_run = nullptr;
  if (!ok)
    set_error(cudaErrorLaunchFailure,
              format("kernel %s, grid (%u, %u, %u), block (%u, %u, %u): block (%u, %u, %u) failed: %s",
                     config.kernel, g.x, g.y, g.z, b.x, b.y, b.z, blockIdx.x, blockIdx.y, blockIdx.z,
                     r.error.c_str()));
}

}  // namespace tcf_emu

using namespace tcf_emu;

// ------------------------------------------------------------------ CUDA runtime subset
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return t_last_error; }

const char *cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t error) {
  if (error != cudaSuccess && error == t_message_code && !t_message.empty()) return t_message.c_str();
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaGetDeviceCount(int *count) {
  if (count == nullptr) return t_last_error = cudaErrorInvalidValue;
  *count = kMaxDevices;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int *device) {
  if (device == nullptr) return t_last_error = cudaErrorInvalidValue;
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= kMaxDevices) return t_last_error = cudaErrorInvalidDevice;
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return t_last_error = cudaErrorInvalidValue;
  if (device < 0 || device >= kMaxDevices) return t_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: {
      const int sms = g_sm_count[device].load();
      g_sm_read[device] = true;
      *value = sms > 0 ? sms : kDefaultSmCount;
      return cudaSuccess;
    }
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimX: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimY: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxBlockDimZ: *value = 64; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(g_grid_limit[0].load()); return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(g_grid_limit[1].load()); return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(g_grid_limit[2].load()); return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
  }
  return t_last_error = cudaErrorInvalidValue;
}

cudaError_t cudaMemsetAsync(void *ptr, int value, size_t count, cudaStream_t) {
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) return t_last_error = cudaErrorInvalidValue;
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attr, const void *func) {
  if (attr == nullptr || func == nullptr) return t_last_error = cudaErrorInvalidValue;
  *attr = cudaFuncAttributes{0, 0, 0, 1024, 0, 0, 0};
  return cudaSuccess;
}

// ------------------------------------------------------------------ control API
// 0 on success; -1: device out of range or sm_count < 0; -2: the device's SM
// count was already read with another value (callers cache it per device:
// use another device index for another count). sm_count 0 keeps the count.
int tcf_emu_set_device(int device, int sm_count) {
  if (device < 0 || device >= kMaxDevices || sm_count < 0) return -1;
  if (sm_count > 0) {
    const int old = g_sm_count[device].load();
    const int effective = old > 0 ? old : kDefaultSmCount;
    if (g_sm_read[device].load() && effective != sm_count) return -2;
    g_sm_count[device] = sm_count;
  }
  t_device = device;
  return 0;
}

void tcf_emu_set_grid_limits(unsigned x, unsigned y, unsigned z) {
  g_grid_limit[0] = x ? x : 2147483647u;
  g_grid_limit[1] = y ? y : 65535u;
  g_grid_limit[2] = z ? z : 65535u;
}

void tcf_emu_set_order(int threads, int blocks) {
  g_thread_order = threads;
  g_block_order = blocks;
}

void tcf_emu_counters(unsigned long long out[4]) {
  for (int i = 0; i < 4; ++i) out[i] = g_counters[i].load();
}

const char *tcf_emu_last_message(void) { return t_message.c_str(); }

}  // extern "C"
