// SPDX-License-Identifier: Apache-2.0
//
// simt_host.h: compile CUDA kernel sources as plain C++ with the host compiler
// and run them on the CPU (the CUDA analogue of TRITON_INTERPRET). The shim
// headers in include/ (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h,
// cuda_runtime_api.h) route the kernels' CUDA includes here, so the sources
// stay unchanged except for their launches, which go through
// TCF_LAUNCH(kernel, grid, block, smem, stream)(args...).
//
// Execution model (simt_runtime.cpp):
//   * a launch runs to completion before it returns, blocks one after another
//     (x fastest; optionally in reverse order);
//   * the threads of a block are cooperative fibers on one OS thread: a thread
//     runs until it reaches __syncthreads() or a warp operation, then the next
//     one runs; a barrier opens when every thread it names has arrived;
//   * a barrier that can never open (a thread exited or waits elsewhere),
//     threads of one warp or block waiting at different call sites, a shuffle
//     mask naming absent lanes, or a bad launch configuration fail the launch:
//     cudaGetLastError() returns an error whose cudaGetErrorString() explains it;
//   * __shared__ variables are static thread_local: one instance, reused by
//     each block in turn (as uninitialized as on the device);
//   * fp32 arithmetic is the host's IEEE arithmetic without contraction
//     (build with -ffp-contract=off): __fadd_rn & co. are exact, but where nvcc
//     would fuse a plain a * b + c into an FMA the device's last bit may differ;
//   * fp16/bf16 conversions round to nearest even; NaN becomes the canonical
//     0x7fff, as in the CUDA headers' host paths.
#pragma once

#if defined(__CUDACC__)
#error "simt_host.h emulates CUDA with the host compiler; nvcc builds use the CUDA headers"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local

// ------------------------------------------------------------------ vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ------------------------------------------------------------------ built-in variables
// Set by the scheduler before it resumes a thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// Device code calls these unqualified.
using std::isfinite;
using std::isinf;
using std::isnan;

// ------------------------------------------------------------------ bit casts
namespace tcf_emu {
template <typename To, typename From>
inline To bit_cast(const From &v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}
}  // namespace tcf_emu

inline float __uint_as_float(unsigned v) { return tcf_emu::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return tcf_emu::bit_cast<unsigned>(v); }
inline float __int_as_float(int v) { return tcf_emu::bit_cast<float>(v); }
inline int __float_as_int(float v) { return tcf_emu::bit_cast<int>(v); }

// ------------------------------------------------------------------ fp32 intrinsics
// IEEE round-to-nearest-even single operations (no contraction across them).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// ------------------------------------------------------------------ fp16 / bf16
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };
typedef __half half;

namespace tcf_emu {
// float -> IEEE binary16, round to nearest even (overflow to inf, subnormals).
inline unsigned short float_to_half_rn(float f) {
  const unsigned x = bit_cast<unsigned>(f);
  const unsigned sign = (x >> 16) & 0x8000u;
  const unsigned ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<unsigned short>(ax == 0x7f800000u ? sign | 0x7c00u : 0x7fffu);
  if (ax >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
  unsigned r, rem, halfway;
  if (ax >= 0x38800000u) {  // normal in binary16: drop 13 mantissa bits, rebias
    r = (ax - 0x38000000u) >> 13;
    rem = ax & 0x1fffu;
    halfway = 0x1000u;
  } else if (ax < 0x33000000u) {  // below half the smallest subnormal: +-0
    return static_cast<unsigned short>(sign);
  } else {  // subnormal in binary16 (2^-25 <= |f| < 2^-14)
    const unsigned shift = 126u - (ax >> 23);  // 14..24
    const unsigned mant = (ax & 0x7fffffu) | 0x800000u;
    r = mant >> shift;
    rem = mant & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  }
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;  // a carry may reach the exponent: right
  return static_cast<unsigned short>(sign | r);
}

inline float half_to_float(unsigned short h) {
  const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
  const unsigned exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero / subnormal: mant * 2^-24, exact in fp32
  const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// float -> bfloat16, round to nearest even.
inline unsigned short float_to_bfloat16_rn(float f) {
  const unsigned x = bit_cast<unsigned>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_to_float(unsigned short b) {
  return bit_cast<float>(static_cast<unsigned>(b) << 16);
}
}  // namespace tcf_emu

inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __half{tcf_emu::float_to_half_rn(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return tcf_emu::half_to_float(h.__x); }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{tcf_emu::float_to_bfloat16_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return tcf_emu::bfloat16_to_float(b.__x); }

// ------------------------------------------------------------------ cache-hinted loads / stores
// The hints only matter to the memory system: plain accesses here.
#define TCF_EMU_STORE(name) \
  template <typename T>     \
  inline void name(T *p, T v) { *p = v; }
TCF_EMU_STORE(__stwb)
TCF_EMU_STORE(__stcg)
TCF_EMU_STORE(__stcs)
TCF_EMU_STORE(__stwt)
#undef TCF_EMU_STORE
#define TCF_EMU_LOAD(name) \
  template <typename T>    \
  inline T name(const T *p) { return *p; }
TCF_EMU_LOAD(__ldg)
TCF_EMU_LOAD(__ldca)
TCF_EMU_LOAD(__ldcg)
TCF_EMU_LOAD(__ldcs)
TCF_EMU_LOAD(__ldlu)
TCF_EMU_LOAD(__ldcv)
#undef TCF_EMU_LOAD

// ------------------------------------------------------------------ atomics and fences
// Blocks run one after another and the threads of a block on one OS thread, so
// device-wide ordering holds already; the atomic keeps concurrent launches from
// host threads well defined.
inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------ barriers and warp operations
namespace tcf_emu {
enum WarpOp { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3, kSyncWarp = 4 };
// Implemented by the scheduler; each suspends the calling thread until its
// barrier opens. file/line name the call site in diagnostics.
void sync_block(const char *file, int line);
unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                           const char *file, int line);

template <typename T>
inline T shfl(int op, unsigned mask, T var, int arg, int width, const char *file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "shuffles move values of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_op(op, mask, bits, arg, width, file, line);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}
}  // namespace tcf_emu

inline void __syncthreads(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  tcf_emu::sync_block(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char *file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  tcf_emu::warp_op(tcf_emu::kSyncWarp, mask, 0, 0, warpSize, file, line);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tcf_emu::shfl(tcf_emu::kShflIdx, mask, var, src_lane, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tcf_emu::shfl(tcf_emu::kShflUp, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tcf_emu::shfl(tcf_emu::kShflDown, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tcf_emu::shfl(tcf_emu::kShflXor, mask, var, lane_mask, width, file, line);
}

// ------------------------------------------------------------------ launches
namespace tcf_emu {
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char *kernel;  // the kernel expression as written at the launch
};
using Body = void (*)(void *ctx);
// Runs the whole grid, each thread calling body(ctx); a failure is reported
// through cudaGetLastError().
void launch(const LaunchConfig &config, Body body, void *ctx);

template <typename... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), const LaunchConfig &config) : kernel_(kernel), config_(config) {}

  template <typename... A>
  void operator()(A &&...args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    // Converted once, as the kernel's parameters; every thread gets copies.
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch(config_, [](void *p) {
      Ctx *c = static_cast<Ctx *>(p);
      std::apply(c->kernel, c->params);
    }, &ctx);
  }

 private:
  void (*kernel_)(P...);
  LaunchConfig config_;
};

template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t stream, const char *name) {
  return Launch<P...>(kernel, LaunchConfig{grid, block, smem, stream, name});
}
}  // namespace tcf_emu

#define TCF_LAUNCH(kernel, grid, block, smem, stream) \
  ::tcf_emu::make_launch(kernel, grid, block, smem, stream, #kernel)
