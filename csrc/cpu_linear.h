// y = x w^T (+ b) for the CPU kernels: split over output columns when there are few rows.
//
// With a [M, K] x [K, N] GEMM and small M (batch-1 inference: M = 128 tokens), MKL's own threading
// splits the rows, so every thread packs the whole weight; at M <= 256 on this 2-core Zen 3 that
// made wide layers (N = 3072) up to 1.35x slower, narrow ones (N ~ 750) 0-15 %. Here each thread
// instead runs a single-threaded GEMM on its own slice of w's rows (a block of output columns), which
// packs each weight element once. Large M keeps BLAS's threading (it wins there). Measured in
// benchmarks/README.md (cpu_linear, runtime). Same BLAS kernel per element: results equal the plain
// at::addmm to rounding (bitwise at the sizes measured).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

#include "env_flag.h"

namespace cofi {
namespace cpu {

// Rows up to which the column split is used; above it BLAS's row split is as fast or faster.
constexpr int64_t kColumnSplitMaxRows = 256;

// COFI_GEMM_SPLIT=0 turns the split off (A/B timing in benchmarks/bench_cpu_linear.py; read per call
// so a process can toggle it).
inline bool column_split_enabled() { return env_flag_on("COFI_GEMM_SPLIT"); }

// x: [M, K]; w: [N, K] (a weight, row-major); b: [N] or undefined. Returns [M, N] contiguous.
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  const int64_t M = x.size(0), N = w.size(0);
  const int64_t threads = at::get_num_threads();
  if (!x.is_cpu() || threads < 2 || N < 64 * threads || M > kColumnSplitMaxRows || M == 0 ||
      at::in_parallel_region() || !column_split_enabled()) {
    return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
  }
  // One slice per thread for narrow outputs, two per thread (evens out uneven cores) from 512
  // columns per thread; slice widths a multiple of 16 (whole SIMD tiles of the BLAS kernel).
  const int64_t parts = N >= 512 * threads ? 2 * threads : threads;
  const int64_t block = ((N + parts - 1) / parts + 15) / 16 * 16;
  at::Tensor y = at::empty({M, N}, x.options());
  const at::ThreadLocalState state;  // worker threads get the caller's inference / grad mode
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s = p * block, n = std::min(N, s + block) - s;
      if (n <= 0) continue;
      at::Tensor out = y.narrow(1, s, n);  // inside the parallel region BLAS runs single-threaded
      if (b.defined()) {
        at::addmm_out(out, b.narrow(0, s, n), x, w.narrow(0, s, n).t());
      } else {
        at::mm_out(out, x, w.narrow(0, s, n).t());
      }
    }
  });
  return y;
}

}  // namespace cpu
}  // namespace cofi
