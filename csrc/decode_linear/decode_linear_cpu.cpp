// CPU kernel of cofi::decode_linear: y = x w^T + b for a few rows of x (incremental decoding),
// reading the weight once at close to the machine's read bandwidth.
//
// Why: a decode step is a chain of matrix-vector products whose weights do not fit in cache, so
// its speed is the rate at which the weights stream from memory. At one to eight rows torch's
// F.linear reaches about half of this 2-core machine's streaming read rate in fp32 (12-14 of ~28
// GB/s; benchmarks/bench_decode_linear.py) and a few GB/s at 8 rows. Here each thread streams its
// own contiguous block of weight rows: R rows at a time (R read streams of 3-4 KiB, see stream_rows,
// dot products against every x row while the rows sit in L1), accumulating in float32.
//
// Weights float32, bfloat16 or float16 (x has the weight's dtype); products and sums are float32
// and y is rounded once to x's dtype (the operation torch's half GEMMs perform, to summation order).
// bfloat16 -> float32 is a 16-bit shift (an unpack against zero), float16 -> float32 F16C's vcvtph2ps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "decode_linear.h"
#include "../fast_math.h"
#include "../simd8.h"

namespace cofi {
namespace {

template <typename W>
inline float to_float(W v) {
  return static_cast<float>(v);
}

// Baseline (any x86-64 / other CPU): plain loops.
template <typename W>
void rows_scalar(const W* w, const float* x, const float* b, float* y, int64_t n0, int64_t n1, int64_t M,
                 int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += to_float(wr[k]) * xr[k];
      y[m * N + n] = s + (b ? b[n] : 0.f);
    }
  }
}

// Rows per read stream. A tile reads its R rows side by side, one stream per row; a stream shorter
// than ~4 KiB ends before the hardware prefetcher has ramped up, so short rows (bf16 of 1-2 KiB,
// fp32 under 4 KiB) are grouped: stream i of a tile covers S consecutive rows and the tile is R S
// rows, done in S passes (pass j: rows i S + j), each stream running on through its rows. Measured
// on this 2-core AVX2 machine (bf16, K = 384-640): 0.75-0.85 of the read bandwidth as R single rows,
// 0.95-1.0 with 3-4 KiB streams.
constexpr int64_t kStreamBytes = 4096;
constexpr int64_t kMaxStreamRows = 4;
inline int64_t stream_rows(int64_t row_bytes) {
  return std::clamp<int64_t>((kStreamBytes + row_bytes - 1) / std::max<int64_t>(1, row_bytes), 1, kMaxStreamRows);
}

// R weight rows (row i at w + i * ld) against MB rows of x: y[m * N + i * ys] for i < R, m < MB.
template <int R, int MB, typename W>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void tile(const W* w, const float* x, float* y,
                                                                          int64_t N, int64_t K, int64_t ld,
                                                                          int64_t ys) {
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < R; ++i) acc[m][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int i = 0; i < R; ++i) {
      const __m256 wv = load8(w + i * ld + k);
      for (int m = 0; m < MB; ++m) acc[m][i] = _mm256_fmadd_ps(wv, xv[m], acc[m][i]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int i = 0; i < R; ++i) {
      float s = hsum(acc[m][i]);
      for (int64_t kk = k; kk < K; ++kk) s += to_float(w[i * ld + kk]) * x[m * K + kk];
      y[m * N + i * ys] = s;
    }
  }
}

// bfloat16: 16 weights per load widened by unpacking against zero (no lane-crossing convert), which
// yields elements {0-3, 8-11} and {4-7, 12-15} of each 16; xq holds x in that order (permute_bf16).
template <int R, int MB>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void tile_bf16(const c10::BFloat16* w, const float* x,
                                                                          const float* xq, float* y, int64_t N,
                                                                          int64_t K, int64_t ld, int64_t ys) {
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < R; ++i) acc[m][i] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 xl[MB], xh[MB];
    for (int m = 0; m < MB; ++m) {
      xl[m] = _mm256_loadu_ps(xq + m * K + k);
      xh[m] = _mm256_loadu_ps(xq + m * K + k + 8);
    }
    for (int i = 0; i < R; ++i) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ld + k));
      const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, h));
      const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, h));
      for (int m = 0; m < MB; ++m) {
        acc[m][i] = _mm256_fmadd_ps(lo, xl[m], acc[m][i]);
        acc[m][i] = _mm256_fmadd_ps(hi, xh[m], acc[m][i]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int i = 0; i < R; ++i) {
      float s = hsum(acc[m][i]);
      for (int64_t kk = K16; kk < K; ++kk) s += to_float(w[i * ld + kk]) * x[m * K + kk];
      y[m * N + i * ys] = s;
    }
  }
}

// x [M, K] -> the order tile_bf16 reads whole 16-blocks in (the tail past K / 16 * 16 is unused).
void permute_bf16(const float* x, float* xq, int64_t M, int64_t K) {
  static constexpr int kOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k + 16 <= K; k += 16)
      for (int j = 0; j < 16; ++j) xq[m * K + k + j] = x[m * K + k + kOrder[j]];
}

// One tile of R weight rows (pitch ld, outputs ys apart) against MB x rows for any weight type
// (xq: x in bf16 unpack order, read only for bfloat16 weights).
template <int R, int MB, typename W>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void tile_any(const W* w, const float* x,
                                                                              const float* xq, float* y, int64_t N,
                                                                              int64_t K, int64_t ld, int64_t ys) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    tile_bf16<R, MB>(w, x, xq, y, N, K, ld, ys);
  } else {
    tile<R, MB>(w, x, y, N, K, ld, ys);
  }
}

// Rows [n, n1) in tiles of R streams of S rows (stream_rows), then single R-row tiles, then rows
// one at a time; advances n past what it did.
template <int R, int MB, typename W>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void streams(const W* w, const float* x,
                                                                             const float* xq, float* y, int64_t& n,
                                                                             int64_t n1, int64_t N, int64_t K) {
  const int64_t S = stream_rows(K * static_cast<int64_t>(sizeof(W)));
  for (; n + R * S <= n1; n += R * S)
    for (int64_t j = 0; j < S; ++j) tile_any<R, MB>(w + (n + j) * K, x, xq, y + n + j, N, K, S * K, S);
  for (; n + R <= n1; n += R) tile_any<R, MB>(w + n * K, x, xq, y + n, N, K, K, 1);
}

// 3-8 rows of x: one weight row against all of them at a time, so the weight streams in one pass
// (x, at most 8 rows, stays in L1 / L2); 4 weight rows against 2 x rows per pass would stream the
// weight during only the first of M / 2 passes.
template <int MB, typename W>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void one_pass(const W* w, const float* x,
                                                                              const float* xq, float* y, int64_t n0,
                                                                              int64_t n1, int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; ++n) tile_any<1, MB>(w + n * K, x, xq, y + n, N, K, K, 1);
}

// Rows [n0, n1) of w against all M rows of x. One x row: 8 weight rows in flight; two: 4 weight
// rows against both; more: one_pass.
template <typename W>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const W* w, const float* x, const float* xq, const float* b,
                                                        float* y, int64_t n0, int64_t n1, int64_t M, int64_t N,
                                                        int64_t K) {
  int64_t n = n0;
  if (M == 1) {
    streams<8, 1>(w, x, xq, y, n, n1, N, K);
    for (; n < n1; ++n) tile_any<1, 1>(w + n * K, x, xq, y + n, N, K, K, 1);
  } else if (M > 2) {
    switch (M) {
      case 3: one_pass<3>(w, x, xq, y, n0, n1, N, K); break;
      case 4: one_pass<4>(w, x, xq, y, n0, n1, N, K); break;
      case 5: one_pass<5>(w, x, xq, y, n0, n1, N, K); break;
      case 6: one_pass<6>(w, x, xq, y, n0, n1, N, K); break;
      case 7: one_pass<7>(w, x, xq, y, n0, n1, N, K); break;
      default: one_pass<8>(w, x, xq, y, n0, n1, N, K); break;
    }
  } else {
    streams<4, 2>(w, x, xq, y, n, n1, N, K);
    for (; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) tile_any<1, 1>(w + n * K, x + m * K, xq + m * K, y + m * N + n, N, K, K, 1);
  }
  if (b) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = n0; j < n1; ++j) y[m * N + j] += b[j];
  }
}


}  // namespace

bool decode_linear_permutes(at::ScalarType w_dtype) { return cpu_has_avx2() && w_dtype == at::kBFloat16; }

void decode_linear_permute(const float* x, float* xq, int64_t M, int64_t K) { permute_bf16(x, xq, M, K); }

void decode_linear_rows(const at::Tensor& w, const float* x, const float* xq, const float* b, float* y, int64_t M,
                        int64_t n0, int64_t n1) {
  const int64_t N = w.size(0), K = w.size(1);
  const bool simd = cpu_has_avx2();
  auto go = [&](auto* wp) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    if (simd) {
      rows_avx2<W>(wp, x, xq, b, y, n0, n1, M, N, K);
    } else {
      rows_scalar<W>(wp, x, b, y, n0, n1, M, N, K);
    }
  };
  switch (w.scalar_type()) {
    case at::kFloat: go(w.const_data_ptr<float>()); break;
    case at::kBFloat16: go(w.const_data_ptr<c10::BFloat16>()); break;
    default: go(w.const_data_ptr<c10::Half>()); break;
  }
}

int64_t decode_linear_tile(const at::Tensor& w) { return 8 * stream_rows(w.size(1) * w.element_size()); }

namespace {

// Rows per parallel task: whole tiles, at least ~64 KiB of weight each (below that a task's
// start-up costs more than its reads).
int64_t task_rows(const at::Tensor& w) {
  const int64_t row = std::max<int64_t>(1, w.size(1) * w.element_size()), tile = decode_linear_tile(w);
  return std::max<int64_t>(tile, ((1 << 16) / row + tile - 1) / tile * tile);
}

// y [M, N] = x [M, K] w^T (+ b), float32 in and out, w contiguous float32 / bfloat16 / float16.
void run_f32(const at::Tensor& w, const float* x, const float* b, float* y, int64_t M) {
  const int64_t N = w.size(0), K = w.size(1);
  if (M == 0 || N == 0) return;
  std::vector<float> xq;
  if (decode_linear_permutes(w.scalar_type())) {
    xq.resize(static_cast<size_t>(M * K));
    decode_linear_permute(x, xq.data(), M, K);
  }
  const float* xqp = xq.empty() ? x : xq.data();
  const int64_t grain = task_rows(w);
  at::parallel_for(0, (N + grain - 1) / grain, 1, [&](int64_t t0, int64_t t1) {
    decode_linear_rows(w, x, xqp, b, y, M, t0 * grain, std::min(N, t1 * grain));
  });
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "cofi::decode_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "cofi::decode_linear: w must be [N, K], got ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "cofi::decode_linear: x [M, K] and w [N, K] must share K, got x ", x.sizes(),
              " and w ", w.sizes());
  TORCH_CHECK(x.size(0) <= kDecodeLinearMaxRows, "cofi::decode_linear: x must have at most ", kDecodeLinearMaxRows, " rows, got ",
              x.size(0));
  const auto dt = w.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "cofi::decode_linear: w must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.scalar_type() == dt, "cofi::decode_linear: x must have w's dtype ", dt, ", got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cofi::decode_linear: CPU tensors only");
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "cofi::decode_linear: bias must be [N] = [",
                w.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "cofi::decode_linear: bias must have w's dtype ", dt, ", got ",
                bias->scalar_type());
    bf = bias->to(at::kFloat).contiguous();
  }
  const int64_t M = x.size(0), N = w.size(0);
  const at::Tensor wc = w.contiguous();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor yf = at::empty({M, N}, x.options().dtype(at::kFloat));
  run_f32(wc, xf.data_ptr<float>(), bf.defined() ? bf.data_ptr<float>() : nullptr, yf.data_ptr<float>(), M);
  return dt == at::kFloat ? yf : yf.to(dt);
}

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace cofi
