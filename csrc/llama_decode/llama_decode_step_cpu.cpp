// cofi::llama_decode_step: every layer of the compact Llama runtime for one new token per row, in
// one call (inference, CPU). It exists to take per-op Python dispatch out of decoding: a layer is
// ~20 small ops, ~5 us each from Python, which at batch 1 is a quarter of a pruned SmolLM2's token
// time; from C++ each costs ~1 us. The math is LlamaRuntime's per-op path for S == 1 with a cache
// (python/cofi/runtime/llama_runtime.py), op for op: RMSNorm, the fused q/k/v projection and RoPE
// (transformers' rotate_half), the cache written in place, a K/V group's query heads as SDPA's query
// rows, o_proj, RMSNorm, gate/up, silu * up, down; projections through decode_linear's kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../decode_linear/decode_linear.h"

namespace cofi {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

constexpr int64_t kPerLayer = 12;  // ln1, qkv_w, qkv_b, o_w, o_b, attn_bias, ln2, gu_w, gu_b, down_w, down_b, mlp_bias

const Tensor& need(const OptT& t, const char* what, int64_t layer) {
  TORCH_CHECK(t.has_value() && t->defined(), "cofi::llama_decode_step: layer ", layer, " needs ", what);
  return *t;
}

// r: [B, d] residual stream of the new tokens; cos, sin: [B, D] at their positions; dims: per layer
// (query heads after padding to whole groups, K/V heads, SwiGLU width), 0 = sublayer absent;
// k_cache / v_cache: per layer [B, G_l, T, D] (an empty tensor without attention), positions < start filled;
// mask: [B, 1, 1, start + 1] bool (true = attend) or none (every cached position visible).
// Returns r after the last layer (before the final norm); writes position `start` of the caches.
Tensor llama_decode_step_cpu(const Tensor& r_in, const std::vector<OptT>& params, at::IntArrayRef dims,
                             const Tensor& cos, const Tensor& sin, at::TensorList k_cache, at::TensorList v_cache, int64_t start, const OptT& mask, int64_t head_dim,
                             double eps) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(r_in.dim() == 2 && r_in.size(0) <= kDecodeLinearMaxRows,
              "cofi::llama_decode_step: r must be [B, d] with B <= ", kDecodeLinearMaxRows, ", got ", r_in.sizes());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kPerLayer * L && static_cast<int64_t>(dims.size()) == 3 * L &&
                  static_cast<int64_t>(v_cache.size()) == L,
              "cofi::llama_decode_step: ", L, " layers need ", kPerLayer * L, " params, ", 3 * L, " dims and ", L,
              " value caches; got ", params.size(), ", ", dims.size(), ", ", v_cache.size());
  TORCH_CHECK(start >= 1, "cofi::llama_decode_step: start must be >= 1 (decoding after a prefill), got ", start);
  const int64_t B = r_in.size(0), d = r_in.size(1), D = head_dim, half = D / 2;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);  // [B, 1, D]: broadcast over heads
  Tensor r = r_in;
  for (int64_t i = 0; i < L; ++i) {
    const OptT* p = params.data() + kPerLayer * i;
    const int64_t hq = dims[3 * i], hk = dims[3 * i + 1], width = dims[3 * i + 2];
    if (hq > 0) {
      const Tensor y = at::rms_norm(r, {d}, need(p[0], "ln1", i), eps);
      const Tensor qkv = decode_linear_cpu(y, need(p[1], "qkv_w", i), p[2]).view({B, hq + 2 * hk, D});
      const Tensor qk = qkv.narrow(1, 0, hq + hk);
      const Tensor rot = at::cat({qk.narrow(2, half, D - half).neg(), qk.narrow(2, 0, half)}, -1);
      const Tensor qk2 = qk * c + rot * s;
      const Tensor& kc = k_cache[i];
      const Tensor& vc = v_cache[i];
      for (const Tensor* t : {&kc, &vc}) {
        TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == hk && t->size(2) > start && t->size(3) == D,
                    "cofi::llama_decode_step: layer ", i, " K/V cache must be [", B, ", ", hk, ", > ", start, ", ", D,
                    "], got ", t->sizes());
      }
      kc.select(2, start).copy_(qk2.narrow(1, hq, hk));
      vc.select(2, start).copy_(qkv.narrow(1, hq + hk, hk));
      const Tensor K = kc.narrow(2, 0, start + 1), V = vc.narrow(2, 0, start + 1);
      const Tensor qg = qk2.narrow(1, 0, hq).reshape({B, hk, hq / hk, D});
      const Tensor ctx = at::scaled_dot_product_attention(qg, K, V, mask, 0.0, false, scale).reshape({B, hq * D});
      r = r + decode_linear_cpu(ctx, need(p[3], "o_w", i), p[4]);
    } else if (p[5].has_value() && p[5]->defined()) {
      r = r + *p[5];
    }
    if (width > 0) {
      const Tensor y = at::rms_norm(r, {d}, need(p[6], "ln2", i), eps);
      const Tensor gu = decode_linear_cpu(y, need(p[7], "gu_w", i), p[8]);
      const Tensor h = at::silu(gu.narrow(1, 0, width)) * gu.narrow(1, width, width);
      r = r + decode_linear_cpu(h, need(p[9], "down_w", i), p[10]);
    } else if (p[11].has_value() && p[11]->defined()) {
      r = r + *p[11];
    }
  }
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("llama_decode_step", &llama_decode_step_cpu); }

}  // namespace cofi
