"""One table of tolerances per op, direction and dtype: (atol, rtol).

float64 is the correctness check (tight); float32 allows accumulation-order differences; low
precision (GPU only) follows the FlashAttention rule in the tests themselves (error vs an fp32
reference at most 2x the reference's own error in that dtype).
"""
from __future__ import annotations

import torch

TOL: dict[str, dict[str, dict[torch.dtype, tuple[float, float]]]] = {
    "hard_concrete": {
        "fwd": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)},
        "bwd": {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)},
    },
    "expected_size": {
        "fwd": {torch.float64: (1e-6, 1e-12), torch.float32: (1.0, 1e-5)},
        "bwd": {torch.float64: (1e-9, 1e-12), torch.float32: (1e-3, 1e-5)},
    },
    "masked_attention": {
        "fwd": {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)},
        "bwd": {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)},
    },
    "masked_ffn": {
        "fwd": {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4)},
        "bwd": {torch.float64: (1e-9, 1e-9), torch.float32: (1e-3, 1e-3)},
    },
    "masked_layer_norm": {
        "fwd": {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)},
        "bwd": {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)},
    },
    "masked_rms_norm": {
        "fwd": {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)},
        "bwd": {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)},
    },
}


def tol(op: str, direction: str, dtype: torch.dtype) -> dict[str, float]:
    """kwargs for torch.testing.assert_close."""
    atol, rtol = TOL[op][direction][dtype]
    return {"atol": atol, "rtol": rtol}
