// cofi::decode_linear's CPU kernel, for the native decoding step (csrc/llama_decode) to call directly.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace cofi {

// Most rows of x the kernel takes; beyond it a GEMM reuses each weight well enough.
constexpr int64_t kDecodeLinearMaxRows = 8;

// x: [M, K] (M <= kDecodeLinearMaxRows), w: [N, K], bias: [N] or none, all float32, bfloat16 or float16
// (one dtype). Returns [M, N] in that dtype: products and sums in float32, rounded once.
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// Its pieces on raw float32 rows, for a caller that runs them in its own parallel region (no ATen
// call, no throw): rows [n0, n1) of y [M, N] = x [M, K] w^T (+ b) (w contiguous [N, K] float32,
// bfloat16 or float16; y written, not rounded) need xq, x in the kernel's bf16 read order when
// decode_linear_permutes(w's dtype) (decode_linear_permute writes it; else pass x); row ranges are
// best whole tiles (decode_linear_tile(w) rows; a rest is done in smaller steps).
bool decode_linear_permutes(at::ScalarType w_dtype);
void decode_linear_permute(const float* x, float* xq, int64_t M, int64_t K);
void decode_linear_rows(const at::Tensor& w, const float* x, const float* xq, const float* b, float* y, int64_t M,
                        int64_t n0, int64_t n1);
int64_t decode_linear_tile(const at::Tensor& w);

}  // namespace cofi
