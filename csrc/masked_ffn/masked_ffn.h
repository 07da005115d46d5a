// Torch-free CUDA launchers of the masked_ffn epilogues (csrc/masked_ffn/masked_ffn_cuda.cu).
// All tensors are contiguous row-major; [N, L] tiles of the live units. dtype: 0 = float32,
// 1 = float64, 2 = float16, 3 = bfloat16 (compute in float, or double for float64).
// act: 0 = GELU (erf), 1 = GELU (tanh), 2 = ReLU, 3 = SiLU (gated only). Return 0 on success, else a
// cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// h[n, j] += b1[j]; a[n, j] = act(h[n, j]) * s[j]
int cofi_masked_ffn_fwd_epilogue(int dtype, void* h, void* a, const void* b1, const void* s, int64_t N, int64_t L,
                                 int act, cudaStream_t stream);

// dh[n, j] = g[n, j] * s[j] * act'(h[n, j]) (dh may alias g); am = act(h) * s and fg = act(h) * g
// when non-null.
int cofi_masked_ffn_bwd_epilogue(int dtype, const void* h, const void* g, void* dh, void* am, void* fg,
                                 const void* s, int64_t N, int64_t L, int act, cudaStream_t stream);

// Gated (SwiGLU / GeGLU / ReGLU), H [N, 2L] = [gate | up]: H[n, j] += bgu[j], H[n, L + j] += bgu[L + j];
// a[n, j] = act(g) * u * s[j].
int cofi_masked_ffn_gated_fwd_epilogue(int dtype, void* H, void* a, const void* bgu, const void* s, int64_t N, int64_t L,
                                       int act, cudaStream_t stream);

// dH [N, 2L] = [G s u act'(g) | G s act(g)] (dH must not alias G); am = act(g) u s and fg = act(g) u G
// ([N, L]) when non-null.
int cofi_masked_ffn_gated_bwd_epilogue(int dtype, const void* H, const void* G, void* dH, void* am, void* fg,
                                       const void* s, int64_t N, int64_t L, int act, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
