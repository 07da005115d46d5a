// CPU kernels of cofi::masked_attention_{fwd,bwd}_native (see python/cofi/ops/masked_attention.py).
//
// One task per (batch, live head) -- per query block too in the forward when there are few -- run
// with at::parallel_for. Per task, flash-attention style:
// query blocks x key blocks, scores of one block in a thread-local buffer, online softmax in the
// forward (running max / sum per row), only the per-row log-sum-exp kept for the backward, which
// recomputes the probabilities block by block. The block products are BLAS gemms (MKL's
// sgemm_/dgemm_, exported by libtorch_cpu; called single-threaded inside the parallel region);
// the elementwise work (exp, rescale, dropout hash) is in loops written for the auto-vectoriser and
// built twice (AVX2+FMA and baseline) with target_clones, since setup.py targets x86-64-v2 and
// at::vec's AVX2 code paths are only enabled in ATen's own per-capability builds.
//
// Key padding: the kept keys of a batch row are gathered into a contiguous block first, so padded
// keys are never read (NaN in padding cannot leak; padded batches also do less work) and their
// gradients are exactly 0. Dropout: counter-based hash of (seed, b * H + h, i, j) identical to
// python/cofi/ops/reference/masked_attention.py.
//
// Grouped-query attention: k, v are [B, Hkv, S, D] and query head h reads K/V head h / G (G = H / Hkv);
// the backward writes dK / dV per query head into [B, H, S, D] buffers and sums each group's slices
// afterwards (tasks stay independent: no atomics). Causal: a query block stops at the number of
// (kept) keys its last row may see, so key blocks above the diagonal are never multiplied (about half
// the work at S >> kBQ); inside the diagonal block the keys j > i are set to -inf before the softmax.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../fast_math.h"

#include "../autocast_guard.h"

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace cofi {
namespace {

// ---------------------------------------------------------------------------------------------
// Row-major gemm on top of column-major BLAS: C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C.
// (Row-major C is column-major C^T = op(B)^T op(A)^T, so the operands swap and flags carry over.)
inline void rm_gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* Bm,
                    int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  sgemm_(&a, &b, &N, &M, &K, &alpha, Bm, &ldb, A, &lda, &beta, C, &ldc);
}
inline void rm_gemm(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda, const double* Bm,
                    int ldb, double beta, double* C, int ldc) {
  if (M == 0 || N == 0) return;
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  dgemm_(&a, &b, &N, &M, &K, &alpha, Bm, &ldb, A, &lda, &beta, C, &ldc);
}

// ---------------------------------------------------------------------------------------------
// Dropout hash (must match reference/masked_attention.py bit for bit).
__attribute__((always_inline)) inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 16;
  return x;
}

// ---------------------------------------------------------------------------------------------
// Vectorisable elementwise kernels. exp for float: Cody-Waite reduction + degree-6 polynomial
// (max rel. error ~2 ulp); inputs below -87 give exactly 0 (masked / underflow).
// Hot float loops are compiled twice -- an AVX2+FMA body and a baseline body -- and picked once at
// run time (target_clones' "arch=haswell" resolver rejects AMD CPUs, so dispatch is explicit).
#if defined(__x86_64__) && defined(__GNUC__)
#define COFI_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define COFI_AVX2
inline bool has_avx2() { return false; }
#endif
// Defines name_avx2 / name_base from the always-inline name##_impl and a dispatching name(...).
#define COFI_DISPATCHED(ret, name, params, args)                 \
  COFI_AVX2 ret name##_avx2 params { return name##_impl args; } \
  ret name##_base params { return name##_impl args; }           \
  inline ret name params { return has_avx2() ? name##_avx2 args : name##_base args; }

// p[j] = exp(s[j] - m), returns sum_j p[j].
__attribute__((always_inline)) inline float exp_sub_sum_impl(float* __restrict s, int n, float m) {
  v8f acc = {};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f x;
    std::memcpy(&x, s + j, sizeof(x));
    x = exp_poly<v8f, v8i>(x - m);
    std::memcpy(s + j, &x, sizeof(x));
    acc += x;
  }
  float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) {
    s[j] = exp_scalar(s[j] - m);
    sum += s[j];
  }
  return sum;
}
COFI_DISPATCHED(float, exp_sub_sum, (float* __restrict s, int n, float m), (s, n, m))

// max_j s[j]
__attribute__((always_inline)) inline float row_max_f_impl(const float* __restrict s, int n) {
  float mx = -std::numeric_limits<float>::infinity();
  int j = 0;
  if (n >= 8) {
    v8f vm;
    std::memcpy(&vm, s, sizeof(vm));
    for (j = 8; j + 8 <= n; j += 8) {
      v8f x;
      std::memcpy(&x, s + j, sizeof(x));
      vm = vm > x ? vm : x;
    }
    for (int l = 0; l < 8; ++l) mx = mx > vm[l] ? mx : vm[l];
  }
  for (; j < n; ++j) mx = mx > s[j] ? mx : s[j];
  return mx;
}
COFI_DISPATCHED(float, row_max_f, (const float* __restrict s, int n), (s, n))

// ds[j] = p[j] * (dp[j] * w[j] - d)   (w = dropout factors, or null for no dropout)
__attribute__((always_inline)) inline void ds_row_impl(const float* __restrict p, float* __restrict dp,
                                                       const float* __restrict w, int n, float d) {
  if (w != nullptr) {
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] * w[j] - d);
  } else {
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
  }
}
COFI_DISPATCHED(void, ds_row, (const float* __restrict p, float* __restrict dp, const float* __restrict w, int n, float d),
                (p, dp, w, n, d))
inline void ds_row(const double* p, double* dp, const double* w, int n, double d) {
  if (w != nullptr) {
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] * w[j] - d);
  } else {
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
  }
}

double exp_sub_sum(double* __restrict s, int n, double m) {
  double sum = 0.0;
  for (int j = 0; j < n; ++j) {
    const double e = std::exp(s[j] - m);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// p[j] = exp(s[j] - lse) in place.
__attribute__((always_inline)) inline void exp_sub_impl(float* __restrict s, int n, float lse) {
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    v8f x;
    std::memcpy(&x, s + j, sizeof(x));
    x = exp_poly<v8f, v8i>(x - lse);
    std::memcpy(s + j, &x, sizeof(x));
  }
  for (; j < n; ++j) s[j] = exp_scalar(s[j] - lse);
}
COFI_DISPATCHED(void, exp_sub, (float* __restrict s, int n, float lse), (s, n, lse))

void exp_sub(double* __restrict s, int n, double lse) {
  for (int j = 0; j < n; ++j) s[j] = std::exp(s[j] - lse);
}

// keep[j] = (mix(row + kmix[j]) >= thr) ? inv : 0
__attribute__((always_inline)) inline void dropout_row_impl(float* __restrict w, const uint32_t* __restrict kmix, int n,
                                                         uint32_t row, uint32_t thr, float inv) {
  for (int j = 0; j < n; ++j) w[j] = mix32(row + kmix[j]) >= thr ? inv : 0.0f;
}
COFI_DISPATCHED(void, dropout_row, (float* __restrict w, const uint32_t* __restrict kmix, int n, uint32_t row, uint32_t thr, float inv),
                (w, kmix, n, row, thr, inv))

void dropout_row(double* __restrict w, const uint32_t* __restrict kmix, int n, uint32_t row, uint32_t thr, double inv) {
  for (int j = 0; j < n; ++j) w[j] = mix32(row + kmix[j]) >= thr ? inv : 0.0;
}

template <typename T>
inline T row_max(const T* s, int n) {
  using Vec = at::vec::Vectorized<T>;
  T mx = -std::numeric_limits<T>::infinity();
  int j = 0;
  if (n >= Vec::size()) {
    Vec vm = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(s + j));
    mx = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

inline float max_of(const float* s, int n) { return row_max_f(s, n); }
inline double max_of(const double* s, int n) { return row_max(s, n); }

template <typename T>
inline void scale_row(T* x, int n, T a) {
  at::vec::map([a](at::vec::Vectorized<T> v) { return v * at::vec::Vectorized<T>(a); }, x, x, n);
}

template <typename T>
inline T dot_row(const T* a, const T* b, int n) {
  T s = 0;
  for (int j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// ---------------------------------------------------------------------------------------------
constexpr int kBQ = 64;   // query rows per block
constexpr int kBK = 512;  // keys per block (S <= 512 is one block: no rescaling at all)

struct Geometry {
  int64_t B, H, S, D;
  int64_t G;                    // query heads per K/V head (H / Hkv)
  int64_t qs[3], ks[3], vs[3];  // strides of b, h, s (last dim is unit stride)
};

inline Geometry geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t hkv = k.size(1);
  Geometry g{q.size(0), q.size(1), q.size(2), q.size(3), hkv > 0 ? q.size(1) / hkv : 1, {}, {}, {}};
  for (int i = 0; i < 3; ++i) {
    g.qs[i] = q.stride(i);
    g.ks[i] = k.stride(i);
    g.vs[i] = v.stride(i);
  }
  if (g.S == 1) g.qs[2] = g.ks[2] = g.vs[2] = std::max<int64_t>(g.D, 1);  // never stepped; BLAS wants ld >= D
  return g;
}

// The [S, D] slice of each (batch, head) goes to BLAS as a row-major matrix whose leading dimension
// is the row stride, which BLAS requires to be >= D (and an int). Rows that are expanded (stride 0),
// overlapping (unfold, as_strided) or not unit-strided along D are therefore copied to contiguous;
// every other layout (packed QKV views, any batch / head strides) is used in place.
inline at::Tensor blas_rows(const at::Tensor& t) {
  const int64_t S = t.size(2), D = t.size(3);
  const bool unit_last = D <= 1 || t.stride(3) == 1;
  const bool rows_ok = S <= 1 || (t.stride(2) >= std::max<int64_t>(D, 1) && t.stride(2) <= INT32_MAX);
  return unit_last && rows_ok ? t : t.contiguous();
}

struct Dropout {
  bool on = false;
  uint32_t s0 = 0, s1 = 0, thr = 0;
  double inv = 1.0;
  uint32_t base(int64_t bh) const { return mix32(s0 ^ mix32(static_cast<uint32_t>(bh) + s1)); }
};

inline Dropout make_dropout(double p, const c10::optional<at::Tensor>& seed) {
  Dropout d;
  if (p <= 0.0) return d;
  TORCH_CHECK(seed.has_value() && seed->numel() == 2, "cofi::masked_attention: dropout_p > 0 needs seed of 2 int64");
  auto s = seed->to(at::kCPU, at::kLong);
  d.on = true;
  d.s0 = static_cast<uint32_t>(s[0].item<int64_t>());
  d.s1 = static_cast<uint32_t>(s[1].item<int64_t>());
  d.thr = static_cast<uint32_t>(std::min<double>(std::nearbyint(p * 4294967296.0), 4294967295.0));
  d.inv = 1.0 / (1.0 - p);
  return d;
}

// Live heads (gate != 0) once per call.
template <typename T>
std::vector<int64_t> live_heads(const c10::optional<at::Tensor>& head_z, int64_t H) {
  std::vector<int64_t> live;
  live.reserve(H);
  const T* z = head_z.has_value() ? head_z->data_ptr<T>() : nullptr;
  for (int64_t h = 0; h < H; ++h)
    if (z == nullptr || z[h] != T(0)) live.push_back(h);
  return live;
}

// Kept key indices per batch row (all keys when there is no mask).
inline std::vector<std::vector<int32_t>> kept_keys(const c10::optional<at::Tensor>& mask, int64_t B, int64_t S) {
  std::vector<std::vector<int32_t>> keys(mask.has_value() ? B : 0);
  if (!mask.has_value()) return keys;
  const bool* m = mask->data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    keys[b].reserve(S);
    for (int64_t j = 0; j < S; ++j)
      if (m[b * S + j]) keys[b].push_back(static_cast<int32_t>(j));
  }
  return keys;
}

// Number of (kept) keys whose position is <= i: the keys query row i may see under causal masking.
// idx: the batch row's kept key positions (ascending), or null for all S keys.
inline int64_t visible_keys(const std::vector<int32_t>* idx, int64_t S, int64_t i) {
  if (idx == nullptr) return std::min<int64_t>(i + 1, S);
  return std::upper_bound(idx->begin(), idx->end(), static_cast<int32_t>(i)) - idx->begin();
}

// Scores of keys c >= lim (positions after the query row) of one block row set to -inf.
template <typename T>
inline void mask_after(T* s, int64_t lim, int n) {
  for (int64_t c = std::max<int64_t>(lim, 0); c < n; ++c) s[c] = -std::numeric_limits<T>::infinity();
}

template <typename T>
void gather_rows(T* dst, const T* src, int64_t stride, const std::vector<int32_t>& idx, int64_t D) {
  for (size_t r = 0; r < idx.size(); ++r) std::memcpy(dst + r * D, src + idx[r] * stride, D * sizeof(T));
}

// ---------------------------------------------------------------------------------------------
template <typename T>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& head_z,
                const c10::optional<at::Tensor>& mask, double scale_d, const Dropout& drop, bool causal,
                at::Tensor& out, at::Tensor& lse) {
  const Geometry g = geometry(q, k, v);
  const int64_t S = g.S, D = g.D;
  const auto live = live_heads<T>(head_z, g.H);
  const auto keys = kept_keys(mask, g.B, S);
  const T* zp = head_z.has_value() ? head_z->data_ptr<T>() : nullptr;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t nl = static_cast<int64_t>(live.size());
  std::vector<uint32_t> qmix(S);
  for (int64_t i = 0; i < S; ++i) qmix[i] = mix32(static_cast<uint32_t>(i));

  // Few (batch, head) pairs (batch-1 inference of a pruned layer: 1-9 heads on 2+ threads) leave
  // threads idle, so then each query block is its own task (rows are independent in the forward).
  const int64_t nqb = (S + kBQ - 1) / kBQ;
  const int64_t qsplit = g.B * nl < 4 * at::get_num_threads() ? nqb : 1;
  at::parallel_for(0, g.B * nl * qsplit, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(static_cast<size_t>(kBQ) * kBK), mrow(kBQ), lrow(kBQ), dbuf(drop.on ? kBK : 0);
    std::vector<T> kc, vc;
    std::vector<uint32_t> kmix(S);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qsplit, b = bh / nl, h = live[bh % nl];
      // this task's query rows: [q_begin, q_end). Causal blocks cost more the later they are, so the
      // blocks go in the order 0, n-1, 1, n-2, ...: parallel_for's contiguous chunks then get equal work.
      const int64_t r = t % qsplit;
      const int64_t qb = causal ? (r % 2 == 0 ? r / 2 : qsplit - 1 - r / 2) : r;
      const int64_t q_begin = qsplit == 1 ? 0 : qb * kBQ;
      const int64_t q_end = qsplit == 1 ? S : std::min(S, q_begin + kBQ);
      const int64_t hk = h / g.G;
      const T* Q = qp + b * g.qs[0] + h * g.qs[1];
      const T* K = kp + b * g.ks[0] + hk * g.ks[1];
      const T* V = vp + b * g.vs[0] + hk * g.vs[1];
      const std::vector<int32_t>* kidx = mask.has_value() ? &keys[b] : nullptr;
      int64_t ldk = g.ks[2], ldv = g.vs[2];
      int64_t nk = S;
      if (mask.has_value()) {
        const auto& idx = keys[b];
        nk = static_cast<int64_t>(idx.size());
        kc.resize(nk * D);
        vc.resize(nk * D);
        gather_rows(kc.data(), K, ldk, idx, D);
        gather_rows(vc.data(), V, ldv, idx, D);
        K = kc.data();
        V = vc.data();
        ldk = ldv = D;
        for (int64_t c = 0; c < nk; ++c) kmix[c] = mix32(static_cast<uint32_t>(idx[c]));
      } else {
        for (int64_t c = 0; c < nk; ++c) kmix[c] = qmix[c];
      }
      T* O = op + (b * g.H + h) * S * D;
      T* L = lp + (b * g.H + h) * S;
      const T zh = zp ? zp[h] : T(1);
      const uint32_t dbase = drop.on ? drop.base(b * g.H + h) : 0;
      if (nk == 0) {  // every key masked: zeros, lse = +inf
        std::fill(O + q_begin * D, O + q_end * D, T(0));
        std::fill(L + q_begin, L + q_end, inf);
        continue;
      }
      for (int64_t i0 = q_begin; i0 < q_end; i0 += kBQ) {
        const int m = static_cast<int>(std::min<int64_t>(kBQ, q_end - i0));
        T* Oi = O + i0 * D;
        std::fill(mrow.begin(), mrow.end(), -inf);
        std::fill(lrow.begin(), lrow.end(), T(0));
        // keys this block's last row may see: the blocks past them are skipped, not masked
        const int64_t nkb = causal ? visible_keys(kidx, S, i0 + m - 1) : nk;
        for (int64_t j0 = 0; j0 < nkb; j0 += kBK) {
          const int n = static_cast<int>(std::min<int64_t>(kBK, nkb - j0));
          rm_gemm(false, true, m, n, static_cast<int>(D), scale, Q + i0 * g.qs[2], static_cast<int>(g.qs[2]),
                  K + j0 * ldk, static_cast<int>(ldk), T(0), sbuf.data(), kBK);
          for (int r = 0; r < m; ++r) {
            T* s = sbuf.data() + static_cast<int64_t>(r) * kBK;
            if (causal) mask_after(s, visible_keys(kidx, S, i0 + r) - j0, n);
            const T mnew = std::max(mrow[r], max_of(s, n));
            const T muse = mnew == -inf ? T(0) : mnew;  // a row with no visible key yet: all p = 0
            const T sum = exp_sub_sum(s, n, muse);
            if (j0 > 0) {
              const T alpha = std::exp(mrow[r] - muse);
              lrow[r] = lrow[r] * alpha + sum;
              scale_row(Oi + r * D, static_cast<int>(D), alpha);
            } else {
              lrow[r] = sum;
            }
            mrow[r] = mnew;
            if (drop.on) {
              dropout_row(dbuf.data(), kmix.data() + j0, n, mix32(dbase ^ qmix[i0 + r]), drop.thr, static_cast<T>(drop.inv));
              for (int j = 0; j < n; ++j) s[j] *= dbuf[j];
            }
          }
          rm_gemm(false, false, m, static_cast<int>(D), n, T(1), sbuf.data(), kBK, V + j0 * ldv, static_cast<int>(ldv),
                  j0 == 0 ? T(0) : T(1), Oi, static_cast<int>(D));
        }
        for (int r = 0; r < m; ++r) {
          if (lrow[r] == T(0)) {  // no visible key (causal + padding): zeros, lse = +inf
            std::fill(Oi + r * D, Oi + (r + 1) * D, T(0));
            L[i0 + r] = inf;
            continue;
          }
          scale_row(Oi + r * D, static_cast<int>(D), zh / lrow[r]);
          L[i0 + r] = mrow[r] + std::log(lrow[r]);
        }
      }
    }
  });
  // Dead heads: zeros and lse = +inf (deterministic outputs, never read by the backward).
  if (nl < g.H) {
    for (int64_t h = 0, li = 0; h < g.H; ++h) {
      if (li < nl && live[li] == h) { ++li; continue; }
      for (int64_t b = 0; b < g.B; ++b) {
        std::fill(op + (b * g.H + h) * S * D, op + (b * g.H + h + 1) * S * D, T(0));
        std::fill(lp + (b * g.H + h) * S, lp + (b * g.H + h + 1) * S, inf);
      }
    }
  }
}

template <typename T>
void bwd_kernel(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const c10::optional<at::Tensor>& head_z, const c10::optional<at::Tensor>& mask, const at::Tensor& out,
                const at::Tensor& lse, double scale_d, const Dropout& drop, bool causal, at::Tensor& dq,
                at::Tensor& dk, at::Tensor& dv, at::Tensor& dz) {
  const Geometry g = geometry(q, k, v);
  const int64_t S = g.S, D = g.D;
  const auto live = live_heads<T>(head_z, g.H);
  const auto keys = kept_keys(mask, g.B, S);
  const T* zp = head_z.has_value() ? head_z->data_ptr<T>() : nullptr;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const int64_t nl = static_cast<int64_t>(live.size());
  std::vector<T> dz_part(g.B * nl, T(0));
  std::vector<uint32_t> qmix(S);
  for (int64_t i = 0; i < S; ++i) qmix[i] = mix32(static_cast<uint32_t>(i));

  at::parallel_for(0, g.B * nl, 1, [&](int64_t begin, int64_t end) {
    const size_t blk = static_cast<size_t>(kBQ) * kBK;
    std::vector<T> pbuf(blk), dpbuf(blk), pdbuf(drop.on ? blk : 0), di(S);
    std::vector<T> kc, vc, dkc, dvc;
    std::vector<uint32_t> kmix(S);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nl, hl = t % nl, h = live[hl], hk = h / g.G;
      const int64_t off = (b * g.H + h) * S * D;  // dk / dv are per query head here (see bwd_float_cpu)
      const T* Q = qp + b * g.qs[0] + h * g.qs[1];
      const T* K = kp + b * g.ks[0] + hk * g.ks[1];
      const T* V = vp + b * g.vs[0] + hk * g.vs[1];
      const std::vector<int32_t>* kidx = mask.has_value() ? &keys[b] : nullptr;
      const T* G = gp + off;
      const T* O = op + off;
      const T* L = lp + (b * g.H + h) * S;
      T* dQ = dqp + off;
      T* dK = dkp + off;
      T* dV = dvp + off;
      int64_t ldk = g.ks[2], ldv = g.vs[2];
      const int64_t ldq = g.qs[2];
      int64_t nk = S;
      if (mask.has_value()) {
        const auto& idx = keys[b];
        nk = static_cast<int64_t>(idx.size());
        kc.resize(nk * D);
        vc.resize(nk * D);
        dkc.assign(nk * D, T(0));
        dvc.assign(nk * D, T(0));
        gather_rows(kc.data(), K, ldk, idx, D);
        gather_rows(vc.data(), V, ldv, idx, D);
        K = kc.data();
        V = vc.data();
        ldk = ldv = D;
        dK = dkc.data();
        dV = dvc.data();
        for (int64_t c = 0; c < nk; ++c) kmix[c] = mix32(static_cast<uint32_t>(idx[c]));
      } else {
        for (int64_t c = 0; c < nk; ++c) kmix[c] = qmix[c];
      }
      const T zh = zp ? zp[h] : T(1);
      const uint32_t dbase = drop.on ? drop.base(b * g.H + h) : 0;
      // D_i = rowsum(dO_eff * O_ungated) = rowsum(grad * out) (out carries the gate already).
      T dzs = 0;
      for (int64_t i = 0; i < S; ++i) {
        di[i] = dot_row(G + i * D, O + i * D, static_cast<int>(D));
        dzs += di[i];
      }
      dz_part[t] = dzs / zh;
      if (nk == 0) continue;  // outputs stay zero
      for (int64_t i0 = 0; i0 < S; i0 += kBQ) {
        const int m = static_cast<int>(std::min<int64_t>(kBQ, S - i0));
        const int64_t nkb = causal ? visible_keys(kidx, S, i0 + m - 1) : nk;
        for (int64_t j0 = 0; j0 < nkb; j0 += kBK) {
          const int n = static_cast<int>(std::min<int64_t>(kBK, nkb - j0));
          T* P = pbuf.data();
          T* dP = dpbuf.data();
          rm_gemm(false, true, m, n, static_cast<int>(D), scale, Q + i0 * ldq, static_cast<int>(ldq), K + j0 * ldk,
                  static_cast<int>(ldk), T(0), P, kBK);
          for (int r = 0; r < m; ++r) {
            if (causal) mask_after(P + static_cast<int64_t>(r) * kBK, visible_keys(kidx, S, i0 + r) - j0, n);
            exp_sub(P + static_cast<int64_t>(r) * kBK, n, L[i0 + r]);
          }
          const T* Pd = P;
          if (drop.on) {
            for (int r = 0; r < m; ++r) {
              T* w = pdbuf.data() + static_cast<int64_t>(r) * kBK;
              dropout_row(w, kmix.data() + j0, n, mix32(dbase ^ qmix[i0 + r]), drop.thr, static_cast<T>(drop.inv));
            }
            // dpbuf temporarily holds the dropped probabilities for the dV product.
            for (int r = 0; r < m; ++r)
              for (int j = 0; j < n; ++j) dP[r * kBK + j] = P[r * kBK + j] * pdbuf[r * kBK + j];
            Pd = dP;
          }
          // dV_j += z * Pd^T G_i
          rm_gemm(true, false, n, static_cast<int>(D), m, zh, Pd, kBK, G + i0 * D, static_cast<int>(D), T(1),
                  dV + j0 * D, static_cast<int>(D));  // dK / dV start at zero: accumulate from any i0
          // dP = z * G_i V_j^T (then through the dropout mask)
          rm_gemm(false, true, m, n, static_cast<int>(D), zh, G + i0 * D, static_cast<int>(D), V + j0 * ldv,
                  static_cast<int>(ldv), T(0), dP, kBK);
          for (int r = 0; r < m; ++r) {
            T* pr = P + static_cast<int64_t>(r) * kBK;
            T* dpr = dP + static_cast<int64_t>(r) * kBK;
            ds_row(pr, dpr, drop.on ? pdbuf.data() + static_cast<int64_t>(r) * kBK : nullptr, n, di[i0 + r]);
          }
          // dQ_i += scale * dS K_j ; dK_j += scale * dS^T Q_i
          rm_gemm(false, false, m, static_cast<int>(D), n, scale, dP, kBK, K + j0 * ldk, static_cast<int>(ldk),
                  j0 == 0 ? T(0) : T(1), dQ + i0 * D, static_cast<int>(D));
          rm_gemm(true, false, n, static_cast<int>(D), m, scale, dP, kBK, Q + i0 * ldq, static_cast<int>(ldq), T(1),
                  dK + j0 * D, static_cast<int>(D));
        }
      }
      if (mask.has_value()) {  // scatter compact key grads back; padded keys stay zero
        const auto& idx = keys[b];
        for (int64_t c = 0; c < nk; ++c) {
          std::memcpy(dkp + off + idx[c] * D, dkc.data() + c * D, D * sizeof(T));
          std::memcpy(dvp + off + idx[c] * D, dvc.data() + c * D, D * sizeof(T));
        }
      }
    }
  });
  if (zp != nullptr) {
    T* dzp = dz.data_ptr<T>();
    for (int64_t h = 0; h < g.H; ++h) dzp[h] = T(0);
    for (int64_t hl = 0; hl < nl; ++hl) {
      T s = 0;
      for (int64_t b = 0; b < g.B; ++b) s += dz_part[b * nl + hl];
      dzp[live[hl]] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& head_z, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4, fn, ": q must be [B, H, S, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), fn,
              ": k must be [B, Hkv, S, D] with q's B, S, D (q ", q.sizes(), "), got ", k.sizes());
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, fn,
              ": k's head count (n_kv_heads) must divide q's ", q.size(1), ", got ", k.size(1));
  TORCH_CHECK(v.sizes() == k.sizes(), fn, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK(qt == at::kFloat || qt == at::kDouble || qt == at::kHalf || qt == at::kBFloat16, fn,
              ": q must be float32, float64, float16 or bfloat16, got ", qt);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": k and v must have q's dtype");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), fn, ": q, k, v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  if (head_z.has_value()) {
    TORCH_CHECK(head_z->dim() == 1 && head_z->size(0) == q.size(1), fn, ": head_z must be [H] = [", q.size(1),
                "], got ", head_z->sizes());
    TORCH_CHECK(head_z->scalar_type() == q.scalar_type() && head_z->device() == q.device(), fn,
                ": head_z must have q's dtype and device, got ", head_z->scalar_type(), " on ", head_z->device());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2), fn,
                ": key_padding_mask must be [B, S] = [", q.size(0), ", ", q.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->device() == q.device(), fn,
                ": key_padding_mask must be a bool tensor on q's device, got ", mask->scalar_type(), " on ",
                mask->device());
  }
}

void check_scalars(const char* fn, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);
}

c10::optional<at::Tensor> contiguous_or_none(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}

std::tuple<at::Tensor, at::Tensor> fwd_float_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const c10::optional<at::Tensor>& head_z_,
                                                            const c10::optional<at::Tensor>& key_padding_mask_,
                                                            double scale, double dropout_p,
                                                            const c10::optional<at::Tensor>& seed, bool causal) {
  const char* fn = "cofi::masked_attention_fwd_native";
  check_inputs(fn, q_, k_, v_, head_z_, key_padding_mask_);
  check_scalars(fn, scale, dropout_p);
  const at::Tensor q = blas_rows(q_), k = blas_rows(k_), v = blas_rows(v_);
  const auto head_z = contiguous_or_none(head_z_), key_padding_mask = contiguous_or_none(key_padding_mask_);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out.zero_(), lse};
  }
  const Dropout drop = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(q, k, v, head_z, key_padding_mask, scale, drop, causal, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_float_cpu(
    const at::Tensor& grad_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const c10::optional<at::Tensor>& head_z_, const c10::optional<at::Tensor>& key_padding_mask_, const at::Tensor& out_,
    const at::Tensor& lse_, double scale, double dropout_p, const c10::optional<at::Tensor>& seed, bool causal) {
  const char* fn = "cofi::masked_attention_bwd_native";
  check_inputs(fn, q_, k_, v_, head_z_, key_padding_mask_);
  check_scalars(fn, scale, dropout_p);
  TORCH_CHECK(grad_.sizes() == q_.sizes() && grad_.scalar_type() == q_.scalar_type() && grad_.device() == q_.device(),
              fn, ": grad must have q's shape, dtype and device, got ", grad_.sizes(), " ", grad_.scalar_type());
  TORCH_CHECK(out_.sizes() == q_.sizes() && out_.scalar_type() == q_.scalar_type() && out_.device() == q_.device(), fn,
              ": out must have q's shape, dtype and device, got ", out_.sizes(), " ", out_.scalar_type());
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q_.size(0) && lse_.size(1) == q_.size(1) &&
                  lse_.size(2) == q_.size(2) && lse_.scalar_type() == q_.scalar_type() && lse_.device() == q_.device(),
              fn, ": lse must be [B, H, S] with q's dtype and device, got ", lse_.sizes(), " ", lse_.scalar_type());
  const at::Tensor q = blas_rows(q_), k = blas_rows(k_), v = blas_rows(v_);
  const at::Tensor grad = grad_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  const auto head_z = contiguous_or_none(head_z_), key_padding_mask = contiguous_or_none(key_padding_mask_);
  // dK / dV per query head ([B, H, S, D]); grouped-query K/V sum each group's slices below
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros(q.sizes(), q.options());
  auto dv = at::zeros(q.sizes(), q.options());
  auto dz = head_z.has_value() ? at::zeros({q.size(1)}, q.options()) : at::empty({0}, q.options());
  const int64_t hkv = k.size(1);
  const auto grouped = [&](const at::Tensor& t) {
    if (hkv == q.size(1)) return t;
    if (hkv == 0 || t.numel() == 0) return at::zeros(k.sizes(), q.options());
    return t.view({q.size(0), hkv, q.size(1) / hkv, q.size(2), q.size(3)}).sum(2);
  };
  if (q.numel() == 0) return {dq, grouped(dk), grouped(dv), dz};
  const Dropout drop = make_dropout(dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_attention_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, drop, causal, dq, dk, dv, dz);
  });
  return {dq, grouped(dk), grouped(dv), dz};
}

// float16 / bfloat16 inputs are computed in float: upcast once, outputs rounded back to q's dtype;
// lse stays float (as the CUDA kernel and the reference keep it for half inputs).
bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

c10::optional<at::Tensor> to_float(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const c10::optional<at::Tensor>& head_z,
                                                            const c10::optional<at::Tensor>& key_padding_mask,
                                                            double scale, double dropout_p,
                                                            const c10::optional<at::Tensor>& seed, bool causal) {
  const NoAutocast no_autocast;
  if (!is_half(q)) return fwd_float_cpu(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, causal);
  check_inputs("cofi::masked_attention_fwd_native", q, k, v, head_z, key_padding_mask);
  auto [out, lse] = fwd_float_cpu(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), to_float(head_z),
                                  key_padding_mask, scale, dropout_p, seed, causal);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& head_z, const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, const c10::optional<at::Tensor>& seed, bool causal) {
  const NoAutocast no_autocast;
  if (!is_half(q)) {
    return bwd_float_cpu(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, dropout_p, seed, causal);
  }
  const char* fn = "cofi::masked_attention_bwd_native";
  check_inputs(fn, q, k, v, head_z, key_padding_mask);
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), fn,
              ": grad and out must have q's dtype ", q.scalar_type(), ", got ", grad.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, fn, ": lse must be float32 for ", q.scalar_type(), " q, got ",
              lse.scalar_type());
  auto [dq, dk, dv, dz] = bwd_float_cpu(grad.to(at::kFloat), q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat),
                                        to_float(head_z), key_padding_mask, out.to(at::kFloat), lse, scale, dropout_p,
                                        seed, causal);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt), dz.to(dt)};
}

}  // namespace
}  // namespace cofi

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("masked_attention_fwd_native", &cofi::masked_attention_fwd_cpu);
  m.impl("masked_attention_bwd_native", &cofi::masked_attention_bwd_cpu);
}
