"""The chunked fused LM loss (cofi.training.lm_distill) equals the naive full-logit computation in
float64 (value and gradients), never makes a [N, V] tensor, and refuses bad inputs in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cofi.errors import UserError
from cofi.training.lm_distill import IGNORE, fused_lm_loss, hidden_distill_loss, shifted_targets
from torch.utils._python_dispatch import TorchDispatchMode


def _naive(hs, ws, ht, wt, targets, kl_w, ce_w, T, mask):
    ls = torch.log_softmax(hs @ ws.T / T, -1)
    lt = torch.log_softmax(ht @ wt.T / T, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)[mask].sum() / mask.sum() * T * T
    ce = F.cross_entropy(hs @ ws.T, targets, ignore_index=IGNORE)
    return kl_w * kl + ce_w * ce, kl, ce


def _inputs(N=37, d=6, dt=9, V=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    ht, wt = torch.randn(N, dt, dtype=torch.float64, generator=g), torch.randn(V, dt, dtype=torch.float64, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = IGNORE
    mask = torch.rand(N, generator=g) > 0.2
    return hs, ws, ht, wt, targets, mask


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("kl_w,ce_w,T", [(1.0, 0.0, 1.0), (0.7, 0.3, 2.0), (0.0, 1.0, 1.0)])
def test_equals_naive_float64(chunk, kl_w, ce_w, T):
    hs, ws, ht, wt, targets, mask = _inputs()
    loss, parts = fused_lm_loss(hs, ws, teacher_hidden=ht, teacher_head=wt, targets=targets, kl_mask=mask,
                                kl_weight=kl_w, ce_weight=ce_w, temperature=T, chunk=chunk)
    g_hs, g_ws = torch.autograd.grad(loss * 1.7, (hs, ws))
    ref, kl, ce = _naive(hs, ws, ht, wt, targets, kl_w, ce_w, T, mask)
    r_hs, r_ws = torch.autograd.grad(ref * 1.7, (hs, ws))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    if kl_w:
        torch.testing.assert_close(parts["kl"], kl.detach(), rtol=1e-12, atol=1e-12)
    if ce_w:
        torch.testing.assert_close(parts["ce"], ce.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_hs, r_hs, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g_ws, r_ws, rtol=1e-11, atol=1e-12)


def test_tied_head_gradient_accumulates():
    """A tied head (the embedding) used elsewhere in the graph gets both gradients."""
    hs, ws, ht, wt, targets, mask = _inputs(seed=1)
    loss, _ = fused_lm_loss(hs, ws, teacher_hidden=ht, teacher_head=wt, targets=targets, kl_weight=1, ce_weight=1, chunk=5)
    g = torch.autograd.grad(loss + (ws ** 2).sum(), ws)[0]
    ref, _, _ = _naive(hs, ws, ht, wt, targets, 1, 1, 1.0, torch.ones_like(mask))
    torch.testing.assert_close(g, torch.autograd.grad(ref + (ws ** 2).sum(), ws)[0], rtol=1e-11, atol=1e-12)


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logit_tensor():
    """Peak memory by construction: forward + backward never allocate more than chunk x V elements
    at once for one tensor (the naive loss makes several [N, V])."""
    N, V, chunk = 256, 500, 16
    hs, ws, ht, wt, targets, _ = _inputs(N=N, V=V, d=8, dt=8)
    with _Largest() as mode:
        loss, _ = fused_lm_loss(hs, ws, teacher_hidden=ht, teacher_head=wt, targets=targets, ce_weight=1.0, chunk=chunk)
        loss.backward()
    assert mode.largest <= chunk * V < N * V
    with _Largest() as naive:
        _naive(hs, ws, ht, wt, targets, 1.0, 1.0, 1.0, torch.ones(N, dtype=torch.bool))[0].backward()
    assert naive.largest >= N * V


def test_shifted_targets_and_hidden_loss():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert shifted_targets(ids, am).tolist() == [6, 7, IGNORE, 9, IGNORE, IGNORE]
    s = [torch.ones(1, 2, 4), torch.zeros(1, 2, 4)]
    t = [torch.zeros(1, 2, 4), torch.ones(1, 2, 4)]
    keep = torch.tensor([True, True, False, False])
    assert float(hidden_distill_loss(s, t, [0, 1], keep)) == 1.0
    with pytest.raises(UserError, match="layers must be in"):
        hidden_distill_loss(s, t, [2])


def test_refusals():
    hs, ws, ht, wt, _targets, _ = _inputs()
    with pytest.raises(UserError, match="needs the teacher"):
        fused_lm_loss(hs, ws, kl_weight=1.0)
    with pytest.raises(UserError, match="needs targets"):
        fused_lm_loss(hs, ws, kl_weight=0.0, ce_weight=1.0)
    with pytest.raises(UserError, match="must agree"):
        fused_lm_loss(hs, ws[:, :3], teacher_hidden=ht, teacher_head=wt)
    with pytest.raises(UserError, match="temperature"):
        fused_lm_loss(hs, ws, teacher_hidden=ht, teacher_head=wt, temperature=0.0)
