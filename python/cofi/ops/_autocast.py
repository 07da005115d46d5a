"""Autocast policies of the public cofi ops (docs/ops-inputs.md, "Autocast").

Inside ``torch.autocast(device_type, dtype)`` each registered op ``cofi::<name>`` first casts its
floating-point tensor arguments on that device type (float64 ones excepted, as torch's own autocast
does), then runs with autocast off, so every backend and every ATen call inside it sees one dtype:

- ``LOWER``: to the autocast dtype read at call time (``torch.get_autocast_dtype``), like torch's
  ``mm`` / ``scaled_dot_product_attention``. Matmul-like ops: masked_attention, masked_ffn (and masked_ffn_gated).
- ``FP32``: float16 / bfloat16 to float32, like torch's CUDA ``layer_norm`` / ``softmax`` policy; the
  outputs are float32. Normalisation and the mask ops: masked_layer_norm, masked_rms_norm, the
  hard_concrete_* family, expected_size, hard_concrete_step.
- ``AS_IS``: no cast, run with autocast off. The ``*_backward`` ops: they receive the tensors their
  forward saved, which already have the dtypes the forward's policy chose.

The casts run above autograd (the Autocast dispatch keys come before Autograd), so gradients flow
back through them to each input in its own dtype. The ``*_native`` kernel ops and the runtime's
``compact_*`` composites need no entry here: the C++ kernels exclude autocast themselves
(csrc/autocast_guard.h) and compute in their inputs' dtype.
"""
from __future__ import annotations

from typing import Callable

import torch

LOWER, FP32, AS_IS = "lower", "fp32", "as_is"

POLICIES: dict[str, str] = {
    "masked_attention": LOWER,
    "masked_attention_backward": AS_IS,
    "masked_ffn": LOWER,
    "masked_ffn_backward": AS_IS,
    "masked_ffn_gated": LOWER,
    "masked_ffn_gated_backward": AS_IS,
    "masked_layer_norm": FP32,
    "masked_layer_norm_backward": AS_IS,
    "masked_rms_norm": FP32,
    "masked_rms_norm_backward": AS_IS,
    "hard_concrete_sample": FP32,
    "hard_concrete_sample_backward": AS_IS,
    "hard_concrete_keep_prob": FP32,
    "hard_concrete_keep_prob_backward": AS_IS,
    "hard_concrete_deterministic": FP32,
    "expected_size": FP32,
    "expected_size_backward": AS_IS,
    "hard_concrete_step": FP32,
    "hard_concrete_step_backward": AS_IS,
}

DEVICE_TYPES = ("cpu", "cuda")
_HALVES = (torch.float16, torch.bfloat16)
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)

_lib: torch.library.Library | None = None
installed: dict[str, str] = {}  # op name -> policy, for the ops this process registered


def autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is enabled for ``device_type`` in this thread."""
    return device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def casts_together(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a cofi op's autocast policy will bring ``a`` and ``b`` to one dtype (both on an
    autocast-enabled device type, both float16 / bfloat16 / float32)."""
    return (a.device.type == b.device.type and a.dtype in _CASTABLE and b.dtype in _CASTABLE
            and autocast_on(a.device.type))


def policy_dtype(op: str, x: torch.Tensor) -> torch.dtype:
    """The dtype ``op``'s floating inputs on x's device have after its autocast policy (x.dtype when
    autocast is off there, or for float64 x, which autocast never casts)."""
    if x.dtype not in _CASTABLE or not autocast_on(x.device.type):
        return x.dtype
    policy = POLICIES[op]
    if policy == LOWER:
        return torch.get_autocast_dtype(x.device.type)
    if policy == FP32:
        return torch.float32
    return x.dtype


def _cast(value: object, device_type: str, to: Callable[[torch.dtype], torch.dtype]) -> object:
    if isinstance(value, torch.Tensor):
        if value.device.type == device_type and value.dtype in _CASTABLE:
            return value.to(to(value.dtype))
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, to) for v in value)
    return value


def _kernel(op: torch._ops.OpOverload, policy: str, device_type: str) -> Callable[..., object]:
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    excluded = torch._C.DispatchKeySet(key)

    def lower(_: torch.dtype) -> torch.dtype:
        return torch.get_autocast_dtype(device_type)

    def fp32(dt: torch.dtype) -> torch.dtype:
        return torch.float32 if dt in _HALVES else dt

    to = {LOWER: lower, FP32: fp32}.get(policy)

    def kernel(_keyset: object, *args: object) -> object:
        if to is not None:
            args = tuple(_cast(a, device_type, to) for a in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return kernel


def install() -> dict[str, str]:
    """Register the policies of every op in POLICIES that this process defines (idempotent).

    Returns {op name: policy} of the registered ops.
    """
    global _lib
    if _lib is None:
        _lib = torch.library.Library("cofi", "IMPL")
    for name, policy in POLICIES.items():
        if name in installed or not hasattr(torch.ops.cofi, name):
            continue
        op = getattr(torch.ops.cofi, name).default
        for device_type in DEVICE_TYPES:
            if not torch.amp.is_autocast_available(device_type):
                continue
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            _lib.impl(name, _kernel(op, policy, device_type), key, with_keyset=True)
        installed[name] = policy
    return dict(installed)


__all__ = ["AS_IS", "FP32", "LOWER", "POLICIES", "autocast_on", "casts_together", "install", "installed",
           "policy_dtype"]
