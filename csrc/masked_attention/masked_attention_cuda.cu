// Torch-free CUDA kernels of masked_attention (see masked_attention.h for the layout contract).
//
// One query row (forward, dQ) or key row (dK/dV) per group of G = DMAX / kDimsPerLane adjacent lanes
// of a warp; lane g of a group holds head-dim elements d = c * G + g (c < kDimsPerLane) of its row's
// q/k/v and accumulators in registers, the other operand streamed through shared memory in tiles of
// kTile rows. Dot products are per-lane partial sums reduced over the group with xor shuffles (every
// lane of the group gets the bitwise-same sum). DMAX is a compile-time 32, 64 or 128 and every loop
// over the head dim runs to a compile-time bound, so the register arrays are indexed by constants
// and stay in registers (tools/ptxas_check.py fails on any local memory here); the runtime D only
// guards loads and stores. Control flow is uniform over a warp (rows past S compute on zeros and are
// never stored), as the full-warp shuffles need. Online softmax in the forward; the backward
// recomputes probabilities from the stored log-sum-exp. Float32 accumulation for every input dtype.
// Grid: 1-D over (batch x live head, row block), row blocks fastest -- dead heads are never launched,
// and batch x heads is not on grid y, which is capped at 65,535 (grid x takes 2^31 - 1 blocks; a
// larger grid is split into launches offset by bh0). Batch indices and every offset built from them
// are 64-bit. Dropout uses the same counter-based hash as python/cofi/ops/reference/masked_attention.py.
#include "masked_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kRows = 64;         // rows per block
constexpr int kTile = 32;         // rows of the streamed operand per shared-memory tile
constexpr int kDimsPerLane = 16;  // head-dim elements of a row each lane holds
constexpr int kDeltaRows = 128;   // rows (= threads) per block of delta_kernel
constexpr long long kMaxGridX = 2147483647;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

template <int DMAX>
constexpr int kGroup = DMAX / kDimsPerLane;  // lanes per row
template <int DMAX>
constexpr int kThreadsFor = kRows * kGroup<DMAX>;
static_assert(kGroup<32> == 2 && kGroup<128> == 8 && 32 % kGroup<128> == 0, "a row's lanes must tile a warp");

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

// Sum of v over the G lanes of this row's group (G a power of two dividing 32).
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullWarp, v, o, G);
  return v;
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 16;
  return x;
}

// Dropout of one (batch, head): the keep decision for (i, j) is mix32(row(i) + mix32(j)) >= thr with
// row(i) = mix32(base ^ mix32(i)) and base from the seed and bh = b * H + h modulo 2^32, as the
// reference's hash. weight() is inv if kept, 0 if dropped, 1 without dropout.
struct Dropout {
  bool on;
  uint32_t base, thr;
  float inv;

  __device__ __forceinline__ Dropout(const int64_t* seed, uint32_t thr_, float inv_, uint32_t bh)
      : on(seed != nullptr), base(0), thr(thr_), inv(inv_) {
    if (on) base = mix32(static_cast<uint32_t>(seed[0]) ^ mix32(bh + static_cast<uint32_t>(seed[1])));
  }
  __device__ __forceinline__ uint32_t row(int i) const { return mix32(base ^ mix32(static_cast<uint32_t>(i))); }
  __device__ __forceinline__ float weight(uint32_t row_hash, int j) const {
    if (!on) return 1.0f;
    return mix32(row_hash + mix32(static_cast<uint32_t>(j))) >= thr ? inv : 0.0f;
  }
};

// This block's batch b, head h and row block of a 1-D grid over (bh0 + batch x live head, row block).
struct Work {
  long long b;
  int h, blk;
};

__device__ __forceinline__ Work block_work(const int32_t* live, int n_live, int S, long long bh0, int rows) {
  const int n_blocks = (S + rows - 1) / rows;
  const long long bh = bh0 + blockIdx.x / n_blocks;
  return {bh / n_live, live[bh % n_live], static_cast<int>(blockIdx.x % n_blocks)};
}

// Stages kTile rows [r0, r0 + kTile) of a [S, D] operand (row stride ld, unit stride on D) as float
// into dst[kTile][DMAX], zero past S or D or where row_ok(row) is false.
template <typename T, int DMAX, typename RowOk>
__device__ __forceinline__ void stage(float (*dst)[DMAX], const T* __restrict__ src, long long ld, int r0, int S,
                                      int D, float mul, RowOk row_ok) {
  for (int idx = threadIdx.x; idx < kTile * DMAX; idx += blockDim.x) {
    const int r = idx / DMAX, d = idx % DMAX, row = r0 + r;
    dst[r][d] = (row < S && d < D && row_ok(row)) ? to_f(src[row * ld + d]) * mul : 0.0f;
  }
}

// ------------------------------------------------------------------------------------------------
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreadsFor<DMAX>)
    fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, Strides st,
               const T* __restrict__ z, const uint8_t* __restrict__ mask, const int64_t* __restrict__ seed,
               const int32_t* __restrict__ live, int n_live, long long bh0, int H, int S, int D, float scale,
               uint32_t thr, float inv, T* __restrict__ out, float* __restrict__ lse) {
  constexpr int G = kGroup<DMAX>, C = kDimsPerLane;
  __shared__ float ks[kTile][DMAX];
  __shared__ float vs[kTile][DMAX];
  __shared__ bool keep[kTile];
  const Work w = block_work(live, n_live, S, bh0, kRows);
  const long long b = w.b;
  const int h = w.h, g = threadIdx.x % G;
  const int i = w.blk * kRows + threadIdx.x / G;
  const bool row_ok = i < S;
  const Dropout drop(seed, thr, inv, static_cast<uint32_t>(b * H + h));
  const uint32_t row_hash = drop.row(i);
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  auto key_ok = [&](int j) { return mask == nullptr || mask[b * S + j] != 0; };
  float qr[C], acc[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int d = c * G + g;
    qr[c] = (row_ok && d < D) ? to_f(qb[i * st.q[2] + d]) * scale : 0.0f;
    acc[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j0 = 0; j0 < S; j0 += kTile) {
    __syncthreads();
    stage<T, DMAX>(ks, kb, st.k[2], j0, S, D, 1.0f, key_ok);  // masked keys are never read
    stage<T, DMAX>(vs, vb, st.v[2], j0, S, D, 1.0f, key_ok);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) keep[r] = j0 + r < S && key_ok(j0 + r);
    __syncthreads();
    for (int r = 0; r < kTile; ++r) {
      if (!keep[r]) continue;  // uniform over the block
      float s = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) s += qr[c] * ks[r][c * G + g];
      s = group_sum<G>(s);
      const float mn = fmaxf(m, s);
      const float alpha = __expf(m - mn);  // m = -inf on the first key -> 0
      const float p = __expf(s - mn);
      l = l * alpha + p;
      const float pw = p * drop.weight(row_hash, j0 + r);
#pragma unroll
      for (int c = 0; c < C; ++c) acc[c] = acc[c] * alpha + pw * vs[r][c * G + g];
      m = mn;
    }
  }
  if (!row_ok) return;
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long o = (b * H + h) * S + i;
  const float f = l > 0.0f ? zh / l : 0.0f;
#pragma unroll
  for (int c = 0; c < C; ++c)
    if (c * G + g < D) out[o * D + c * G + g] = from_f<T>(acc[c] * f);
  if (g == 0) lse[o] = l > 0.0f ? m + __logf(l) : INFINITY;
}

template <typename T>
__global__ void delta_kernel(const T* __restrict__ g, const T* __restrict__ out, const int32_t* __restrict__ live,
                             int n_live, long long bh0, int H, int S, int D, float* __restrict__ delta) {
  const Work w = block_work(live, n_live, S, bh0, kDeltaRows);
  const int i = w.blk * kDeltaRows + threadIdx.x;
  if (i >= S) return;
  const long long o = (w.b * H + w.h) * S + i;
  float s = 0.0f;
  for (int d = 0; d < D; ++d) s += to_f(g[o * D + d]) * to_f(out[o * D + d]);
  delta[o] = s;
}

// dK, dV: one key row j per lane group; query rows (and their gradients) streamed through shared memory.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreadsFor<DMAX>)
    bwd_dkdv_kernel(const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, Strides st, const T* __restrict__ z, const uint8_t* __restrict__ mask,
                    const int64_t* __restrict__ seed, const int32_t* __restrict__ live, int n_live, long long bh0,
                    int H, int S, int D, float scale, uint32_t thr, float inv, const float* __restrict__ lse,
                    const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int G = kGroup<DMAX>, C = kDimsPerLane;
  __shared__ float qs[kTile][DMAX];
  __shared__ float gs[kTile][DMAX];
  __shared__ float ls[kTile], ds_[kTile];
  const Work wk = block_work(live, n_live, S, bh0, kRows);
  const long long b = wk.b;
  const int h = wk.h, lane = threadIdx.x % G;
  const int j = wk.blk * kRows + threadIdx.x / G;
  const bool col_ok = j < S && (mask == nullptr || mask[b * S + j] != 0);
  const Dropout drop(seed, thr, inv, static_cast<uint32_t>(b * H + h));
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long base = (b * H + h) * S;
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  auto all = [](int) { return true; };
  float kr[C], vr[C], dkr[C], dvr[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int d = c * G + lane;
    kr[c] = (col_ok && d < D) ? to_f(kb[j * st.k[2] + d]) : 0.0f;
    vr[c] = (col_ok && d < D) ? to_f(vb[j * st.v[2] + d]) : 0.0f;
    dkr[c] = 0.0f;
    dvr[c] = 0.0f;
  }
  for (int i0 = 0; i0 < S; i0 += kTile) {
    __syncthreads();
    stage<T, DMAX>(qs, qb, st.q[2], i0, S, D, 1.0f, all);
    stage<T, DMAX>(gs, g + base * D, D, i0, S, D, zh, all);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      ls[r] = i0 + r < S ? lse[base + i0 + r] : INFINITY;
      ds_[r] = i0 + r < S ? delta[base + i0 + r] : 0.0f;
    }
    __syncthreads();
    for (int r = 0; r < kTile; ++r) {
      if (i0 + r >= S) break;  // uniform over the block
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        s += qs[r][c * G + lane] * kr[c];
        dp += gs[r][c * G + lane] * vr[c];
      }
      s = group_sum<G>(s);
      dp = group_sum<G>(dp);
      const float p = __expf(s * scale - ls[r]);  // lse = +inf (fully masked row) -> 0
      const float w = drop.weight(drop.row(i0 + r), j);
      const float dsv = p * (dp * w - ds_[r]) * scale;
      const float pw = p * w;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        dvr[c] += pw * gs[r][c * G + lane];
        dkr[c] += dsv * qs[r][c * G + lane];
      }
    }
  }
  if (j >= S) return;
#pragma unroll
  for (int c = 0; c < C; ++c) {  // masked keys get exact zeros (their lanes computed on zeros)
    const int d = c * G + lane;
    if (d < D) {
      dk[(base + j) * D + d] = from_f<T>(col_ok ? dkr[c] : 0.0f);
      dv[(base + j) * D + d] = from_f<T>(col_ok ? dvr[c] : 0.0f);
    }
  }
}

// dQ: one query row i per lane group; key rows streamed through shared memory.
template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreadsFor<DMAX>)
    bwd_dq_kernel(const T* __restrict__ g, const T* __restrict__ q, const T* __restrict__ k,
                  const T* __restrict__ v, Strides st, const T* __restrict__ z, const uint8_t* __restrict__ mask,
                  const int64_t* __restrict__ seed, const int32_t* __restrict__ live, int n_live, long long bh0,
                  int H, int S, int D, float scale, uint32_t thr, float inv, const float* __restrict__ lse,
                  const float* __restrict__ delta, T* __restrict__ dq) {
  constexpr int G = kGroup<DMAX>, C = kDimsPerLane;
  __shared__ float ks[kTile][DMAX];
  __shared__ float vs[kTile][DMAX];
  __shared__ bool keep[kTile];
  const Work wk = block_work(live, n_live, S, bh0, kRows);
  const long long b = wk.b;
  const int h = wk.h, lane = threadIdx.x % G;
  const int i = wk.blk * kRows + threadIdx.x / G;
  const bool row_ok = i < S;
  const Dropout drop(seed, thr, inv, static_cast<uint32_t>(b * H + h));
  const uint32_t row_hash = drop.row(i);
  const float zh = z != nullptr ? to_f(z[h]) : 1.0f;
  const long long base = (b * H + h) * S;
  const T* qb = q + b * st.q[0] + h * st.q[1];
  const T* kb = k + b * st.k[0] + h * st.k[1];
  const T* vb = v + b * st.v[0] + h * st.v[1];
  auto key_ok = [&](int j) { return mask == nullptr || mask[b * S + j] != 0; };
  float qr[C], gr[C], dqr[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int d = c * G + lane;
    qr[c] = (row_ok && d < D) ? to_f(qb[i * st.q[2] + d]) : 0.0f;
    gr[c] = (row_ok && d < D) ? to_f(g[(base + i) * D + d]) * zh : 0.0f;
    dqr[c] = 0.0f;
  }
  const float li = row_ok ? lse[base + i] : INFINITY;
  const float di = row_ok ? delta[base + i] : 0.0f;
  for (int j0 = 0; j0 < S; j0 += kTile) {
    __syncthreads();
    stage<T, DMAX>(ks, kb, st.k[2], j0, S, D, 1.0f, key_ok);
    stage<T, DMAX>(vs, vb, st.v[2], j0, S, D, 1.0f, key_ok);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) keep[r] = j0 + r < S && key_ok(j0 + r);
    __syncthreads();
    for (int r = 0; r < kTile; ++r) {
      if (!keep[r]) continue;  // uniform over the block
      float s = 0.0f, dp = 0.0f;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        s += qr[c] * ks[r][c * G + lane];
        dp += gr[c] * vs[r][c * G + lane];
      }
      s = group_sum<G>(s);
      dp = group_sum<G>(dp);
      const float p = __expf(s * scale - li);
      const float w = drop.weight(row_hash, j0 + r);
      const float dsv = p * (dp * w - di) * scale;
#pragma unroll
      for (int c = 0; c < C; ++c) dqr[c] += dsv * ks[r][c * G + lane];
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int c = 0; c < C; ++c)
    if (c * G + lane < D) dq[(base + i) * D + c * G + lane] = from_f<T>(dqr[c]);
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
// kMaxGridX blocks of `rows` rows.
template <typename Launch>
int for_each_grid(int B, int n_live, int S, int rows, Launch launch) {
  const long long n_blocks = (S + rows - 1) / rows;
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
  return for_each_grid(B, n_live, S, kRows, [&](dim3 grid, long long bh0) {
    fwd_kernel<T, DMAX><<<grid, kThreadsFor<DMAX>, 0, stream>>>(
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
  return for_each_grid(B, n_live, S, kRows, [&](dim3 grid, long long bh0) {
    bwd_dkdv_kernel<T, DMAX><<<grid, kThreadsFor<DMAX>, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), st,
        static_cast<const T*>(z), mask, seed, live, n_live, bh0, H, S, D, scale, thr, inv, lse, delta,
        static_cast<T*>(dk), static_cast<T*>(dv));
    bwd_dq_kernel<T, DMAX><<<grid, kThreadsFor<DMAX>, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), st,
        static_cast<const T*>(z), mask, seed, live, n_live, bh0, H, S, D, scale, thr, inv, lse, delta,
        static_cast<T*>(dq));
  });
}

}  // namespace

// The instantiation for (dtype, D): head-dim width DMAX = 32, 64 or 128, the smallest >= D.
#define COFI_DISPATCH_D(T, D, FN, ...)                                  \
  return (D) <= 32 ? FN<T, 32>(__VA_ARGS__) : (D) <= 64 ? FN<T, 64>(__VA_ARGS__) : FN<T, 128>(__VA_ARGS__)
#define COFI_DISPATCH(dtype, D, FN, ...)                                \
  do {                                                                 \
    if ((D) < 0 || (D) > 128) return static_cast<int>(cudaErrorInvalidValue); \
    if ((dtype) == 0) COFI_DISPATCH_D(float, D, FN, __VA_ARGS__);      \
    if ((dtype) == 1) COFI_DISPATCH_D(__half, D, FN, __VA_ARGS__);     \
    if ((dtype) == 2) COFI_DISPATCH_D(__nv_bfloat16, D, FN, __VA_ARGS__); \
    return static_cast<int>(cudaErrorInvalidValue);                    \
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
  return for_each_grid(B, n_live, S, kDeltaRows, [&](dim3 grid, long long bh0) {
    if (dtype == 0)
      delta_kernel<float><<<grid, kDeltaRows, 0, stream>>>(static_cast<const float*>(grad), static_cast<const float*>(out),
                                                    live, n_live, bh0, H, S, D, delta);
    else if (dtype == 1)
      delta_kernel<__half><<<grid, kDeltaRows, 0, stream>>>(static_cast<const __half*>(grad),
                                                     static_cast<const __half*>(out), live, n_live, bh0, H, S, D, delta);
    else
      delta_kernel<__nv_bfloat16><<<grid, kDeltaRows, 0, stream>>>(static_cast<const __nv_bfloat16*>(grad),
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
