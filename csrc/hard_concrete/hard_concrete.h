// Torch-free hard-concrete math shared by the CPU and CUDA kernels, and the CUDA launchers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define COFI_HD __host__ __device__ __forceinline__
#else
#define COFI_HD inline
#endif

namespace cofi_hc {

template <typename T>
COFI_HD T sigmoid(T x) { return T(1) / (T(1) + exp(-x)); }

// z = clip(sigmoid((logit(u) + log_alpha) / t) * (r - l) + l, 0, 1)
template <typename T>
COFI_HD T sample(T log_alpha, T u, T t, T l, T r) {
  T s = sigmoid((log(u) - log1p(-u) + log_alpha) / t);
  T sbar = s * (r - l) + l;
  return sbar <= T(0) ? T(0) : (sbar >= T(1) ? T(1) : sbar);
}

// g * d z / d log_alpha, zero where the clip is active (hardtanh's rule: strict interior only) even
// for a non-finite g: the reference's where(inside, g * dz, 0), on every device.
template <typename T>
COFI_HD T sample_grad_times(T g, T log_alpha, T u, T t, T l, T r) {
  T s = sigmoid((log(u) - log1p(-u) + log_alpha) / t);
  T sbar = s * (r - l) + l;
  return (sbar > T(0) && sbar < T(1)) ? g * ((r - l) * s * (T(1) - s) / t) : T(0);
}

// keep probability 1 - clamp(sigmoid(q0_logit - log_alpha), eps, 1 - eps)
template <typename T>
COFI_HD T keep_prob(T log_alpha, T q0_logit, T eps) {
  T q = sigmoid(q0_logit - log_alpha);
  q = q < eps ? eps : (q > T(1) - eps ? T(1) - eps : q);
  return T(1) - q;
}

// g * d keep / d log_alpha, zero where the clamp is active (even for a non-finite g)
template <typename T>
COFI_HD T keep_prob_grad_times(T g, T log_alpha, T q0_logit, T eps) {
  T q = sigmoid(q0_logit - log_alpha);
  return (q > eps && q < T(1) - eps) ? g * (q * (T(1) - q)) : T(0);
}

}  // namespace cofi_hc

#ifdef COFI_WITH_CUDA
#include <cuda_runtime.h>
extern "C" {
// Elementwise launchers over n elements; `kind` selects the math (see hard_concrete_cuda.cu).
cudaError_t cofi_hc_sample_fwd_f32(const float* la, const float* u, float* z, int64_t n, float t, float l, float r, cudaStream_t s);
cudaError_t cofi_hc_sample_fwd_f64(const double* la, const double* u, double* z, int64_t n, double t, double l, double r, cudaStream_t s);
cudaError_t cofi_hc_sample_bwd_f32(const float* g, const float* la, const float* u, float* out, int64_t n, float t, float l, float r, cudaStream_t s);
cudaError_t cofi_hc_sample_bwd_f64(const double* g, const double* la, const double* u, double* out, int64_t n, double t, double l, double r, cudaStream_t s);
cudaError_t cofi_hc_keep_fwd_f32(const float* la, float* p, int64_t n, float q0, float eps, cudaStream_t s);
cudaError_t cofi_hc_keep_fwd_f64(const double* la, double* p, int64_t n, double q0, double eps, cudaStream_t s);
cudaError_t cofi_hc_keep_bwd_f32(const float* g, const float* la, float* out, int64_t n, float q0, float eps, cudaStream_t s);
cudaError_t cofi_hc_keep_bwd_f64(const double* g, const double* la, double* out, int64_t n, double q0, double eps, cudaStream_t s);
}
#endif
