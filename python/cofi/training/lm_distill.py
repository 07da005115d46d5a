"""Cheap causal-LM losses: logit distillation (KL to the teacher) and next-token cross-entropy from
the final hidden states and the LM heads, over chunks of tokens, so that no full [B, S, V] logit
tensor (student's or teacher's) exists at any time (docs/decoder.md, "Distillation").

``fused_lm_loss`` is a custom autograd function. Per chunk of ``chunk`` tokens it forms the student
and teacher logits [c, V], the loss terms and, when a gradient is wanted, their gradient with respect
to the student logits (softmax - target), which it turns at once into the gradients of the student
hidden chunk ([c, d]) and of the student head ([V, d], accumulated); the chunk's logits are then
freed. Backward only scales the stored gradients. The alternative, ``torch.utils.checkpoint`` per
chunk, would recompute both logit products of every chunk in backward; this costs the same matrix
products as an unchunked forward + backward and holds [c, V] instead of ~4 x [N, V].

With N tokens, p_t = softmax(teacher / T), q = softmax(student / T):
  kl = T^2 / N_kl * sum_tokens KL(p_t || q)      (Hinton's T^2 keeps the gradient scale)
  ce = 1 / N_ce * sum_{targets != -100} -log softmax(student)[target]
  loss = kl_weight * kl + ce_weight * ce
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

IGNORE = -100


def _check(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor | None, wt: torch.Tensor | None,
           targets: torch.Tensor | None, kl_weight: float, ce_weight: float, temperature: float, chunk: int) -> None:
    who = "cofi.training.lm_distill.fused_lm_loss"
    if hs.dim() != 2 or ws.dim() != 2 or hs.shape[1] != ws.shape[1]:
        raise UserError(f"{who}: student hidden [N, d] and head [V, d] must agree, got {tuple(hs.shape)} and {tuple(ws.shape)}")
    if kl_weight:
        if ht is None or wt is None:
            raise UserError(f"{who}: kl_weight {kl_weight} needs the teacher hidden states and head, got None")
        if ht.dim() != 2 or ht.shape[0] != hs.shape[0] or wt.shape != (ws.shape[0], ht.shape[1]):
            raise UserError(f"{who}: teacher hidden [N, d_t] and head [V, d_t] must match N={hs.shape[0]}, V={ws.shape[0]}, "
                            f"got {tuple(ht.shape)} and {tuple(wt.shape)}")
    if ce_weight and (targets is None or targets.shape != (hs.shape[0],)):
        raise UserError(f"{who}: ce_weight {ce_weight} needs targets [N={hs.shape[0]}], "
                        f"got {None if targets is None else tuple(targets.shape)}")
    if not temperature > 0 or chunk < 1:
        raise UserError(f"{who}: temperature must be > 0 and chunk >= 1, got {temperature}, {chunk}")


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, kl_mask, kl_weight, ce_weight, temperature, chunk):  # type: ignore[override]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        N, T = hs.shape[0], float(temperature)
        acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        n_kl = int(kl_mask.sum()) if kl_weight else 0
        n_ce = int((targets != IGNORE).sum()) if ce_weight else 0
        kl_sum = torch.zeros((), dtype=acc, device=hs.device)
        ce_sum = torch.zeros((), dtype=acc, device=hs.device)
        g_hs = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        g_ws = None  # [V, d]: the first chunk's product, then accumulated in place (no zero-filled [V, d] buffer)
        w = ws.to(hs.dtype)
        wteach = wt.to(ht.dtype) if kl_weight else None
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            h = hs[a:b]
            logits = (h @ w.T).to(acc)                                                  # [c, V]
            g = None  # d loss / d logits [c, V], built from the terms (no zero-filled buffer)
            if kl_weight and n_kl:
                m = kl_mask[a:b].to(acc)[:, None]
                ls = torch.log_softmax(logits / T, -1)
                lt = torch.log_softmax((ht[a:b] @ wteach.T).to(acc) / T, -1)
                pt = lt.exp()
                kl_sum += (m * pt * (lt - ls)).sum()
                if want_grad:  # d/dlogits of T^2 KL(p_t || softmax(logits / T)) = T (q - p_t)
                    g = ls.exp_().sub_(pt).mul_((kl_weight * T / n_kl) * m)
                del ls, lt, pt
            if ce_weight and n_ce:
                tg = targets[a:b]
                valid = tg != IGNORE
                lp = torch.log_softmax(logits, -1)
                ce_sum -= lp.gather(-1, tg.clamp_min(0)[:, None])[:, 0][valid].sum()
                if want_grad:
                    gc = lp.exp()
                    gc[torch.arange(b - a, device=gc.device), tg.clamp_min(0)] -= 1.0
                    gc.mul_((ce_weight / n_ce) * valid.to(acc)[:, None])
                    g = gc if g is None else g.add_(gc)
                del lp
            if want_grad and g is None:
                g = torch.zeros_like(logits)
            if want_grad:
                if g_hs is not None:
                    g_hs[a:b] = (g @ ws.to(acc)).to(hs.dtype)
                if ctx.needs_input_grad[1]:
                    g_ws = g.T @ h.to(acc) if g_ws is None else g_ws.addmm_(g.T, h.to(acc))
            del logits, g
        if ctx.needs_input_grad[1] and g_ws is None:  # no tokens
            g_ws = torch.zeros(ws.shape, dtype=acc, device=ws.device)
        kl = kl_sum * (T * T / max(n_kl, 1))
        ce = ce_sum / max(n_ce, 1)
        ctx.save_for_backward(g_hs if g_hs is not None else torch.empty(0),
                              g_ws.to(ws.dtype) if g_ws is not None else torch.empty(0))
        loss = (kl_weight * kl + ce_weight * ce).to(hs.dtype)
        kl, ce = kl.detach(), ce.detach()
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, g_loss, _g_kl, _g_ce):  # type: ignore[override]
        g_hs, g_ws = ctx.saved_tensors
        d_hs = g_hs * g_loss.to(g_hs.dtype) if ctx.needs_input_grad[0] else None
        d_ws = g_ws * g_loss.to(g_ws.dtype) if ctx.needs_input_grad[1] else None
        return d_hs, d_ws, None, None, None, None, None, None, None, None


def fused_lm_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, *,
              teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
              targets: torch.Tensor | None = None, kl_mask: torch.Tensor | None = None,
              kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
              chunk: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"kl", "ce"} detached) of the module docstring. student_hidden [N, d] (the final
    norm's output), student_head [V, d], teacher_hidden [N, d_t] (no grad), teacher_head [V, d_t],
    targets [N] int64 (``IGNORE`` = no target), kl_mask [N] bool (default all). Gradients reach
    student_hidden and student_head only. Unsupported: a second derivative."""
    _check(student_hidden, student_head, teacher_hidden, teacher_head, targets, kl_weight, ce_weight,
           temperature, chunk)
    N = student_hidden.shape[0]
    dev = student_hidden.device
    if kl_mask is None:
        kl_mask = torch.ones(N, dtype=torch.bool, device=dev)
    if targets is None:
        targets = torch.full((N,), IGNORE, dtype=torch.int64, device=dev)
    ht = teacher_hidden.detach() if teacher_hidden is not None else student_hidden.new_empty(0, 0)
    wt = teacher_head.detach() if teacher_head is not None else student_head.new_empty(0, 0)
    loss, kl, ce = _FusedLMLoss.apply(student_hidden, student_head, ht, wt, targets, kl_mask,
                                      float(kl_weight), float(ce_weight), float(temperature), int(chunk))
    return loss, {"kl": kl, "ce": ce}


def shifted_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets [B * S] of input_ids [B, S]: position t predicts token t + 1; the last
    position and padded tokens (attention_mask 0) get ``IGNORE``."""
    t = torch.full_like(input_ids, IGNORE)
    t[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        t[:, :-1][attention_mask[:, 1:] == 0] = IGNORE
        t[attention_mask == 0] = IGNORE
    return t.reshape(-1)


def hidden_distill_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                        layers: Sequence[int], hidden_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over ``layers`` of the mean squared error between the student's and the teacher's residual
    streams [B, S, d] after those layers (index 0: after the embedding), over the student's kept
    hidden dims (``hidden_keep`` [d] bool; pruned dims of the student hold 0 and are not compared)."""
    if not layers:
        raise UserError("cofi.training.lm_distill.hidden_distill_loss: layers must name at least one state")
    n = len(student_states)
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise UserError(f"cofi.training.lm_distill.hidden_distill_loss: layers must be in [0, {n}), got {bad}")
    total = student_states[0].new_zeros(())
    for l in layers:
        s, t = student_states[l], teacher_states[l].detach().to(student_states[l].dtype)
        if hidden_keep is not None:
            s, t = s[..., hidden_keep], t[..., hidden_keep]
        total = total + F.mse_loss(s, t)
    return total / len(layers)


__all__ = ["IGNORE", "fused_lm_loss", "hidden_distill_loss", "shifted_targets"]
