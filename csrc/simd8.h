// 8-float AVX2 helpers shared by the CPU decode kernels (csrc/decode_linear, csrc/llama_decode):
// load 8 weights of any supported dtype widened to float32, horizontal sum, and rounding 8 floats to
// a dtype T and back (what storing them in a T tensor does). Call only from COFI_TARGET_AVX2 code.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <type_traits>

namespace cofi {

#define COFI_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

COFI_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
COFI_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
COFI_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

COFI_AVX2_INLINE float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// v rounded to T and widened back: bf16 round-to-nearest-even on the bits (NaN stays NaN), fp16 by
// F16C, float unchanged; c10's scalar conversions give the same values.
template <typename T>
COFI_AVX2_INLINE __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb),
                                       _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

}  // namespace cofi
