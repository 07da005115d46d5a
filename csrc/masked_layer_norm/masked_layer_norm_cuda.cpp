// CUDA glue of cofi::masked_layer_norm_fwd_native / _bwd_native around the torch-free kernels of
// masked_layer_norm_cuda.cu, on torch's current stream. mean / rstd are float (double for float64
// inputs), matching the Python fake. Column sums of the weight / bias / hidden_z gradients are
// per-row contributions summed by ATen (simple; the row kernel dominates).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "masked_layer_norm.h"
#include "../autocast_guard.h"

namespace cofi {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "cofi::masked_layer_norm_native (CUDA): x dtype must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                  const at::Tensor& bias, const c10::optional<at::Tensor>& hidden_z) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "cofi::masked_layer_norm_native (CUDA): x must be a CUDA [N, d] tensor, got ", x.sizes());
  const int64_t d = x.size(1);
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native (CUDA): residual must match x");
  TORCH_CHECK(weight.numel() == d && weight.scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native (CUDA): weight must be [d] in x's dtype");
  TORCH_CHECK(bias.numel() == d && bias.scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native (CUDA): bias must be [d] in x's dtype");
  if (hidden_z) TORCH_CHECK(hidden_z->numel() == d && hidden_z->scalar_type() == x.scalar_type(), "cofi::masked_layer_norm_native (CUDA): hidden_z must be [d] in x's dtype");
}

const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

void check_eps(double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "cofi::masked_layer_norm_native (CUDA): eps must be finite and >= 0, got ", eps);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cuda(
    const at::Tensor& x_, const c10::optional<at::Tensor>& residual_, const at::Tensor& weight_, const at::Tensor& bias_,
    const c10::optional<at::Tensor>& hidden_z_, double eps) {
  const NoAutocast no_autocast;
  check_inputs(x_, residual_, weight_, bias_, hidden_z_);
  check_eps(eps);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous(), b = bias_.contiguous();
  c10::optional<at::Tensor> r, z;
  if (residual_) r = residual_->contiguous();
  if (hidden_z_) z = hidden_z_->contiguous();
  const int64_t N = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({N}, x.options().dtype(stat_type(x))), rstd = at::empty_like(mean);
  const int err = cofi_masked_layer_norm_fwd(dtype_code(x), x.data_ptr(), ptr_or_null(r), w.data_ptr(), b.data_ptr(),
                                             ptr_or_null(z), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), N, d, eps,
                                             at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "cofi::masked_layer_norm_fwd_native (CUDA): launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {y, mean, rstd};
}

std::vector<at::Tensor> masked_layer_norm_bwd_cuda(const at::Tensor& grad_, const at::Tensor& x_,
                                                   const c10::optional<at::Tensor>& residual_, const at::Tensor& weight_,
                                                   const at::Tensor& bias_, const c10::optional<at::Tensor>& hidden_z_,
                                                   const at::Tensor& mean_, const at::Tensor& rstd_, double eps,
                                                   c10::List<bool> needs_) {
  const NoAutocast no_autocast;
  check_inputs(x_, residual_, weight_, bias_, hidden_z_);
  check_eps(eps);
  TORCH_CHECK(needs_.size() == 5, "cofi::masked_layer_norm_bwd_native (CUDA): needs must have 5 entries");
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type(),
              "cofi::masked_layer_norm_bwd_native (CUDA): grad must match x, got ", grad_.sizes());
  TORCH_CHECK(mean_.numel() == x_.size(0) && rstd_.numel() == x_.size(0),
              "cofi::masked_layer_norm_bwd_native (CUDA): mean and rstd must have N=", x_.size(0), " elements");
  bool needs[5];
  for (int i = 0; i < 5; ++i) needs[i] = needs_.get(i);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), g = grad_.contiguous(), w = weight_.contiguous(), b = bias_.contiguous();
  const at::Tensor mean = mean_.to(stat_type(x)).contiguous(), rstd = rstd_.to(stat_type(x)).contiguous();
  c10::optional<at::Tensor> r, z;
  if (residual_) r = residual_->contiguous();
  if (hidden_z_) z = hidden_z_->contiguous();
  const int64_t N = x.size(0), d = x.size(1);
  auto E = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = needs[0] ? at::empty_like(x) : E();
  at::Tensor dr = (needs[1] && r) ? at::empty_like(x) : E();
  const auto so = x.options().dtype(stat_type(x));
  at::Tensor rdw = needs[2] ? at::empty({N, d}, so) : at::Tensor();
  at::Tensor rdb = needs[3] ? at::empty({N, d}, so) : at::Tensor();
  at::Tensor rdz = (needs[4] && z) ? at::empty({N, d}, so) : at::Tensor();
  const int err = cofi_masked_layer_norm_bwd(
      dtype_code(x), g.data_ptr(), x.data_ptr(), ptr_or_null(r), w.data_ptr(), b.data_ptr(), ptr_or_null(z),
      mean.data_ptr(), rstd.data_ptr(), needs[0] ? dx.data_ptr() : nullptr, dr.numel() ? dr.data_ptr() : nullptr,
      rdw.defined() ? rdw.data_ptr() : nullptr, rdb.defined() ? rdb.data_ptr() : nullptr,
      rdz.defined() ? rdz.data_ptr() : nullptr, N, d, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "cofi::masked_layer_norm_bwd_native (CUDA): launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  at::Tensor dw = rdw.defined() ? rdw.sum(0).to(x.scalar_type()) : E();
  at::Tensor db = rdb.defined() ? rdb.sum(0).to(x.scalar_type()) : E();
  at::Tensor dz = rdz.defined() ? rdz.sum(0).to(x.scalar_type()) : E();
  return {dx, dr, dw, db, dz};
}

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("masked_layer_norm_fwd_native", &masked_layer_norm_fwd_cuda);
  m.impl("masked_layer_norm_bwd_native", &masked_layer_norm_bwd_cuda);
}

}  // namespace cofi
