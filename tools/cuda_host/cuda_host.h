// Host execution of the torch-free CUDA kernels (csrc/*/*_cuda.cu) for tests without a GPU.
//
// Force-included (g++ -include) into a .cu that tools/cuda_host/hostify.py rewrote: every thread of
// a block is a real std::thread, blocks of a grid run one after another on the same threads, and
// __syncthreads is a barrier that a thread leaves when its kernel returns (as an exited GPU thread
// does). Warp shuffles and votes exchange values through per-warp slots between two warp barriers.
// __shared__ variables are function-local statics (one block runs at a time), filled with 0xFF bytes
// (NaN floats, invalid bools) when each block starts, so a read before the block wrote them shows.
// The point is executing the kernels under ThreadSanitizer / AddressSanitizer + UBSan with exact
// arithmetic; nothing here models timing or warp-synchronous execution without an explicit sync.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ CUDA runtime types and errors
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);

// ------------------------------------------------------------------ qualifiers and built-ins
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__ static
// hostify.py rewrites `__shared__ T name[...];` into a static plus a cuda_host::shared_mark call;
// this definition only covers a declaration it did not recognise (no poisoning, still shared).
#define __shared__ static
#define __syncthreads() ::cuda_host::syncthreads(__LINE__)
#define __syncwarp(...) ::cuda_host::syncwarp()

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

namespace cuda_host {

[[noreturn]] void die(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void set_last_error(cudaError_t e);

void syncthreads(int line);
void syncwarp();
void shared_mark(void* p, std::size_t bytes);
void* dynamic_shared_base();
unsigned active_warp_mask();

// Writes `bytes` bytes of v into this lane's exchange slot, waits for the warp, reads lane src's slot
// (src < 0: own value), waits again. mask must name every lane of the warp that has not exited.
void warp_exchange(unsigned mask, const void* v, void* out, std::size_t bytes, int src, const char* what);
int lane_id();
unsigned warp_ballot(unsigned mask, int pred);

template <class T>
T dynamic_shared() {
  return static_cast<T>(dynamic_shared_base());
}

template <class T>
T shfl_from(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  T r;
  warp_exchange(mask, &v, &r, sizeof(T), src, what);
  return r;
}

// ------------------------------------------------------------------ launches
void run_grid(dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& body);

// `kernel<<<grid, block, smem, stream>>>(args)` becomes `cuda_host::Launch(grid, block, smem, stream)(kernel, args)`.
struct Launch {
  dim3 grid, block;
  std::size_t smem;
  Launch(dim3 g, dim3 b, std::size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}

  template <class... P, class... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    // Converted once on the launching thread, as the CUDA runtime copies the parameter buffer.
    const std::tuple<std::remove_cv_t<P>...> params(static_cast<P>(std::forward<A>(args))...);
    run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

// ------------------------------------------------------------------ registry of extern "C" launchers
struct Arg {
  enum Kind { Ptr, Int, Float } kind = Ptr;
  void* p = nullptr;
  long long i = 0;
  double f = 0.0;
};

using Invoker = std::function<long long(const Arg*, std::size_t)>;
void register_launcher(const char* name, std::size_t n_args, Invoker fn);
// Calls the registered launcher `name` (dies when there is none or the argument count differs).
long long call_launcher(const char* name, const Arg* args, std::size_t n_args);

template <class P>
P take(const Arg& a, std::size_t idx, const char* name) {
  if constexpr (std::is_pointer_v<P>) {
    if (a.kind != Arg::Ptr) die("%s: argument %zu must be a pointer", name, idx);
    return static_cast<P>(a.p);
  } else if constexpr (std::is_integral_v<P> || std::is_enum_v<P>) {
    if (a.kind != Arg::Int) die("%s: argument %zu must be an integer", name, idx);
    using I = std::conditional_t<std::is_enum_v<P>, int, P>;
    if (!std::in_range<I>(a.i)) die("%s: argument %zu = %lld does not fit its type", name, idx, a.i);
    return static_cast<P>(a.i);
  } else {
    static_assert(std::is_floating_point_v<P>, "unsupported launcher parameter type");
    if (a.kind != Arg::Float) die("%s: argument %zu must be a float", name, idx);
    return static_cast<P>(a.f);
  }
}

template <class R, class... P, std::size_t... I>
long long invoke(R (*f)(P...), const Arg* a, const char* name, std::index_sequence<I...>) {
  return static_cast<long long>(f(take<P>(a[I], I, name)...));
}

struct Registrar {
  template <class R, class... P>
  Registrar(const char* name, R (*f)(P...)) {
    register_launcher(name, sizeof...(P), [f, name](const Arg* a, std::size_t) {
      return invoke(f, a, name, std::index_sequence_for<P...>{});
    });
  }
};

}  // namespace cuda_host

// ------------------------------------------------------------------ warp intrinsics
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = cuda_host::lane_id();
  return cuda_host::shfl_from(mask, v, (lane / width) * width + (src % width), "__shfl_sync");
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int lane = cuda_host::lane_id(), src = lane ^ lane_mask;
  return cuda_host::shfl_from(mask, v, src / width == lane / width ? src : -1, "__shfl_xor_sync");
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_host::lane_id(), src = lane + static_cast<int>(delta);
  return cuda_host::shfl_from(mask, v, src / width == lane / width ? src : -1, "__shfl_down_sync");
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_host::lane_id(), src = lane - static_cast<int>(delta);
  return cuda_host::shfl_from(mask, v, src >= 0 && src / width == lane / width ? src : -1, "__shfl_up_sync");
}
unsigned __ballot_sync(unsigned mask, int pred);
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == (mask & cuda_host::active_warp_mask()); }
inline unsigned __activemask() { return cuda_host::active_warp_mask(); }

// ------------------------------------------------------------------ atomics (device-wide, relaxed)
template <class T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <class T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}
template <class T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, std::memory_order_relaxed);
  return expected;
}
template <class T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (v < old && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ------------------------------------------------------------------ math intrinsics (exact host versions)
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(unsigned x) { return std::countl_zero(x); }
inline int __ffs(unsigned x) { return x ? std::countr_zero(x) + 1 : 0; }
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline int min(int a, int b) { return std::min(a, b); }
inline int max(int a, int b) { return std::max(a, b); }
inline unsigned min(unsigned a, unsigned b) { return std::min(a, b); }
inline unsigned max(unsigned a, unsigned b) { return std::max(a, b); }
inline long min(long a, long b) { return std::min(a, b); }
inline long max(long a, long b) { return std::max(a, b); }
inline long long min(long long a, long long b) { return std::min(a, b); }
inline long long max(long long a, long long b) { return std::max(a, b); }
inline unsigned long min(unsigned long a, unsigned long b) { return std::min(a, b); }
inline unsigned long max(unsigned long a, unsigned long b) { return std::max(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
