// CUDA glue of cofi::masked_ffn_fwd_native / masked_ffn_bwd_native: cuBLAS GEMMs (through ATen) on
// the gathered live units around the torch-free fused epilogue kernels of masked_ffn_cuda.cu, all on
// torch's current stream. Same contract and formulas as masked_ffn_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../autocast_guard.h"
#include "masked_ffn.h"

namespace cofi {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "cofi::masked_ffn_native (CUDA): x dtype must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "cofi::masked_ffn_native (CUDA): ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

struct Live {
  at::Tensor w1, b1, w2, z;
};

Live gather(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& int_z,
            const c10::optional<at::Tensor>& live) {
  Live l;
  if (live) {
    l.w1 = w1.index_select(0, *live);
    l.b1 = b1.index_select(0, *live);
    l.w2 = w2.index_select(1, *live);
    if (int_z) l.z = int_z->index_select(0, *live);
  } else {
    l.w1 = w1.contiguous();
    l.b1 = b1.contiguous();
    l.w2 = w2.contiguous();
    if (int_z) l.z = int_z->contiguous();
  }
  return l;
}

at::Tensor gate_scale(const Live& l, const c10::optional<at::Tensor>& mlp_z, int64_t L, const at::Tensor& like) {
  at::Tensor s = l.z.defined() ? l.z.clone() : at::ones({L}, like.options());
  if (mlp_z) s.mul_(mlp_z->reshape({}));
  return s.contiguous();
}

void check_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                  const at::Tensor& b2, const c10::optional<at::Tensor>& int_z, const c10::optional<at::Tensor>& mlp_z,
                  const c10::optional<at::Tensor>& live, int64_t act) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "cofi::masked_ffn_native (CUDA): x must be a CUDA [N, d] tensor, got ", x.sizes());
  const int64_t F = w1.size(0), d = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == d, "cofi::masked_ffn_native (CUDA): w1 must be [F, d], got ", w1.sizes());
  TORCH_CHECK(b1.numel() == F && w2.dim() == 2 && w2.size(0) == d && w2.size(1) == F && b2.numel() == d,
              "cofi::masked_ffn_native (CUDA): b1 [F], w2 [d, F], b2 [d] expected");
  for (const auto* t : {&w1, &b1, &w2, &b2})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "cofi::masked_ffn_native (CUDA): weights must match x's dtype and device");
  if (int_z) TORCH_CHECK(int_z->numel() == F && int_z->scalar_type() == x.scalar_type(), "cofi::masked_ffn_native (CUDA): int_z must be [F] in x's dtype");
  if (mlp_z) TORCH_CHECK(mlp_z->numel() == 1 && mlp_z->scalar_type() == x.scalar_type(), "cofi::masked_ffn_native (CUDA): mlp_z must have one element in x's dtype");
  if (live) TORCH_CHECK(live->dim() == 1 && live->scalar_type() == at::kLong, "cofi::masked_ffn_native (CUDA): live must be int64 [L]");
  TORCH_CHECK(act >= 0 && act <= 2, "cofi::masked_ffn_native (CUDA): activation code must be 0, 1 or 2, got ", act);
}

struct GatedLive {
  at::Tensor W, b, w2, z;  // W [2L, d] = [wg; w1] live rows, b [2L] = [bg; b1] live entries
};

GatedLive gather_gated(const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1, const at::Tensor& b1,
                       const at::Tensor& w2, const c10::optional<at::Tensor>& int_z, const c10::optional<at::Tensor>& live) {
  GatedLive g;
  if (live) {
    const int64_t L = live->size(0);
    g.W = at::empty({2 * L, wg.size(1)}, wg.options());
    at::Tensor top = g.W.narrow(0, 0, L), bottom = g.W.narrow(0, L, L);  // contiguous row blocks
    at::index_select_out(top, wg, 0, *live);
    at::index_select_out(bottom, w1, 0, *live);
    g.b = at::cat({bg.index_select(0, *live), b1.index_select(0, *live)});
    g.w2 = w2.index_select(1, *live);
    if (int_z) g.z = int_z->index_select(0, *live);
  } else {
    g.W = at::cat({wg, w1});
    g.b = at::cat({bg, b1});
    g.w2 = w2.contiguous();
    if (int_z) g.z = int_z->contiguous();
  }
  return g;
}

void check_gated(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& int_z,
                 const c10::optional<at::Tensor>& mlp_z, const c10::optional<at::Tensor>& live, int64_t act) {
  check_inputs(x, w1, b1, w2, b2, int_z, mlp_z, live, 0);
  TORCH_CHECK(wg.sizes() == w1.sizes() && bg.sizes() == b1.sizes(), "cofi::masked_ffn_gated_native (CUDA): wg [F, d] and bg [F] expected");
  for (const auto* t : {&wg, &bg})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), "cofi::masked_ffn_gated_native (CUDA): wg and bg must match x's dtype and device");
  TORCH_CHECK(act >= 0 && act <= 3, "cofi::masked_ffn_gated_native (CUDA): gate activation code must be 0, 1, 2 or 3, got ", act);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_ffn_fwd_cuda(const at::Tensor& x_, const at::Tensor& w1, const at::Tensor& b1,
                                                      const at::Tensor& w2, const at::Tensor& b2,
                                                      const c10::optional<at::Tensor>& int_z,
                                                      const c10::optional<at::Tensor>& mlp_z,
                                                      const c10::optional<at::Tensor>& live, int64_t act) {
  const NoAutocast no_autocast;
  check_inputs(x_, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  Live l = gather(w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = l.w1.size(0);
  at::Tensor h = at::mm(x, l.w1.t());
  at::Tensor a = at::empty_like(h);
  at::Tensor s = gate_scale(l, mlp_z, L, x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &h}, {"a", &a}, {"b1", &l.b1},
                                {"gate scale", &s}})
    check_buffer_dtype("cofi::masked_ffn_fwd_native (CUDA)", name, *t, x.scalar_type());
  check(cofi_masked_ffn_fwd_epilogue(dtype_code(x), h.data_ptr(), a.data_ptr(), l.b1.data_ptr(), s.data_ptr(), N, L,
                                     static_cast<int>(act), at::cuda::getCurrentCUDAStream()),
        "forward epilogue");
  at::Tensor b2m = mlp_z ? b2 * mlp_z->reshape({}) : b2;
  // No live unit: y = b2 m in every row, as a fresh tensor (an expand of b2 would alias an input).
  at::Tensor y = L > 0 ? at::addmm(b2m, a, l.w2.t()) : b2m.expand({N, b2.size(0)}).clone(at::MemoryFormat::Contiguous);
  return {y, h};
}

std::vector<at::Tensor> masked_ffn_bwd_cuda(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& w1,
                                            const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                            const c10::optional<at::Tensor>& int_z,
                                            const c10::optional<at::Tensor>& mlp_z,
                                            const c10::optional<at::Tensor>& live, const at::Tensor& h_, int64_t act,
                                            c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_inputs(x_, w1, b1, w2, b2, int_z, mlp_z, live, act);
  TORCH_CHECK(needs_.size() == 7, "cofi::masked_ffn_bwd_native (CUDA): needs must have 7 entries");
  bool needs[7];
  for (int i = 0; i < 7; ++i) needs[i] = needs_.get(i);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous(), h = h_.contiguous();
  Live l = gather(w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = l.w1.size(0);
  TORCH_CHECK(h.size(0) == N && h.size(1) == L, "cofi::masked_ffn_bwd_native (CUDA): h must be [N, L]");
  at::Tensor s = gate_scale(l, mlp_z, L, x);
  at::Tensor G = at::mm(grad, l.w2);  // [N, L], becomes dh in place
  at::Tensor am = needs[3] ? at::empty({N, L}, x.options()) : at::Tensor();
  const bool need_P = (needs[5] && int_z) || (needs[6] && mlp_z);
  at::Tensor fg = need_P ? at::empty({N, L}, x.options()) : at::Tensor();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &h}, {"G", &G}, {"am", &am},
                                {"act(h) * G", &fg}, {"gate scale", &s}})
    check_buffer_dtype("cofi::masked_ffn_bwd_native (CUDA)", name, *t, x.scalar_type());
  check(cofi_masked_ffn_bwd_epilogue(dtype_code(x), h.data_ptr(), G.data_ptr(), G.data_ptr(),
                                     am.defined() ? am.data_ptr() : nullptr, fg.defined() ? fg.data_ptr() : nullptr,
                                     s.data_ptr(), N, L, static_cast<int>(act), at::cuda::getCurrentCUDAStream()),
        "backward epilogue");
  auto E = [&] { return at::empty({0}, x.options()); };
  auto full = [&](const at::Tensor& part, const at::Tensor& like, int64_t dim) {
    if (!live) return part;
    return at::zeros_like(like, at::MemoryFormat::Contiguous).index_copy_(dim, *live, part);
  };
  at::Tensor P = need_P ? fg.sum(0) : E();
  at::Tensor dx = needs[0] ? (L > 0 ? at::mm(G, l.w1) : at::zeros_like(x)) : E();
  at::Tensor dw1 = needs[1] ? full(at::mm(G.t(), x), w1, 0) : E();
  at::Tensor db1 = needs[2] ? full(G.sum(0), b1, 0) : E();
  at::Tensor dw2 = needs[3] ? full(at::mm(grad.t(), am), w2, 1) : E();
  at::Tensor gsum = grad.sum(0);
  at::Tensor db2 = needs[4] ? (mlp_z ? gsum * mlp_z->reshape({}) : gsum.clone()) : E();
  at::Tensor dz = E(), dm = E();
  if (needs[5] && int_z) dz = full(mlp_z ? P * mlp_z->reshape({}) : P.clone(), *int_z, 0);
  if (needs[6] && mlp_z) {
    at::Tensor inner = l.z.defined() ? (P * l.z).sum() : P.sum();
    dm = (inner + (gsum * b2).sum()).reshape(mlp_z->sizes());
  }
  return {dx, dw1, db1, dw2, db2, dz, dm};
}

// Gated (SwiGLU / GeGLU / ReGLU): one GEMM on the stacked live rows [wg; w1] ([2L, d]) gives H = [g | u]
// ([N, 2L], kept for backward); same contract and formulas as masked_ffn_gated_*_cpu.
std::tuple<at::Tensor, at::Tensor> masked_ffn_gated_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& int_z,
    const c10::optional<at::Tensor>& mlp_z, const c10::optional<at::Tensor>& live, int64_t act) {
  const NoAutocast no_autocast;
  check_gated(x_, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  GatedLive g = gather_gated(wg, bg, w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = g.w2.size(1);
  at::Tensor H = at::mm(x, g.W.t());  // [N, 2L]
  at::Tensor a = at::empty({N, L}, x.options());
  at::Tensor s = gate_scale(Live{at::Tensor(), at::Tensor(), at::Tensor(), g.z}, mlp_z, L, x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &H}, {"a", &a}, {"bias", &g.b},
                                {"gate scale", &s}})
    check_buffer_dtype("cofi::masked_ffn_gated_fwd_native (CUDA)", name, *t, x.scalar_type());
  check(cofi_masked_ffn_gated_fwd_epilogue(dtype_code(x), H.data_ptr(), a.data_ptr(), g.b.data_ptr(), s.data_ptr(), N,
                                           L, static_cast<int>(act), at::cuda::getCurrentCUDAStream()),
        "gated forward epilogue");
  at::Tensor b2m = mlp_z ? b2 * mlp_z->reshape({}) : b2;
  at::Tensor y = L > 0 ? at::addmm(b2m, a, g.w2.t()) : b2m.expand({N, b2.size(0)}).clone(at::MemoryFormat::Contiguous);
  return {y, H};
}

std::vector<at::Tensor> masked_ffn_gated_bwd_cuda(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& wg, const at::Tensor& bg, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& int_z,
    const c10::optional<at::Tensor>& mlp_z, const c10::optional<at::Tensor>& live, const at::Tensor& h_, int64_t act,
    c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_gated(x_, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act);
  TORCH_CHECK(needs_.size() == 9, "cofi::masked_ffn_gated_bwd_native (CUDA): needs must have 9 entries");
  bool needs[9];
  for (int i = 0; i < 9; ++i) needs[i] = needs_.get(i);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous(), H = h_.contiguous();
  GatedLive g = gather_gated(wg, bg, w1, b1, w2, int_z, live);
  const int64_t N = x.size(0), L = g.w2.size(1);
  TORCH_CHECK(H.size(0) == N && H.size(1) == 2 * L, "cofi::masked_ffn_gated_bwd_native (CUDA): h must be [N, 2L]");
  at::Tensor s = gate_scale(Live{at::Tensor(), at::Tensor(), at::Tensor(), g.z}, mlp_z, L, x);
  const at::Tensor G = at::mm(grad, g.w2);  // [N, L]
  at::Tensor dH = at::empty({N, 2 * L}, x.options());
  at::Tensor am = needs[5] ? at::empty({N, L}, x.options()) : at::Tensor();
  const bool need_P = (needs[7] && int_z) || (needs[8] && mlp_z);
  at::Tensor fg = need_P ? at::empty({N, L}, x.options()) : at::Tensor();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"h", &H}, {"G", &G}, {"dH", &dH},
                                {"am", &am}, {"act(g) * u * G", &fg}, {"gate scale", &s}})
    check_buffer_dtype("cofi::masked_ffn_gated_bwd_native (CUDA)", name, *t, x.scalar_type());
  check(cofi_masked_ffn_gated_bwd_epilogue(dtype_code(x), H.data_ptr(), G.data_ptr(), dH.data_ptr(),
                                           am.defined() ? am.data_ptr() : nullptr, fg.defined() ? fg.data_ptr() : nullptr,
                                           s.data_ptr(), N, L, static_cast<int>(act), at::cuda::getCurrentCUDAStream()),
        "gated backward epilogue");
  auto E = [&] { return at::empty({0}, x.options()); };
  auto full = [&](const at::Tensor& part, const at::Tensor& like, int64_t dim) {
    if (!live) return part.clone(at::MemoryFormat::Contiguous);
    return at::zeros_like(like, at::MemoryFormat::Contiguous).index_copy_(dim, *live, part);
  };
  const at::Tensor dHg = dH.narrow(1, 0, L), dHu = dH.narrow(1, L, L);
  at::Tensor P = need_P ? fg.sum(0) : E();
  at::Tensor dx = needs[0] ? (L > 0 ? at::mm(dH, g.W) : at::zeros_like(x)) : E();
  at::Tensor dwg = needs[1] ? full(at::mm(dHg.t(), x), wg, 0) : E();
  at::Tensor dbg = needs[2] ? full(dHg.sum(0), bg, 0) : E();
  at::Tensor dw1 = needs[3] ? full(at::mm(dHu.t(), x), w1, 0) : E();
  at::Tensor db1 = needs[4] ? full(dHu.sum(0), b1, 0) : E();
  at::Tensor dw2 = needs[5] ? full(at::mm(grad.t(), am), w2, 1) : E();
  at::Tensor gsum = grad.sum(0);
  at::Tensor db2 = needs[6] ? (mlp_z ? gsum * mlp_z->reshape({}) : gsum.clone()) : E();
  at::Tensor dz = E(), dm = E();
  if (needs[7] && int_z) dz = full(mlp_z ? P * mlp_z->reshape({}) : P, *int_z, 0);
  if (needs[8] && mlp_z) {
    at::Tensor inner = g.z.defined() ? (P * g.z).sum() : P.sum();
    dm = (inner + (gsum * b2).sum()).reshape(mlp_z->sizes());
  }
  return {dx, dwg, dbg, dw1, db1, dw2, db2, dz, dm};
}

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("masked_ffn_fwd_native", &masked_ffn_fwd_cuda);
  m.impl("masked_ffn_bwd_native", &masked_ffn_bwd_cuda);
  m.impl("masked_ffn_gated_fwd_native", &masked_ffn_gated_fwd_cuda);
  m.impl("masked_ffn_gated_bwd_native", &masked_ffn_gated_bwd_cuda);
}

}  // namespace cofi
