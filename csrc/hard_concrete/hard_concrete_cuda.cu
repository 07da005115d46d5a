// Torch-free CUDA kernels of the hard-concrete op family: one elementwise launch per call over a
// model's whole flat log_alpha buffer.
#include "hard_concrete.h"

namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);
}

// NaN or out-of-range noise gives a NaN gate, as the reference: log(u) - log1p(-u) is NaN there and
// the clip in cofi_hc::sample is a compare-and-select that passes NaN (fminf / fmaxf would not).
// Backward: cofi_hc::*_grad_times, the reference's where(inside, g * dz, 0).

template <typename T>
__global__ void sample_fwd(const T* __restrict__ la, const T* __restrict__ u, T* __restrict__ z, int64_t n, T t, T l, T r) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    z[i] = cofi_hc::sample<T>(la[i], u[i], t, l, r);
}

template <typename T>
__global__ void sample_bwd(const T* __restrict__ g, const T* __restrict__ la, const T* __restrict__ u, T* __restrict__ out,
                           int64_t n, T t, T l, T r) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = cofi_hc::sample_grad_times<T>(g[i], la[i], u[i], t, l, r);
}

template <typename T>
__global__ void keep_fwd(const T* __restrict__ la, T* __restrict__ p, int64_t n, T q0, T eps) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = cofi_hc::keep_prob<T>(la[i], q0, eps);
}

template <typename T>
__global__ void keep_bwd(const T* __restrict__ g, const T* __restrict__ la, T* __restrict__ out, int64_t n, T q0, T eps) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = cofi_hc::keep_prob_grad_times<T>(g[i], la[i], q0, eps);
}

}  // namespace

#define COFI_LAUNCH(kernel, T, n, s, ...)                              \
  do {                                                                 \
    if ((n) == 0) return cudaSuccess;                                  \
    kernel<T><<<blocks_for(n), kThreads, 0, (s)>>>(__VA_ARGS__);       \
    return cudaGetLastError();                                         \
  } while (0)

extern "C" {
cudaError_t cofi_hc_sample_fwd_f32(const float* la, const float* u, float* z, int64_t n, float t, float l, float r, cudaStream_t s) {
  COFI_LAUNCH(sample_fwd, float, n, s, la, u, z, n, t, l, r);
}
cudaError_t cofi_hc_sample_fwd_f64(const double* la, const double* u, double* z, int64_t n, double t, double l, double r, cudaStream_t s) {
  COFI_LAUNCH(sample_fwd, double, n, s, la, u, z, n, t, l, r);
}
cudaError_t cofi_hc_sample_bwd_f32(const float* g, const float* la, const float* u, float* out, int64_t n, float t, float l, float r, cudaStream_t s) {
  COFI_LAUNCH(sample_bwd, float, n, s, g, la, u, out, n, t, l, r);
}
cudaError_t cofi_hc_sample_bwd_f64(const double* g, const double* la, const double* u, double* out, int64_t n, double t, double l, double r, cudaStream_t s) {
  COFI_LAUNCH(sample_bwd, double, n, s, g, la, u, out, n, t, l, r);
}
cudaError_t cofi_hc_keep_fwd_f32(const float* la, float* p, int64_t n, float q0, float eps, cudaStream_t s) {
  COFI_LAUNCH(keep_fwd, float, n, s, la, p, n, q0, eps);
}
cudaError_t cofi_hc_keep_fwd_f64(const double* la, double* p, int64_t n, double q0, double eps, cudaStream_t s) {
  COFI_LAUNCH(keep_fwd, double, n, s, la, p, n, q0, eps);
}
cudaError_t cofi_hc_keep_bwd_f32(const float* g, const float* la, float* out, int64_t n, float q0, float eps, cudaStream_t s) {
  COFI_LAUNCH(keep_bwd, float, n, s, g, la, out, n, q0, eps);
}
cudaError_t cofi_hc_keep_bwd_f64(const double* g, const double* la, double* out, int64_t n, double q0, double eps, cudaStream_t s) {
  COFI_LAUNCH(keep_bwd, double, n, s, g, la, out, n, q0, eps);
}
}
