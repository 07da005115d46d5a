// CPU kernels of cofi::masked_layer_norm_fwd_native / masked_layer_norm_bwd_native.
//
// Per row (one task handles a block of rows; a row of d <= a few thousand stays in L1):
//   v = x * z + r;  k = (z != 0);  n = max(sum k, 1)
//   mean = sum(v k) / n;  rstd = 1 / sqrt(sum(((v - mean) k)^2) / n + eps)
//   y = ((v - mean) k rstd * w + b) * z
// Backward per row, with xhat = (v - mean) k rstd, go = g z, dxhat = go w:
//   dv = rstd k (dxhat - sum(dxhat k)/n - xhat sum(dxhat xhat)/n);  dx = dv z;  dr = dv
//   column sums: dw += go xhat, db += go, dz += g (xhat w + b) + dv x
// Column sums are accumulated per row block and summed in block order (deterministic).
// z absent: k = 1, z = 1 (plain LayerNorm with fused residual add).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace cofi {
namespace {

using at::vec::Vectorized;

template <typename T>
struct Args {
  const T* x;
  const T* r;  // nullable
  const T* w;
  const T* b;
  const T* z;  // nullable
  const T* k;  // keep mask, always set (ones without z)
  T inv_n;
  T eps;
  int64_t N, d;
};

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// v = x z + r into out; returns sum(v k).
template <typename T>
inline T load_v(const Args<T>& A, int64_t row, T* out) {
  using V = Vectorized<T>;
  const T* xr = A.x + row * A.d;
  const T* rr = A.r ? A.r + row * A.d : nullptr;
  V acc(T(0));
  int64_t j = 0;
  for (; j + V::size() <= A.d; j += V::size()) {
    V v = V::loadu(xr + j);
    if (A.z) v = v * V::loadu(A.z + j);
    if (rr) v = v + V::loadu(rr + j);
    v.store(out + j);
    acc = acc + v * V::loadu(A.k + j);
  }
  T s = hsum(acc);
  for (; j < A.d; ++j) {
    T v = xr[j];
    if (A.z) v *= A.z[j];
    if (rr) v += rr[j];
    out[j] = v;
    s += v * A.k[j];
  }
  return s;
}

template <typename T>
inline void fwd_rows(const Args<T>& A, T* y, T* mean_out, T* rstd_out,
                                                           int64_t r0, int64_t r1) {
  using V = Vectorized<T>;
  const int64_t d = A.d;
    for (int64_t row = r0; row < r1; ++row) {
      T* yr = y + row * d;
      const T mean = load_v(A, row, yr) * A.inv_n;  // yr holds v
      const V mv(mean);
      V acc(T(0));
      int64_t j = 0;
      for (; j + V::size() <= d; j += V::size()) {
        V c = (V::loadu(yr + j) - mv) * V::loadu(A.k + j);
        acc = acc + c * c;
      }
      T ss = hsum(acc);
      for (; j < d; ++j) {
        T c = (yr[j] - mean) * A.k[j];
        ss += c * c;
      }
      const T rstd = T(1) / std::sqrt(ss * A.inv_n + A.eps);
      const V rv(rstd);
      j = 0;
      for (; j + V::size() <= d; j += V::size()) {
        V o = (V::loadu(yr + j) - mv) * V::loadu(A.k + j) * rv * V::loadu(A.w + j) + V::loadu(A.b + j);
        if (A.z) o = o * V::loadu(A.z + j);
        o.store(yr + j);
      }
      for (; j < d; ++j) {
        T o = (yr[j] - mean) * A.k[j] * rstd * A.w[j] + A.b[j];
        yr[j] = A.z ? o * A.z[j] : o;
      }
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
}


template <typename T>
void ln_fwd(const Args<T>& A, T* y, T* mean_out, T* rstd_out) {
  at::parallel_for(0, A.N, std::max<int64_t>(1, 16384 / std::max<int64_t>(A.d, 1)), [&](int64_t r0, int64_t r1) {
    fwd_rows<T>(A, y, mean_out, rstd_out, r0, r1);
  });
}

// dx, dr: [N, d] or null; cols: [nblocks, 3, d] partial sums of (dw, db, dz).
template <typename T>
inline void bwd_blocks(const Args<T>& A, const T* g, const T* mean,
                                                             const T* rstd, T* dx, T* dr, T* cols, int64_t nblocks,
                                                             bool want_cols, int64_t b0, int64_t b1) {
  using V = Vectorized<T>;
  const int64_t d = A.d, N = A.N;
    std::vector<T> vbuf(d), xh(d), dxh(d);
    for (int64_t blk = b0; blk < b1; ++blk) {
      T* dw = cols + blk * 3 * d;
      T* db = dw + d;
      T* dz = db + d;
      if (want_cols) std::fill(dw, dw + 3 * d, T(0));
      const int64_t r0 = blk * N / nblocks, r1 = (blk + 1) * N / nblocks;
      for (int64_t row = r0; row < r1; ++row) {
        load_v(A, row, vbuf.data());
        const T* gr = g + row * d;
        const T* xr = A.x + row * d;
        const V mv(mean[row]), rv(rstd[row]);
        V a1(T(0)), a2(T(0));
        int64_t j = 0;
        for (; j + V::size() <= d; j += V::size()) {
          V xhat = (V::loadu(vbuf.data() + j) - mv) * V::loadu(A.k + j) * rv;
          V go = V::loadu(gr + j);
          if (A.z) go = go * V::loadu(A.z + j);
          V dxhat = go * V::loadu(A.w + j);
          xhat.store(xh.data() + j);
          dxhat.store(dxh.data() + j);
          a1 = a1 + dxhat * V::loadu(A.k + j);
          a2 = a2 + dxhat * xhat;
          if (want_cols) {
            (V::loadu(dw + j) + go * xhat).store(dw + j);
            (V::loadu(db + j) + go).store(db + j);
          }
        }
        T s1 = hsum(a1), s2 = hsum(a2);
        for (; j < d; ++j) {
          T xhat = (vbuf[j] - mean[row]) * A.k[j] * rstd[row];
          T go = A.z ? gr[j] * A.z[j] : gr[j];
          T dxhat = go * A.w[j];
          xh[j] = xhat;
          dxh[j] = dxhat;
          s1 += dxhat * A.k[j];
          s2 += dxhat * xhat;
          if (want_cols) {
            dw[j] += go * xhat;
            db[j] += go;
          }
        }
        const V c1(s1 * A.inv_n), c2(s2 * A.inv_n);
        T* dxr = dx ? dx + row * d : nullptr;
        T* drr = dr ? dr + row * d : nullptr;
        j = 0;
        for (; j + V::size() <= d; j += V::size()) {
          V xhat = V::loadu(xh.data() + j);
          V dv = (V::loadu(dxh.data() + j) - c1 - xhat * c2) * rv * V::loadu(A.k + j);
          if (drr) dv.store(drr + j);
          if (dxr) (A.z ? dv * V::loadu(A.z + j) : dv).store(dxr + j);
          if (want_cols && A.z)
            (V::loadu(dz + j) + V::loadu(gr + j) * (xhat * V::loadu(A.w + j) + V::loadu(A.b + j)) +
             dv * V::loadu(xr + j)).store(dz + j);
        }
        for (; j < d; ++j) {
          T dv = (dxh[j] - s1 * A.inv_n - xh[j] * s2 * A.inv_n) * rstd[row] * A.k[j];
          if (drr) drr[j] = dv;
          if (dxr) dxr[j] = A.z ? dv * A.z[j] : dv;
          if (want_cols && A.z) dz[j] += gr[j] * (xh[j] * A.w[j] + A.b[j]) + dv * xr[j];
        }
      }
    }
}


template <typename T>
void ln_bwd(const Args<T>& A, const T* g, const T* mean, const T* rstd, T* dx, T* dr, T* cols, int64_t nblocks,
            bool want_cols) {
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    bwd_blocks<T>(A, g, mean, rstd, dx, dr, cols, nblocks, want_cols, b0, b1);
  });
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
  A.z = z.defined() ? z.data_ptr<T>() : nullptr;
  A.k = k.data_ptr<T>();
  A.N = x.size(0);
  A.d = x.size(1);
  A.eps = T(eps);
  return A;
}

struct Prepared {
  at::Tensor x, r, w, b, z, k;
  double inv_n;
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
    p.inv_n = 1.0 / std::max(kept, 1.0);
  } else {
    p.k = at::ones({d}, x.options());
    p.inv_n = 1.0 / std::max<double>(double(d), 1.0);
  }
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cpu(
    const at::Tensor& x_, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, const at::Tensor& bias,
    const c10::optional<at::Tensor>& hidden_z, double eps) {
  if (!hidden_z.has_value()) {
    // Unmasked (the compact runtime): ATen's LayerNorm kernel is per-CPU-capability vectorised,
    // which this extension's baseline build is not; same mean/rstd definition as ours.
    check_inputs(x_, residual, weight, bias, hidden_z);
    const at::Tensor v = residual ? at::add(x_, *residual) : x_.contiguous();
    auto [y, mean, rstd] = at::native_layer_norm(v, {x_.size(1)}, weight, bias, eps);
    return {y, mean.reshape({-1}), rstd.reshape({-1})};
  }
  Prepared p = prepare(x_, residual, weight, bias, hidden_z);
  const int64_t N = p.x.size(0);
  at::Tensor y = at::empty_like(p.x);
  at::Tensor mean = at::empty({N}, p.x.options()), rstd = at::empty({N}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "masked_layer_norm_fwd_cpu", [&] {
    Args<scalar_t> A = make_args<scalar_t>(p.x, p.r, p.w, p.b, p.z, p.k, eps);
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
      A.inv_n = scalar_t(p.inv_n);
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
