// CPU kernels of cofi::masked_rms_norm_fwd_native / masked_rms_norm_bwd_native.
//
// Per row (one task handles a block of rows; a row of d <= a few thousand stays in L1):
//   s = x * z + r;  k = (z != 0);  n = max(sum k, 1)
//   rstd = 1 / sqrt(sum(s^2 k) / n + eps);  y = s k rstd * w * z   (s is also stored when wanted)
// Backward per row, with xhat = s k rstd, go = g z, dxhat = go w, gs the gradient of the stored s:
//   ds = rstd k (dxhat - xhat sum(dxhat xhat)/n) + gs;  dx = ds z;  dr = ds
//   column sums: dw += go xhat, dz += g xhat w + ds x
// Column sums are accumulated per row block and summed in block order (deterministic).
// z absent: k = 1, z = 1 (plain RMSNorm with fused residual add).
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

// Plain loops with `omp simd` reductions, compiled twice per dtype (an AVX2+FMA clone picked at run
// time and the x86-64-v2 baseline), as in masked_layer_norm_cpu.cpp.
template <typename T>
struct Args {
  const T* x;
  const T* r;  // residual or null
  const T* w;
  const T* z;  // hidden_z, or the ones of k
  const T* k;  // keep mask (z != 0), ones without z
  bool has_z;
  T inv_n;  // 1 / max(kept dims, 1)
  T eps;
  int64_t N, d;
};

template <typename T>
COFI_INLINE void fwd_rows(const Args<T>& A, T* y, T* s_out, T* rstd_out, int64_t r0,
                          int64_t r1) {
  const int64_t d = A.d;
  const T* __restrict z = A.z;
  const T* __restrict k = A.k;
  const T* __restrict w = A.w;
  for (int64_t row = r0; row < r1; ++row) {
    const T* __restrict xr = A.x + row * d;
    const T* __restrict rr = A.r == nullptr ? nullptr : A.r + row * d;
    T* sr = s_out ? s_out + row * d : y + row * d;  // s lives in y until y is written (may alias yr)
    T* yr = y + row * d;
    T ss = 0;
    if (rr) {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j] + rr[j];
        sr[j] = v;
        ss += v * v * k[j];
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j];
        sr[j] = v;
        ss += v * v * k[j];
      }
    }
    const T rstd = T(1) / std::sqrt(ss * A.inv_n + A.eps);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = sr[j] * k[j] * rstd * w[j] * z[j];
    rstd_out[row] = rstd;
  }
}

// dx, dr: [N, d] or null; gs: [N, d] or null; cols: [nblocks, 2, d] partial sums of (dw, dz).
// scratch: 2 d.
template <typename T>
COFI_INLINE void bwd_blocks(const Args<T>& A, const T* g, const T* gs, const T* rstd, T* dx, T* dr, T* cols,
                            int64_t nblocks, bool want_cols, int64_t b0, int64_t b1, T* __restrict xh,
                            T* __restrict dxh) {
  const int64_t d = A.d, N = A.N;
  const T* __restrict z = A.z;
  const T* __restrict k = A.k;
  const T* __restrict w = A.w;
  for (int64_t blk = b0; blk < b1; ++blk) {
    T* __restrict dw = cols + blk * 2 * d;
    T* __restrict dz = dw + d;
    if (want_cols) std::fill(dw, dw + 2 * d, T(0));
    const int64_t r0 = blk * N / nblocks, r1 = (blk + 1) * N / nblocks;
    for (int64_t row = r0; row < r1; ++row) {
      const T* __restrict gr = g + row * d;
      const T* __restrict gsr = gs ? gs + row * d : nullptr;
      const T* __restrict xr = A.x + row * d;
      const T* __restrict rr = A.r == nullptr ? nullptr : A.r + row * d;
      const T rs = rstd[row];
      T s2 = 0;
#pragma omp simd reduction(+ : s2)
      for (int64_t j = 0; j < d; ++j) {
        const T v = xr[j] * z[j] + (rr ? rr[j] : T(0));
        const T xhat = v * k[j] * rs;
        const T dxhat = gr[j] * z[j] * w[j];
        xh[j] = xhat;
        dxh[j] = dxhat;
        s2 += dxhat * xhat;
      }
      if (want_cols) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dw[j] += gr[j] * z[j] * xh[j];
      }
      const T c2 = s2 * A.inv_n;
      T* __restrict dxr = dx ? dx + row * d : nullptr;
      T* __restrict drr = dr ? dr + row * d : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const T ds = (dxh[j] - xh[j] * c2) * rs * k[j] + (gsr ? gsr[j] : T(0));
        dxh[j] = ds;  // dxh now holds ds for the dz pass
        if (drr) drr[j] = ds;
        if (dxr) dxr[j] = ds * z[j];
      }
      if (want_cols && A.has_z) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dz[j] += gr[j] * xh[j] * w[j] + dxh[j] * xr[j];
      }
    }
  }
}

#define COFI_RMS_CLONES(T, SUF)                                                                                    \
  void fwd_##SUF##_base(const Args<T>& A, T* y, T* so, T* ro, int64_t r0, int64_t r1) {                           \
    fwd_rows<T>(A, y, so, ro, r0, r1);                                                                               \
  }                                                                                                                  \
  void bwd_##SUF##_base(const Args<T>& A, const T* g, const T* gs, const T* rstd, T* dx, T* dr, T* cols,           \
                        int64_t nb, bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {                               \
    bwd_blocks<T>(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);                                            \
  }                                                                                                                  \
  COFI_RMS_AVX2(T, SUF)

#if defined(__x86_64__) && defined(__GNUC__)
#define COFI_RMS_AVX2(T, SUF)                                                                                      \
  __attribute__((target("avx2,fma"))) void fwd_##SUF##_avx2(const Args<T>& A, T* y, T* so, T* ro, int64_t r0,     \
                                                            int64_t r1) {                                          \
    fwd_rows<T>(A, y, so, ro, r0, r1);                                                                               \
  }                                                                                                                  \
  __attribute__((target("avx2,fma"))) void bwd_##SUF##_avx2(const Args<T>& A, const T* g, const T* gs,             \
                                                            const T* rstd, T* dx, T* dr, T* cols, int64_t nb,      \
                                                            bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {       \
    bwd_blocks<T>(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);                                            \
  }
bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
#define COFI_RMS_AVX2(T, SUF)
bool have_avx2() { return false; }
#endif

COFI_RMS_CLONES(float, f)
COFI_RMS_CLONES(double, d)

template <typename T>
void fwd_rows_any(const Args<T>& A, T* y, T* so, T* ro, int64_t r0, int64_t r1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) {
    if constexpr (std::is_same_v<T, float>) return fwd_f_avx2(A, y, so, ro, r0, r1);
    else return fwd_d_avx2(A, y, so, ro, r0, r1);
  }
#endif
  if constexpr (std::is_same_v<T, float>) fwd_f_base(A, y, so, ro, r0, r1);
  else fwd_d_base(A, y, so, ro, r0, r1);
}

template <typename T>
void bwd_blocks_any(const Args<T>& A, const T* g, const T* gs, const T* rstd, T* dx, T* dr, T* cols, int64_t nb,
                    bool wc, int64_t b0, int64_t b1, T* xh, T* dxh) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) {
    if constexpr (std::is_same_v<T, float>) return bwd_f_avx2(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
    else return bwd_d_avx2(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
  }
#endif
  if constexpr (std::is_same_v<T, float>) bwd_f_base(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
  else bwd_d_base(A, g, gs, rstd, dx, dr, cols, nb, wc, b0, b1, xh, dxh);
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "cofi::masked_rms_norm_native: eps must be finite and >= 0, got ", eps);
}

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& hidden_z) {
  TORCH_CHECK(x.dim() == 2, "cofi::masked_rms_norm_native: x must be [N, d], got ", x.sizes());
  const int64_t d = x.size(1);
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "cofi::masked_rms_norm_native: residual must match x, got ", residual->sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.scalar_type() == x.scalar_type(), "cofi::masked_rms_norm_native: weight must be [d=", d, "] in x's dtype, got ", weight.sizes());
  if (hidden_z) TORCH_CHECK(hidden_z->dim() == 1 && hidden_z->size(0) == d && hidden_z->scalar_type() == x.scalar_type(), "cofi::masked_rms_norm_native: hidden_z must be [d=", d, "] in x's dtype, got ", hidden_z->sizes());
}

struct Prepared {
  at::Tensor x, r, w, z, k;
  double inv_n;
};

Prepared prepare(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& hidden_z) {
  check_inputs(x, residual, weight, hidden_z);
  Prepared p;
  p.x = x.contiguous();
  if (residual) p.r = residual->contiguous();
  p.w = weight.contiguous();
  const int64_t d = x.size(1);
  double n;
  if (hidden_z) {
    p.z = hidden_z->contiguous();
    p.k = p.z.ne(0).to(x.scalar_type());
    n = std::max(p.k.sum().item<double>(), 1.0);  // CPU tensor: no device sync
  } else {
    p.k = at::ones({d}, x.options());
    n = std::max<double>(double(d), 1.0);
  }
  p.inv_n = 1.0 / n;
  return p;
}

template <typename T>
Args<T> make_args(const Prepared& p, double eps) {
  Args<T> A;
  A.x = p.x.data_ptr<T>();
  A.r = p.r.defined() ? p.r.data_ptr<T>() : nullptr;
  A.w = p.w.data_ptr<T>();
  A.k = p.k.data_ptr<T>();
  A.has_z = p.z.defined();
  A.z = p.z.defined() ? p.z.data_ptr<T>() : A.k;  // no hidden_z: k is all ones
  A.inv_n = T(p.inv_n);
  A.eps = T(eps);
  A.N = p.x.size(0);
  A.d = p.x.size(1);
  return A;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_rms_norm_fwd_cpu(const at::Tensor& x_,
                                                                       const c10::optional<at::Tensor>& residual,
                                                                       const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& hidden_z,
                                                                       double eps, bool want_sum) {
  const NoAutocast no_autocast;
  check_eps(eps);
  Prepared p = prepare(x_, residual, weight, hidden_z);
  const int64_t N = p.x.size(0);
  at::Tensor y = at::empty_like(p.x);
  at::Tensor s = want_sum ? at::empty_like(p.x) : at::empty({0}, p.x.options());
  at::Tensor rstd = at::empty({N}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "masked_rms_norm_fwd_cpu", [&] {
    const Args<scalar_t> A = make_args<scalar_t>(p, eps);
    scalar_t* so = want_sum ? s.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(A.d, 1)), [&](int64_t r0, int64_t r1) {
      fwd_rows_any<scalar_t>(A, y.data_ptr<scalar_t>(), so, rstd.data_ptr<scalar_t>(), r0, r1);
    });
  });
  return {y, s, rstd};
}

std::vector<at::Tensor> masked_rms_norm_bwd_cpu(const at::Tensor& grad_, const c10::optional<at::Tensor>& grad_sum_,
                                                const at::Tensor& x_, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, const c10::optional<at::Tensor>& hidden_z,
                                                const at::Tensor& rstd_, c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  TORCH_CHECK(needs_.size() == 4, "cofi::masked_rms_norm_bwd_native: needs must have 4 entries, got ", needs_.size());
  bool needs[4];
  for (int i = 0; i < 4; ++i) needs[i] = needs_.get(i);
  Prepared p = prepare(x_, residual, weight, hidden_z);
  const int64_t N = p.x.size(0), d = p.x.size(1);
  TORCH_CHECK(grad_.sizes() == p.x.sizes() && grad_.scalar_type() == p.x.scalar_type(),
              "cofi::masked_rms_norm_bwd_native: grad must match x, got ", grad_.sizes());
  if (grad_sum_) TORCH_CHECK(grad_sum_->sizes() == p.x.sizes() && grad_sum_->scalar_type() == p.x.scalar_type(),
                             "cofi::masked_rms_norm_bwd_native: grad_sum must match x, got ", grad_sum_->sizes());
  TORCH_CHECK(rstd_.numel() == N && rstd_.scalar_type() == p.x.scalar_type(),
              "cofi::masked_rms_norm_bwd_native: rstd must be [N=", N, "] in x's dtype");
  const at::Tensor g = grad_.contiguous(), rstd = rstd_.contiguous();
  const at::Tensor gs = grad_sum_ ? grad_sum_->contiguous() : at::Tensor();
  auto E = [&] { return at::empty({0}, p.x.options()); };
  at::Tensor dx = needs[0] ? at::empty_like(p.x) : E();
  at::Tensor dr = (needs[1] && residual) ? at::empty_like(p.x) : E();
  const bool want_cols = needs[2] || (needs[3] && hidden_z);
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(N, 4 * at::get_num_threads()));
  at::Tensor cols = at::empty({want_cols ? nblocks : 0, 2, d}, p.x.options());
  if (N > 0 && (needs[0] || dr.numel() || want_cols)) {
    AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "masked_rms_norm_bwd_cpu", [&] {
      const Args<scalar_t> A = make_args<scalar_t>(p, 0.0);  // the backward reads the saved rstd, not eps
      const scalar_t* gsp = gs.defined() ? gs.data_ptr<scalar_t>() : nullptr;
      scalar_t* dxp = needs[0] ? dx.data_ptr<scalar_t>() : nullptr;
      scalar_t* drp = dr.numel() ? dr.data_ptr<scalar_t>() : nullptr;
      scalar_t* cp = want_cols ? cols.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<scalar_t> scratch(2 * d);
        bwd_blocks_any<scalar_t>(A, g.data_ptr<scalar_t>(), gsp, rstd.data_ptr<scalar_t>(), dxp, drp, cp, nblocks,
                                 want_cols, b0, b1, scratch.data(), scratch.data() + d);
      });
    });
  }
  at::Tensor sums = want_cols ? (N > 0 ? cols.sum(0) : at::zeros({2, d}, p.x.options())) : E();
  at::Tensor dw = needs[2] ? sums[0].clone() : E();  // rows of one buffer: no aliasing outputs
  at::Tensor dz = (needs[3] && hidden_z) ? sums[1].clone() : E();
  return {dx, dr, dw, dz};
}

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("masked_rms_norm_fwd_native", &masked_rms_norm_fwd_cpu);
  m.impl("masked_rms_norm_bwd_native", &masked_rms_norm_bwd_cpu);
}

}  // namespace cofi
