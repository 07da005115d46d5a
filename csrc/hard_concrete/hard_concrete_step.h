// hard_concrete_step: one training step's mask work in one op (sample z, keep probabilities, expected
// size and sparsity; one backward). Device-generic glue over a device's kernels: the group views of the
// flat buffer and the scatter of the expected-size gradient into the keep-probability gradient.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <tuple>
#include <vector>

namespace cofi_hc_step {

using OptT = c10::optional<at::Tensor>;
// Group order of `offsets`: hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L]; -1 = absent.
using Views = std::array<OptT, 5>;

inline std::array<std::vector<int64_t>, 5> shapes(int64_t L, int64_t d, int64_t H, int64_t F) {
  return {{{d}, {L, H}, {L}, {L, F}, {L}}};
}

inline Views views(const at::Tensor& flat, at::IntArrayRef offsets, int64_t L, int64_t d, int64_t H, int64_t F) {
  static const char* names[5] = {"hidden", "head", "mha", "intermediate", "ffn"};
  TORCH_CHECK(offsets.size() == 5, "cofi: hard_concrete_step offsets must have 5 entries (hidden, head, mha, "
              "intermediate, ffn; -1 = absent), got ", offsets.size());
  TORCH_CHECK(flat.dim() == 1, "cofi: hard_concrete_step log_alpha must be 1-D, got ", flat.sizes());
  const auto sh = shapes(L, d, H, F);
  Views v;
  bool any = false;
  for (int i = 0; i < 5; ++i) {
    if (offsets[i] < 0) continue;
    int64_t n = 1;
    for (int64_t s : sh[i]) n *= s;
    TORCH_CHECK(offsets[i] + n <= flat.numel(), "cofi: hard_concrete_step group ", names[i], " [", offsets[i], ", ",
                offsets[i] + n, ") exceeds log_alpha's ", flat.numel(), " elements");
    v[i] = flat.narrow(0, offsets[i], n).view(sh[i]);
    any = true;
  }
  TORCH_CHECK(any, "cofi: hard_concrete_step needs at least one group in offsets");
  return v;
}

// ZK(la, u, t, l, r, eps) -> (z, keep); SizeF(hidden, head, mha, inter, ffn, L, d, H, F) -> (E, s)
template <class ZK, class SizeF>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(ZK zk, SizeF size_fwd, const at::Tensor& log_alpha,
                                                               const at::Tensor& u, at::IntArrayRef offsets, int64_t L,
                                                               int64_t d, int64_t H, int64_t F, double t, double l,
                                                               double r, double eps) {
  TORCH_CHECK(u.sizes() == log_alpha.sizes(), "cofi: hard_concrete_step u must have log_alpha's shape ",
              log_alpha.sizes(), ", got ", u.sizes());
  auto [z, keep] = zk(log_alpha, u, t, l, r, eps);
  const Views v = views(keep, offsets, L, d, H, F);
  auto [e, s] = size_fwd(v[0], v[1], v[2], v[3], v[4], L, d, H, F);
  return {z, keep, e, s};
}

// ZKB(grad_z, grad_keep, la, u, t, l, r, eps) -> d log_alpha; SizeB as expected_size_bwd_native.
template <class ZKB, class SizeB>
at::Tensor bwd(ZKB zkb, SizeB size_bwd, const OptT& grad_z, const OptT& grad_keep, const at::Tensor& grad_params,
               const at::Tensor& grad_sparsity, const at::Tensor& log_alpha, const at::Tensor& u, const at::Tensor& keep,
               at::IntArrayRef offsets, int64_t L, int64_t d, int64_t H, int64_t F, double t, double l, double r,
               double eps) {
  const Views v = views(keep, offsets, L, d, H, F);
  auto gsize = size_bwd(grad_params, grad_sparsity, v[0], v[1], v[2], v[3], v[4], L, d, H, F);
  at::Tensor gk = grad_keep.has_value() ? grad_keep->contiguous().clone() : at::zeros_like(log_alpha);
  for (int i = 0; i < 5; ++i)
    if (offsets[i] >= 0) gk.narrow(0, offsets[i], gsize[i].numel()).add_(gsize[i].reshape(-1));
  at::Tensor gz = grad_z.has_value() ? grad_z->contiguous() : at::zeros_like(log_alpha);
  return zkb(gz, gk, log_alpha, u, t, l, r, eps);
}

}  // namespace cofi_hc_step
