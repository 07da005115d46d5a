// CUDA glue of cofi::masked_attention_{fwd,bwd}_native: checks, allocation, the live-head index
// list (built once per call on the device; one host sync for its length, which sizes the grid),
// and launches of masked_attention_cuda.cu on torch's current stream. lse is float32 for every
// input dtype. d head_z = sum_{b,i} delta / z for live heads (ATen reduction, no extra kernel).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../autocast_guard.h"
#include "masked_attention.h"

namespace {

void ok(int e, const char* what) {
  TORCH_CHECK(e == 0, "cofi::masked_attention: CUDA ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(e)));
}

int dtype_code(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "cofi::masked_attention: q must be float32, float16 or bfloat16 on CUDA, got ", q.scalar_type());
  }
  return -1;
}

void check(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const c10::optional<at::Tensor>& head_z, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), fn, ": q, k, v must be CUDA tensors");
  TORCH_CHECK(q.dim() == 4, fn, ": q must be [B, H, S, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), fn, ": k and v must have q's shape ", q.sizes(),
              " (no grouped-query attention on CUDA)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn, ": k, v must have q's dtype");
  TORCH_CHECK(q.size(3) <= 128, fn, ": head dim must be <= 128 on CUDA, got ", q.size(3));
  TORCH_CHECK(q.size(0) <= std::numeric_limits<int>::max() && q.size(2) <= std::numeric_limits<int>::max(), fn,
              ": batch and sequence length must be < 2^31 on CUDA, got ", q.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, fn, ": q, k, v need a unit stride on the last dim");
  if (head_z.has_value())
    TORCH_CHECK(head_z->dim() == 1 && head_z->size(0) == q.size(1) && head_z->scalar_type() == q.scalar_type() &&
                    head_z->is_cuda(),
                fn, ": head_z must be a CUDA [H] tensor of q's dtype, got ", head_z->sizes());
  if (mask.has_value())
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == q.size(0) && mask->size(1) == q.size(2) &&
                    mask->scalar_type() == at::kBool && mask->is_cuda(),
                fn, ": key_padding_mask must be a CUDA bool [B, S] tensor, got ", mask->sizes());
}

void check_scalars(const char* fn, double scale, double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);
}

struct Common {
  at::Tensor live, z, mask, seed;
  int64_t strides[9];
  uint32_t thr = 0;
  float inv = 1.0f;
};

Common common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& head_z,
              const c10::optional<at::Tensor>& mask, double dropout_p, const c10::optional<at::Tensor>& seed) {
  Common c;
  const int64_t H = q.size(1);
  c.live = head_z.has_value() ? at::nonzero(*head_z).flatten().to(at::kInt)
                              : at::arange(H, q.options().dtype(at::kInt));
  if (head_z.has_value()) c.z = head_z->contiguous();
  if (mask.has_value()) c.mask = mask->contiguous();
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 2, "cofi::masked_attention: dropout_p > 0 needs a seed of 2 int64");
    c.seed = seed->to(q.device(), at::kLong).contiguous();
    c.thr = static_cast<uint32_t>(std::min<double>(std::nearbyint(dropout_p * 4294967296.0), 4294967295.0));
    c.inv = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  for (int i = 0; i < 3; ++i) {
    c.strides[i] = q.stride(i);
    c.strides[3 + i] = k.stride(i);
    c.strides[6 + i] = v.stride(i);
  }
  return c;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const c10::optional<at::Tensor>& head_z,
                                            const c10::optional<at::Tensor>& key_padding_mask, double scale,
                                            double dropout_p, const c10::optional<at::Tensor>& seed, bool causal) {
  const cofi::NoAutocast no_autocast;
  const char* fn = "cofi::masked_attention_fwd_native";
  check(fn, q, k, v, head_z, key_padding_mask);
  TORCH_CHECK(!causal, fn, ": causal=True is not supported by the CUDA kernel (use the sdpa or triton backend)");
  check_scalars(fn, scale, dropout_p);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  auto out = at::zeros(q.sizes(), q.options());
  auto lse = at::full({B, H, S}, std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  Common c = common(q, k, v, head_z, key_padding_mask, dropout_p, seed);
  const int n_live = static_cast<int>(c.live.numel());
  if (n_live == 0) return {out, lse};
  cofi::check_buffer_dtype(fn, "out", out, q.scalar_type());
  cofi::check_buffer_dtype(fn, "lse", lse, at::kFloat);
  ok(cofi_masked_attention_fwd_cuda(dtype_code(q), q.data_ptr(), k.data_ptr(), v.data_ptr(), c.strides, ptr_or_null(c.z),
                                    static_cast<const uint8_t*>(ptr_or_null(c.mask)),
                                    static_cast<const int64_t*>(ptr_or_null(c.seed)), c.live.data_ptr<int32_t>(), n_live,
                                    B, H, S, D, static_cast<float>(scale), c.thr, c.inv, out.data_ptr(),
                                    lse.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
     "forward launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& head_z, const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale, double dropout_p, const c10::optional<at::Tensor>& seed, bool causal) {
  const cofi::NoAutocast no_autocast;
  const char* fn = "cofi::masked_attention_bwd_native";
  check(fn, q, k, v, head_z, key_padding_mask);
  TORCH_CHECK(!causal, fn, ": causal=True is not supported by the CUDA kernel (use the sdpa or triton backend)");
  check_scalars(fn, scale, dropout_p);
  TORCH_CHECK(grad.sizes() == q.sizes() && out.sizes() == q.sizes(), fn, ": grad and out must have q's shape");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros(q.sizes(), q.options());
  auto dv = at::zeros(q.sizes(), q.options());
  auto dz = head_z.has_value() ? at::zeros({H}, q.options()) : at::empty({0}, q.options());
  if (q.numel() == 0) return {dq, dk, dv, dz};
  Common c = common(q, k, v, head_z, key_padding_mask, dropout_p, seed);
  const int n_live = static_cast<int>(c.live.numel());
  if (n_live == 0) return {dq, dk, dv, dz};
  auto g = grad.contiguous();
  auto o = out.contiguous();
  auto l = lse.to(at::kFloat).contiguous();
  auto delta = at::zeros({B, H, S}, q.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  const int code = dtype_code(q);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad", &g}, {"out", &o}, {"dq", &dq},
                                {"dk", &dk}, {"dv", &dv}})
    cofi::check_buffer_dtype(fn, name, *t, q.scalar_type());
  cofi::check_buffer_dtype(fn, "lse", l, at::kFloat);
  cofi::check_buffer_dtype(fn, "delta", delta, at::kFloat);
  ok(cofi_masked_attention_delta_cuda(code, g.data_ptr(), o.data_ptr(), c.live.data_ptr<int32_t>(), n_live, B, H, S, D,
                                      delta.data_ptr<float>(), stream),
     "delta launch");
  ok(cofi_masked_attention_bwd_cuda(code, g.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), c.strides,
                                    ptr_or_null(c.z), static_cast<const uint8_t*>(ptr_or_null(c.mask)),
                                    static_cast<const int64_t*>(ptr_or_null(c.seed)), c.live.data_ptr<int32_t>(), n_live,
                                    B, H, S, D, static_cast<float>(scale), c.thr, c.inv, l.data_ptr<float>(),
                                    delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), stream),
     "backward launch");
  if (head_z.has_value()) {
    // d z_h = sum_{b,i} delta / z_h on live heads (dead heads: 0 by convention); delta is 0 there.
    auto zf = c.z.to(at::kFloat);
    auto live = zf.ne(0);
    auto dzf = at::where(live, delta.sum({0, 2}) / at::where(live, zf, at::ones_like(zf)), at::zeros_like(zf));
    dz.copy_(dzf);
  }
  return {dq, dk, dv, dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("masked_attention_fwd_native", &fwd_cuda);
  m.impl("masked_attention_bwd_native", &bwd_cuda);
}
