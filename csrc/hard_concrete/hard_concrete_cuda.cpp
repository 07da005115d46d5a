// CUDA glue of the hard-concrete op family: checks, allocation, and launches on torch's current
// stream. Sampling and keep-prob use the kernels of hard_concrete_cuda.cu; the deterministic rule
// and the expected size are a handful of reductions/sorts over <= 40k values and run as ATen ops
// on the device (no host sync either way).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "hard_concrete.h"
#include "hard_concrete_checks.h"
#include "hard_concrete_step.h"
#include "../autocast_guard.h"

namespace {

double q0_logit(double t, double l, double r) {
  double xn = (0.0 - l) / (r - l);
  return (std::log(xn) - std::log1p(-xn)) * t;
}

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "cofi: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "cofi: ", name, " must be float32 or float64, got ", x.scalar_type());
}

void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), "cofi: ", bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), "cofi: ", bn, " must match ", an, " in dtype and device");
}

void ok(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "cofi: CUDA launch failed: ", cudaGetErrorString(e)); }

at::Tensor sample_fwd(const at::Tensor& log_alpha, const at::Tensor& u, double t, double l, double r) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch("cofi::hard_concrete_sample_fwd_native", t, l, r);
  check_cuda(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", u, "u");
  c10::cuda::CUDAGuard guard(log_alpha.device());
  auto la = log_alpha.contiguous(), uu = u.contiguous();
  auto z = at::empty_like(la);
  auto s = at::cuda::getCurrentCUDAStream().stream();
  if (la.scalar_type() == at::kFloat)
    ok(cofi_hc_sample_fwd_f32(la.const_data_ptr<float>(), uu.const_data_ptr<float>(), z.mutable_data_ptr<float>(), la.numel(), t, l, r, s));
  else
    ok(cofi_hc_sample_fwd_f64(la.const_data_ptr<double>(), uu.const_data_ptr<double>(), z.mutable_data_ptr<double>(), la.numel(), t, l, r, s));
  return z;
}

at::Tensor sample_bwd(const at::Tensor& grad, const at::Tensor& log_alpha, const at::Tensor& u, double t, double l, double r) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch("cofi::hard_concrete_sample_bwd_native", t, l, r);
  check_cuda(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", u, "u");
  check_same(log_alpha, "log_alpha", grad, "grad");
  c10::cuda::CUDAGuard guard(log_alpha.device());
  auto la = log_alpha.contiguous(), uu = u.contiguous(), g = grad.contiguous();
  auto out = at::empty_like(la);
  auto s = at::cuda::getCurrentCUDAStream().stream();
  if (la.scalar_type() == at::kFloat)
    ok(cofi_hc_sample_bwd_f32(g.const_data_ptr<float>(), la.const_data_ptr<float>(), uu.const_data_ptr<float>(),
                              out.mutable_data_ptr<float>(), la.numel(), t, l, r, s));
  else
    ok(cofi_hc_sample_bwd_f64(g.const_data_ptr<double>(), la.const_data_ptr<double>(), uu.const_data_ptr<double>(),
                              out.mutable_data_ptr<double>(), la.numel(), t, l, r, s));
  return out;
}

at::Tensor keep_fwd(const at::Tensor& log_alpha, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_keep_prob_fwd_native", t, l, r, eps);
  check_cuda(log_alpha, "log_alpha");
  c10::cuda::CUDAGuard guard(log_alpha.device());
  auto la = log_alpha.contiguous();
  auto p = at::empty_like(la);
  auto s = at::cuda::getCurrentCUDAStream().stream();
  const double q0 = q0_logit(t, l, r);
  if (la.scalar_type() == at::kFloat)
    ok(cofi_hc_keep_fwd_f32(la.const_data_ptr<float>(), p.mutable_data_ptr<float>(), la.numel(), q0, eps, s));
  else
    ok(cofi_hc_keep_fwd_f64(la.const_data_ptr<double>(), p.mutable_data_ptr<double>(), la.numel(), q0, eps, s));
  return p;
}

at::Tensor keep_bwd(const at::Tensor& grad, const at::Tensor& log_alpha, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_keep_prob_bwd_native", t, l, r, eps);
  check_cuda(log_alpha, "log_alpha");
  check_same(log_alpha, "log_alpha", grad, "grad");
  c10::cuda::CUDAGuard guard(log_alpha.device());
  auto la = log_alpha.contiguous(), g = grad.contiguous();
  auto out = at::empty_like(la);
  auto s = at::cuda::getCurrentCUDAStream().stream();
  const double q0 = q0_logit(t, l, r);
  if (la.scalar_type() == at::kFloat)
    ok(cofi_hc_keep_bwd_f32(g.const_data_ptr<float>(), la.const_data_ptr<float>(), out.mutable_data_ptr<float>(), la.numel(), q0, eps, s));
  else
    ok(cofi_hc_keep_bwd_f64(g.const_data_ptr<double>(), la.const_data_ptr<double>(), out.mutable_data_ptr<double>(), la.numel(), q0, eps, s));
  return out;
}

at::Tensor deterministic(const at::Tensor& log_alpha, bool binary, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_deterministic_native", t, l, r, eps);
  check_cuda(log_alpha, "log_alpha");
  TORCH_CHECK(log_alpha.dim() == 2, "cofi: log_alpha must be 2-D [rows, n], got ", log_alpha.sizes());
  auto la = log_alpha.contiguous();
  const int64_t n = la.size(1);
  auto num_zeros = at::round(n - keep_fwd(la, t, l, r, eps).sum(-1));
  auto order = std::get<1>(at::sort(la, /*stable=*/true, /*dim=*/-1, /*descending=*/false));
  auto rank = at::empty_like(order).scatter_(-1, order, at::arange(n, order.options()).expand_as(order).contiguous());
  auto z = binary ? at::ones_like(la) : at::sigmoid(la / t * 0.8);
  return at::where(rank.lt(num_zeros.unsqueeze(-1)), at::zeros_like(z), z);
}

at::Tensor ones_or(const c10::optional<at::Tensor>& x, at::IntArrayRef shape, const at::Tensor& ref) {
  return x.has_value() ? x->contiguous() : at::ones(shape, ref.options());
}

const at::Tensor& first_of(std::initializer_list<const c10::optional<at::Tensor>*> xs) {
  for (auto* x : xs)
    if (x->has_value()) return x->value();
  TORCH_CHECK(false, "cofi: expected_size needs at least one group of keep probabilities");
}

struct Consts { double pair_head, per_head, per_unit, full; };
Consts consts(int64_t L, int64_t d, int64_t H, int64_t F) {
  double per_head = (4.0 * d * d + 4.0 * d) / H;
  int64_t per_mlp = 2 * d * F + 5 * d;
  return {per_head / d, per_head, static_cast<double>(per_mlp / F), L * H * per_head + static_cast<double>(L * per_mlp)};
}

std::tuple<at::Tensor, at::Tensor> size_fwd(const c10::optional<at::Tensor>& hidden, const c10::optional<at::Tensor>& head,
                                            const c10::optional<at::Tensor>& mha, const c10::optional<at::Tensor>& inter,
                                            const c10::optional<at::Tensor>& ffn, int64_t L, int64_t d, int64_t H, int64_t F) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::groups("cofi::expected_size_fwd_native", {&hidden, &head, &mha, &inter, &ffn}, L, d, H, F);
  const at::Tensor& ref = first_of({&hidden, &head, &mha, &inter, &ffn});
  check_cuda(ref, "keep probabilities");
  c10::cuda::CUDAGuard guard(ref.device());
  Consts c = consts(L, d, H, F);
  auto head_score = (ones_or(mha, {L}, ref).unsqueeze(1) * ones_or(head, {L, H}, ref)).sum();
  auto int_score = (ones_or(ffn, {L}, ref).unsqueeze(1) * ones_or(inter, {L, F}, ref)).sum();
  at::Tensor e = hidden.has_value() ? hidden->sum() * (head_score * c.pair_head + int_score * 2.0)
                                    : head_score * c.per_head + int_score * c.per_unit;
  return {e, 1.0 - e / c.full};
}

std::vector<at::Tensor> size_bwd(const at::Tensor& g_params, const at::Tensor& g_sparsity, const c10::optional<at::Tensor>& hidden,
                                 const c10::optional<at::Tensor>& head, const c10::optional<at::Tensor>& mha,
                                 const c10::optional<at::Tensor>& inter, const c10::optional<at::Tensor>& ffn, int64_t L,
                                 int64_t d, int64_t H, int64_t F) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::groups("cofi::expected_size_bwd_native", {&hidden, &head, &mha, &inter, &ffn}, L, d, H, F);
  cofi_hc_check::size_grads("cofi::expected_size_bwd_native", g_params, g_sparsity);
  const at::Tensor& ref = first_of({&hidden, &head, &mha, &inter, &ffn});
  check_cuda(ref, "keep probabilities");
  c10::cuda::CUDAGuard guard(ref.device());
  Consts c = consts(L, d, H, F);
  auto gE = g_params - g_sparsity / c.full;
  auto mha_ = ones_or(mha, {L}, ref), head_ = ones_or(head, {L, H}, ref);
  auto ffn_ = ones_or(ffn, {L}, ref), inter_ = ones_or(inter, {L, F}, ref);
  auto head_rows = head_.sum(-1), int_rows = inter_.sum(-1);
  auto head_score = (mha_ * head_rows).sum(), int_score = (ffn_ * int_rows).sum();
  at::Tensor dH, dI;
  if (hidden.has_value()) {
    auto hs = hidden->sum();
    dH = hs * c.pair_head;
    dI = hs * 2.0;
  } else {
    dH = at::full({}, c.per_head, ref.options());
    dI = at::full({}, c.per_unit, ref.options());
  }
  auto empty = [&] { return at::empty({0}, ref.options()); };
  return {
      hidden.has_value() ? (gE * (head_score * c.pair_head + int_score * 2.0)).expand({d}).contiguous() : empty(),
      head.has_value() ? (gE * dH * mha_).unsqueeze(1).expand({L, H}).contiguous() : empty(),
      mha.has_value() ? gE * dH * head_rows : empty(),
      inter.has_value() ? (gE * dI * ffn_).unsqueeze(1).expand({L, F}).contiguous() : empty(),
      ffn.has_value() ? gE * dI * int_rows : empty(),
  };
}

// hard_concrete_step on CUDA: the elementwise launchers back to back (no fused launch yet).
std::tuple<at::Tensor, at::Tensor> zk_fwd(const at::Tensor& la, const at::Tensor& u, double t, double l, double r, double eps) {
  return {sample_fwd(la, u, t, l, r), keep_fwd(la, t, l, r, eps)};
}

at::Tensor zk_bwd(const at::Tensor& gz, const at::Tensor& gk, const at::Tensor& la, const at::Tensor& u, double t, double l,
                  double r, double eps) {
  return sample_bwd(gz, la, u, t, l, r).add_(keep_bwd(gk, la, t, l, r, eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> step_fwd(const at::Tensor& log_alpha, const at::Tensor& u,
                                                                    at::IntArrayRef offsets, int64_t L, int64_t d,
                                                                    int64_t H, int64_t F, double t, double l, double r,
                                                                    double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_step_fwd_native", t, l, r, eps);
  cofi_hc_check::sizes("cofi::hard_concrete_step_fwd_native", L, d, H, F);
  return cofi_hc_step::fwd(zk_fwd, size_fwd, log_alpha, u, offsets, L, d, H, F, t, l, r, eps);
}

at::Tensor step_bwd(const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_keep,
                    const at::Tensor& grad_params, const at::Tensor& grad_sparsity, const at::Tensor& log_alpha,
                    const at::Tensor& u, const at::Tensor& /*z*/, const at::Tensor& keep, at::IntArrayRef offsets, int64_t L, int64_t d, int64_t H,
                    int64_t F, double t, double l, double r, double eps) {
  const cofi::NoAutocast no_autocast;
  cofi_hc_check::stretch_eps("cofi::hard_concrete_step_bwd_native", t, l, r, eps);
  cofi_hc_check::sizes("cofi::hard_concrete_step_bwd_native", L, d, H, F);
  return cofi_hc_step::bwd(zk_bwd, size_bwd, grad_z, grad_keep, grad_params, grad_sparsity, log_alpha, u, keep, offsets,
                           L, d, H, F, t, l, r, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("hard_concrete_step_fwd_native", &step_fwd);
  m.impl("hard_concrete_step_bwd_native", &step_bwd);
  m.impl("hard_concrete_sample_fwd_native", &sample_fwd);
  m.impl("hard_concrete_sample_bwd_native", &sample_bwd);
  m.impl("hard_concrete_keep_prob_fwd_native", &keep_fwd);
  m.impl("hard_concrete_keep_prob_bwd_native", &keep_bwd);
  m.impl("hard_concrete_deterministic_native", &deterministic);
  m.impl("expected_size_fwd_native", &size_fwd);
  m.impl("expected_size_bwd_native", &size_bwd);
}
