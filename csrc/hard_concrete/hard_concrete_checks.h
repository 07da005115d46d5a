// Argument checks of the hard-concrete entry points, shared by the CPU and CUDA glue. The Python
// wrappers (python/cofi/ops/hard_concrete.py) enforce the same rules first; these make a direct
// torch.ops.cofi.* call just as safe. Scalar and size errors raise ValueError in Python.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

namespace cofi_hc_check {

using OptT = c10::optional<at::Tensor>;

inline void stretch(const char* fn, double t, double l, double r) {
  TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0, fn, ": temperature must be finite and > 0, got ", t);
  TORCH_CHECK_VALUE(std::isfinite(l) && l < 0.0, fn, ": limit_l must be finite and < 0, got ", l);
  TORCH_CHECK_VALUE(std::isfinite(r) && r > 1.0, fn, ": limit_r must be finite and > 1, got ", r);
}

inline void stretch_eps(const char* fn, double t, double l, double r, double eps) {
  stretch(fn, t, l, r);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0 && eps <= 0.5, fn, ": eps must be in (0, 0.5], got ", eps);
}

inline void sizes(const char* fn, int64_t L, int64_t d, int64_t H, int64_t F) {
  TORCH_CHECK_VALUE(L > 0 && d > 0 && H > 0 && F > 0, fn,
                    ": num_layers, hidden_size, num_heads, intermediate_size must be > 0, got ", L, ", ", d, ", ", H,
                    ", ", F);
}

// Sizes > 0, and every group present has its shape (hidden [d], head [L, H], mha [L],
// intermediate [L, F], ffn [L]), the first group's dtype and device.
inline void groups(const char* fn, const std::array<const OptT*, 5>& g, int64_t L, int64_t d, int64_t H, int64_t F) {
  sizes(fn, L, d, H, F);
  static const char* names[5] = {"hidden", "head", "mha", "intermediate", "ffn"};
  const std::array<std::vector<int64_t>, 5> shapes{{{d}, {L, H}, {L}, {L, F}, {L}}};
  const at::Tensor* first = nullptr;
  for (int i = 0; i < 5; ++i) {
    if (!g[i]->has_value()) continue;
    const at::Tensor& t = g[i]->value();
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shapes[i]), fn, ": ", names[i], " must have shape ",
                      at::IntArrayRef(shapes[i]), ", got ", t.sizes());
    if (first == nullptr) {
      first = &t;
      continue;
    }
    TORCH_CHECK_VALUE(t.scalar_type() == first->scalar_type() && t.device() == first->device(), fn, ": ", names[i],
                      " must match the first group's dtype and device (", first->scalar_type(), " on ",
                      first->device(), "), got ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK_VALUE(first != nullptr, fn, ": at least one group of keep probabilities is required");
}

// grad_params and grad_sparsity of the expected-size backward: one element each.
inline void size_grads(const char* fn, const at::Tensor& gp, const at::Tensor& gs) {
  TORCH_CHECK_VALUE(gp.numel() == 1 && gs.numel() == 1, fn,
                    ": grad_params and grad_sparsity must have one element each, got shapes ", gp.sizes(), " and ",
                    gs.sizes());
}

}  // namespace cofi_hc_check
