"""Training and runtime on the GPU with the auto backends: a CoFi step in compact vs dense mode (equal
loss and gradients), the compact runtime fused vs per-op, and a tiny end-to-end pruning run (steps,
fold, compact model == masked model) in fp32 and under bf16 autocast. No datasets: tiny random models
built from a config and synthetic batches."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from cofi import ops
from cofi.masks import MaskSet
from cofi.models import CoFiBertForSequenceClassification
from cofi.pruning import prune

L, d, H, F_ = 3, 64, 4, 128


def tiny(dev: torch.device, seed: int = 0) -> CoFiBertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=d, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F_,
                     max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return CoFiBertForSequenceClassification(cfg).to(dev)


def batch(dev: torch.device, B: int = 4, S: int = 33, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 20:] = 0
    am[3, 7:] = 0
    return ids.to(dev), am.to(dev), torch.zeros_like(ids).to(dev), torch.randint(0, 3, (B,), generator=g).to(dev)


def maskset(model, dev: torch.device, seed: int = 0) -> MaskSet:
    """log_alpha with exact zeros in every group once sampled (as tests/models' compact == dense)."""
    torch.manual_seed(seed)
    ms = MaskSet(model.mask_config(), device=dev)
    with torch.no_grad():
        ms.log_alpha.uniform_(-1.0, 3.0)
        ms.log_alpha_ffn[0] = -30
        ms.log_alpha_mha[1] = -30
        ms.log_alpha_head[2, :2] = -30
        ms.log_alpha_intermediate[2, 10:] = -30
        ms.log_alpha_hidden[::4] = -30
        ms.lambda_1.fill_(0.7)
        ms.lambda_2.fill_(0.2)
    return ms


def step(model, ms, noise, b, mode):
    model.zero_grad(set_to_none=True)
    ms.zero_grad(set_to_none=True)
    ids, am, tt, y = b
    out = model(ids, am, tt, masks=ms.sample(noise=noise), backend=mode)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), y) + ms.lagrangian(0.4)[0]
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return loss.detach(), grads, ms.log_alpha.grad.clone()


def test_train_step_compact_equals_dense(dev):
    model = tiny(dev).train()
    ms = maskset(model, dev)
    noise = torch.rand(ms.num_masks, generator=torch.Generator().manual_seed(1)).to(dev)
    b = batch(dev)
    ref = step(model, ms, noise, b, "dense")
    got = step(model, ms, noise, b, "compact")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-3, atol=1e-5)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    used = {op: ops.last_backend(op) for op in ("masked_attention", "masked_ffn", "masked_layer_norm")}
    print("backends used:", used)


def test_compact_runtime_fused_equals_per_op(dev):
    model = tiny(dev).eval()
    ms = maskset(model, dev)
    compact = prune(model, ms.deterministic("soft")).to(dev).eval()
    ids, am, tt, _ = batch(dev)
    with torch.no_grad():
        want = model(ids, am, tt, masks=ms.deterministic("soft"), backend="dense").logits
        per_op = compact.set_backend("ops")(ids, am, tt).logits
        fused_or_auto = compact.set_backend("auto")(ids, am, tt).logits
    ran = compact.last_backend
    torch.testing.assert_close(per_op, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_or_auto, per_op, rtol=1e-4, atol=1e-5, msg=lambda m: f"auto ran {ran}: {m}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_pruning_run(dev, precision):
    """20 CoFi steps (distillation from a teacher + Lagrangian towards 50 % sparsity, AdamW on the
    weights and log_alpha, ascent on the lambdas), then fold: the compact model equals the masked
    model with the deterministic masks."""
    student, teacher = tiny(dev, 0).train(), tiny(dev, 1).eval()
    ms = MaskSet(student.mask_config(), device=dev)
    opt = torch.optim.AdamW(list(student.parameters()) + [ms.log_alpha], lr=3e-3)
    lam = torch.optim.AdamW([ms.lambda_1, ms.lambda_2], lr=3e-2)
    amp = torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16")
    sparsity = []
    for i in range(20):
        ids, am, tt, _ = batch(dev, seed=i)
        with torch.no_grad(), amp:
            t_logits = teacher(ids, am, tt).logits.float()
        with amp:
            s_logits = student(ids, am, tt, masks=ms.sample(), backend="compact").logits.float()
        kd = torch.nn.functional.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True,
                                        reduction="batchmean")
        lag, s = ms.lagrangian(0.5)
        loss = kd + lag
        assert torch.isfinite(loss), f"step {i}: loss {loss.item()}"
        opt.zero_grad(set_to_none=True)
        lam.zero_grad(set_to_none=True)
        loss.backward()
        ms.ascend_lambdas_()
        opt.step()
        lam.step()
        ms.clamp_()
        sparsity.append(float(s))
    assert sparsity[-1] > sparsity[0], sparsity
    student.eval()
    z = ms.deterministic("soft")
    compact = prune(student, z).to(dev).eval()
    ids, am, tt, _ = batch(dev, seed=99)
    with torch.no_grad():
        want = student(ids, am, tt, masks=z, backend="dense").logits
        got = compact(ids, am, tt).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    print(f"{precision}: expected sparsity {sparsity[0]:.3f} -> {sparsity[-1]:.3f}, compact == masked, "
          f"attention ran {ops.last_backend('masked_attention')}")
