"""The ``sdpa`` backend of ``cofi.ops.masked_attention``: torch's scaled_dot_product_attention.

It gathers the live heads (gate != 0), runs ``torch.nn.functional.scaled_dot_product_attention``
on them (flash / memory-efficient / cuDNN kernels on a GPU, torch's fused CPU kernel on CPU), gates
them and scatters them back into a zero output, so dead heads get exactly 0 output and 0 gradients,
as in the reference. It is a *composite* backend (``_backends``): plain differentiable torch code that
``masked_attention`` runs instead of the registered custom op, so autograd and torch.compile go
through SDPA's own derivative and lowering, and no log-sum-exp is returned.

Semantics matched to the reference (``reference/masked_attention.py``):

- key_padding_mask [B, S] (True = keep) becomes a boolean ``attn_mask`` [B, 1, 1, S]. A batch row
  whose keys are all masked gives 0: SDPA sees all its keys (finite values and gradients, whatever
  the kernel does with an empty row) and the result is zeroed there afterwards.
- causal without padding is SDPA's ``is_causal``; causal with padding is one boolean mask
  [B, 1, S, S] (SDPA takes no is_causal together with attn_mask), and a query row with no visible key
  is handled as a fully padded batch row above.
- Grouped-query K/V [B, Hkv, S, D]: ``enable_gqa=True`` when every head is computed; when some query
  heads are gathered, each gathered head takes its own K/V head (``index_select`` on h // G).
- Dropout is refused (``reasons``): SDPA draws its own keep mask from torch's RNG, which cannot
  reproduce the counter-based hash mask every other backend shares.
- Finding the live heads costs one host sync (their count sizes the gather); under torch.compile the
  heads are not gathered (no data-dependent shapes): every head is computed and the dead ones are
  zeroed with ``where``, which gives the same values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends as B
from ._validate import FLOAT_DTYPES, has_data

OP = "masked_attention"
_DTYPES = {"cpu": FLOAT_DTYPES, "cuda": FLOAT_DTYPES}


def sdpa_reasons(q: torch.Tensor, k: object = None, v: object = None, head_z: object = None,
                 key_padding_mask: object = None, scale: object = None, dropout_p: float = 0.0,
                 *rest: object) -> list[str]:
    """Why the sdpa backend cannot run this call (empty = it can); reads no tensor data."""
    why = B.dtype_reasons("q", q, _DTYPES)
    if dropout_p > 0.0:
        why.append("dropout_p > 0: SDPA's dropout RNG cannot reproduce the shared counter-based dropout mask")
    return why


def masked_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_z: torch.Tensor | None,
                          key_padding_mask: torch.Tensor | None, scale: float, dropout_p: float = 0.0,
                          causal: bool = False, *rest: object) -> torch.Tensor:
    """out [B, H, S, D] = head_z[h] * SDPA(q_h, k_g, v_g) on the live heads (g = h // (H / Hkv)), 0 on
    the dead ones.

    q: [B, H, S, D], k, v: [B, Hkv, S, D] (any strides); head_z: [H] in q's dtype or None;
    key_padding_mask: [B, S] bool (True = keep) or None; scale: the softmax scale; causal: keys j <= i
    only. Validated by ``masked_attention``.
    """
    assert dropout_p == 0.0, "sdpa_reasons refuses dropout"
    Bsz, H, S, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv if Hkv else 1
    live: torch.Tensor | None = None  # indices of the live heads when some are dead and we gather
    gated_all = head_z is not None and not has_data(head_z)  # compiling: gate every head with where
    if head_z is not None and not gated_all:
        idx = torch.nonzero(head_z != 0).squeeze(1)  # the one host sync
        if idx.numel() < H:
            live = idx
    qs, ks, vs, z = q, k, v, head_z
    if live is not None:
        kv_idx = live // G if G > 1 else live
        qs = q.index_select(1, live)
        ks, vs = (t.index_select(1, kv_idx) for t in (k, v))
        z = head_z.index_select(0, live)
    attn_mask = has_key = None
    if key_padding_mask is not None:
        if causal:
            vis = key_padding_mask[:, None, :] & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
            has_key = vis.any(dim=2)[:, None, :, None]  # [B, 1, S, 1]: the query row sees some key
            attn_mask = (vis[:, None] | ~has_key)
        else:
            has_key = key_padding_mask.any(dim=1)[:, None, None, None]  # [B, 1, 1, 1]
            attn_mask = (key_padding_mask[:, None, None, :] | ~has_key)
    gqa = live is None and G > 1
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn_mask, scale=scale,
                                         is_causal=causal and attn_mask is None, enable_gqa=gqa)
    if z is not None:
        zz = z.to(out.dtype)[None, :, None, None]  # out's dtype: torch.autocast may have lowered it
        out = torch.where(zz != 0, out * zz, out.new_zeros(())) if gated_all else out * zz
    if has_key is not None:
        out = torch.where(has_key, out, out.new_zeros(()))
    if live is not None:
        out = out.new_zeros(Bsz, H, S, D).index_copy(1, live, out)
    return out


B.register(OP, B.BackendImpl("sdpa", sdpa_reasons, masked_attention_sdpa, composite=True))
