// The cofi native ops the runtime's composite kernels call, reached through the dispatcher (so the
// same composite code runs the CPU kernels and, in a CUDA build, the CUDA ones). Forward only.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace cofi {
namespace native {

using OptT = std::optional<at::Tensor>;
using at::Tensor;

inline std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& kpm,
                                            double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cofi::masked_attention_fwd_native", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptT&,
                                                         const OptT&, double, double, const OptT&, bool)>();
  return op.call(q, k, v, std::nullopt, kpm, scale, 0.0, std::nullopt, /*causal=*/false);
}

inline Tensor ffn(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                  int64_t act) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cofi::masked_ffn_fwd_native", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, const OptT&, const OptT&, const OptT&,
                                                         int64_t)>();
  return std::get<0>(op.call(x, w1, b1, w2, b2, std::nullopt, std::nullopt, std::nullopt, act));
}

// LayerNorm(x + residual) (residual optional), hidden_z-aware.
inline Tensor layer_norm(const Tensor& x, const OptT& residual, const Tensor& w, const Tensor& b,
                         const OptT& hidden_z, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cofi::masked_layer_norm_fwd_native", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptT&, const Tensor&,
                                                                 const Tensor&, const OptT&, double)>();
  return std::get<0>(op.call(x, residual, w, b, hidden_z, eps));
}

}  // namespace native
}  // namespace cofi
