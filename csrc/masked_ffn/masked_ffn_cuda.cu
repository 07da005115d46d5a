// Torch-free CUDA kernels: the fused epilogues of masked_ffn (see masked_ffn.h). One thread per
// element of the [N, L] live-unit tile, grid-stride loop; the GEMMs around them are cuBLAS calls
// made by the glue (masked_ffn_cuda.cpp).
#include "masked_ffn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type ld(const T* p) { return static_cast<typename Acc<T>::type>(*p); }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T, typename A> __device__ __forceinline__ void st(T* p, A v) { *p = static_cast<T>(v); }
template <> __device__ __forceinline__ void st<__half, float>(__half* p, float v) { *p = __float2half(v); }
template <> __device__ __forceinline__ void st<__nv_bfloat16, float>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename A> __device__ __forceinline__ A act_f(A h, int act) {
  if (act == 0) return A(0.5) * h * (A(1) + erf(h * A(0.70710678118654752440)));
  if (act == 1) return A(0.5) * h * (A(1) + tanh(A(0.79788456080286535588) * (h + A(0.044715) * h * h * h)));
  if (act == 3) return h / (A(1) + exp(-h));
  return h > A(0) ? h : A(0);
}

template <typename A> __device__ __forceinline__ A dact_f(A h, int act) {
  if (act == 0)
    return A(0.5) * (A(1) + erf(h * A(0.70710678118654752440))) + h * A(0.39894228040143267794) * exp(A(-0.5) * h * h);
  if (act == 1) {
    const A k = A(0.79788456080286535588), c = A(0.044715);
    const A t = tanh(k * (h + c * h * h * h));
    return A(0.5) * (A(1) + t) + A(0.5) * h * (A(1) - t * t) * k * (A(1) + A(3) * c * h * h);
  }
  if (act == 3) {
    const A sg = A(1) / (A(1) + exp(-h));
    return sg * (A(1) + h * (A(1) - sg));
  }
  return h > A(0) ? A(1) : A(0);
}

template <typename T>
__global__ void fwd_epilogue_kernel(T* __restrict__ h, T* __restrict__ a, const T* __restrict__ b1,
                                    const T* __restrict__ s, int64_t N, int64_t L, int act) {
  using A = typename Acc<T>::type;
  const int64_t total = N * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % L;
    const A v = ld(h + i) + ld(b1 + j);
    st(h + i, v);
    st(a + i, act_f<A>(v, act) * ld(s + j));
  }
}

template <typename T>
__global__ void bwd_epilogue_kernel(const T* h, const T* g, T* dh, T* am, T* fg, const T* __restrict__ s, int64_t N,
                                    int64_t L, int act) {
  using A = typename Acc<T>::type;
  const int64_t total = N * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % L;
    const A hv = ld(h + i), gv = ld(g + i), sv = ld(s + j);
    const A f = act_f<A>(hv, act);
    if (am) st(am + i, f * sv);
    if (fg) st(fg + i, f * gv);
    st(dh + i, gv * sv * dact_f<A>(hv, act));  // written last: dh may alias g
  }
}

// Gated: H [N, 2L] = [gate | up]; element i of the [N, L] tile is unit j = i % L of row n = i / L.
template <typename T>
__global__ void gated_fwd_epilogue_kernel(T* __restrict__ H, T* __restrict__ a, const T* __restrict__ bgu,
                                          const T* __restrict__ s, int64_t N, int64_t L, int act) {
  using A = typename Acc<T>::type;
  const int64_t total = N * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / L, j = i - n * L, hg = n * 2 * L + j;
    const A g = ld(H + hg) + ld(bgu + j), u = ld(H + hg + L) + ld(bgu + L + j);
    st(H + hg, g);
    st(H + hg + L, u);
    st(a + i, act_f<A>(g, act) * u * ld(s + j));
  }
}

template <typename T>
__global__ void gated_bwd_epilogue_kernel(const T* __restrict__ H, const T* __restrict__ G, T* __restrict__ dH,
                                          T* __restrict__ am, T* __restrict__ fg, const T* __restrict__ s, int64_t N,
                                          int64_t L, int act) {
  using A = typename Acc<T>::type;
  const int64_t total = N * L;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / L, j = i - n * L, hg = n * 2 * L + j;
    const A g = ld(H + hg), u = ld(H + hg + L), gv = ld(G + i), sv = ld(s + j);
    const A f = act_f<A>(g, act);
    st(dH + hg, gv * sv * u * dact_f<A>(g, act));
    st(dH + hg + L, gv * sv * f);
    if (am) st(am + i, f * u * sv);
    if (fg) st(fg + i, f * u * gv);
  }
}

inline unsigned blocks_for(int64_t total) {
  const int64_t b = (total + 255) / 256;
  return static_cast<unsigned>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

template <typename T>
int fwd_t(void* h, void* a, const void* b1, const void* s, int64_t N, int64_t L, int act, cudaStream_t st) {
  if (N * L == 0) return 0;
  fwd_epilogue_kernel<T><<<blocks_for(N * L), 256, 0, st>>>(static_cast<T*>(h), static_cast<T*>(a),
                                                             static_cast<const T*>(b1), static_cast<const T*>(s), N, L, act);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int bwd_t(const void* h, const void* g, void* dh, void* am, void* fg, const void* s, int64_t N, int64_t L, int act,
          cudaStream_t st) {
  if (N * L == 0) return 0;
  bwd_epilogue_kernel<T><<<blocks_for(N * L), 256, 0, st>>>(static_cast<const T*>(h), static_cast<const T*>(g),
                                                             static_cast<T*>(dh), static_cast<T*>(am), static_cast<T*>(fg),
                                                             static_cast<const T*>(s), N, L, act);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int gated_fwd_t(void* H, void* a, const void* bgu, const void* s, int64_t N, int64_t L, int act, cudaStream_t st) {
  if (N * L == 0) return 0;
  gated_fwd_epilogue_kernel<T><<<blocks_for(N * L), 256, 0, st>>>(static_cast<T*>(H), static_cast<T*>(a),
                                                                   static_cast<const T*>(bgu), static_cast<const T*>(s),
                                                                   N, L, act);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int gated_bwd_t(const void* H, const void* G, void* dH, void* am, void* fg, const void* s, int64_t N, int64_t L,
                int act, cudaStream_t st) {
  if (N * L == 0) return 0;
  gated_bwd_epilogue_kernel<T><<<blocks_for(N * L), 256, 0, st>>>(
      static_cast<const T*>(H), static_cast<const T*>(G), static_cast<T*>(dH), static_cast<T*>(am),
      static_cast<T*>(fg), static_cast<const T*>(s), N, L, act);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int cofi_masked_ffn_fwd_epilogue(int dtype, void* h, void* a, const void* b1, const void* s, int64_t N,
                                            int64_t L, int act, cudaStream_t stream) {
  switch (dtype) {
    case 0: return fwd_t<float>(h, a, b1, s, N, L, act, stream);
    case 1: return fwd_t<double>(h, a, b1, s, N, L, act, stream);
    case 2: return fwd_t<__half>(h, a, b1, s, N, L, act, stream);
    case 3: return fwd_t<__nv_bfloat16>(h, a, b1, s, N, L, act, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int cofi_masked_ffn_bwd_epilogue(int dtype, const void* h, const void* g, void* dh, void* am, void* fg,
                                            const void* s, int64_t N, int64_t L, int act, cudaStream_t stream) {
  switch (dtype) {
    case 0: return bwd_t<float>(h, g, dh, am, fg, s, N, L, act, stream);
    case 1: return bwd_t<double>(h, g, dh, am, fg, s, N, L, act, stream);
    case 2: return bwd_t<__half>(h, g, dh, am, fg, s, N, L, act, stream);
    case 3: return bwd_t<__nv_bfloat16>(h, g, dh, am, fg, s, N, L, act, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int cofi_masked_ffn_gated_fwd_epilogue(int dtype, void* H, void* a, const void* bgu, const void* s, int64_t N,
                                                  int64_t L, int act, cudaStream_t stream) {
  switch (dtype) {
    case 0: return gated_fwd_t<float>(H, a, bgu, s, N, L, act, stream);
    case 1: return gated_fwd_t<double>(H, a, bgu, s, N, L, act, stream);
    case 2: return gated_fwd_t<__half>(H, a, bgu, s, N, L, act, stream);
    case 3: return gated_fwd_t<__nv_bfloat16>(H, a, bgu, s, N, L, act, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int cofi_masked_ffn_gated_bwd_epilogue(int dtype, const void* H, const void* G, void* dH, void* am, void* fg,
                                                  const void* s, int64_t N, int64_t L, int act, cudaStream_t stream) {
  switch (dtype) {
    case 0: return gated_bwd_t<float>(H, G, dH, am, fg, s, N, L, act, stream);
    case 1: return gated_bwd_t<double>(H, G, dH, am, fg, s, N, L, act, stream);
    case 2: return gated_bwd_t<__half>(H, G, dH, am, fg, s, N, L, act, stream);
    case 3: return gated_bwd_t<__nv_bfloat16>(H, G, dH, am, fg, s, N, L, act, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
