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

}  // namespace cofi
