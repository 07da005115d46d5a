// CPU kernels of the hard-concrete op family (sample, keep_prob, deterministic, expected_size).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "hard_concrete.h"
#include "hard_concrete_checks.h"
#include "hard_concrete_step.h"
#include "../fast_math.h"
#include "../autocast_guard.h"

namespace {

constexpr int64_t kGrain = 16384;

// ---- float fast path ---------------------------------------------------------------------------
// The extension is built for the x86-64-v2 baseline, where scalar libm log/log1p/exp cost ~40 ns per
// gate (2.5x slower than ATen's SLEEF-vectorised eager ops). The float loops below use branch-free
// Cephes logf/expf polynomials (~1 ulp) that GCC vectorises, compiled twice: an AVX2+FMA clone
// chosen at run time and a baseline clone. float64 keeps the exact scalar path.
COFI_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

// logit(u) = log(u / (1 - u)) (one log instead of two), with the reference's values where log_fast has
// none: -inf at u = 0, +inf at u = 1, NaN for u outside [0, 1] or NaN (so z is NaN exactly where the
// reference's log(u) - log1p(-u) makes it NaN; exp_fast and std::min/max pass NaN through).
COFI_INLINE float logit_f(float u) {
  const float inf = std::numeric_limits<float>::infinity();
  float lg = log_fast(u / (1.0f - u));
  lg = u <= 0.0f ? -inf : lg;
  lg = u >= 1.0f ? inf : lg;
  return ((u >= 0.0f) & (u <= 1.0f)) ? lg : std::numeric_limits<float>::quiet_NaN();
}

// v where c, else +0 (also for a NaN v: 0 * NaN would be NaN). A bit mask, not '?:' on floats, so
// GCC vectorises the loops.
COFI_INLINE float keep_if(bool c, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= 0u - uint32_t(c);
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// kind 0: sample fwd, 1: sample bwd, 2: keep fwd, 3: keep bwd, 4: sample + keep fwd (o = z,
// o2 = keep), 5: sample + keep bwd (g = grad of z, g2 = grad of keep, u = the forward's z: inside the
// clip s = (z - l) / (r - l) exactly inverts the forward map, so no log/exp is needed for dz).
// a = log_alpha, u = noise. Gradients outside the clip are keep_if'd to 0, as the reference's
// where(inside, ., 0), so a NaN gate gets gradient 0 there.
template <int kind>
COFI_INLINE void hc_loop_f(const float* a, const float* u, const float* g, const float* g2, float* o, float* o2,
                           int64_t b, int64_t e, float t, float l, float r, float q0, float eps) {
  for (int64_t i = b; i < e; ++i) {
    if constexpr (kind == 4) {
      const float s = sigmoid_f((logit_f(u[i]) + a[i]) / t);
      const float q = sigmoid_f(q0 - a[i]);
      o[i] = std::min(std::max(s * (r - l) + l, 0.0f), 1.0f);
      o2[i] = 1.0f - std::min(std::max(q, eps), 1.0f - eps);
    } else if constexpr (kind == 5) {
      const float z = u[i];
      const float s = (z - l) / (r - l);
      const float q = sigmoid_f(q0 - a[i]);
      const float dz = g[i] * (r - l) * s * (1.0f - s) / t;
      const float dq = g2[i] * q * (1.0f - q);
      o[i] = keep_if((z > 0.0f) & (z < 1.0f), dz) + keep_if((q > eps) & (q < 1.0f - eps), dq);
    } else if constexpr (kind <= 1) {
      const float s = sigmoid_f((logit_f(u[i]) + a[i]) / t);
      const float sbar = s * (r - l) + l;
      if constexpr (kind == 0) {
        o[i] = std::min(std::max(sbar, 0.0f), 1.0f);
      } else {
        const float dz = g[i] * (r - l) * s * (1.0f - s) / t;
        o[i] = keep_if((sbar > 0.0f) & (sbar < 1.0f), dz);
      }
    } else {
      const float q = sigmoid_f(q0 - a[i]);
      if constexpr (kind == 2) {
        o[i] = 1.0f - std::min(std::max(q, eps), 1.0f - eps);
      } else {
        const float dq = g[i] * q * (1.0f - q);
        o[i] = keep_if((q > eps) & (q < 1.0f - eps), dq);
      }
    }
  }
}

template <int kind>
void hc_base_f(const float* a, const float* u, const float* g, const float* g2, float* o, float* o2, int64_t b,
               int64_t e, float t, float l, float r, float q0, float eps) {
  hc_loop_f<kind>(a, u, g, g2, o, o2, b, e, t, l, r, q0, eps);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <int kind>
__attribute__((target("avx2,fma"))) void hc_avx2_f(const float* a, const float* u, const float* g, const float* g2,
                                                   float* o, float* o2, int64_t b, int64_t e, float t, float l, float r,
                                                   float q0, float eps) {
  hc_loop_f<kind>(a, u, g, g2, o, o2, b, e, t, l, r, q0, eps);
}
bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <int kind>
void hc_float(const float* a, const float* u, const float* g, float* o, int64_t n, double t, double l, double r,
              double q0, double eps, const float* g2 = nullptr, float* o2 = nullptr) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2())
      return hc_avx2_f<kind>(a, u, g, g2, o, o2, b, e, float(t), float(l), float(r), float(q0), float(eps));
#endif
    hc_base_f<kind>(a, u, g, g2, o, o2, b, e, float(t), float(l), float(r), float(q0), float(eps));
  });
}

double q0_logit(double t, double l, double r) {
  double xn = (0.0 - l) / (r - l);
  return (std::log(xn) - std::log1p(-xn)) * t;
}

void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), "cofi: ", bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "cofi: ", bn, " dtype ", b.scalar_type(), " must match ", an, " dtype ", a.scalar_type());
}

void check_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "cofi: ", name, " must be float32 or float64 on CPU, got ", x.scalar_type());
}

at::Tensor sample_fwd(const at::Tensor& log_alpha, const at::Tensor& u, double t, double l, double r) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch("cofi::hard_concrete_sample_fwd_native", t, l, r);
  check_float(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", u, "u");
  auto la = log_alpha.contiguous();
  auto uu = u.contiguous();
  auto z = at::empty_like(la);
  if (la.scalar_type() == at::kFloat) {
    hc_float<0>(la.const_data_ptr<float>(), uu.const_data_ptr<float>(), nullptr, z.mutable_data_ptr<float>(), la.numel(),
                t, l, r, 0, 0);
    return z;
  }
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "hard_concrete_sample_fwd", [&] {
    const scalar_t* pa = la.const_data_ptr<scalar_t>();
    const scalar_t* pu = uu.const_data_ptr<scalar_t>();
    scalar_t* pz = z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        pz[i] = cofi_hc::sample<scalar_t>(pa[i], pu[i], scalar_t(t), scalar_t(l), scalar_t(r));
    });
  });
  return z;
}

at::Tensor sample_bwd(const at::Tensor& grad, const at::Tensor& log_alpha, const at::Tensor& u, double t, double l, double r) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch("cofi::hard_concrete_sample_bwd_native", t, l, r);
  check_float(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", u, "u");
  check_same(log_alpha, "log_alpha", grad, "grad");
  auto la = log_alpha.contiguous();
  auto uu = u.contiguous();
  auto g = grad.contiguous();
  auto out = at::empty_like(la);
  if (la.scalar_type() == at::kFloat) {
    hc_float<1>(la.const_data_ptr<float>(), uu.const_data_ptr<float>(), g.const_data_ptr<float>(),
                out.mutable_data_ptr<float>(), la.numel(), t, l, r, 0, 0);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "hard_concrete_sample_bwd", [&] {
    const scalar_t* pa = la.const_data_ptr<scalar_t>();
    const scalar_t* pu = uu.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        po[i] = cofi_hc::sample_grad_times<scalar_t>(pg[i], pa[i], pu[i], scalar_t(t), scalar_t(l), scalar_t(r));
    });
  });
  return out;
}

at::Tensor keep_fwd(const at::Tensor& log_alpha, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_keep_prob_fwd_native", t, l, r, eps);
  check_float(log_alpha, "log_alpha");
  auto la = log_alpha.contiguous();
  auto p = at::empty_like(la);
  const double q0 = q0_logit(t, l, r);
  if (la.scalar_type() == at::kFloat) {
    hc_float<2>(la.const_data_ptr<float>(), nullptr, nullptr, p.mutable_data_ptr<float>(), la.numel(), t, l, r, q0, eps);
    return p;
  }
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "hard_concrete_keep_prob_fwd", [&] {
    const scalar_t* pa = la.const_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) pp[i] = cofi_hc::keep_prob<scalar_t>(pa[i], scalar_t(q0), scalar_t(eps));
    });
  });
  return p;
}

at::Tensor keep_bwd(const at::Tensor& grad, const at::Tensor& log_alpha, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_keep_prob_bwd_native", t, l, r, eps);
  check_float(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", grad, "grad");
  auto la = log_alpha.contiguous();
  auto g = grad.contiguous();
  auto out = at::empty_like(la);
  const double q0 = q0_logit(t, l, r);
  if (la.scalar_type() == at::kFloat) {
    hc_float<3>(la.const_data_ptr<float>(), nullptr, g.const_data_ptr<float>(), out.mutable_data_ptr<float>(), la.numel(),
                t, l, r, q0, eps);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "hard_concrete_keep_prob_bwd", [&] {
    const scalar_t* pa = la.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, la.numel(), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) po[i] = cofi_hc::keep_prob_grad_times<scalar_t>(pg[i], pa[i], scalar_t(q0), scalar_t(eps));
    });
  });
  return out;
}

// Per row: zero the round-half-even(n - sum keep) smallest log_alpha (ties: lower index first).
at::Tensor deterministic(const at::Tensor& log_alpha, bool binary, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_deterministic_native", t, l, r, eps);
  check_float(log_alpha, "log_alpha");
  TORCH_CHECK(log_alpha.dim() == 2, "cofi: log_alpha must be 2-D [rows, n], got ", log_alpha.sizes());
  auto la = log_alpha.contiguous();
  auto out = at::empty_like(la);
  const int64_t rows = la.size(0), n = la.size(1);
  const double q0 = q0_logit(t, l, r);
  AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "hard_concrete_deterministic", [&] {
    const scalar_t* pa = la.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      std::vector<int64_t> order(n);
      for (int64_t row = b; row < e; ++row) {
        const scalar_t* a = pa + row * n;
        scalar_t* o = po + row * n;
        // Sum in the op's dtype, in index order, as torch's sum over a short row does.
        scalar_t keep = 0;
        for (int64_t i = 0; i < n; ++i) keep += cofi_hc::keep_prob<scalar_t>(a[i], scalar_t(q0), scalar_t(eps));
        // keep is NaN only for NaN log_alpha (refused by the wrapper): then zero nothing, never index past n.
        const double nz = std::nearbyint(static_cast<double>(scalar_t(n) - keep));
        const int64_t zeros = nz > 0.0 ? static_cast<int64_t>(std::min(nz, static_cast<double>(n))) : 0;
        for (int64_t i = 0; i < n; ++i)
          o[i] = binary ? scalar_t(1) : cofi_hc::sigmoid<scalar_t>(a[i] / scalar_t(t) * scalar_t(0.8));
        if (zeros <= 0) continue;
        std::iota(order.begin(), order.end(), 0);
        auto less = [a](int64_t x, int64_t y) { return a[x] < a[y] || (a[x] == a[y] && x < y); };
        std::nth_element(order.begin(), order.begin() + (zeros - 1), order.end(), less);
        for (int64_t k = 0; k < std::min(zeros, n); ++k) o[order[k]] = 0;
      }
    });
  });
  return out;
}

struct SizeConsts {
  double pair_head, per_head, per_unit, full;
};

SizeConsts consts(int64_t L, int64_t d, int64_t H, int64_t F) {
  double per_head = H ? (4.0 * d * d + 4.0 * d) / H : 0.0;
  int64_t per_mlp = 2 * d * F + 5 * d;
  return {d ? per_head / d : 0.0, per_head, F ? static_cast<double>(per_mlp / F) : 0.0,
          L * H * per_head + static_cast<double>(L * per_mlp)};
}

template <typename T>
T sum_or(const c10::optional<at::Tensor>& x, T dflt) {
  if (!x.has_value()) return dflt;
  auto c = x->contiguous();
  const T* p = c.const_data_ptr<T>();
  const int64_t n = c.numel();
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

// score = sum_l gate[l] * sum_j unit[l, j]; also fills row sums (for the backward).
template <typename T>
T gated_score(const c10::optional<at::Tensor>& units, const c10::optional<at::Tensor>& gate, int64_t L, int64_t W,
              std::vector<T>* row_sums) {
  row_sums->assign(L, T(W));
  if (units.has_value()) {
    auto c = units->contiguous();
    const T* p = c.const_data_ptr<T>();
    for (int64_t l = 0; l < L; ++l) {
      T s = 0;
      const T* row = p + l * W;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < W; ++j) s += row[j];
      (*row_sums)[l] = s;
    }
  }
  std::vector<T> g(L, T(1));
  if (gate.has_value()) {
    auto c = gate->contiguous();
    const T* p = c.const_data_ptr<T>();
    for (int64_t l = 0; l < L; ++l) g[l] = p[l];
  }
  T score = 0;
  for (int64_t l = 0; l < L; ++l) score += g[l] * (*row_sums)[l];
  return score;
}

const at::Tensor& first_of(const std::vector<const c10::optional<at::Tensor>*>& xs) {
  for (auto* x : xs)
    if (x->has_value()) return x->value();
  TORCH_CHECK(false, "cofi: expected_size needs at least one group of keep probabilities");
}

std::tuple<at::Tensor, at::Tensor> size_fwd(const c10::optional<at::Tensor>& hidden, const c10::optional<at::Tensor>& head,
                                            const c10::optional<at::Tensor>& mha, const c10::optional<at::Tensor>& inter,
                                            const c10::optional<at::Tensor>& ffn, int64_t L, int64_t d, int64_t H, int64_t F) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::groups("cofi::expected_size_fwd_native", {&hidden, &head, &mha, &inter, &ffn}, L, d, H, F);
  const at::Tensor& ref = first_of({&hidden, &head, &mha, &inter, &ffn});
  check_float(ref, "keep probabilities");
  auto e = at::empty({}, ref.options());
  auto s = at::empty({}, ref.options());
  const SizeConsts c = consts(L, d, H, F);
  AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "expected_size_fwd", [&] {
    std::vector<scalar_t> hs, is;
    scalar_t head_score = gated_score<scalar_t>(head, mha, L, H, &hs);
    scalar_t int_score = gated_score<scalar_t>(inter, ffn, L, F, &is);
    scalar_t expected;
    if (hidden.has_value()) {
      scalar_t hsum = sum_or<scalar_t>(hidden, scalar_t(d));
      expected = hsum * (head_score * scalar_t(c.pair_head) + int_score * scalar_t(2));
    } else {
      expected = head_score * scalar_t(c.per_head) + int_score * scalar_t(c.per_unit);
    }
    e.fill_(expected);
    s.fill_(scalar_t(1) - expected / scalar_t(c.full));
  });
  return {e, s};
}

// d E / d keep, the closed form of expected_size's gradient, ADDED into out[i] (contiguous, the shape
// of group i; null = group absent, as is v[i]). Groups: hidden, head, mha, intermediate, ffn.
template <typename T>
void add_size_grad(const std::array<T*, 5>& out, const cofi_hc_step::Views& v, T gE, int64_t L, int64_t d, int64_t H,
                   int64_t F) {
  const SizeConsts c = consts(L, d, H, F);
  std::vector<T> hs, is;
  const T head_score = gated_score<T>(v[1], v[2], L, H, &hs);
  const T int_score = gated_score<T>(v[3], v[4], L, F, &is);
  const bool has_hidden = v[0].has_value();
  const T hsum = has_hidden ? sum_or<T>(v[0], T(d)) : T(1);
  // dE/d head_score and dE/d int_score
  const T dH = has_hidden ? hsum * T(c.pair_head) : T(c.per_head);
  const T dI = has_hidden ? hsum * T(2) : T(c.per_unit);
  auto gate = [&](int i, int64_t l) { return v[i].has_value() ? v[i]->const_data_ptr<T>()[l] : T(1); };
  if (out[0]) {
    const T g = gE * (head_score * T(c.pair_head) + int_score * T(2));
    for (int64_t j = 0; j < d; ++j) out[0][j] += g;
  }
  for (int64_t l = 0; l < L; ++l) {
    if (out[1]) {
      const T g = gE * dH * gate(2, l);
      for (int64_t j = 0; j < H; ++j) out[1][l * H + j] += g;
    }
    if (out[2]) out[2][l] += gE * dH * hs[l];
    if (out[3]) {
      const T g = gE * dI * gate(4, l);
      for (int64_t j = 0; j < F; ++j) out[3][l * F + j] += g;
    }
    if (out[4]) out[4][l] += gE * dI * is[l];
  }
}

std::vector<at::Tensor> size_bwd(const at::Tensor& g_params, const at::Tensor& g_sparsity, const c10::optional<at::Tensor>& hidden,
                                 const c10::optional<at::Tensor>& head, const c10::optional<at::Tensor>& mha,
                                 const c10::optional<at::Tensor>& inter, const c10::optional<at::Tensor>& ffn, int64_t L,
                                 int64_t d, int64_t H, int64_t F) {
  const cofi::NoAutocast no_autocast;
  const char* fn = "cofi::expected_size_bwd_native";
  cofi_hc_check::groups(fn, {&hidden, &head, &mha, &inter, &ffn}, L, d, H, F);
  cofi_hc_check::size_grads(fn, g_params, g_sparsity);
  const at::Tensor& ref = first_of({&hidden, &head, &mha, &inter, &ffn});
  check_float(ref, "keep probabilities");
  const SizeConsts c = consts(L, d, H, F);
  cofi_hc_step::Views v;
  std::vector<at::Tensor> out;
  int i = 0;
  for (const auto* g : {&hidden, &head, &mha, &inter, &ffn}) {
    if (g->has_value()) v[i] = (*g)->contiguous();
    // A fresh tensor per group (also the empty ones of absent groups): custom-op outputs may not alias.
    out.push_back(g->has_value() ? at::zeros_like(**g, at::MemoryFormat::Contiguous) : at::empty({0}, ref.options()));
    ++i;
  }
  AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "expected_size_bwd", [&] {
    const scalar_t gE = g_params.item<scalar_t>() - g_sparsity.item<scalar_t>() / scalar_t(c.full);
    std::array<scalar_t*, 5> ptr{};
    for (int k = 0; k < 5; ++k) ptr[k] = v[k].has_value() ? out[k].mutable_data_ptr<scalar_t>() : nullptr;
    add_size_grad<scalar_t>(ptr, v, gE, L, d, H, F);
  });
  return out;
}

// ---- hard_concrete_step: z and keep in one pass (float), the gradients of both in one pass -------
std::tuple<at::Tensor, at::Tensor> zk_fwd(const at::Tensor& log_alpha, const at::Tensor& u, double t, double l, double r,
                                          double eps) {
  check_float(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", u, "u");
  if (log_alpha.scalar_type() != at::kFloat) return {sample_fwd(log_alpha, u, t, l, r), keep_fwd(log_alpha, t, l, r, eps)};
  auto la = log_alpha.contiguous();
  auto uu = u.contiguous();
  auto z = at::empty_like(la), p = at::empty_like(la);
  hc_float<4>(la.const_data_ptr<float>(), uu.const_data_ptr<float>(), nullptr, z.mutable_data_ptr<float>(), la.numel(),
              t, l, r, q0_logit(t, l, r), eps, nullptr, p.mutable_data_ptr<float>());
  return {z, p};
}

at::Tensor zk_bwd(const at::Tensor& gz, const at::Tensor& gk, const at::Tensor& log_alpha, const at::Tensor& u,
                  const at::Tensor& z, double t, double l, double r, double eps) {
  check_same(log_alpha, "log_alpha", gz, "grad_z");
  check_same(log_alpha, "log_alpha", gk, "grad_keep");
  check_same(log_alpha, "log_alpha", z, "z");
  if (log_alpha.scalar_type() != at::kFloat) return sample_bwd(gz, log_alpha, u, t, l, r).add_(keep_bwd(gk, log_alpha, t, l, r, eps));
  auto la = log_alpha.contiguous();
  auto zz = z.contiguous();
  auto out = at::empty_like(la);
  hc_float<5>(la.const_data_ptr<float>(), zz.const_data_ptr<float>(), gz.const_data_ptr<float>(),
              out.mutable_data_ptr<float>(), la.numel(), t, l, r, q0_logit(t, l, r), eps, gk.const_data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_fwd(const at::Tensor& log_alpha, const at::Tensor& u,
                                                                    at::IntArrayRef offsets, int64_t L, int64_t d,
                                                                    int64_t H, int64_t F, double t, double l, double r,
                                                                    double eps) {
  const cofi::NoAutocast no_autocast;
  const char* fn = "cofi::hard_concrete_step_fwd_native";
  cofi_hc_check::stretch_eps(fn, t, l, r, eps);
  cofi_hc_check::sizes(fn, L, d, H, F);
  return cofi_hc_step::fwd(zk_fwd, size_fwd, log_alpha, u, offsets, L, d, H, F, t, l, r, eps);
}

at::Tensor step_bwd(const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_keep,
                    const at::Tensor& grad_params, const at::Tensor& grad_sparsity, const at::Tensor& log_alpha,
                    const at::Tensor& u, const at::Tensor& z, const at::Tensor& keep, at::IntArrayRef offsets, int64_t L, int64_t d, int64_t H,
                    int64_t F, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  const char* fn = "cofi::hard_concrete_step_bwd_native";
  cofi_hc_check::stretch_eps(fn, t, l, r, eps);
  cofi_hc_check::sizes(fn, L, d, H, F);
  cofi_hc_check::size_grads(fn, grad_params, grad_sparsity);
  check_float(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", keep, "keep");
  check_same(log_alpha, "log_alpha", u, "u");
  if (grad_keep.has_value()) check_same(log_alpha, "log_alpha", *grad_keep, "grad_keep");
  if (grad_z.has_value()) check_same(log_alpha, "log_alpha", *grad_z, "grad_z");
  const SizeConsts c = consts(L, d, H, F);
  at::Tensor gk = grad_keep.has_value() ? grad_keep->contiguous().clone() : at::zeros_like(log_alpha);
  at::Tensor kc = keep.contiguous();
  const cofi_hc_step::Views v = cofi_hc_step::views(kc, offsets, L, d, H, F);
  AT_DISPATCH_FLOATING_TYPES(log_alpha.scalar_type(), "hard_concrete_step_bwd", [&] {
    const scalar_t gE = grad_params.item<scalar_t>() - grad_sparsity.item<scalar_t>() / scalar_t(c.full);
    std::array<scalar_t*, 5> ptr{};
    for (int k = 0; k < 5; ++k) ptr[k] = v[k].has_value() ? gk.mutable_data_ptr<scalar_t>() + offsets[k] : nullptr;
    add_size_grad<scalar_t>(ptr, v, gE, L, d, H, F);
  });
  at::Tensor gz = grad_z.has_value() ? grad_z->contiguous() : at::zeros_like(log_alpha);
  return zk_bwd(gz, gk, log_alpha, u, z, t, l, r, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("hard_concrete_step_fwd_native", &step_fwd);
  m.impl("hard_concrete_step_bwd_native", &step_bwd);
  m.impl("hard_concrete_sample_fwd_native", &sample_fwd);
  m.impl("hard_concrete_sample_bwd_native", &sample_bwd);
  m.impl("hard_concrete_keep_prob_fwd_native", &keep_fwd);
  m.impl("hard_concrete_keep_prob_bwd_native", &keep_bwd);
  m.impl("hard_concrete_deterministic_native", &deterministic);
  m.impl("expected_size_fwd_native", &size_fwd);
  m.impl("expected_size_bwd_native", &size_bwd);
}
