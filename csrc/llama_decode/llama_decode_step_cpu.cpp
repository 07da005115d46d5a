// cofi::llama_decode_step: every layer of the compact Llama runtime for one new token per row, in
// one call (inference, CPU). It exists to take per-op Python dispatch out of decoding: a layer is
// ~20 small ops, ~5 us each from Python, which at batch 1 is a quarter of a pruned SmolLM2's token
// time; from C++ each costs ~1 us. The math is LlamaRuntime's per-op path for S == 1 with a cache
// (python/cofi/runtime/llama_runtime.py), step for step: RMSNorm, the fused q/k/v projection and
// RoPE (transformers' rotate_half), the cache written in place, attention of each query head over its
// K/V group, o_proj, RMSNorm, gate/up, silu * up, down; projections through decode_linear's kernel.
// The residual add + RMSNorm and the one-query attention are plain loops here (float32 math, one
// rounding to the model dtype per stored value): for a few rows, ATen's rms_norm and SDPA spend
// 30-60 us each on dispatch and set-up, more than the work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
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

// r [B, d] (+)= delta [B, d] (when given, rounded to T like an eager add); y = r * rstd(r) * w.
template <typename T>
void add_rms_norm(T* r, const T* delta, const T* w, T* y, int64_t B, int64_t d, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    T* rb = r + b * d;
    if (delta) {
      const T* db = delta + b * d;
      for (int64_t k = 0; k < d; ++k) rb[k] = static_cast<T>(static_cast<float>(rb[k]) + static_cast<float>(db[k]));
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < d; ++k) {
      const float v = static_cast<float>(rb[k]);
      ss += v * v;
    }
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    T* yb = y + b * d;
    for (int64_t k = 0; k < d; ++k) yb[k] = static_cast<T>(static_cast<float>(rb[k]) * rstd * static_cast<float>(w[k]));
  }
}

Tensor add_rms_norm(Tensor& r, const Tensor& delta, const Tensor& w, double eps) {
  Tensor y = at::empty_like(r);
  const Tensor dc = delta.defined() ? delta.contiguous() : delta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "llama_decode_step", [&] {
    add_rms_norm<scalar_t>(r.data_ptr<scalar_t>(), dc.defined() ? dc.data_ptr<scalar_t>() : nullptr,
                           w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), r.size(0), r.size(1), static_cast<float>(eps));
  });
  return y;
}

// One query per row: ctx[b, h] = softmax(scale q[b, h] . K[b, g(h), :T]) V[b, g(h), :T], with
// g(h) = h / n; positions whose mask [B, T] is false are left out. q: [B, G * n, D] contiguous;
// caches [B, G, cap, D] contiguous. Returns [B, G * n * D].
template <typename T>
void decode_attention(const T* q, const T* kc, const T* vc, const bool* mask, T* ctx, int64_t B, int64_t G, int64_t n,
                      int64_t cap, int64_t len, int64_t D, float scale) {
  at::parallel_for(0, B * G, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> sc(len), acc(D);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / G, g = p % G;
      const T* K = kc + (b * G + g) * cap * D;
      const T* V = vc + (b * G + g) * cap * D;
      const bool* mb = mask ? mask + b * len : nullptr;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t h = g * n + j;
        const T* qh = q + (b * G * n + h) * D;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) {
          if (mb && !mb[t]) {
            sc[t] = -std::numeric_limits<float>::infinity();
            continue;
          }
          const T* kt = K + t * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t e = 0; e < D; ++e) s += static_cast<float>(qh[e]) * static_cast<float>(kt[e]);
          sc[t] = s * scale;
          mx = std::max(mx, sc[t]);
        }
        float den = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = (mb && !mb[t]) ? 0.f : std::exp(sc[t] - mx);
          den += sc[t];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < len; ++t) {
          if (sc[t] == 0.f) continue;
          const float pt = sc[t];
          const T* vt = V + t * D;
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) acc[e] += pt * static_cast<float>(vt[e]);
        }
        T* out = ctx + (b * G * n + h) * D;
        const float inv = 1.f / den;
        for (int64_t e = 0; e < D; ++e) out[e] = static_cast<T>(acc[e] * inv);
      }
    }
  });
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
  Tensor r = r_in.contiguous().clone();
  Tensor pending;  // the last sublayer's output, added to r by the next add_rms_norm (or at the end)
  const OptT m2 = mask.has_value() && mask->defined() ? OptT(mask->reshape({B, -1}).contiguous()) : OptT();
  if (m2) {
    TORCH_CHECK(m2->scalar_type() == at::kBool && m2->size(1) == start + 1,
                "cofi::llama_decode_step: mask must be bool [B, 1, 1, start + 1] = [", B, ", 1, 1, ", start + 1,
                "], got ", mask->sizes(), " ", mask->scalar_type());
  }
  auto flush = [&]() {
    if (pending.defined()) {
      r.add_(pending);
      pending = Tensor();
    }
  };
  for (int64_t i = 0; i < L; ++i) {
    const OptT* p = params.data() + kPerLayer * i;
    const int64_t hq = dims[3 * i], hk = dims[3 * i + 1], width = dims[3 * i + 2];
    if (hq > 0) {
      const Tensor y = add_rms_norm(r, pending, need(p[0], "ln1", i), eps);
      pending = Tensor();
      const Tensor qkv = decode_linear_cpu(y, need(p[1], "qkv_w", i), p[2]).view({B, hq + 2 * hk, D});
      const Tensor qk = qkv.narrow(1, 0, hq + hk);
      const Tensor rot = at::cat({qk.narrow(2, half, D - half).neg(), qk.narrow(2, 0, half)}, -1);
      const Tensor qk2 = qk * c + rot * s;
      const Tensor& kc = k_cache[i];
      const Tensor& vc = v_cache[i];
      for (const Tensor* t : {&kc, &vc}) {
        TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == hk && t->size(2) > start && t->size(3) == D &&
                        t->is_contiguous() && t->scalar_type() == r.scalar_type(),
                    "cofi::llama_decode_step: layer ", i, " K/V cache must be contiguous ", r.scalar_type(), " [", B,
                    ", ", hk, ", > ", start, ", ", D, "], got ", t->scalar_type(), " ", t->sizes());
      }
      kc.select(2, start).copy_(qk2.narrow(1, hq, hk));
      vc.select(2, start).copy_(qkv.narrow(1, hq + hk, hk));
      const Tensor q = qk2.narrow(1, 0, hq).contiguous();
      Tensor ctx = at::empty({B, hq * D}, r.options());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "llama_decode_step", [&] {
        decode_attention<scalar_t>(q.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                                   m2 ? m2->data_ptr<bool>() : nullptr, ctx.data_ptr<scalar_t>(), B, hk, hq / hk,
                                   kc.size(2), start + 1, D, static_cast<float>(scale));
      });
      pending = decode_linear_cpu(ctx, need(p[3], "o_w", i), p[4]);
    } else if (p[5].has_value() && p[5]->defined()) {
      flush();
      r.add_(*p[5]);
    }
    if (width > 0) {
      const Tensor y = add_rms_norm(r, pending, need(p[6], "ln2", i), eps);
      pending = Tensor();
      const Tensor gu = decode_linear_cpu(y, need(p[7], "gu_w", i), p[8]);
      const Tensor h = at::silu(gu.narrow(1, 0, width)) * gu.narrow(1, width, width);
      pending = decode_linear_cpu(h, need(p[9], "down_w", i), p[10]);
    } else if (p[11].has_value() && p[11]->defined()) {
      flush();
      r.add_(*p[11]);
    }
  }
  flush();
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("llama_decode_step", &llama_decode_step_cpu); }

}  // namespace cofi
