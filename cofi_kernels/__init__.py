"""Triton kernels of the cofi ops (GPU; interpreted on CPU tensors under ``TRITON_INTERPRET=1``)."""
import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    from ._interpreter import patch_bf16_dot as _patch_bf16_dot

    _patch_bf16_dot()
