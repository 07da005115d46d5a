// Branch-free float exp/log (Cephes polynomials, ~1 ulp) for CPU kernel loops that GCC vectorises.
// Shared by the float fast paths of the op kernels; see the notes at their call sites for why
// scalar libm is avoided (the extension is built for the x86-64-v2 baseline).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#define COFI_INLINE static inline __attribute__((always_inline))

// Run-time AVX2 + FMA + F16C: the extension is built for the x86-64-v2 baseline, so hot loops are
// compiled a second time with COFI_TARGET_AVX2 and picked per call with cpu_has_avx2().
#if defined(__x86_64__) && defined(__GNUC__)
#define COFI_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// COFI_CPU_AVX2=0 in the environment (read once) turns the AVX2 paths off, to test the baseline ones.
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c") && !(std::getenv("COFI_CPU_AVX2") &&
                                                             std::string_view(std::getenv("COFI_CPU_AVX2")) == "0");
  return ok;
}
#else
#define COFI_TARGET_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

COFI_INLINE float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log for positive normal x (u and 1 - u, u in (eps, 1 - eps)).
COFI_INLINE float log_fast(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = float(int32_t((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const float small = float(m < 0.707106781186547524f);
  e = e - small;
  m = m + small * m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// GCC vector extensions: 8 floats per step in every clone (AVX2 in a COFI_TARGET_AVX2 function, 2x SSE in
// the baseline) without relying on the auto-vectoriser's if-conversion rules.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <typename V, typename I>
__attribute__((always_inline)) inline V exp_poly(V x) {
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  V s;
  std::memcpy(&s, &e, sizeof(s));
  return x < lo ? V{} : p * s;
}

__attribute__((always_inline)) inline float exp_scalar(float x) {
  typedef float v1f __attribute__((vector_size(4)));
  typedef int32_t v1i __attribute__((vector_size(4)));
  v1f v = {x};
  return exp_poly<v1f, v1i>(v)[0];
}
