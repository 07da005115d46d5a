"""CoFi distillation losses as pure functions (docs/cofi-reference.md section 3).

- ``prediction_distill_loss``: KL(softmax(t/T) || softmax(s/T)) * T^2, batchmean (classification).
- ``qa_prediction_distill_loss``: the same for start and end logits, averaged (SQuAD).
- ``layer_distill_loss``: layerwise MSE through a learned projection with dynamic matching of each
  teacher layer to a student layer (v3: unconstrained argmin, the reference's default; v4: ordered
  top-down with the existence rule fixed). Every student layer is projected once (with gradient;
  only the matched projections are in the loss's graph) and the T x L loss matrix is computed from
  direct differences (``projected_loss_matrix``).
- ``identity_projection``: the projection, initialised to identity weight and zero bias.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TEACHER_LAYERS = (3, 6, 9, 12)  # 1-based layer outputs the reference distils (hidden_states[3], ...)


def default_teacher_layers(num_layers: int) -> tuple[int, ...]:
    """1-based teacher layers ceil(k L / 4), k = 1..4: (3, 6, 9, 12) for 12 layers, (2, 3, 5, 6) for 6."""
    return tuple(sorted({-(-num_layers * k // 4) for k in range(1, 5)}))


def prediction_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over the batch.

    student_logits, teacher_logits: [B, C] (any leading shape; the last dim is the class dim, the
    KL is summed over it and averaged over the first). Returns a 0-dim tensor.
    """
    T = float(temperature)
    s = F.log_softmax(student_logits / T, dim=-1)
    t = F.softmax(teacher_logits.detach() / T, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * (T * T)


def qa_prediction_distill_loss(start_s: torch.Tensor, end_s: torch.Tensor, start_t: torch.Tensor,
                               end_t: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Mean of ``prediction_distill_loss`` over start and end logits ([B, S] each)."""
    return 0.5 * (prediction_distill_loss(start_s, start_t, temperature)
                  + prediction_distill_loss(end_s, end_t, temperature))


def identity_projection(student_dim: int, teacher_dim: int | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> nn.Linear:
    """nn.Linear(student_dim, teacher_dim) with identity weight (eye) and zero bias (the reference's
    ``layer_transformation`` init)."""
    teacher_dim = student_dim if teacher_dim is None else teacher_dim
    lin = nn.Linear(student_dim, teacher_dim, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(teacher_dim, student_dim, dtype=lin.weight.dtype))
        lin.bias.zero_()
    return lin


_CHUNK = 16384  # columns per float32 partial sum of the distance (float64 across chunks)


@torch.no_grad()
def projected_loss_matrix(projected: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """l[t, s] = mean((teacher[t] - projected[s])^2) for same-shape tensors [..., d_t]; [T, L] float64.

    Direct differences (no Gram form: ||a||^2 - 2<a, b> + ||b||^2 cancels catastrophically when the
    student is close to the teacher, as at the start of pruning), as float32 partial sums over column
    chunks accumulated in float64: relative error ~1e-6 where the Gram form in float32 was off by
    more than 100%.
    """
    Pf = torch.stack([p.reshape(-1) for p in projected])               # [L, n]
    Tf = torch.stack([t.reshape(-1) for t in teacher]).to(Pf.dtype)    # [T, n]
    n = Pf.shape[1]
    out = torch.zeros((Tf.shape[0], Pf.shape[0]), dtype=torch.float64, device=Pf.device)
    for a, b in zip(Tf.split(_CHUNK, 1), Pf.split(_CHUNK, 1)):
        out += torch.cdist(a[None], b[None], compute_mode="donot_use_mm_for_euclid_dist")[0].double().pow(2)
    return out / max(n, 1)


@torch.no_grad()
def layer_loss_matrix(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """l[t, s] = mean((teacher[t] - (student[s] W^T + b))^2), no gradient.

    student: L tensors [..., d_s]; teacher: T tensors [..., d_t]; weight: [d_t, d_s]. Returns [T, L]
    float64 (``projected_loss_matrix``).
    """
    return projected_loss_matrix([F.linear(s, weight, bias) for s in student], teacher)


def match_layers(loss_matrix: torch.Tensor, version: str = "v3", alive: Sequence[bool] | None = None) -> list[int]:
    """Student layer (0-based index into the student list) for each teacher layer.

    v3: argmin over all student layers, independently per teacher layer (the reference's default).
    v4: top-down: the last teacher layer picks among all student layers, each earlier one among
    layers strictly below the previous pick, only layers with ``alive[s]`` (MHA or FFN survives;
    the reference checked the MHA gate only, a bug). When nothing qualifies the teacher layer is
    left unmatched (-1) instead of the reference's out-of-range index.
    """
    lm = loss_matrix.detach().cpu()
    if version == "v3":
        return [int(i) for i in lm.argmin(dim=1)]
    if version != "v4":
        raise ValueError(f"cofi.training.losses.match_layers: version must be 'v3' or 'v4', got {version!r}")
    T, L = lm.shape
    ok = [True] * L if alive is None else [bool(a) for a in alive]
    out = [-1] * T
    bound = L
    for t in range(T - 1, -1, -1):
        cand = [s for s in range(bound) if ok[s]]
        if not cand:
            continue
        best = min(cand, key=lambda s: float(lm[t, s]))
        out[t] = best
        bound = best
    return out


def _distill_pairs(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor | None],
                  teacher_layers: Sequence[int], token_mask: torch.Tensor | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(student candidates = layers 1..L, distilled teacher layers), each [B, S, d] or, with
    ``token_mask`` [B, S], the real tokens only [N, d] (row-major order)."""
    studs = list(student_states[1:])
    teach = []
    for t in teacher_layers:
        if not 1 <= t < len(teacher_states) or teacher_states[t] is None:
            raise ValueError(f"cofi.training.losses.layer_distill_loss: teacher layer {t} out of range "
                             f"1..{len(teacher_states) - 1} (or not among the teacher's states)")
        teach.append(teacher_states[t].detach())
    if token_mask is not None:
        m = token_mask.to(torch.bool)
        studs = [s[m] for s in studs]
        teach = [t[m] for t in teach]
    return studs, teach


def layer_distill_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                       projection: nn.Linear | tuple[torch.Tensor, torch.Tensor | None],
                       teacher_layers: Sequence[int] = TEACHER_LAYERS, version: str = "v3",
                       student_index: torch.Tensor | None = None,
                       alive: Sequence[bool] | None = None,
                       token_mask: torch.Tensor | None = None,
                       reduce_matrix: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Layerwise distillation: sum over teacher layers t of MSE(H_t^teacher, W H_{m(t)}^student + b).

    student_states / teacher_states: ``hidden_states`` of the models (index 0 = embedding output,
    i = output of layer i; [B, S, d'] / [B, S, d]); the student candidates are layers 1..L.
    teacher_layers: 1-based teacher layers distilled (default 3, 6, 9, 12; must exist).
    projection: nn.Linear(d, d) or (weight [d_t, d_s], bias). student_index: the live hidden dims
    of compact student states (``CoFiOutput.hidden_index``): the projection's input columns are
    gathered to them, so the loss equals the full-width one. token_mask [B, S] bool (1 = real
    token): the loss and the matching read those tokens only (padding carries no signal; the
    reference pads every batch to the maximum length and averages over pads too). reduce_matrix:
    applied in place to the [T, L] loss matrix before matching (data parallel: average it over ranks
    so every rank matches on the global batch). Returns (loss, matching) with matching [m(t)] as
    1-based student layers (0 = unmatched, v4 only).
    """
    w, b = (projection.weight, projection.bias) if isinstance(projection, nn.Module) else projection
    if student_index is not None:
        w = w.index_select(1, student_index)
    studs, teach = _distill_pairs(student_states, teacher_states, teacher_layers, token_mask)
    projected = [F.linear(s, w, b) for s in studs]  # with gradient; only the matched ones reach the loss
    lm = projected_loss_matrix([p.detach() for p in projected], teach)
    if reduce_matrix is not None:
        reduce_matrix(lm)
    match = match_layers(lm, version, alive)
    loss = studs[0].new_zeros(())
    for t_state, s in zip(teach, match):
        if s < 0:
            continue
        loss = loss + F.mse_loss(projected[s], t_state)
    return loss, [s + 1 for s in match]
