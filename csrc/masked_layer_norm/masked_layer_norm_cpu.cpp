// CPU kernels of cofi::masked_layer_norm_fwd_native / masked_layer_norm_bwd_native.
//
// Per row (one task handles a block of rows; a row of d <= a few thousand stays in L1):
//   v = x * z + r;  k = (z != 0);  n = max(sum k, 1)
//   mean = sum(v k) / n;  rstd = 1 / sqrt(sum(((v - mean) k)^2) / n + eps)  (corrected two-pass, below)
//   y = ((v - mean) k rstd * w + b) * z
// Backward per row, with xhat = (v - mean) k rstd, go = g z, dxhat = go w:
//   dv = rstd k (dxhat - sum(dxhat k)/n - xhat sum(dxhat xhat)/n);  dx = dv z;  dr = dv
//   column sums: dw += go xhat, db += go, dz += g (xhat w + b) + dv x
// Column sums are accumulated per row block and summed in block order (deterministic).
// z absent: k = 1, z = 1 (plain LayerNorm with fused residual add).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../fast_math.h"
#include "../autocast_guard.h"

namespace cofi {
namespace {

// Plain loops with `omp simd` reductions (vectorised by GCC without -ffast-math), compiled twice for
// each dtype: an AVX2+FMA clone picked at run time and the x86-64-v2 baseline (at::vec is generic,
// i.e. scalar, in this extension's baseline build).
template <typename T>
struct Args {
  const T* x;
  const T* r;  // residual, or d zeros
  const T* w;
  const T* b;
  const T* z;  // hidden_z, or the ones of k
  const T* k;  // keep mask (z != 0), ones without z
  bool has_z;
  T n;  // kept dims, at least 1
  T inv_n;
  T eps;
  int64_t N, d;
};

template <typename T>
COFI_INLINE void fwd_rows(const Args<T>& A, T* __restrict y, T* mean_out, T* rstd_out, int64_t r0, int64_t r1) {
  const int64_t d = A.d;
  const T* __restrict z = A.z;
  const T* __restrict k = A.k;
  const T* __restrict w = A.w;
  const T* __restrict b = A.b;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = A.x + row * d;
    const T* __restrict rr = A.r == nullptr ? nullptr : A.r + row * d;
    T* __restrict yr = y + row * d;
    T s = 0;
    if (rr) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j] + rr[j];
        yr[j] = v;
        s += v * k[j];
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j];
        yr[j] = v;
        s += v * k[j];
      }
    }
    // Corrected two-pass statistics: the second pass also sums the residuals c of the first mean and
    // corrects mean and variance with them, so a row that is constant over its kept dims gets its
    // value back exactly and normalises to exactly 0 (not rounding noise times 1 / sqrt(eps)).
    const T mean0 = s * A.inv_n;
    T s1 = 0, ss = 0;
#pragma omp simd reduction(+ : s1, ss)
    for (int64_t j = 0; j < d; ++j) {
      const T c = (yr[j] - mean0) * k[j];
      s1 += c;
      ss += c * c;
    }
    const T corr = s1 / A.n;
    const T mean = mean0 + corr;
    const T var = std::max((ss - s1 * corr) * A.inv_n, T(0));
    const T rstd = T(1) / std::sqrt(var + A.eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = ((yr[j] - mean) * k[j] * rstd * w[j] + b[j]) * z[j];
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx, dr: [N, d] or null; cols: [nblocks, 3, d] partial sums of (dw, db, dz). scratch: 2 d.
template <typename T>
COFI_INLINE void bwd_blocks(const Args<T>& A, const T* g, const T* mean, const T* rstd, T* dx, T* dr, T* cols,
                            int64_t nblocks, bool want_cols, int64_t b0, int64_t b1, T* __restrict xh,
                            T* __restrict dxh) {
  const int64_t d = A.d, N = A.N;
  const T* __restrict z = A.z;
  const T* __restrict k = A.k;
  const T* __restrict w = A.w;
  const T* __restrict bb = A.b;
  for (int64_t blk = b0; blk < b1; ++blk) {
    T* __restrict dw = cols + blk * 3 * d;
    T* __restrict db = dw + d;
    T* __restrict dz = db + d;
    if (want_cols) std::fill(dw, dw + 3 * d, T(0));
    const int64_t r0 = blk * N / nblocks, r1 = (blk + 1) * N / nblocks;
    for (int64_t row = r0; row < r1; ++row) {
      const T* __restrict gr = g + row * d;
      const T* __restrict xr = A.x + row * d;
      const T* __restrict rr = A.r == nullptr ? nullptr : A.r + row * d;
      const T m = mean[row], rs = rstd[row];
      T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j] + (rr ? rr[j] : T(0));
        const T xhat = (v - m) * k[j] * rs;
        const T go = gr[j] * z[j];
        const T dxhat = go * w[j];
        xh[j] = xhat;
        dxh[j] = dxhat;
        s1 += dxhat * k[j];
        s2 += dxhat * xhat;
      }
      if (want_cols) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const T go = gr[j] * z[j];
          dw[j] += go * xh[j];
          db[j] += go;
        }
      }
      const T c1 = s1 * A.inv_n, c2 = s2 * A.inv_n;
      T* __restrict dxr = dx ? dx + row * d : nullptr;
      T* __restrict drr = dr ? dr + row * d : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const T dv = (dxh[j] - c1 - xh[j] * c2) * rs * k[j];
        xh[j] = dv;  // xh now holds dv; the dz pass below needs xhat again, so it recomputes it
        if (drr) drr[j] = dv;
        if (dxr) dxr[j] = dv * z[j];
      }
      if (want_cols && A.has_z) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          const T v = xr[j] * z[j] + (rr ? rr[j] : T(0));
          const T xhat = (v - m) * k[j] * rs;
          dz[j] += gr[j] * (xhat * w[j] + bb[j]) + xh[j] * xr[j];
        }
      }
    }
  }
}

#define COFI_LN_CLONES(T, SUF)                                                                                     \
  void fwd_##SUF##_base(const Args<T>& A, T* y, T* mo, T* ro, int64_t r0, int64_t r1) {                           \
    fwd_rows<T>(A, y, mo, ro, r0, r1);                                                                               \
  }                                                                                                                  \
  void bwd_##SUF##_base(const Args<T>& A, const T* g, const T* mean, const T* rstd, T* dx, T* dr, T* cols,         \
                        int64_t nb, bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {                               \
    bwd_blocks<T>(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);                                          \
  }                                                                                                                  \
  COFI_LN_AVX2(T, SUF)

#if defined(__x86_64__) && defined(__GNUC__)
#define COFI_LN_AVX2(T, SUF)                                                                                       \
  __attribute__((target("avx2,fma"))) void fwd_##SUF##_avx2(const Args<T>& A, T* y, T* mo, T* ro, int64_t r0,     \
                                                            int64_t r1) {                                          \
    fwd_rows<T>(A, y, mo, ro, r0, r1);                                                                               \
  }                                                                                                                  \
  __attribute__((target("avx2,fma"))) void bwd_##SUF##_avx2(const Args<T>& A, const T* g, const T* mean,           \
                                                            const T* rstd, T* dx, T* dr, T* cols, int64_t nb,      \
                                                            bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {       \
    bwd_blocks<T>(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);                                          \
  }
bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define COFI_LN_AVX2(T, SUF)
bool have_avx2() { return false; }
#endif

COFI_LN_CLONES(float, f)
COFI_LN_CLONES(double, d)

template <typename T>
void fwd_rows_any(const Args<T>& A, T* y, T* mo, T* ro, int64_t r0, int64_t r1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) {
    if constexpr (std::is_same_v<T, float>) return fwd_f_avx2(A, y, mo, ro, r0, r1);
    else return fwd_d_avx2(A, y, mo, ro, r0, r1);
  }
#endif
  if constexpr (std::is_same_v<T, float>) fwd_f_base(A, y, mo, ro, r0, r1);
  else fwd_d_base(A, y, mo, ro, r0, r1);
}

template <typename T>
void bwd_blocks_any(const Args<T>& A, const T* g, const T* mean, const T* rstd, T* dx, T* dr, T* cols, int64_t nb,
                    bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) {
    if constexpr (std::is_same_v<T, float>) return bwd_f_avx2(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
    else return bwd_d_avx2(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
  }
#endif
  if constexpr (std::is_same_v<T, float>) bwd_f_base(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
  else bwd_d_base(A, g, mean, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
}

template <typename T>
void ln_fwd(const Args<T>& A, T* y, T* mean_out, T* rstd_out) {
  at::parallel_for(0, A.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(A.d, 1)), [&](int64_t r0, int64_t r1) {
    fwd_rows_any<T>(A, y, mean_out, rstd_out, r0, r1);
  });
}

template <typename T>
void ln_bwd(const Args<T>& A, const T* g, const T* mean, const T* rstd, T* dx, T* dr, T* cols, int64_t nblocks,
            bool want_cols) {
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> scratch(2 * A.d);
    bwd_blocks_any<T>(A, g, mean, rstd, dx, dr, cols, nblocks, want_cols, b0, b1, scratch.data(), scratch.data() + A.d);
  });
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "cofi::masked_layer_norm_native: eps must be finite and >= 0, got ", eps);
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const at::Tensor& bias, const c10::optional<at::Tensor>& hidden_z) {
  TORCH_CHECK(x.dim() == 2, "cofi::masked_layer_norm_native: x must be [N, d], got ", x.sizes());
  const int64_t d = x.size(1);
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native: residual must match x, got ", residual->sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native: weight must be [d=", d, "] in x's dtype, got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == d && bias.scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native: bias must be [d=", d, "] in x's dtype, got ", bias.sizes());
  if (hidden_z) TORCH_CHECK(hidden_z->dim() == 1 && hidden_z->size(0) == d && hidden_z->scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native: hidden_z must be [d=", d, "] in x's dtype, got ", hidden_z->sizes());
}

template <typename T>
Args<T> make_args(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b, const at::Tensor& z,
                  const at::Tensor& k, double eps) {
  Args<T> A;
  A.x = x.data_ptr<T>();
  A.r = r.defined() ? r.data_ptr<T>() : nullptr;
  A.w = w.data_ptr<T>();
  A.b = b.data_ptr<T>();
  A.k = k.data_ptr<T>();
  A.has_z = z.defined();
  A.z = z.defined() ? z.data_ptr<T>() : A.k;  // no hidden_z: k is all ones
  A.N = x.size(0);
  A.d = x.size(1);
  A.eps = T(eps);
  return A;
}

struct Prepared {
  at::Tensor x, r, w, b, z, k;
  double n, inv_n;
};

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                 const at::Tensor& bias, const c10::optional<at::Tensor>& hidden_z) {
  check_inputs(x, residual, weight, bias, hidden_z);
  Prepared p;
  p.x = x.contiguous();
  if (residual) p.r = residual->contiguous();
  p.w = weight.contiguous();
  p.b = bias.contiguous();
  const int64_t d = x.size(1);
  if (hidden_z) {
    p.z = hidden_z->contiguous();
    p.k = p.z.ne(0).to(x.scalar_type());
    const double kept = p.k.sum().item<double>();  // CPU tensor: no device sync
    p.n = std::max(kept, 1.0);
  } else {
    p.k = at::ones({d}, x.options());
    p.n = std::max<double>(double(d), 1.0);
  }
  p.inv_n = 1.0 / p.n;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cpu(
    const at::Tensor& x_, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& hidden_z, double eps) {
  const NoAutocast no_autocast;
  check_eps(eps);
  Prepared p = prepare(x_, residual, weight, bias, hidden_z);
  const int64_t N = p.x.size(0);
  at::Tensor y = at::empty_like(p.x);
  at::Tensor mean = at::empty({N}, p.x.options()), rstd = at::empty({N}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "masked_layer_norm_fwd_cpu", [&] {
    Args<scalar_t> A = make_args<scalar_t>(p.x, p.r, p.w, p.b, p.z, p.k, eps);
    A.n = scalar_t(p.n);
    A.inv_n = scalar_t(p.inv_n);
    ln_fwd<scalar_t>(A, y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> masked_layer_norm_bwd_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                  const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                                                  const at::Tensor& bias, const c10::optional<at::Tensor>& hidden_z,
                                                  const at::Tensor& mean_, const at::Tensor& rstd_, double eps,
                                                  c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_eps(eps);
  TORCH_CHECK(needs_.size() == 5, "cofi::masked_layer_norm_bwd_native: needs must have 5 entries, got ", needs_.size());
  bool needs[5];
  for (int i = 0; i < 5; ++i) needs[i] = needs_.get(i);
  Prepared p = prepare(x_, residual, weight, bias, hidden_z);
  const int64_t N = p.x.size(0), d = p.x.size(1);
  TORCH_CHECK(grad_.sizes() == p.x.sizes(), "cofi::masked_layer_norm_bwd_native: grad must match x, got ", grad_.sizes());
  TORCH_CHECK(mean_.numel() == N && rstd_.numel() == N && mean_.scalar_type() == p.x.scalar_type() &&
                  rstd_.scalar_type() == p.x.scalar_type(),
              "cofi::masked_layer_norm_bwd_native: mean and rstd must be [N=", N, "] in x's dtype");
  const at::Tensor g = grad_.contiguous(), mean = mean_.contiguous(), rstd = rstd_.contiguous();
  auto E = [&] { return at::empty({0}, p.x.options()); };
  at::Tensor dx = needs[0] ? at::empty_like(p.x) : E();
  at::Tensor dr = (needs[1] && residual) ? at::empty_like(p.x) : E();
  const bool want_cols = needs[2] || needs[3] || (needs[4] && hidden_z);
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(N, 4 * at::get_num_threads()));
  at::Tensor cols = at::empty({want_cols ? nblocks : 0, 3, d}, p.x.options());
  if (N > 0 && (needs[0] || needs[1] || want_cols)) {
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "masked_layer_norm_bwd_cpu", [&] {
      Args<scalar_t> A = make_args<scalar_t>(p.x, p.r, p.w, p.b, p.z, p.k, eps);
      A.inv_n = scalar_t(p.inv_n);  // ln_bwd reads the saved mean / rstd, not n
      ln_bwd<scalar_t>(A, g.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                       needs[0] ? dx.data_ptr<scalar_t>() : nullptr, dr.numel() ? dr.data_ptr<scalar_t>() : nullptr,
                       want_cols ? cols.data_ptr<scalar_t>() : nullptr, nblocks, want_cols);
    });
  }
  at::Tensor sums = want_cols ? (N > 0 ? cols.sum(0) : at::zeros({3, d}, p.x.options())) : E();
  at::Tensor dw = needs[2] ? sums[0] : E();
  at::Tensor db = needs[3] ? sums[1] : E();
  at::Tensor dz = (needs[4] && hidden_z) ? sums[2] : E();
  return {dx, dr, dw.clone(), db.clone(), dz.clone()};  // rows of one buffer: no aliasing outputs
}

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("masked_layer_norm_fwd_native", &masked_layer_norm_fwd_cpu);
  m.impl("masked_layer_norm_bwd_native", &masked_layer_norm_bwd_cpu);
}

}  // namespace cofi
