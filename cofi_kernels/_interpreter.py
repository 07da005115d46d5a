"""Triton interpreter (``TRITON_INTERPRET=1``) fix applied by cofi_kernels: ``tl.dot`` on bfloat16.

The interpreter stores bfloat16 tensors as numpy uint16 and its ``create_dot`` multiplies those bit
patterns as integers (Triton 3.8 / 3.9), so every bf16 ``tl.dot`` returns garbage on CPU. The patch
converts bf16 operands to float32 before the product: a GPU's bf16 dot multiplies exactly and
accumulates in float32, so this is the same arithmetic. Other dtypes go to the original unchanged.
"""
from __future__ import annotations


def patch_bf16_dot() -> None:
    """Install the fix into triton's interpreter builder (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_cofi_bf16", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._cofi_bf16 = True  # type: ignore[attr-defined]
    builder.create_dot = create_dot
