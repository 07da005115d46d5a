// CPU kernels of cofi::masked_ffn_fwd_native / masked_ffn_bwd_native.
//
// y = m * ((act(x w1^T + b1) * z) w2^T + b2) on the live units only: the live rows of w1 and
// columns of w2 are gathered once, both GEMMs go through ATen (MKL / oneDNN), and everything
// elementwise is one fused, vectorised epilogue per GEMM:
//   forward : h = acc + b1 (kept for backward), a = act(h) * (z * m)        -> second GEMM
//   backward: G = grad w2_live; dh = G * (z m) * act'(h), a_m = m * act(h) * z, and the
//             column sums sum_n dh (-> db1) and sum_n act(h) G (-> d int_z, d mlp_z)
// so fwd+bwd costs exactly the six GEMMs of a dense FFN, scaled by the live fraction.
// Activation codes: 0 = GELU (erf), 1 = GELU (tanh approximation), 2 = ReLU, 3 = SiLU (gated ops only).
//
// Gated FFN (masked_ffn_gated_*_native, SwiGLU / GeGLU / ReGLU): y = m * ((act(x wg^T + bg) * (x w1^T + b1)
// * z) w2^T + b2). The live rows of wg and w1 are stacked into one [2L, d] weight, so one GEMM gives
// H = [gate pre-activations | up projections] ([N, 2L], kept for backward); the epilogue writes
// a = act(g) * u * s, and in backward dH = [G s u act'(g) | G s act(g)] feeds dx = dH W and dW = dH^T x.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../autocast_guard.h"
#include "../cpu_linear.h"
#include "../fast_math.h"

namespace cofi {
namespace {

using at::vec::Vectorized;

constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kTanhK = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kTanhC = 0.044715;

// ---- activation and derivative, scalar and vector forms (identical formulas) --------------------

template <typename T>
inline T act_s(T h, int64_t act) {
  if (act == 0) return T(0.5) * h * (T(1) + std::erf(h * T(kSqrt1_2)));
  if (act == 1) return T(0.5) * h * (T(1) + std::tanh(T(kTanhK) * (h + T(kTanhC) * h * h * h)));
  if (act == 3) return h / (T(1) + std::exp(-h));
  return h > T(0) ? h : T(0);
}

template <typename T>
inline T dact_s(T h, int64_t act) {
  if (act == 0) return T(0.5) * (T(1) + std::erf(h * T(kSqrt1_2))) + h * T(kInvSqrt2Pi) * std::exp(T(-0.5) * h * h);
  if (act == 1) {
    T t = std::tanh(T(kTanhK) * (h + T(kTanhC) * h * h * h));
    return T(0.5) * (T(1) + t) + T(0.5) * h * (T(1) - t * t) * T(kTanhK) * (T(1) + T(3 * kTanhC) * h * h);
  }
  if (act == 3) {
    const T sg = T(1) / (T(1) + std::exp(-h));
    return sg * (T(1) + h * (T(1) - sg));
  }
  return h > T(0) ? T(1) : T(0);
}

template <typename T>
inline Vectorized<T> act_v(const Vectorized<T>& h, int64_t act) {
  using V = Vectorized<T>;
  if (act == 0) return V(T(0.5)) * h * (V(T(1)) + (h * V(T(kSqrt1_2))).erf());
  if (act == 1) return V(T(0.5)) * h * (V(T(1)) + (V(T(kTanhK)) * (h + V(T(kTanhC)) * h * h * h)).tanh());
  return at::vec::clamp_min(h, V(T(0)));
}

template <typename T>
inline Vectorized<T> dact_v(const Vectorized<T>& h, int64_t act) {
  using V = Vectorized<T>;
  if (act == 0)
    return V(T(0.5)) * (V(T(1)) + (h * V(T(kSqrt1_2))).erf()) + h * V(T(kInvSqrt2Pi)) * (V(T(-0.5)) * h * h).exp();
  if (act == 1) {
    V t = (V(T(kTanhK)) * (h + V(T(kTanhC)) * h * h * h)).tanh();
    return V(T(0.5)) * (V(T(1)) + t) +
           V(T(0.5)) * h * (V(T(1)) - t * t) * V(T(kTanhK)) * (V(T(1)) + V(T(3 * kTanhC)) * h * h);
  }
  return V::blendv(V(T(0)), V(T(1)), h > V(T(0)));
}

// ---- float fast path ------------------------------------------------------------------------
// This extension is compiled for the x86-64-v2 baseline without ATen's per-CPU-capability builds,
// so at::vec::Vectorized<float> is the generic 8-lane array whose erf/exp/tanh call scalar libm:
// measured ~3x slower than ATen's own AVX2 GELU on BERT-base sizes. The float epilogues therefore
// use branch-free polynomial erf/exp (A&S 7.1.26: |err| < 1.5e-7; Cephes expf) in plain loops that
// GCC vectorises, compiled twice: an AVX2+FMA clone chosen at run time and a baseline clone.
COFI_INLINE float erf_fast(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  return std::copysign(1.0f - poly * exp_fast(-ax * ax), x);
}

COFI_INLINE float tanh_fast(float u) {
  u = std::min(std::max(u, -15.0f), 15.0f);
  return 1.0f - 2.0f / (exp_fast(2.0f * u) + 1.0f);
}

// sigmoid(h) from e = exp(-|h|) <= 1 (no overflow, no cancellation in either tail); as a select, so
// GCC vectorises it (the plain 1 / (1 + exp(-h)) form measured 5x slower: not vectorised).
COFI_INLINE float sigmoid_fast(float h) {
  const float e = exp_fast(-std::fabs(h));
  const float r = 1.0f / (1.0f + e);
  return h >= 0.0f ? r : e * r;
}

COFI_INLINE float act_f(float h, int64_t act) {
  if (act == 0) return 0.5f * h * (1.0f + erf_fast(h * float(kSqrt1_2)));
  if (act == 1) return 0.5f * h * (1.0f + tanh_fast(float(kTanhK) * (h + float(kTanhC) * h * h * h)));
  if (act == 3) return h * sigmoid_fast(h);
  return h > 0.0f ? h : 0.0f;
}

COFI_INLINE float dact_f(float h, int64_t act) {
  if (act == 0) return 0.5f * (1.0f + erf_fast(h * float(kSqrt1_2))) + h * float(kInvSqrt2Pi) * exp_fast(-0.5f * h * h);
  if (act == 1) {
    const float t = tanh_fast(float(kTanhK) * (h + float(kTanhC) * h * h * h));
    return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * float(kTanhK) * (1.0f + float(3 * kTanhC) * h * h);
  }
  if (act == 3) {
    const float sg = sigmoid_fast(h);
    return sg * (1.0f + h * (1.0f - sg));
  }
  return h > 0.0f ? 1.0f : 0.0f;
}

// One row segment [j0, j1) of the forward epilogue; ACT is a template parameter so each loop is
// branch-free and vectorisable.
template <int ACT>
COFI_INLINE void fwd_seg_f(float* __restrict h, float* __restrict a, const float* __restrict b1,
                           const float* __restrict s, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const float v = h[j] + b1[j];
    h[j] = v;
    a[j] = act_f(v, ACT) * s[j];
  }
}

template <int ACT>
COFI_INLINE void bwd_seg_f(const float* __restrict h, float* __restrict g, float* __restrict am,
                           float* __restrict P, float* __restrict Q, const float* __restrict s, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    const float f = act_f(h[j], ACT);
    const float dh = g[j] * s[j] * dact_f(h[j], ACT);
    if (P) P[j] += f * g[j];
    if (am) am[j] = f * s[j];
    g[j] = dh;
    if (Q) Q[j] += dh;
  }
}

COFI_INLINE void fwd_rows_f(float* h, float* a, const float* b1, const float* s, int64_t N, int64_t L, int64_t j0,
                            int64_t j1, int64_t act) {
  for (int64_t n = 0; n < N; ++n) {
    if (act == 0) fwd_seg_f<0>(h + n * L, a + n * L, b1, s, j0, j1);
    else if (act == 1) fwd_seg_f<1>(h + n * L, a + n * L, b1, s, j0, j1);
    else fwd_seg_f<2>(h + n * L, a + n * L, b1, s, j0, j1);
  }
}

// P and Q are zeroed by the caller; am may be null.
COFI_INLINE void bwd_rows_f(const float* h, float* g, float* am, float* P, float* Q, const float* s, int64_t N,
                            int64_t L, int64_t j0, int64_t j1, int64_t act) {
  for (int64_t n = 0; n < N; ++n) {
    float* amr = am ? am + n * L : nullptr;
    if (act == 0) bwd_seg_f<0>(h + n * L, g + n * L, amr, P, Q, s, j0, j1);
    else if (act == 1) bwd_seg_f<1>(h + n * L, g + n * L, amr, P, Q, s, j0, j1);
    else bwd_seg_f<2>(h + n * L, g + n * L, amr, P, Q, s, j0, j1);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void fwd_rows_f_avx2(float* h, float* a, const float* b1, const float* s, int64_t N,
                                                          int64_t L, int64_t j0, int64_t j1, int64_t act) {
  fwd_rows_f(h, a, b1, s, N, L, j0, j1, act);
}
__attribute__((target("avx2,fma"))) void bwd_rows_f_avx2(const float* h, float* g, float* am, float* P, float* Q,
                                                          const float* s, int64_t N, int64_t L, int64_t j0, int64_t j1,
                                                          int64_t act) {
  bwd_rows_f(h, g, am, P, Q, s, N, L, j0, j1, act);
}
bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool have_avx2() { return false; }
#endif

void fwd_rows_f_base(float* h, float* a, const float* b1, const float* s, int64_t N, int64_t L, int64_t j0, int64_t j1,
                     int64_t act) {
  fwd_rows_f(h, a, b1, s, N, L, j0, j1, act);
}
void bwd_rows_f_base(const float* h, float* g, float* am, float* P, float* Q, const float* s, int64_t N, int64_t L,
                     int64_t j0, int64_t j1, int64_t act) {
  bwd_rows_f(h, g, am, P, Q, s, N, L, j0, j1, act);
}


// h[n, j] += b1[j]; a[n, j] = act(h[n, j]) * s[j]. Row blocks (no column sums needed here), so each
// task streams through contiguous memory.
template <typename T>
void epilogue_fwd(T* h, T* a, const T* b1, const T* s, int64_t N, int64_t L, int64_t act) {
  using V = Vectorized<T>;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)), [&](int64_t n0, int64_t n1) {
    if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
      if (have_avx2()) return fwd_rows_f_avx2(h + n0 * L, a + n0 * L, b1, s, n1 - n0, L, 0, L, act);
#endif
      return fwd_rows_f_base(h + n0 * L, a + n0 * L, b1, s, n1 - n0, L, 0, L, act);
    }
    for (int64_t n = n0; n < n1; ++n) {
      T* hr = h + n * L;
      T* ar = a + n * L;
      int64_t j = 0;
      for (; j + V::size() <= L; j += V::size()) {
        V hv = V::loadu(hr + j) + V::loadu(b1 + j);
        hv.store(hr + j);
        (act_v(hv, act) * V::loadu(s + j)).store(ar + j);
      }
      for (; j < L; ++j) {
        hr[j] += b1[j];
        ar[j] = act_s(hr[j], act) * s[j];
      }
    }
  });
}

// In place G -> dh = G * s * act'(h). Optional outputs: am = m * act(h) * z (= act(h) * s),
// P[j] = sum_n act(h) G, Q[j] = sum_n dh. Row blocks stream contiguous memory; the column sums are
// accumulated per block and added in block order (deterministic for a given thread count's blocks).
template <typename T>
void epilogue_bwd(const T* h, T* G, T* am, T* P, T* Q, const T* s, int64_t N, int64_t L, int64_t act) {
  using V = Vectorized<T>;
  const bool sums = P || Q;
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, 4 * at::get_num_threads()));
  std::vector<T> part(sums ? size_t(nb) * 2 * L : 0, T(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * N / nb, r1 = (blk + 1) * N / nb;
      T* Pb = P ? part.data() + blk * 2 * L : nullptr;
      T* Qb = Q ? part.data() + blk * 2 * L + L : nullptr;
      T* amb = am ? am + r0 * L : nullptr;
      if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
        if (have_avx2()) { bwd_rows_f_avx2(h + r0 * L, G + r0 * L, amb, Pb, Qb, s, r1 - r0, L, 0, L, act); continue; }
#endif
        bwd_rows_f_base(h + r0 * L, G + r0 * L, amb, Pb, Qb, s, r1 - r0, L, 0, L, act);
        continue;
      }
      for (int64_t n = r0; n < r1; ++n) {
        const T* hr = h + n * L;
        T* gr = G + n * L;
        T* ar = am ? am + n * L : nullptr;
        int64_t j = 0;
        for (; j + V::size() <= L; j += V::size()) {
          V hv = V::loadu(hr + j), gv = V::loadu(gr + j), sv = V::loadu(s + j);
          if (Pb || ar) {
            V f = act_v(hv, act);
            if (Pb) (V::loadu(Pb + j) + f * gv).store(Pb + j);
            if (ar) (f * sv).store(ar + j);
          }
          V dh = gv * sv * dact_v(hv, act);
          dh.store(gr + j);
          if (Qb) (V::loadu(Qb + j) + dh).store(Qb + j);
        }
        for (; j < L; ++j) {
          T f = act_s(hr[j], act);
          if (Pb) Pb[j] += f * gr[j];
          if (ar) ar[j] = f * s[j];
          T dh = gr[j] * s[j] * dact_s(hr[j], act);
          gr[j] = dh;
          if (Qb) Qb[j] += dh;
        }
      }
    }
  });
  if (!sums) return;
  if (P) std::fill(P, P + L, T(0));
  if (Q) std::fill(Q, Q + L, T(0));
  for (int64_t blk = 0; blk < nb; ++blk) {
    const T* Pb = part.data() + blk * 2 * L;
    for (int64_t j = 0; j < L; ++j) {
      if (P) P[j] += Pb[j];
      if (Q) Q[j] += Pb[L + j];
    }
  }
}

// ---- glue -------------------------------------------------------------------------------------

void check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                  const at::Tensor& b2, const c10::optional<at::Tensor>& int_z, const c10::optional<at::Tensor>& mlp_z,
                  const c10::optional<at::Tensor>& live, int64_t act) {
  TORCH_CHECK(x.dim() == 2, "cofi::masked_ffn_native: x must be [N, d], got ", x.sizes());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == x.size(1), "cofi::masked_ffn_native: w1 must be [F, d=", x.size(1), "], got ", w1.sizes());
  const int64_t F = w1.size(0), d = x.size(1);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == F, "cofi::masked_ffn_native: b1 must be [F=", F, "], got ", b1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == d && w2.size(1) == F, "cofi::masked_ffn_native: w2 must be [d, F] = [", d, ", ", F, "], got ", w2.sizes());
  TORCH_CHECK(b2.dim() == 1 && b2.size(0) == d, "cofi::masked_ffn_native: b2 must be [d=", d, "], got ", b2.sizes());
  for (const auto* t : {&w1, &b1, &w2, &b2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "cofi::masked_ffn_native: weights must match x's dtype and device");
  if (int_z) TORCH_CHECK(int_z->dim() == 1 && int_z->size(0) == F && int_z->scalar_type() == x.scalar_type(), "cofi::masked_ffn_native: int_z must be [F=", F, "] in x's dtype, got ", int_z->sizes());
  if (mlp_z) TORCH_CHECK(mlp_z->numel() == 1 && mlp_z->scalar_type() == x.scalar_type(), "cofi::masked_ffn_native: mlp_z must have one element in x's dtype");
  if (live) {
    TORCH_CHECK(live->dim() == 1 && live->scalar_type() == at::kLong, "cofi::masked_ffn_native: live must be an int64 [L] index tensor");
    if (live->numel() > 0) {  // CPU tensor: reading it costs no device sync
      const auto [lo, hi] = at::aminmax(*live);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < F, "cofi::masked_ffn_native: live must index units in [0, ",
                        F, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  TORCH_CHECK(act >= 0 && act <= 2, "cofi::masked_ffn_native: activation code must be 0 (gelu), 1 (gelu_tanh) or 2 (relu), got ", act);
}

struct Live {
  at::Tensor w1, b1, w2, z;  // z undefined when int_z is None
};

Live gather(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& int_z,
            const c10::optional<at::Tensor>& live) {
  Live l;
  if (live) {
    l.w1 = w1.index_select(0, *live);
    l.b1 = b1.index_select(0, *live);
    l.w2 = w2.index_select(1, *live);
    if (int_z) l.z = int_z->index_select(0, *live);
  } else {
    l.w1 = w1.contiguous();
    l.b1 = b1.contiguous();
    l.w2 = w2.contiguous();
    if (int_z) l.z = int_z->contiguous();
  }
  return l;
}

// The epilogues run in float for float16 / bfloat16 inputs (the GEMMs stay in the input dtype).
at::ScalarType epilogue_dtype(at::ScalarType dt) {
  return (dt == at::kHalf || dt == at::kBFloat16) ? at::kFloat : dt;
}

// s[j] = z[j] * m over the live units (the gate folded with the layer mask).
at::Tensor gate_scale(const Live& l, const c10::optional<at::Tensor>& mlp_z, int64_t L, const at::Tensor& like) {
  at::Tensor s = l.z.defined() ? l.z.clone() : at::ones({L}, like.options());
  if (mlp_z) s.mul_(mlp_z->reshape({}));
  return s.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_ffn_fwd_cpu(const at::Tensor& x_, const at::Tensor& w1, const at::Tensor& b1,
                                                     const at::Tensor& w2, const at::Tensor& b2,
                                                     const c10::optional<at::Tensor>& int_z,
                                                     const c10::optional<at::Tensor>& mlp_z,
                                                     const c10::optional<at::Tensor>& live, int64_t act) {
  const NoAutocast no_autocast;
  check_inputs(x_, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const char* fn = "cofi::masked_ffn_fwd_native";
  const at::Tensor x = x_.contiguous();
  Live l = gather(w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = l.w1.size(0);
  const at::ScalarType dt = x.scalar_type(), et = epilogue_dtype(dt);
  at::Tensor h = cpu::linear(x, l.w1, at::Tensor());  // [N, L], bias added in the epilogue
  at::Tensor he = h.to(et);                           // h itself unless x is a half type
  at::Tensor ae = at::empty_like(he);
  const at::Tensor b1e = l.b1.to(et), se = gate_scale(l, mlp_z, L, x).to(et);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &he}, {"a", &ae}, {"b1", &b1e},
                                {"gate scale", &se}})
    check_buffer_dtype(fn, name, *t, et);
  AT_DISPATCH_FLOATING_TYPES(et, "masked_ffn_fwd_cpu", [&] {
    epilogue_fwd<scalar_t>(he.data_ptr<scalar_t>(), ae.data_ptr<scalar_t>(), b1e.data_ptr<scalar_t>(),
                           se.data_ptr<scalar_t>(), N, L, act);
  });
  h = he.to(dt);
  const at::Tensor a = ae.to(dt);
  at::Tensor b2m = mlp_z ? b2 * mlp_z->reshape({}) : b2;
  // No live unit: y = b2 m in every row, as a fresh tensor (an expand of b2 would alias an input).
  at::Tensor y = L > 0 ? cpu::linear(a, l.w2, b2m) : b2m.expand({N, b2.size(0)}).clone(at::MemoryFormat::Contiguous);
  return {y, h};
}

std::vector<at::Tensor> masked_ffn_bwd_cpu(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& w1,
                                           const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                           const c10::optional<at::Tensor>& int_z,
                                           const c10::optional<at::Tensor>& mlp_z,
                                           const c10::optional<at::Tensor>& live, const at::Tensor& h_,
                                           int64_t act, c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_inputs(x_, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const char* fn = "cofi::masked_ffn_bwd_native";
  TORCH_CHECK(needs_.size() == 7, "cofi::masked_ffn_bwd_native: needs must have 7 entries, got ", needs_.size());
  bool needs[7];
  for (int i = 0; i < 7; ++i) needs[i] = needs_.get(i);
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous(), h = h_.contiguous();
  Live l = gather(w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = l.w1.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({N, x.size(1)}), "cofi::masked_ffn_bwd_native: grad must be [N, d], got ", grad.sizes());
  TORCH_CHECK(h.sizes() == at::IntArrayRef({N, L}), "cofi::masked_ffn_bwd_native: h must be [N, L] = [", N, ", ", L, "], got ", h.sizes());
  const bool need_dh = needs[0] || needs[1] || needs[2];
  const bool need_P = (needs[5] && int_z) || (needs[6] && mlp_z);
  const bool need_a = needs[3];
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && h.scalar_type() == x.scalar_type(),
              "cofi::masked_ffn_bwd_native: grad and h must have x's dtype ", x.scalar_type(), ", got ",
              grad.scalar_type(), " and ", h.scalar_type());
  const at::ScalarType dt = x.scalar_type(), et = epilogue_dtype(dt);
  at::Tensor G, am, P, Q;
  if (need_dh || need_P || need_a) {
    // The epilogue works on buffers of dtype et (float for half inputs), converted back after.
    const at::Tensor he = h.to(et), se = gate_scale(l, mlp_z, L, x).to(et);
    const at::TensorOptions eo = x.options().dtype(et);
    at::Tensor Ge = (need_dh || need_P) ? at::mm(grad, l.w2).to(et) : at::empty({N, L}, eo);  // [N, L]
    at::Tensor ame = need_a ? at::empty({N, L}, eo) : at::Tensor();
    at::Tensor Pe = need_P ? at::empty({L}, eo) : at::Tensor();
    at::Tensor Qe = needs[2] ? at::empty({L}, eo) : at::Tensor();
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &he}, {"G", &Ge}, {"am", &ame},
                                  {"P", &Pe}, {"Q", &Qe}, {"gate scale", &se}})
      check_buffer_dtype(fn, name, *t, et);
    AT_DISPATCH_FLOATING_TYPES(et, "masked_ffn_bwd_cpu", [&] {
      epilogue_bwd<scalar_t>(he.data_ptr<scalar_t>(), Ge.data_ptr<scalar_t>(),
                             need_a ? ame.data_ptr<scalar_t>() : nullptr, need_P ? Pe.data_ptr<scalar_t>() : nullptr,
                             needs[2] ? Qe.data_ptr<scalar_t>() : nullptr, se.data_ptr<scalar_t>(), N, L, act);
    });
    G = Ge.to(dt);
    if (need_a) am = ame.to(dt);
    if (need_P) P = Pe.to(dt);
    if (needs[2]) Q = Qe.to(dt);
  }
  auto E = [&] { return at::empty({0}, x.options()); };
  auto full = [&](const at::Tensor& part, const at::Tensor& like, int64_t dim) {
    if (!live) return part;
    return at::zeros_like(like, at::MemoryFormat::Contiguous).index_copy_(dim, *live, part);
  };
  at::Tensor dx = needs[0] ? (L > 0 ? at::mm(G, l.w1) : at::zeros_like(x)) : E();
  at::Tensor dw1 = needs[1] ? full(at::mm(G.t(), x), w1, 0) : E();
  at::Tensor db1 = needs[2] ? full(Q, b1, 0) : E();
  at::Tensor dw2 = needs[3] ? full(at::mm(grad.t(), am), w2, 1) : E();
  at::Tensor gsum = (needs[4] || (needs[6] && mlp_z)) ? grad.sum(0) : E();
  at::Tensor db2 = needs[4] ? (mlp_z ? gsum * mlp_z->reshape({}) : gsum) : E();
  at::Tensor dz = E(), dm = E();
  if (needs[5] && int_z) dz = full(mlp_z ? P * mlp_z->reshape({}) : P, *int_z, 0);
  if (needs[6] && mlp_z) {
    at::Tensor inner = l.z.defined() ? at::dot(P, l.z) : P.sum();
    dm = (inner + at::dot(gsum, b2)).reshape(mlp_z->sizes());
  }
  return {dx, dw1, db1, dw2, db2, dz, dm};
}

// ---- gated FFN (SwiGLU / GeGLU / ReGLU) ---------------------------------------------------------

namespace {

template <typename T>
COFI_INLINE T gact(T h, int64_t act) {
  if constexpr (std::is_same_v<T, float>) return act_f(h, act);
  else return act_s(h, act);
}

template <typename T>
COFI_INLINE T gdact(T h, int64_t act) {
  if constexpr (std::is_same_v<T, float>) return dact_f(h, act);
  else return dact_s(h, act);
}

// One row: hg, hu = the row's gate and up halves of H (biases added in place), a[j] = act(g) u s[j].
// Separate __restrict parameters (not pointers derived inside a loop) let GCC vectorise the loop.
template <typename T, int ACT>
COFI_INLINE void gated_fwd_row(T* __restrict hg, T* __restrict hu, T* __restrict a, const T* __restrict bg,
                               const T* __restrict bu, const T* __restrict s, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    const T g = hg[j] + bg[j], u = hu[j] + bu[j];
    hg[j] = g;
    hu[j] = u;
    a[j] = gact<T>(g, ACT) * u * s[j];
  }
}

// Rows [0, N) of H [N, 2L] (gate | up): add the biases bgu [2L] in place, a[n, j] = act(g) u s[j].
template <typename T, int ACT>
COFI_INLINE void gated_fwd_rows_t(T* H, T* a, const T* bgu, const T* s, int64_t N, int64_t L) {
  for (int64_t n = 0; n < N; ++n)
    gated_fwd_row<T, ACT>(H + n * 2 * L, H + n * 2 * L + L, a + n * L, bgu, bgu + L, s, L);
}

// One row of the backward epilogue (dg, du: the row's halves of dH).
template <typename T, int ACT>
COFI_INLINE void gated_bwd_row(const T* __restrict hg, const T* __restrict hu, const T* __restrict gr,
                               T* __restrict dg, T* __restrict du, T* __restrict ar, T* __restrict P,
                               T* __restrict Qg, T* __restrict Qu, const T* __restrict s, int64_t L) {
  for (int64_t j = 0; j < L; ++j) {
    const T g = hg[j], u = hu[j], gs = gr[j] * s[j];
    const T f = gact<T>(g, ACT);
    const T dgv = gs * u * gdact<T>(g, ACT), duv = gs * f;
    dg[j] = dgv;
    du[j] = duv;
    if (ar) ar[j] = f * u * s[j];
    if (P) P[j] += f * u * gr[j];
    if (Qg) {
      Qg[j] += dgv;
      Qu[j] += duv;
    }
  }
}

// Rows [0, N): dH [N, 2L] = [G s u act'(g) | G s act(g)]; optional am = act(g) u s, P[j] += act(g) u G,
// Q[0:2L] += dH (column sums; P and Q are this block's zeroed partials).
template <typename T, int ACT>
COFI_INLINE void gated_bwd_rows_t(const T* H, const T* G, T* dH, T* am, T* P, T* Q, const T* s, int64_t N, int64_t L) {
  for (int64_t n = 0; n < N; ++n)
    gated_bwd_row<T, ACT>(H + n * 2 * L, H + n * 2 * L + L, G + n * L, dH + n * 2 * L, dH + n * 2 * L + L,
                          am ? am + n * L : nullptr, P, Q, Q ? Q + L : nullptr, s, L);
}

// COFI_INLINE: inlined into the AVX2 clones below (else they would call the baseline code).
template <typename T>
COFI_INLINE void gated_fwd_rows(T* H, T* a, const T* bgu, const T* s, int64_t N, int64_t L, int64_t act) {
  switch (act) {
    case 0: return gated_fwd_rows_t<T, 0>(H, a, bgu, s, N, L);
    case 1: return gated_fwd_rows_t<T, 1>(H, a, bgu, s, N, L);
    case 2: return gated_fwd_rows_t<T, 2>(H, a, bgu, s, N, L);
    default: return gated_fwd_rows_t<T, 3>(H, a, bgu, s, N, L);
  }
}

template <typename T>
COFI_INLINE void gated_bwd_rows(const T* H, const T* G, T* dH, T* am, T* P, T* Q, const T* s, int64_t N, int64_t L, int64_t act) {
  switch (act) {
    case 0: return gated_bwd_rows_t<T, 0>(H, G, dH, am, P, Q, s, N, L);
    case 1: return gated_bwd_rows_t<T, 1>(H, G, dH, am, P, Q, s, N, L);
    case 2: return gated_bwd_rows_t<T, 2>(H, G, dH, am, P, Q, s, N, L);
    default: return gated_bwd_rows_t<T, 3>(H, G, dH, am, P, Q, s, N, L);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void gated_fwd_rows_avx2(float* H, float* a, const float* bgu, const float* s,
                                                              int64_t N, int64_t L, int64_t act) {
  gated_fwd_rows<float>(H, a, bgu, s, N, L, act);
}
__attribute__((target("avx2,fma"))) void gated_bwd_rows_avx2(const float* H, const float* G, float* dH, float* am,
                                                              float* P, float* Q, const float* s, int64_t N, int64_t L,
                                                              int64_t act) {
  gated_bwd_rows<float>(H, G, dH, am, P, Q, s, N, L, act);
}
#endif

template <typename T>
void gated_epilogue_fwd(T* H, T* a, const T* bgu, const T* s, int64_t N, int64_t L, int64_t act) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1)), [&](int64_t n0, int64_t n1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, float>) {
      if (have_avx2()) return gated_fwd_rows_avx2(H + n0 * 2 * L, a + n0 * L, bgu, s, n1 - n0, L, act);
    }
#endif
    gated_fwd_rows<T>(H + n0 * 2 * L, a + n0 * L, bgu, s, n1 - n0, L, act);
  });
}

// Column sums accumulated per row block and added in block order, as epilogue_bwd.
template <typename T>
void gated_epilogue_bwd(const T* H, const T* G, T* dH, T* am, T* P, T* Q, const T* s, int64_t N, int64_t L,
                        int64_t act) {
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, 4 * at::get_num_threads()));
  const bool sums = P || Q;
  std::vector<T> part(sums ? size_t(nb) * 3 * L : 0, T(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * N / nb, r1 = (blk + 1) * N / nb;
      T* Pb = P ? part.data() + blk * 3 * L : nullptr;
      T* Qb = Q ? part.data() + blk * 3 * L + L : nullptr;
      T* amb = am ? am + r0 * L : nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<T, float>) {
        if (have_avx2()) {
          gated_bwd_rows_avx2(H + r0 * 2 * L, G + r0 * L, dH + r0 * 2 * L, amb, Pb, Qb, s, r1 - r0, L, act);
          continue;
        }
      }
#endif
      gated_bwd_rows<T>(H + r0 * 2 * L, G + r0 * L, dH + r0 * 2 * L, amb, Pb, Qb, s, r1 - r0, L, act);
    }
  });
  if (!sums) return;
  if (P) std::fill(P, P + L, T(0));
  if (Q) std::fill(Q, Q + 2 * L, T(0));
  for (int64_t blk = 0; blk < nb; ++blk) {
    const T* Pb = part.data() + blk * 3 * L;
    for (int64_t j = 0; j < L; ++j)
      if (P) P[j] += Pb[j];
    for (int64_t j = 0; j < 2 * L; ++j)
      if (Q) Q[j] += Pb[L + j];
  }
}

void check_gated_inputs(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                        const c10::optional<at::Tensor>& int_z, const c10::optional<at::Tensor>& mlp_z,
                        const c10::optional<at::Tensor>& live, int64_t act) {
  check_inputs(x, w1, b1, w2, b2, int_z, mlp_z, live, 0);
  TORCH_CHECK(wg.sizes() == w1.sizes(), "cofi::masked_ffn_gated_native: wg must be [F, d] like w1 ", w1.sizes(), ", got ", wg.sizes());
  TORCH_CHECK(bg.sizes() == b1.sizes(), "cofi::masked_ffn_gated_native: bg must be [F] like b1 ", b1.sizes(), ", got ", bg.sizes());
  for (const auto* t : {&wg, &bg})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "cofi::masked_ffn_gated_native: wg and bg must match x's dtype and device");
  TORCH_CHECK(act >= 0 && act <= 3, "cofi::masked_ffn_gated_native: gate activation code must be 0 (gelu), 1 (gelu_tanh), 2 (relu) or 3 (silu), got ", act);
}

struct GatedLive {
  at::Tensor W, b, w2, z;  // W [2L, d] = [wg; w1] live rows, b [2L] = [bg; b1] live entries
};

GatedLive gather_gated(const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const c10::optional<at::Tensor>& int_z, const c10::optional<at::Tensor>& live) {
  GatedLive g;
  if (live) {
    const int64_t L = live->size(0);
    g.W = at::empty({2 * L, wg.size(1)}, wg.options());
    at::Tensor top = g.W.narrow(0, 0, L), bottom = g.W.narrow(0, L, L);  // contiguous row blocks
    at::index_select_out(top, wg, 0, *live);
    at::index_select_out(bottom, w1, 0, *live);
    g.b = at::cat({bg.index_select(0, *live), b1.index_select(0, *live)});
    g.w2 = w2.index_select(1, *live);
    if (int_z) g.z = int_z->index_select(0, *live);
  } else {
    g.W = at::cat({wg, w1});
    g.b = at::cat({bg, b1});
    g.w2 = w2.contiguous();
    if (int_z) g.z = int_z->contiguous();
  }
  return g;
}

at::Tensor gated_scale(const GatedLive& g, const c10::optional<at::Tensor>& mlp_z, int64_t L, const at::Tensor& like) {
  at::Tensor s = g.z.defined() ? g.z.clone() : at::ones({L}, like.options());
  if (mlp_z) s.mul_(mlp_z->reshape({}));
  return s.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_ffn_gated_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& int_z,
    const c10::optional<at::Tensor>& mlp_z, const c10::optional<at::Tensor>& live, int64_t act) {
  const NoAutocast no_autocast;
  check_gated_inputs(x_, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const char* fn = "cofi::masked_ffn_gated_fwd_native";
  const at::Tensor x = x_.contiguous();
  GatedLive g = gather_gated(wg, bg, w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = g.w2.size(1);
  const at::ScalarType dt = x.scalar_type(), et = epilogue_dtype(dt);
  at::Tensor He = cpu::linear(x, g.W, at::Tensor()).to(et);  // [N, 2L], biases added in the epilogue
  at::Tensor ae = at::empty({N, L}, x.options().dtype(et));
  const at::Tensor be = g.b.to(et), se = gated_scale(g, mlp_z, L, x).to(et);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &He}, {"a", &ae}, {"bias", &be},
                                {"gate scale", &se}})
    check_buffer_dtype(fn, name, *t, et);
  AT_DISPATCH_FLOATING_TYPES(et, "masked_ffn_gated_fwd_cpu", [&] {
    gated_epilogue_fwd<scalar_t>(He.data_ptr<scalar_t>(), ae.data_ptr<scalar_t>(), be.data_ptr<scalar_t>(),
                                 se.data_ptr<scalar_t>(), N, L, act);
  });
  at::Tensor b2m = mlp_z ? b2 * mlp_z->reshape({}) : b2;
  at::Tensor y = L > 0 ? cpu::linear(ae.to(dt), g.w2, b2m)
                       : b2m.expand({N, b2.size(0)}).clone(at::MemoryFormat::Contiguous);
  return {y, He.to(dt)};
}

// needs: [x, wg, bg, w1, b1, w2, b2, int_z, mlp_z]; returns their gradients (empty where not needed).
std::vector<at::Tensor> masked_ffn_gated_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& int_z,
    const c10::optional<at::Tensor>& mlp_z, const c10::optional<at::Tensor>& live, const at::Tensor& h_, int64_t act,
    c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_gated_inputs(x_, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const char* fn = "cofi::masked_ffn_gated_bwd_native";
  TORCH_CHECK(needs_.size() == 9, fn, ": needs must have 9 entries, got ", needs_.size());
  bool needs[9];
  for (int i = 0; i < 9; ++i) needs[i] = needs_.get(i);
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous(), h = h_.contiguous();
  GatedLive g = gather_gated(wg, bg, w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = g.w2.size(1);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({N, x.size(1)}), fn, ": grad must be [N, d], got ", grad.sizes());
  TORCH_CHECK(h.sizes() == at::IntArrayRef({N, 2 * L}), fn, ": h must be [N, 2L] = [", N, ", ", 2 * L, "], got ", h.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && h.scalar_type() == x.scalar_type(), fn,
              ": grad and h must have x's dtype ", x.scalar_type(), ", got ", grad.scalar_type(), " and ", h.scalar_type());
  const bool need_dH = needs[0] || needs[1] || needs[2] || needs[3] || needs[4];
  const bool need_P = (needs[7] && int_z) || (needs[8] && mlp_z);
  const bool need_Q = needs[2] || needs[4];
  const at::ScalarType dt = x.scalar_type(), et = epilogue_dtype(dt);
  at::Tensor dH, am, P, Q;
  if (need_dH || need_P || needs[5]) {
    const at::Tensor He = h.to(et), se = gated_scale(g, mlp_z, L, x).to(et);
    const at::TensorOptions eo = x.options().dtype(et);
    const at::Tensor Ge = at::mm(grad, g.w2).to(et);  // [N, L]
    at::Tensor dHe = at::empty({N, 2 * L}, eo);
    at::Tensor ame = needs[5] ? at::empty({N, L}, eo) : at::Tensor();
    at::Tensor Pe = need_P ? at::empty({L}, eo) : at::Tensor();
    at::Tensor Qe = need_Q ? at::empty({2 * L}, eo) : at::Tensor();
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &He}, {"G", &Ge}, {"dH", &dHe},
                                  {"am", &ame}, {"P", &Pe}, {"Q", &Qe}, {"gate scale", &se}})
      check_buffer_dtype(fn, name, *t, et);
    AT_DISPATCH_FLOATING_TYPES(et, "masked_ffn_gated_bwd_cpu", [&] {
      gated_epilogue_bwd<scalar_t>(He.data_ptr<scalar_t>(), Ge.data_ptr<scalar_t>(), dHe.data_ptr<scalar_t>(),
                                   needs[5] ? ame.data_ptr<scalar_t>() : nullptr,
                                   need_P ? Pe.data_ptr<scalar_t>() : nullptr,
                                   need_Q ? Qe.data_ptr<scalar_t>() : nullptr, se.data_ptr<scalar_t>(), N, L, act);
    });
    dH = dHe.to(dt);
    if (needs[5]) am = ame.to(dt);
    if (need_P) P = Pe.to(dt);
    if (need_Q) Q = Qe.to(dt);
  }
  auto E = [&] { return at::empty({0}, x.options()); };
  // Gradient over all F units from the live part (a fresh tensor: outputs never alias each other).
  auto full = [&](const at::Tensor& part, const at::Tensor& like, int64_t dim) {
    if (!live) return part.clone(at::MemoryFormat::Contiguous);
    return at::zeros_like(like, at::MemoryFormat::Contiguous).index_copy_(dim, *live, part);
  };
  at::Tensor dx = needs[0] ? (L > 0 ? at::mm(dH, g.W) : at::zeros_like(x)) : E();
  at::Tensor dwg = needs[1] ? full(at::mm(dH.narrow(1, 0, L).t(), x), wg, 0) : E();
  at::Tensor dbg = needs[2] ? full(Q.narrow(0, 0, L), bg, 0) : E();
  at::Tensor dw1 = needs[3] ? full(at::mm(dH.narrow(1, L, L).t(), x), w1, 0) : E();
  at::Tensor db1 = needs[4] ? full(Q.narrow(0, L, L), b1, 0) : E();
  at::Tensor dw2 = needs[5] ? full(at::mm(grad.t(), am), w2, 1) : E();
  at::Tensor gsum = (needs[6] || (needs[8] && mlp_z)) ? grad.sum(0) : E();
  at::Tensor db2 = needs[6] ? (mlp_z ? gsum * mlp_z->reshape({}) : gsum) : E();
  at::Tensor dz = E(), dm = E();
  if (needs[7] && int_z) dz = full(mlp_z ? P * mlp_z->reshape({}) : P, *int_z, 0);
  if (needs[8] && mlp_z) {
    at::Tensor inner = g.z.defined() ? at::dot(P, g.z) : P.sum();
    dm = (inner + at::dot(gsum, b2)).reshape(mlp_z->sizes());
  }
  return {dx, dwg, dbg, dw1, db1, dw2, db2, dz, dm};
}

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("masked_ffn_gated_fwd_native", &masked_ffn_gated_fwd_cpu);
  m.impl("masked_ffn_gated_bwd_native", &masked_ffn_gated_bwd_cpu);
  m.impl("masked_ffn_fwd_native", &masked_ffn_fwd_cpu);
  m.impl("masked_ffn_bwd_native", &masked_ffn_bwd_cpu);
}

}  // namespace cofi
