// cofi::llama_decode_step: every layer of the compact Llama runtime for one new token per row, in
// one call (inference, CPU). It exists to take per-op dispatch out of decoding: a layer is ~20 small
// ops, ~5 us each from Python and 1-8 us each even from C++ (allocation, dispatch, set-up), which at
// batch 1 is a fifth of a pruned SmolLM2's token time, more than the work. The math is
// LlamaRuntime's per-op path for S == 1 with a cache (python/cofi/runtime/llama_runtime.py), step
// for step: RMSNorm, the fused q/k/v projection and RoPE (transformers' rotate_half), the cache
// written in place, attention of each query head over its K/V group, o_proj, RMSNorm, gate/up,
// silu * up, down. Projections run decode_linear's kernel; everything else is plain loops over
// float32 work buffers allocated once per call. Each value is rounded to the model dtype T where
// the per-op path stores a T tensor (after every projection, product, sum and norm), so bf16 / fp16
// steps round as eager does; float32 math is that of the eager ops up to summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>
#include <xmmintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../decode_linear/decode_linear.h"
#include "../fast_math.h"
#include "../simd8.h"

namespace cofi {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kPerLayer = 12;  // ln1, qkv_w, qkv_b, o_w, o_b, attn_bias, ln2, gu_w, gu_b, down_w, down_b, mlp_bias

// Value v rounded to T (what storing it in a T tensor does), kept as float.
template <typename T>
inline float rnd(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<T>(v));
  }
}

const Tensor& need(const OptT& t, const char* what, int64_t layer) {
  TORCH_CHECK(t.has_value() && t->defined(), "cofi::llama_decode_step: layer ", layer, " needs ", what);
  return *t;
}

// A parameter of the expected shape, the step's dtype and contiguous, or a one-line refusal.
const Tensor& param(const OptT& t, const char* what, int64_t layer, at::IntArrayRef shape, at::ScalarType dt) {
  const Tensor& p = need(t, what, layer);
  TORCH_CHECK(p.sizes() == shape && p.scalar_type() == dt && p.is_contiguous(), "cofi::llama_decode_step: layer ",
              layer, " ", what, " must be contiguous ", dt, " ", shape, ", got ", p.scalar_type(), " ", p.sizes(),
              p.is_contiguous() ? "" : " (not contiguous)");
  return p;
}

template <typename T>
const T* opt_ptr(const OptT& t, const char* what, int64_t layer, int64_t n, at::ScalarType dt) {
  if (!t.has_value() || !t->defined()) return nullptr;
  return param(t, what, layer, {n}, dt).template data_ptr<T>();
}

// r += pend (the last sublayer's output, not yet added), rounded like an eager add.
template <typename T>
void flush_pending(float* r, const float* pend, int64_t n) {
  for (int64_t k = 0; k < n; ++k) r[k] = rnd<T>(r[k] + pend[k]);
}

// r [B, d] (+)= delta [B, d] (when given, rounded like an eager add); y = r * rstd(r) * w, rounded.
template <typename T>
COFI_TARGET_AVX2 void add_rms_norm_avx2(float* r, const float* delta, const T* w, float* y, int64_t B, int64_t d,
                                        float eps) {
  const int64_t d8 = d / 8 * 8;
  for (int64_t b = 0; b < B; ++b) {
    float* rb = r + b * d;
    const float* db = delta ? delta + b * d : nullptr;
    __m256 ss8 = _mm256_setzero_ps();
    for (int64_t k = 0; k < d8; k += 8) {
      __m256 v = _mm256_loadu_ps(rb + k);
      if (db) {
        v = round8<T>(_mm256_add_ps(v, _mm256_loadu_ps(db + k)));
        _mm256_storeu_ps(rb + k, v);
      }
      ss8 = _mm256_fmadd_ps(v, v, ss8);
    }
    float ss = hsum(ss8);
    for (int64_t k = d8; k < d; ++k) {
      if (db) rb[k] = rnd<T>(rb[k] + db[k]);
      ss += rb[k] * rb[k];
    }
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    const __m256 rs = _mm256_set1_ps(rstd);
    float* yb = y + b * d;
    for (int64_t k = 0; k < d8; k += 8)
      _mm256_storeu_ps(yb + k, round8<T>(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(rb + k), rs), load8(w + k))));
    for (int64_t k = d8; k < d; ++k) yb[k] = rnd<T>(rb[k] * rstd * static_cast<float>(w[k]));
  }
}

template <typename T>
void add_rms_norm(float* r, const float* delta, const T* w, float* y, int64_t B, int64_t d, float eps) {
  if (cpu_has_avx2()) return add_rms_norm_avx2<T>(r, delta, w, y, B, d, eps);
  for (int64_t b = 0; b < B; ++b) {
    float* rb = r + b * d;
    if (delta) {
      const float* db = delta + b * d;
      for (int64_t k = 0; k < d; ++k) rb[k] = rnd<T>(rb[k] + db[k]);
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < d; ++k) ss += rb[k] * rb[k];
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    float* yb = y + b * d;
    for (int64_t k = 0; k < d; ++k) yb[k] = rnd<T>(rb[k] * rstd * static_cast<float>(w[k]));
  }
}

// This thread's share [i0, i1) of n attention items (query heads of every row), the same split
// for the prefetch and the attention loop.
inline std::pair<int64_t, int64_t> my_share(int64_t n) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  return {n * t / nt, n * (t + 1) / nt};
}

// Asks for (into L2) the K/V rows [0, len) that attention items [i0, i1) will read: the cache was
// written steps ago and the weights streamed since have evicted it, and read on demand its
// few-KiB rows come in one miss at a time; fetched while the q/k/v projection runs, they are there.
template <typename T>
void prefetch_kv(const T* kc, const T* vc, int64_t hq, int64_t hk, int64_t cap, int64_t len, int64_t D, int64_t i0,
                 int64_t i1) {
  int64_t last = -1;
  for (int64_t bh = i0; bh < i1; ++bh) {
    const int64_t pair = bh / hq * hk + (bh % hq) / (hq / hk);
    if (pair == last) continue;
    last = pair;
    for (const T* base : {kc, vc}) {
      const char* p = reinterpret_cast<const char*>(base + pair * cap * D);
      const char* end = p + len * D * static_cast<int64_t>(sizeof(T));
      for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
    }
  }
}

// Parameters and caches of one layer, checked before the parallel region (which must not throw).
template <typename T>
struct Layer {
  int64_t hq = 0, hk = 0, width = 0, cap = 0;
  const T *ln1 = nullptr, *qkv_b = nullptr, *o_b = nullptr, *attn_bias = nullptr;
  const T *ln2 = nullptr, *gu_b = nullptr, *down_b = nullptr, *mlp_bias = nullptr;
  const Tensor *qkv_w = nullptr, *o_w = nullptr, *gu_w = nullptr, *down_w = nullptr;
  T *kc = nullptr, *vc = nullptr;
};

// Inside the parallel region: y [B, N] = x [B, K] w^T (+ bias), rounded to T (decode_linear's
// operation), its tiles shared out by a guided schedule (large contiguous chunks first, small
// ones at the end, so a thread the machine delays does not hold the other up); ends in a barrier.
template <typename T>
void project(const Tensor& w, const T* bias, const float* x, const float* xq, float* y, int64_t B) {
  const int64_t N = w.size(0), unit = decode_linear_tile(w), tiles = (N + unit - 1) / unit;
#pragma omp for schedule(guided, 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n0 = t * unit, n1 = std::min(N, n0 + unit);
    decode_linear_rows(w, x, xq, nullptr, y, B, n0, n1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = n0; j < n1; ++j) y[b * N + j] = rnd<T>(y[b * N + j] + (bias ? static_cast<float>(bias[j]) : 0.f));
  }
}

// r (+)= v [d] for every row, rounded (a removed sublayer's bias).
template <typename T>
void add_row(float* r, const T* v, int64_t B, int64_t d) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < d; ++k) r[b * d + k] = rnd<T>(r[b * d + k] + static_cast<float>(v[k]));
}

// One query per row, query head h of row b: ctx[b, h] = softmax(scale q[b, h] . K[b, g, :len])
// V[b, g, :len] with g = h / n; positions whose mask [B, len] is false are left out. q: [B, G n, D];
// caches [B, G, cap, D]; ctx [B, G n, D], rounded to T; sc: len scratch floats, acc: D. Plain loops
// (CPUs without AVX2, or D not a multiple of 8); exp is fast_math's exp_fast (~1 ulp).
template <typename T>
void attend_impl(const float* q, const T* kc, const T* vc, const bool* mask, float* ctx, int64_t b, int64_t h, int64_t G,
                 int64_t n, int64_t cap, int64_t len, int64_t D, float scale, float* sc, float* acc) {
  const int64_t g = h / n;
  const T* K = kc + (b * G + g) * cap * D;
  const T* V = vc + (b * G + g) * cap * D;
  const bool* mb = mask ? mask + b * len : nullptr;
  const float* qh = q + (b * G * n + h) * D;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = K + t * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t e = 0; e < D; ++e) s += qh[e] * static_cast<float>(kt[e]);
    sc[t] = s * scale;
    if (!mb || mb[t]) mx = std::max(mx, sc[t]);
  }
  float den = 0.f;
#pragma omp simd reduction(+ : den)
  for (int64_t t = 0; t < len; ++t) {
    const float p = (mb && !mb[t]) ? 0.f : exp_fast(sc[t] - mx);
    sc[t] = p;
    den += p;
  }
  std::fill(acc, acc + D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const float pt = sc[t];
    if (pt == 0.f) continue;
    const T* vt = V + t * D;
#pragma omp simd
    for (int64_t e = 0; e < D; ++e) acc[e] += pt * static_cast<float>(vt[e]);
  }
  float* out = ctx + (b * G * n + h) * D;
  const float inv = 1.f / den;
  for (int64_t e = 0; e < D; ++e) out[e] = rnd<T>(acc[e] * inv);
}

// The same with AVX2 intrinsics, for D a multiple of 8 (dot products 8 lanes wide, exp 8 scores at a
// time with fast_math's exp_poly; masked scores are -inf, whose exp_poly is exactly 0).
template <typename T>
COFI_TARGET_AVX2 void attend_avx2(const float* q, const T* kc, const T* vc, const bool* mask, float* ctx, int64_t b,
                                  int64_t h, int64_t G, int64_t n, int64_t cap, int64_t len, int64_t D, float scale,
                                  float* sc, float* acc) {
  const int64_t g = h / n;
  const T* K = kc + (b * G + g) * cap * D;
  const T* V = vc + (b * G + g) * cap * D;
  const bool* mb = mask ? mask + b * len : nullptr;
  const float* qh = q + (b * G * n + h) * D;
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  for (int64_t t = 0; t < len; ++t) {
    const T* kt = K + t * D;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 16 <= D; e += 16) {
      s0 = _mm256_fmadd_ps(load8(kt + e), _mm256_loadu_ps(qh + e), s0);
      s1 = _mm256_fmadd_ps(load8(kt + e + 8), _mm256_loadu_ps(qh + e + 8), s1);
    }
    if (e < D) s0 = _mm256_fmadd_ps(load8(kt + e), _mm256_loadu_ps(qh + e), s0);
    const float st = (mb && !mb[t]) ? ninf : hsum(_mm256_add_ps(s0, s1)) * scale;
    sc[t] = st;
    mx = std::max(mx, st);
  }
  __m256 den8 = _mm256_setzero_ps();
  const __m256 mx8 = _mm256_set1_ps(mx);
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) {
    const __m256 p = (__m256)exp_poly<v8f, v8i>((v8f)_mm256_sub_ps(_mm256_loadu_ps(sc + t), mx8));
    _mm256_storeu_ps(sc + t, p);
    den8 = _mm256_add_ps(den8, p);
  }
  float den = hsum(den8);
  for (; t < len; ++t) {
    sc[t] = exp_scalar(sc[t] - mx);
    den += sc[t];
  }
  for (int64_t e = 0; e < D; e += 8) _mm256_storeu_ps(acc + e, _mm256_setzero_ps());
  for (int64_t u = 0; u < len; ++u) {
    if (sc[u] == 0.f) continue;
    const __m256 pt = _mm256_set1_ps(sc[u]);
    const T* vt = V + u * D;
    for (int64_t e = 0; e < D; e += 8) _mm256_storeu_ps(acc + e, _mm256_fmadd_ps(pt, load8(vt + e), _mm256_loadu_ps(acc + e)));
  }
  float* out = ctx + (b * G * n + h) * D;
  const __m256 inv = _mm256_set1_ps(1.f / den);
  for (int64_t e = 0; e < D; e += 8) _mm256_storeu_ps(out + e, round8<T>(_mm256_mul_ps(_mm256_loadu_ps(acc + e), inv)));
}

template <typename T>
void attend(const float* q, const T* kc, const T* vc, const bool* mask, float* ctx, int64_t b, int64_t h, int64_t G,
            int64_t n, int64_t cap, int64_t len, int64_t D, float scale, float* sc, float* acc) {
  if (cpu_has_avx2() && D % 8 == 0) {
    attend_avx2<T>(q, kc, vc, mask, ctx, b, h, G, n, cap, len, D, scale, sc, acc);
  } else {
    attend_impl<T>(q, kc, vc, mask, ctx, b, h, G, n, cap, len, D, scale, sc, acc);
  }
}

// h[k] = silu(gu[k]) * gu[width + k] for k < width, the silu and the product each rounded to T.
template <typename T>
COFI_TARGET_AVX2 void silu_mul_avx2(const float* gu, float* h, int64_t width) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t k = 0;
  for (; k + 8 <= width; k += 8) {
    const __m256 g = _mm256_loadu_ps(gu + k);
    const __m256 e = (__m256)exp_poly<v8f, v8i>((v8f)_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 sg = round8<T>(_mm256_div_ps(g, _mm256_add_ps(one, e)));
    _mm256_storeu_ps(h + k, round8<T>(_mm256_mul_ps(sg, _mm256_loadu_ps(gu + width + k))));
  }
  for (; k < width; ++k) h[k] = rnd<T>(rnd<T>(gu[k] / (1.f + exp_scalar(-gu[k]))) * gu[width + k]);
}

template <typename T>
void silu_mul(const float* gu, float* h, int64_t width) {
  if (cpu_has_avx2()) {
    silu_mul_avx2<T>(gu, h, width);
  } else {
    for (int64_t k = 0; k < width; ++k) h[k] = rnd<T>(rnd<T>(gu[k] / (1.f + exp_fast(-gu[k]))) * gu[width + k]);
  }
}

// RoPE (x * cos + rotate_half(x) * sin, each product and the sum rounded as eager does) on the
// q and k heads of qkv [B, hq + 2 hk, D]: q heads to q [B, hq, D]; k heads, and v as they are,
// to position `start` of the caches [B, hk, cap, D].
template <typename T>
void rope_and_cache(const float* qkv, const T* cos, const T* sin, float* q, T* kc, T* vc, int64_t B, int64_t hq,
                    int64_t hk, int64_t cap, int64_t start, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    const T* cb = cos + b * D;
    const T* sb = sin + b * D;
    for (int64_t h = 0; h < hq + 2 * hk; ++h) {
      const float* x = qkv + (b * (hq + 2 * hk) + h) * D;
      if (h >= hq + hk) {
        T* out = vc + ((b * hk + (h - hq - hk)) * cap + start) * D;
        for (int64_t e = 0; e < D; ++e) out[e] = static_cast<T>(x[e]);
        continue;
      }
      float rot[kMaxHeadDim];
      for (int64_t e = 0; e < D; ++e) {
        const float other = e < half ? -x[e + half] : x[e - half];
        rot[e] = rnd<T>(rnd<T>(x[e] * static_cast<float>(cb[e])) + rnd<T>(other * static_cast<float>(sb[e])));
      }
      if (h < hq) {
        std::copy(rot, rot + D, q + (b * hq + h) * D);
      } else {
        T* out = kc + ((b * hk + (h - hq)) * cap + start) * D;
        for (int64_t e = 0; e < D; ++e) out[e] = static_cast<T>(rot[e]);
      }
    }
  }
}

// Every layer, in one parallel region: projections and attention are shared out among the
// threads; the small per-row work between them (norms, RoPE, silu * up) runs on one thread while
// the others wait at the barrier (it takes a few microseconds; a fork / join per projection, as a
// parallel_for per op would do, costs about as much each time).
template <typename T>
Tensor run_step(const Tensor& r_in, const std::vector<OptT>& params, at::IntArrayRef dims, const Tensor& cos,
                const Tensor& sin, at::TensorList k_cache, at::TensorList v_cache, int64_t start, const bool* mask,
                int64_t D, float eps, const OptT& norm_w, const OptT& head_w) {
  const int64_t L = static_cast<int64_t>(k_cache.size()), B = r_in.size(0), d = r_in.size(1);
  const auto dt = r_in.scalar_type();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  std::vector<Layer<T>> layers(L);
  int64_t max_qkv = 0, max_width = 0, max_q = 0;
  for (int64_t i = 0; i < L; ++i) {
    const OptT* p = params.data() + kPerLayer * i;
    Layer<T>& l = layers[i];
    l.hq = dims[3 * i], l.hk = dims[3 * i + 1], l.width = dims[3 * i + 2];
    if (l.hq > 0) {
      TORCH_CHECK(l.hk > 0 && l.hq % l.hk == 0, "cofi::llama_decode_step: layer ", i,
                  " query heads must be a positive multiple of K/V heads, got ", l.hq, " and ", l.hk);
      const int64_t nqkv = (l.hq + 2 * l.hk) * D;
      for (const Tensor* t : {&k_cache[i], &v_cache[i]}) {
        TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == l.hk && t->size(2) > start &&
                        t->size(3) == D && t->is_contiguous() && t->scalar_type() == dt,
                    "cofi::llama_decode_step: layer ", i, " K/V cache must be contiguous ", dt, " [", B, ", ", l.hk,
                    ", > ", start, ", ", D, "], got ", t->scalar_type(), " ", t->sizes());
      }
      l.ln1 = param(p[0], "ln1", i, {d}, dt).template data_ptr<T>();
      l.qkv_w = &param(p[1], "qkv_w", i, {nqkv, d}, dt);
      l.qkv_b = opt_ptr<T>(p[2], "qkv_b", i, nqkv, dt);
      l.o_w = &param(p[3], "o_w", i, {d, l.hq * D}, dt);
      l.o_b = opt_ptr<T>(p[4], "o_b", i, d, dt);
      l.kc = k_cache[i].data_ptr<T>(), l.vc = v_cache[i].data_ptr<T>(), l.cap = k_cache[i].size(2);
      max_qkv = std::max(max_qkv, nqkv), max_q = std::max(max_q, l.hq * D);
    } else {
      l.attn_bias = opt_ptr<T>(p[5], "attn_bias", i, d, dt);
    }
    if (l.width > 0) {
      l.ln2 = param(p[6], "ln2", i, {d}, dt).template data_ptr<T>();
      l.gu_w = &param(p[7], "gu_w", i, {2 * l.width, d}, dt);
      l.gu_b = opt_ptr<T>(p[8], "gu_b", i, 2 * l.width, dt);
      l.down_w = &param(p[9], "down_w", i, {d, l.width}, dt);
      l.down_b = opt_ptr<T>(p[10], "down_b", i, d, dt);
      max_width = std::max(max_width, l.width);
    } else {
      l.mlp_bias = opt_ptr<T>(p[11], "mlp_bias", i, d, dt);
    }
  }
  const T* fnorm = head_w ? param(norm_w, "the final norm", L, {d}, dt).template data_ptr<T>() : nullptr;
  const Tensor* head = head_w ? &param(head_w, "lm_head", L, {head_w->size(0), d}, dt) : nullptr;
  const int64_t V = head ? head->size(0) : 0;
  // x and, for bf16 weights, x in the kernel's read order (decode_linear_permute) for each projection
  std::vector<float> r(B * d), pend(B * d), y(B * d), yq(B * d), qkv(B * max_qkv), q(B * max_q), ctx(B * max_q),
      ctxq(B * max_q), gu(B * 2 * max_width), h(B * max_width), hq(B * max_width);
  const bool perm = decode_linear_permutes(dt);
  const Tensor rc = r_in.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const T* rp = rc.data_ptr<T>();
  for (int64_t k = 0; k < B * d; ++k) r[k] = static_cast<float>(rp[k]);
  const T *cp = cc.data_ptr<T>(), *sp = sc.data_ptr<T>();
  const int64_t len = start + 1;
  auto permute = [&](const float* x, float* xq, int64_t K) {
    if (perm) decode_linear_permute(x, xq, B, K);
  };
  // the result: logits [B, V] after the final norm and head when given (float32 ones written in place), else r
  Tensor out = at::empty({B, head ? V : d}, r_in.options());
  std::vector<float> logit_buf(std::is_same_v<T, float> ? 0 : B * V);
  float* logits = head ? (std::is_same_v<T, float> ? reinterpret_cast<float*>(out.data_ptr()) : logit_buf.data()) : nullptr;
  // Whether pend holds the last sublayer's output, not yet added to r (by the next norm or at the
  // end). Every thread keeps its own copy, updated identically outside the single sections, so no
  // barrier is spent on a flag.
  bool pending_at_end = false;
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  {
    std::vector<float> scores(len), acc(D);
    bool pending = false;
    // a removed sublayer's bias: r += pend (if pending) + bias, on one thread
    auto add_bias = [&](const T* bias) {
#pragma omp single
      {
        if (pending) flush_pending<T>(r.data(), pend.data(), B * d);
        add_row<T>(r.data(), bias, B, d);
      }
      pending = false;
    };
    for (int64_t i = 0; i < L; ++i) {
      const Layer<T>& l = layers[i];
      if (l.hq > 0) {
#pragma omp single
        {
          add_rms_norm<T>(r.data(), pending ? pend.data() : nullptr, l.ln1, y.data(), B, d, eps);
          permute(y.data(), yq.data(), d);
        }
        pending = false;
        const auto [i0, i1] = my_share(B * l.hq);
        prefetch_kv<T>(l.kc, l.vc, l.hq, l.hk, l.cap, len, D, i0, i1);
        project<T>(*l.qkv_w, l.qkv_b, y.data(), perm ? yq.data() : y.data(), qkv.data(), B);
#pragma omp single
        rope_and_cache<T>(qkv.data(), cp, sp, q.data(), l.kc, l.vc, B, l.hq, l.hk, l.cap, start, D);
        for (int64_t bh = i0; bh < i1; ++bh)
          attend<T>(q.data(), l.kc, l.vc, mask, ctx.data(), bh / l.hq, bh % l.hq, l.hk, l.hq / l.hk, l.cap, len, D,
                    scale, scores.data(), acc.data());
#pragma omp barrier
        if (perm) {
#pragma omp single
          permute(ctx.data(), ctxq.data(), l.hq * D);
        }
        project<T>(*l.o_w, l.o_b, ctx.data(), perm ? ctxq.data() : ctx.data(), pend.data(), B);
        pending = true;
      } else if (l.attn_bias) {
        add_bias(l.attn_bias);
      }
      if (l.width > 0) {
#pragma omp single
        {
          add_rms_norm<T>(r.data(), pending ? pend.data() : nullptr, l.ln2, y.data(), B, d, eps);
          permute(y.data(), yq.data(), d);
        }
        pending = false;
        project<T>(*l.gu_w, l.gu_b, y.data(), perm ? yq.data() : y.data(), gu.data(), B);
#pragma omp single
        {
          for (int64_t b = 0; b < B; ++b) silu_mul<T>(gu.data() + b * 2 * l.width, h.data() + b * l.width, l.width);
          permute(h.data(), hq.data(), l.width);
        }
        project<T>(*l.down_w, l.down_b, h.data(), perm ? hq.data() : h.data(), pend.data(), B);
        pending = true;
      } else if (l.mlp_bias) {
        add_bias(l.mlp_bias);
      }
    }
    if (head) {
#pragma omp single
      {
        if (pending) flush_pending<T>(r.data(), pend.data(), B * d);
        add_rms_norm<T>(r.data(), nullptr, fnorm, y.data(), B, d, eps);
        permute(y.data(), yq.data(), d);
      }
      pending = false;
      project<T>(*head, nullptr, y.data(), perm ? yq.data() : y.data(), logits, B);
    }
#pragma omp single nowait
    pending_at_end = pending;
  }
  if (head) {
    if constexpr (!std::is_same_v<T, float>) {
      T* op = out.data_ptr<T>();
      for (int64_t k = 0; k < B * V; ++k) op[k] = static_cast<T>(logits[k]);
    }
    return out;
  }
  if (pending_at_end) flush_pending<T>(r.data(), pend.data(), B * d);
  T* op = out.data_ptr<T>();
  for (int64_t k = 0; k < B * d; ++k) op[k] = static_cast<T>(r[k]);
  return out;
}

// r: [B, d] residual stream of the new tokens; cos, sin: [B, D] at their positions; dims: per layer
// (query heads after padding to whole groups, K/V heads, SwiGLU width), 0 = sublayer absent;
// k_cache / v_cache: per layer [B, G_l, T, D] (an empty tensor without attention), positions < start filled;
// mask: [B, 1, 1, start + 1] bool (true = attend) or none (every cached position visible).
// norm [d], lm_head [V, d]: when given, the final RMSNorm and the head run too.
// Returns r after the last layer (before the final norm), or the logits [B, V] when lm_head is
// given; writes position `start` of the caches.
Tensor llama_decode_step_cpu(const Tensor& r_in, const std::vector<OptT>& params, at::IntArrayRef dims,
                             const Tensor& cos, const Tensor& sin, at::TensorList k_cache, at::TensorList v_cache,
                             int64_t start, const OptT& mask, int64_t head_dim, double eps, const OptT& norm,
                             const OptT& lm_head) {
  const int64_t L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(r_in.dim() == 2 && r_in.size(0) <= kDecodeLinearMaxRows,
              "cofi::llama_decode_step: r must be [B, d] with B <= ", kDecodeLinearMaxRows, ", got ", r_in.sizes());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kPerLayer * L && static_cast<int64_t>(dims.size()) == 3 * L &&
                  static_cast<int64_t>(v_cache.size()) == L,
              "cofi::llama_decode_step: ", L, " layers need ", kPerLayer * L, " params, ", 3 * L, " dims and ", L,
              " value caches; got ", params.size(), ", ", dims.size(), ", ", v_cache.size());
  TORCH_CHECK(start >= 1, "cofi::llama_decode_step: start must be >= 1 (decoding after a prefill), got ", start);
  const int64_t B = r_in.size(0), D = head_dim;
  const auto dt = r_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "cofi::llama_decode_step: r must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(D > 0 && D % 2 == 0 && D <= kMaxHeadDim, "cofi::llama_decode_step: head_dim must be even and in [2, ", kMaxHeadDim, "], got ", D);
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == D && t->scalar_type() == dt,
                "cofi::llama_decode_step: cos / sin must be ", dt, " [", B, ", ", D, "], got ", t->scalar_type(), " ",
                t->sizes());
  }
  const OptT m2 = mask.has_value() && mask->defined() ? OptT(mask->reshape({B, -1}).contiguous()) : OptT();
  if (m2) {
    TORCH_CHECK(m2->scalar_type() == at::kBool && m2->size(1) == start + 1,
                "cofi::llama_decode_step: mask must be bool [B, 1, 1, start + 1] = [", B, ", 1, 1, ", start + 1,
                "], got ", mask->sizes(), " ", mask->scalar_type());
  }
  const bool* mp = m2 ? m2->data_ptr<bool>() : nullptr;
  const OptT head = lm_head.has_value() && lm_head->defined() ? lm_head : OptT();
  TORCH_CHECK(!head || head->dim() == 2, "cofi::llama_decode_step: lm_head must be [V, d], got ", head->sizes());
  const float e = static_cast<float>(eps);
  switch (dt) {
    case at::kFloat: return run_step<float>(r_in, params, dims, cos, sin, k_cache, v_cache, start, mp, D, e, norm, head);
    case at::kBFloat16: return run_step<c10::BFloat16>(r_in, params, dims, cos, sin, k_cache, v_cache, start, mp, D, e, norm, head);
    default: return run_step<c10::Half>(r_in, params, dims, cos, sin, k_cache, v_cache, start, mp, D, e, norm, head);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("llama_decode_step", &llama_decode_step_cpu); }

}  // namespace cofi
