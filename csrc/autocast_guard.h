// Every native kernel runs its internal ATen calls (GEMMs, reductions, casts) in its inputs' dtype.
// Under torch.autocast those calls would otherwise be re-cast (at::mm returns bf16 while the epilogue
// writes fp32 into it), so each kernel entry point excludes the Autocast dispatch keys for its
// duration. The autocast policy of the public custom ops (python/cofi/ops/_autocast.py,
// docs/ops-inputs.md "Autocast") picks the dtype before the kernel is reached.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace cofi {

// Declare one at the top of every kernel entry point: `const NoAutocast no_autocast;`.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Checked before every epilogue launch that writes or reads a buffer through a raw pointer of
// x's dtype: a buffer of another dtype would be read or written with the wrong element size.
inline void check_buffer_dtype(const char* fn, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK(!t.defined() || t.scalar_type() == expected, fn, ": ", name, " must be ", expected,
              " (the kernel's dtype) before the epilogue, got ", t.scalar_type());
}

}  // namespace cofi
