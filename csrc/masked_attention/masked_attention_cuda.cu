// Torch-free CUDA kernels of masked_attention (see masked_attention.h for the layout contract).
//
// Deliberately simple: one thread per query row (forward, dQ) or key row (dK/dV), its row of
// q/k/v and accumulators in registers (D <= DMAX, DMAX = 64 or 128), the other operand streamed
// through shared memory in tiles of TILE rows. Online softmax in the forward; the backward recomputes
// probabilities from the stored log-sum-exp. Float32 accumulation for every input dtype. Grid: 1-D
// over (batch x live head, row block), row blocks fastest -- dead heads are never launched, and batch
// x heads is not on grid y, which is capped at 65,535 (grid x takes 2^31 - 1 blocks; a larger grid
// is split into launches offset by bh0). Batch indices and every offset built from them are 64-bit.
// Dropout uses the same counter-based hash as python/cofi/ops/reference/masked_attention.py.
#include "masked_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 64;  // rows per block
constexpr int kTile = 32;     // rows of the streamed operand per shared-memory tile
constexpr long long kMaxGridX = 2147483647;

struct Strides {
  long long q[3], k[3], v[3];
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 16;
  return x;
}

// Dropout factor for (bh, i, j): inv if kept, 0 if dropped; 1 without dropout. bh = b * H + h modulo
// 2^32, as the reference's hash.
__device__ __forceinline__ float drop_w(const int64_t* seed, uint32_t thr, float inv, uint32_t bh, int i, int j) {
  if (seed == nullptr) return 1.0f;
  const uint32_t s0 = static_cast<uint32_t>(seed[0]), s1 = static_cast<uint32_t>(seed[1]);
  const uint32_t base = mix32(s0 ^ mix32(bh + s1));
  const uint32_t row = mix32(base ^ mix32(static_cast<uint32_t>(i)));
  return mix32(row + mix32(static_cast<uint32_t>(j))) >= thr ? inv : 0.0f;
}

// This block's batch b, head h and row block of a 1-D grid over (bh0 + batch x live head, row block).
struct Work {
  long long b;
  int h, blk;
};

__device__ __forceinline__ Work block_work(const int32_t* live, int n_live, int S, long long bh0) {
  const int n_blocks = (S + blockDim.x - 1) / blockDim.x;
  const long long bh = bh0 + blockIdx.x / n_blocks;
  return {bh / n_live, live[bh % n_live], static_cast<int>(blockIdx.x % n_blocks)};
}

// ------------------------------------------------------------------------------------------------
template <typename T, int DMAX>
__global__ void fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, Strides st,
                           const T* __restrict__ z, const uint8_t* __restrict__ mask, const int64_t* __restrict__ seed,
                           const int32_t* __restrict__ live, int n_live, long long bh0, int H, int S, int D,
                           float scale, uint32_t thr, float inv, T* __restrict__ out, float* __restrict__ lse) {
  __shared__ float ks[kTile][DMAX];
  __shared__ float vs[kTile][DMAX];
  __shared__ bool keep[kTile];
  const Work w = block_work(live, n_live, S, bh0);
  const long long b = w.b;
  const int h = w.h;
  const uint32_t bh = static_cast<uint32_t>(b * H + h);
  const int i = w.blk * kThreads + threadIdx.x;
  const bool row_ok = i < S;
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  float qr[DMAX], acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    qr[d] = (row_ok && d < D) ? to_f(qb[i * st.q[2] + d]) * scale : 0.0f;
    acc[d] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j0 = 0; j0 < S; j0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * DMAX; idx += kThreads) {
      const int r = idx / DMAX, d = idx % DMAX, j = j0 + r;
      const bool ok = j < S && (mask == nullptr || mask[b * S + j] != 0);
      ks[r][d] = (ok && d < D) ? to_f(kb[j * st.k[2] + d]) : 0.0f;  // padded keys are never read
      vs[r][d] = (ok && d < D) ? to_f(vb[j * st.v[2] + d]) : 0.0f;
      if (d == 0) keep[r] = ok;
    }
    __syncthreads();
    if (!row_ok) continue;
    for (int r = 0; r < kTile; ++r) {
      if (!keep[r]) continue;
      float s = 0.0f;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) s += qr[d] * ks[r][d];
      const float mn = fmaxf(m, s);
      const float alpha = __expf(m - mn);  // m = -inf on the first key -> 0
      const float p = __expf(s - mn);
      l = l * alpha + p;
      const float pw = p * drop_w(seed, thr, inv, bh, i, j0 + r);
#pragma unroll
      for (int d = 0; d < DMAX; ++d) acc[d] = acc[d] * alpha + pw * vs[r][d];
      m = mn;
    }
  }
  if (!row_ok) return;
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long o = (b * H + h) * S + i;
  const float f = l > 0.0f ? zh / l : 0.0f;
#pragma unroll
  for (int d = 0; d < DMAX; ++d)  // unrolled (not d < D): a runtime index would put acc in local memory
    if (d < D) out[o * D + d] = from_f<T>(acc[d] * f);
  lse[o] = l > 0.0f ? m + __logf(l) : INFINITY;
}

template <typename T>
__global__ void delta_kernel(const T* __restrict__ g, const T* __restrict__ out, const int32_t* __restrict__ live,
                             int n_live, long long bh0, int H, int S, int D, float* __restrict__ delta) {
  const Work w = block_work(live, n_live, S, bh0);
  const int i = w.blk * blockDim.x + threadIdx.x;
  if (i >= S) return;
  const long long o = (w.b * H + w.h) * S + i;
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s += to_f(g[o * D + d]) * to_f(out[o * D + d]);
  delta[o] = s;
}

// dK, dV: one thread per key row j; query rows streamed through shared memory.
template <typename T, int DMAX>
__global__ void bwd_dkdv_kernel(const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, Strides st, const T* __restrict__ z,
                                const uint8_t* __restrict__ mask, const int64_t* __restrict__ seed,
                                const int32_t* __restrict__ live, int n_live, long long bh0, int H, int S, int D,
                                float scale, uint32_t thr, float inv, const float* __restrict__ lse,
                                const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  __shared__ float qs[kTile][DMAX];
  __shared__ float gs[kTile][DMAX];
  __shared__ float ls[kTile], ds_[kTile];
  const Work wk = block_work(live, n_live, S, bh0);
  const long long b = wk.b;
  const int h = wk.h;
  const uint32_t bh = static_cast<uint32_t>(b * H + h);
  const int j = wk.blk * kThreads + threadIdx.x;
  const bool col_ok = j < S && (mask == nullptr || mask[b * S + j] != 0);
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long base = (b * H + h) * S;
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  float kr[DMAX], vr[DMAX], dkr[DMAX], dvr[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    kr[d] = (col_ok && d < D) ? to_f(kb[j * st.k[2] + d]) : 0.0f;
    vr[d] = (col_ok && d < D) ? to_f(vb[j * st.v[2] + d]) : 0.0f;
    dkr[d] = 0.0f;
    dvr[d] = 0.0f;
  }
  for (int i0 = 0; i0 < S; i0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * DMAX; idx += kThreads) {
      const int r = idx / DMAX, d = idx % DMAX, i = i0 + r;
      const bool ok = i < S && d < D;
      qs[r][d] = ok ? to_f(qb[i * st.q[2] + d]) : 0.0f;
      gs[r][d] = ok ? to_f(g[(base + i) * D + d]) * zh : 0.0f;
      if (d == 0) {
        ls[r] = i < S ? lse[base + i] : INFINITY;
        ds_[r] = i < S ? delta[base + i] : 0.0f;
      }
    }
    __syncthreads();
    if (!col_ok) continue;
    for (int r = 0; r < kTile; ++r) {
      if (i0 + r >= S) break;
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) {
        s += qs[r][d] * kr[d];
        dp += gs[r][d] * vr[d];
      }
      const float p = __expf(s * scale - ls[r]);  // lse = +inf (fully masked row) -> 0
      const float w = drop_w(seed, thr, inv, bh, i0 + r, j);
      const float dsv = p * (dp * w - ds_[r]) * scale;
      const float pw = p * w;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) {
        dvr[d] += pw * gs[r][d];
        dkr[d] += dsv * qs[r][d];
      }
    }
  }
  if (j >= S) return;
  // Not unrolled like the other kernels' stores: kr, vr, dkr, dvr (4 DMAX floats) never fit in
  // registers, and ptxas spills more when dkr, dvr are register-resident than when they stay in local memory.
  for (int d = 0; d < D; ++d) {  // padded keys get exact zeros
    dk[(base + j) * D + d] = from_f<T>(col_ok ? dkr[d] : 0.0f);
    dv[(base + j) * D + d] = from_f<T>(col_ok ? dvr[d] : 0.0f);
  }
}

// dQ: one thread per query row i; key rows streamed through shared memory.
template <typename T, int DMAX>
__global__ void bwd_dq_kernel(const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, Strides st, const T* __restrict__ z,
                              const uint8_t* __restrict__ mask, const int64_t* __restrict__ seed,
                              const int32_t* __restrict__ live, int n_live, long long bh0, int H, int S, int D,
                              float scale, uint32_t thr, float inv, const float* __restrict__ lse,
                              const float* __restrict__ delta, T* __restrict__ dq) {
  __shared__ float ks[kTile][DMAX];
  __shared__ float vs[kTile][DMAX];
  __shared__ bool keep[kTile];
  const Work wk = block_work(live, n_live, S, bh0);
  const long long b = wk.b;
  const int h = wk.h;
  const uint32_t bh = static_cast<uint32_t>(b * H + h);
  const int i = wk.blk * kThreads + threadIdx.x;
  const bool row_ok = i < S;
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long base = (b * H + h) * S;
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  float qr[DMAX], gr[DMAX], dqr[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) {
    qr[d] = (row_ok && d < D) ? to_f(qb[i * st.q[2] + d]) : 0.0f;
    gr[d] = (row_ok && d < D) ? to_f(g[(base + i) * D + d]) * zh : 0.0f;
    dqr[d] = 0.0f;
  }
  const float li = row_ok ? lse[base + i] : INFINITY;
  const float di = row_ok ? delta[base + i] : 0.0f;
  for (int j0 = 0; j0 < S; j0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * DMAX; idx += kThreads) {
      const int r = idx / DMAX, d = idx % DMAX, j = j0 + r;
      const bool ok = j < S && (mask == nullptr || mask[b * S + j] != 0);
      ks[r][d] = (ok && d < D) ? to_f(kb[j * st.k[2] + d]) : 0.0f;
      vs[r][d] = (ok && d < D) ? to_f(vb[j * st.v[2] + d]) : 0.0f;
      if (d == 0) keep[r] = ok;
    }
    __syncthreads();
    if (!row_ok) continue;
    for (int r = 0; r < kTile; ++r) {
      if (!keep[r]) continue;
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) {
        s += qr[d] * ks[r][d];
        dp += gr[d] * vs[r][d];
      }
      const float p = __expf(s * scale - li);
      const float w = drop_w(seed, thr, inv, bh, i, j0 + r);
      const float dsv = p * (dp * w - di) * scale;
#pragma unroll
      for (int d = 0; d < DMAX; ++d) dqr[d] += dsv * ks[r][d];
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int d = 0; d < DMAX; ++d)
    if (d < D) dq[(base + i) * D + d] = from_f<T>(dqr[d]);
}

Strides make_strides(const int64_t* s) {
  Strides st;
  for (int t = 0; t < 3; ++t) {
    st.q[t] = s[t];
    st.k[t] = s[3 + t];
    st.v[t] = s[6 + t];
  }
  return st;
}

// Calls launch(grid, bh0) over the B * n_live (batch, live head) pairs, each launch's 1-D grid at most
// kMaxGridX blocks of `threads` rows.
template <typename Launch>
int for_each_grid(int B, int n_live, int S, int threads, Launch launch) {
  const long long n_blocks = (S + threads - 1) / threads;
  const long long total = static_cast<long long>(B) * n_live, per = kMaxGridX / n_blocks;
  for (long long bh0 = 0; bh0 < total; bh0 += per) {
    const long long n = total - bh0 < per ? total - bh0 : per;
    launch(dim3(static_cast<unsigned>(n * n_blocks)), bh0);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int DMAX>
int launch_fwd(const void* q, const void* k, const void* v, const int64_t* strides, const void* z,
               const uint8_t* mask, const int64_t* seed, const int32_t* live, int n_live, int B, int H, int S, int D,
               float scale, uint32_t thr, float inv, void* out, float* lse, cudaStream_t stream) {
  return for_each_grid(B, n_live, S, kThreads, [&](dim3 grid, long long bh0) {
    fwd_kernel<T, DMAX><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), make_strides(strides),
        static_cast<const T*>(z), mask, seed, live, n_live, bh0, H, S, D, scale, thr, inv, static_cast<T*>(out), lse);
  });
}

template <typename T, int DMAX>
int launch_bwd(const void* g, const void* q, const void* k, const void* v, const int64_t* strides, const void* z,
               const uint8_t* mask, const int64_t* seed, const int32_t* live, int n_live, int B, int H, int S, int D,
               float scale, uint32_t thr, float inv, const float* lse, const float* delta, void* dq, void* dk,
               void* dv, cudaStream_t stream) {
  const Strides st = make_strides(strides);
  return for_each_grid(B, n_live, S, kThreads, [&](dim3 grid, long long bh0) {
    bwd_dkdv_kernel<T, DMAX><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), st,
        static_cast<const T*>(z), mask, seed, live, n_live, bh0, H, S, D, scale, thr, inv, lse, delta,
        static_cast<T*>(dk), static_cast<T*>(dv));
    bwd_dq_kernel<T, DMAX><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), st,
        static_cast<const T*>(z), mask, seed, live, n_live, bh0, H, S, D, scale, thr, inv, lse, delta,
        static_cast<T*>(dq));
  });
}

}  // namespace

#define COFI_DISPATCH(dtype, D, FN, ...)                                                   \
  do {                                                                                    \
    if ((D) > 128) return static_cast<int>(cudaErrorInvalidValue);                        \
    if ((dtype) == 0) return (D) <= 64 ? FN<float, 64>(__VA_ARGS__) : FN<float, 128>(__VA_ARGS__); \
    if ((dtype) == 1) return (D) <= 64 ? FN<__half, 64>(__VA_ARGS__) : FN<__half, 128>(__VA_ARGS__); \
    if ((dtype) == 2)                                                                     \
      return (D) <= 64 ? FN<__nv_bfloat16, 64>(__VA_ARGS__) : FN<__nv_bfloat16, 128>(__VA_ARGS__); \
    return static_cast<int>(cudaErrorInvalidValue);                                       \
  } while (0)

extern "C" int cofi_masked_attention_fwd_cuda(int dtype, const void* q, const void* k, const void* v,
                                              const int64_t* strides, const void* head_z, const uint8_t* mask,
                                              const int64_t* seed, const int32_t* live, int n_live, int B, int H,
                                              int S, int D, float scale, uint32_t drop_thr, float drop_inv, void* out,
                                              float* lse, cudaStream_t stream) {
  if (n_live == 0 || B == 0 || S == 0) return 0;
  COFI_DISPATCH(dtype, D, launch_fwd, q, k, v, strides, head_z, mask, seed, live, n_live, B, H, S, D, scale, drop_thr,
                drop_inv, out, lse, stream);
}

extern "C" int cofi_masked_attention_delta_cuda(int dtype, const void* grad, const void* out, const int32_t* live,
                                                int n_live, int B, int H, int S, int D, float* delta,
                                                cudaStream_t stream) {
  if (n_live == 0 || B == 0 || S == 0) return 0;
  if (dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  return for_each_grid(B, n_live, S, 128, [&](dim3 grid, long long bh0) {
    if (dtype == 0)
      delta_kernel<float><<<grid, 128, 0, stream>>>(static_cast<const float*>(grad), static_cast<const float*>(out),
                                                    live, n_live, bh0, H, S, D, delta);
    else if (dtype == 1)
      delta_kernel<__half><<<grid, 128, 0, stream>>>(static_cast<const __half*>(grad),
                                                     static_cast<const __half*>(out), live, n_live, bh0, H, S, D, delta);
    else
      delta_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(static_cast<const __nv_bfloat16*>(grad),
                                                            static_cast<const __nv_bfloat16*>(out), live, n_live, bh0,
                                                            H, S, D, delta);
  });
}

extern "C" int cofi_masked_attention_bwd_cuda(int dtype, const void* grad, const void* q, const void* k,
                                              const void* v, const int64_t* strides, const void* head_z,
                                              const uint8_t* mask, const int64_t* seed, const int32_t* live,
                                              int n_live, int B, int H, int S, int D, float scale, uint32_t drop_thr,
                                              float drop_inv, const float* lse, const float* delta, void* dq,
                                              void* dk, void* dv, cudaStream_t stream) {
  if (n_live == 0 || B == 0 || S == 0) return 0;
  COFI_DISPATCH(dtype, D, launch_bwd, grad, q, k, v, strides, head_z, mask, seed, live, n_live, B, H, S, D, scale,
                drop_thr, drop_inv, lse, delta, dq, dk, dv, stream);
}
