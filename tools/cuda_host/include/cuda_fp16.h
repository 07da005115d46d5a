// Host-harness __half: IEEE binary16 storage with round-to-nearest-even conversions (GCC's _Float16),
// as CUDA's __float2half / __half2float. Only the conversions the kernels use; no __half arithmetic
// (the extension is built with __CUDA_NO_HALF_OPERATORS__ too).
#pragma once
#include <bit>
#include <cstdint>

struct __half {
  uint16_t bits;
};
using half = __half;

inline float __half2float(__half h) { return static_cast<float>(std::bit_cast<_Float16>(h.bits)); }
inline __half __float2half(float f) { return __half{std::bit_cast<uint16_t>(static_cast<_Float16>(f))}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __half{std::bit_cast<uint16_t>(static_cast<_Float16>(d))}; }
