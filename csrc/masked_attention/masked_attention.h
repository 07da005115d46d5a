// Torch-free CUDA launchers of masked_attention (kernels in masked_attention_cuda.cu; the glue that
// registers them as cofi::masked_attention_{fwd,bwd}_native for the CUDA key is masked_attention_cuda.cpp).
//
// Layout: q, k, v are [B, H, S, D] with element strides (b, h, s) given in `strides` (q, k, v in that
// order, 9 values) and unit stride on D; grad, out, dq, dk, dv are contiguous [B, H, S, D]; lse and
// delta are contiguous float32 [B, H, S]. Only heads listed in `live` (n_live int32 indices) are
// computed; the caller pre-fills everything else. mask: [B, S] bytes (nonzero = keep) or null.
// seed: 2 int64 on the device or null (no dropout). dtype: 0 = float32, 1 = float16, 2 = bfloat16.
// Supports D <= 128. Each launcher returns a cudaError_t value (0 = success).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

int cofi_masked_attention_fwd_cuda(int dtype, const void* q, const void* k, const void* v, const int64_t* strides,
                                   const void* head_z, const uint8_t* mask, const int64_t* seed,
                                   const int32_t* live, int n_live, int B, int H, int S, int D, float scale,
                                   uint32_t drop_thr, float drop_inv, void* out, float* lse, cudaStream_t stream);

// delta[b, h, i] = sum_d grad * out (float32), live heads only.
int cofi_masked_attention_delta_cuda(int dtype, const void* grad, const void* out, const int32_t* live, int n_live,
                                     int B, int H, int S, int D, float* delta, cudaStream_t stream);

int cofi_masked_attention_bwd_cuda(int dtype, const void* grad, const void* q, const void* k, const void* v,
                                   const int64_t* strides, const void* head_z, const uint8_t* mask,
                                   const int64_t* seed, const int32_t* live, int n_live, int B, int H, int S, int D,
                                   float scale, uint32_t drop_thr, float drop_inv, const float* lse,
                                   const float* delta, void* dq, void* dk, void* dv, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
