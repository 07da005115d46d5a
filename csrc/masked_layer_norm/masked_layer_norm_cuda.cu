// Torch-free CUDA kernels of masked_layer_norm (see masked_layer_norm.h): one 256-thread block per
// row, block-wide sums through shared memory; kept-dim statistics (k = hidden_z != 0), corrected two-pass.
#include "masked_layer_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type ld(const T* p) { return static_cast<typename Acc<T>::type>(*p); }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T, typename A> __device__ __forceinline__ void st(T* p, A v) { *p = static_cast<T>(v); }
template <> __device__ __forceinline__ void st<__half, float>(__half* p, float v) { *p = __float2half(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Sum of v over the block; every thread gets the result.
template <typename A>
__device__ A block_sum(A v, A* shm) {
  shm[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shm[threadIdx.x] += shm[threadIdx.x + s];
    __syncthreads();
  }
  const A r = shm[0];
  __syncthreads();
  return r;
}

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return a / b; }

template <typename T>
__device__ __forceinline__ typename Acc<T>::type vval(const T* x, const T* r, const T* z, int64_t row, int64_t d, int64_t j) {
  using A = typename Acc<T>::type;
  A v = ld(x + row * d + j);
  if (z) v *= ld(z + j);
  if (r) v += ld(r + row * d + j);
  return v;
}

template <typename T>
__device__ __forceinline__ typename Acc<T>::type keepf(const T* z, int64_t j) {
  using A = typename Acc<T>::type;
  return z ? (ld(z + j) != A(0) ? A(1) : A(0)) : A(1);
}

template <typename T>
__global__ void ln_fwd_kernel(const T* x, const T* r, const T* w, const T* b, const T* z, T* y,
                              typename Acc<T>::type* mean_out, typename Acc<T>::type* rstd_out, int64_t d, double eps) {
  using A = typename Acc<T>::type;
  __shared__ A shm[kThreads];
  const int64_t row = blockIdx.x;
  A s = 0, n = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A k = keepf(z, j);
    s += vval(x, r, z, row, d, j) * k;
    n += k;
  }
  s = block_sum(s, shm);
  n = block_sum(n, shm);
  n = n > A(1) ? n : A(1);
  // Corrected two-pass statistics (the CPU kernel's and the reference's row_stats): the residuals c of
  // the first mean correct mean and variance, so a row constant over its kept dims gets its value back
  // exactly and normalises to exactly 0. Correctly rounded divisions: --use_fast_math would make them
  // approximate.
  const A mean0 = div_rn(s, n);
  A s1 = 0, ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A c = (vval(x, r, z, row, d, j) - mean0) * keepf(z, j);
    s1 += c;
    ss += c * c;
  }
  s1 = block_sum(s1, shm);
  ss = block_sum(ss, shm);
  const A corr = div_rn(s1, n);
  const A mean = mean0 + corr;
  A var = div_rn(ss - s1 * corr, n);
  var = var < A(0) ? A(0) : var;
  const A rstd = A(1) / sqrt(var + A(eps));
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    A o = (vval(x, r, z, row, d, j) - mean) * keepf(z, j) * rstd * ld(w + j) + ld(b + j);
    if (z) o *= ld(z + j);
    st(y + row * d + j, o);
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T>
__global__ void ln_bwd_kernel(const T* g, const T* x, const T* r, const T* w, const T* b, const T* z,
                              const typename Acc<T>::type* mean_in, const typename Acc<T>::type* rstd_in, T* dx, T* dr,
                              typename Acc<T>::type* rows_dw, typename Acc<T>::type* rows_db,
                              typename Acc<T>::type* rows_dz, int64_t d) {
  using A = typename Acc<T>::type;
  __shared__ A shm[kThreads];
  const int64_t row = blockIdx.x;
  const A mean = mean_in[row], rstd = rstd_in[row];
  A n = 0, s1 = 0, s2 = 0;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A k = keepf(z, j);
    const A xhat = (vval(x, r, z, row, d, j) - mean) * k * rstd;
    const A go = ld(g + row * d + j) * (z ? ld(z + j) : A(1));
    const A dxhat = go * ld(w + j);
    n += k;
    s1 += dxhat * k;
    s2 += dxhat * xhat;
  }
  n = block_sum(n, shm);
  n = n > A(1) ? n : A(1);
  s1 = block_sum(s1, shm) / n;
  s2 = block_sum(s2, shm) / n;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A k = keepf(z, j);
    const A xhat = (vval(x, r, z, row, d, j) - mean) * k * rstd;
    const A gv = ld(g + row * d + j);
    const A zj = z ? ld(z + j) : A(1);
    const A go = gv * zj;
    const A dv = (go * ld(w + j) - s1 - xhat * s2) * rstd * k;
    const int64_t i = row * d + j;
    if (dx) st(dx + i, dv * zj);
    if (dr) st(dr + i, dv);
    if (rows_dw) rows_dw[i] = go * xhat;
    if (rows_db) rows_db[i] = go;
    if (rows_dz) rows_dz[i] = gv * (xhat * ld(w + j) + ld(b + j)) + dv * ld(x + i);
  }
}

template <typename T>
int fwd_t(const void* x, const void* r, const void* w, const void* b, const void* z, void* y, void* mean, void* rstd,
          int64_t N, int64_t d, double eps, cudaStream_t st) {
  using A = typename Acc<T>::type;
  if (N == 0) return 0;
  ln_fwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, st>>>(
      static_cast<const T*>(x), static_cast<const T*>(r), static_cast<const T*>(w), static_cast<const T*>(b),
      static_cast<const T*>(z), static_cast<T*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), d, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int bwd_t(const void* g, const void* x, const void* r, const void* w, const void* b, const void* z, const void* mean,
          const void* rstd, void* dx, void* dr, void* rdw, void* rdb, void* rdz, int64_t N, int64_t d, cudaStream_t st) {
  using A = typename Acc<T>::type;
  if (N == 0) return 0;
  ln_bwd_kernel<T><<<static_cast<unsigned>(N), kThreads, 0, st>>>(
      static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const T*>(r), static_cast<const T*>(w),
      static_cast<const T*>(b), static_cast<const T*>(z), static_cast<const A*>(mean), static_cast<const A*>(rstd),
      static_cast<T*>(dx), static_cast<T*>(dr), static_cast<A*>(rdw), static_cast<A*>(rdb), static_cast<A*>(rdz), d);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int cofi_masked_layer_norm_fwd(int dtype, const void* x, const void* residual, const void* weight,
                                          const void* bias, const void* hidden_z, void* y, void* mean, void* rstd,
                                          int64_t N, int64_t d, double eps, cudaStream_t stream) {
  switch (dtype) {
    case 0: return fwd_t<float>(x, residual, weight, bias, hidden_z, y, mean, rstd, N, d, eps, stream);
    case 1: return fwd_t<double>(x, residual, weight, bias, hidden_z, y, mean, rstd, N, d, eps, stream);
    case 2: return fwd_t<__half>(x, residual, weight, bias, hidden_z, y, mean, rstd, N, d, eps, stream);
    case 3: return fwd_t<__nv_bfloat16>(x, residual, weight, bias, hidden_z, y, mean, rstd, N, d, eps, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int cofi_masked_layer_norm_bwd(int dtype, const void* grad, const void* x, const void* residual,
                                          const void* weight, const void* bias, const void* hidden_z, const void* mean,
                                          const void* rstd, void* dx, void* dr, void* rows_dw, void* rows_db,
                                          void* rows_dz, int64_t N, int64_t d, cudaStream_t stream) {
  switch (dtype) {
    case 0: return bwd_t<float>(grad, x, residual, weight, bias, hidden_z, mean, rstd, dx, dr, rows_dw, rows_db, rows_dz, N, d, stream);
    case 1: return bwd_t<double>(grad, x, residual, weight, bias, hidden_z, mean, rstd, dx, dr, rows_dw, rows_db, rows_dz, N, d, stream);
    case 2: return bwd_t<__half>(grad, x, residual, weight, bias, hidden_z, mean, rstd, dx, dr, rows_dw, rows_db, rows_dz, N, d, stream);
    case 3: return bwd_t<__nv_bfloat16>(grad, x, residual, weight, bias, hidden_z, mean, rstd, dx, dr, rows_dw, rows_db, rows_dz, N, d, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
