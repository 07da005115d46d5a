"""cofi.training.losses: prediction KL, layer-loss matrix vs brute force (also when student ~ teacher), v3 / v4 matching."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cofi.training.losses import (default_teacher_layers, identity_projection, layer_distill_loss, layer_loss_matrix,
                                  match_layers, prediction_distill_loss)


def test_prediction_kl():
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    want = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(prediction_distill_loss(s, t, 2.0), want)


def test_layer_loss_matrix_and_v3():
    torch.manual_seed(0)
    studs = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(4)]
    teach = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(2)]
    proj = identity_projection(6, dtype=torch.float64)
    with torch.no_grad():
        proj.weight.add_(0.1 * torch.randn(6, 6, dtype=torch.float64))
        proj.bias.normal_()
    lm = layer_loss_matrix(studs, teach, proj.weight, proj.bias)
    brute = torch.tensor([[F.mse_loss(proj(s), t).item() for s in studs] for t in teach], dtype=torch.float64)
    torch.testing.assert_close(lm, brute)
    states_s = [torch.zeros(2, 5, 6, dtype=torch.float64)] + studs
    states_t = [torch.zeros(2, 5, 6, dtype=torch.float64)] + teach
    loss, match = layer_distill_loss(states_s, states_t, proj, teacher_layers=(1, 2))
    assert match == [int(i) + 1 for i in brute.argmin(1)]
    torch.testing.assert_close(loss, sum(brute[t, m - 1] for t, m in enumerate(match)))


def test_v4_ordered_with_existence():
    lm = torch.tensor([[0.1, 0.5, 0.9, 0.2], [0.9, 0.1, 0.8, 0.05]])
    assert match_layers(lm, "v3") == [0, 3]
    assert match_layers(lm, "v4") == [0, 3]
    assert match_layers(lm, "v4", alive=[True, True, True, False]) == [0, 1]
    assert match_layers(lm, "v4", alive=[False, True, False, False]) == [-1, 1]


def test_identity_projection_and_layers():
    p = identity_projection(4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(p(x), x)
    assert default_teacher_layers(12) == (3, 6, 9, 12) and default_teacher_layers(6) == (2, 3, 5, 6)


def test_layer_loss_matrix_precise_when_student_close_to_teacher():
    """At the start of pruning the student is the teacher (identity projection): entries of ~1e-4 of
    the states' norm must come out right (the Gram form in float32 got them >100% wrong)."""
    torch.manual_seed(1)
    teach = [torch.randn(8, 64, 96) for _ in range(2)]
    studs = [t + 1e-2 * torch.randn_like(t) for t in teach] + [torch.randn(8, 64, 96)]
    lm = layer_loss_matrix(studs, teach, torch.eye(96), None)
    brute = torch.tensor([[((t.double() - s.double()) ** 2).mean().item() for s in studs] for t in teach],
                         dtype=torch.float64)
    torch.testing.assert_close(lm, brute, rtol=1e-5, atol=0)
    assert lm.argmin(1).tolist() == [0, 1]
