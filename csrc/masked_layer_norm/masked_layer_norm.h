// Torch-free CUDA launchers of masked_layer_norm (csrc/masked_layer_norm/masked_layer_norm_cuda.cu).
// x, residual, y, grads: contiguous [N, d]; weight, bias, hidden_z: [d]; mean, rstd: [N] in the
// compute type (float, or double for float64). residual / hidden_z may be null (no residual; plain
// LayerNorm). dtype: 0 = float32, 1 = float64, 2 = float16, 3 = bfloat16. Returns 0 or a cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int cofi_masked_layer_norm_fwd(int dtype, const void* x, const void* residual, const void* weight, const void* bias,
                               const void* hidden_z, void* y, void* mean, void* rstd, int64_t N, int64_t d, double eps,
                               cudaStream_t stream);

// dx, dr may be null. rows_dw, rows_db, rows_dz: per-row column contributions [N, d] in the compute
// type (summed over rows by the caller), each may be null.
int cofi_masked_layer_norm_bwd(int dtype, const void* grad, const void* x, const void* residual, const void* weight,
                               const void* bias, const void* hidden_z, const void* mean, const void* rstd, void* dx,
                               void* dr, void* rows_dw, void* rows_db, void* rows_dz, int64_t N, int64_t d,
                               cudaStream_t stream);

#ifdef __cplusplus
}
#endif
