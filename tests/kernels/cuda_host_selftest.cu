// Deliberately broken kernels: tests/kernels/test_cuda_host_harness.py checks the host harness
// reports each bug (a harness that passes everything proves nothing).
#include <cuda_runtime.h>

namespace {

// Reads a neighbour's shared-memory element without __syncthreads: a data race.
__global__ void racy(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Reads one element past the end of `in` (n elements).
__global__ void out_of_bounds(const float* in, float* out, int n) {
  if (threadIdx.x < n) out[threadIdx.x] = in[threadIdx.x + 1];
}

// Half the block waits at one __syncthreads, half at another.
__global__ void divergent(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Correct: neighbour exchange through shared memory and a warp reduction.
__global__ void good(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  float v = s[(threadIdx.x + 1) % 64];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  out[threadIdx.x] = v;
}

}  // namespace

extern "C" int cofi_selftest_racy(float* out) {
  racy<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
extern "C" int cofi_selftest_out_of_bounds(const float* in, float* out, int n) {
  out_of_bounds<<<1, 64>>>(in, out, n);
  return static_cast<int>(cudaGetLastError());
}
extern "C" int cofi_selftest_divergent(float* out) {
  divergent<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
extern "C" int cofi_selftest_good(float* out) {
  good<<<2, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}
extern "C" int cofi_selftest_bad_config(float* out) {
  good<<<1, 2048>>>(out);
  return static_cast<int>(cudaGetLastError());
}
