"""The named-domain part of ``cofi prune-lm`` (``LMPruner`` inherits it): batches drawn across
domains by weights, Sheared-LLaMA's dynamic batch loading before a step's batch, perplexity per
domain, and what results.json records about the domains. Sampling and the weight update are
``cofi.data.lm_domains``; this class only connects them to the pruner's model and masks.

It relies on the pruner's ``cfg``, ``loader`` (a ``DomainLoader`` or None), ``train``,
``eval_seqs``, ``student``, ``teacher``, ``step``, ``log``, ``eval_nll(masks, seqs)``,
``delivered()``, ``progress(step)`` and ``masks``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..masks.decoder import DecoderMasks


class DomainSteps:
    """Mixin of ``LMPruner`` for ``--domains`` and ``--dynamic-batch-loading``."""

    def _eval_rows(self) -> int:
        return self.cfg.batch_size * self.cfg.eval_batches

    def perplexities(self, masks: DecoderMasks | None) -> dict[str, float]:
        """{"all": eval perplexity} on up to ``eval_batches`` batches of the eval sequences; with
        domains, one per domain (that many batches of each domain's held-out sequences) and "all"
        pooling their tokens."""
        if self.loader is not None:
            return self.loader.perplexities(lambda seqs: self.eval_nll(masks, seqs), self._eval_rows())
        nll, n = self.eval_nll(masks, self.eval_seqs[: self._eval_rows()])
        return {"all": math.exp(nll / max(n, 1))}

    def eval_masks(self) -> DecoderMasks:
        """The masks evaluated at this step: delivered after the warm-up, deterministic during it."""
        return self.delivered() if self.progress(self.step) >= 1.0 else self.masks.deterministic(self.cfg.mask_mode)

    def next_batch(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch of ``self.step`` [B, S] and what to log about its domains. With dynamic batch
        loading, when an update is due the weights first move by the held-out loss per domain of
        the student under ``eval_masks()``."""
        from .lm_prune import batch_at

        if self.loader is None:
            return batch_at(self.train, self.step, self.cfg.batch_size, self.cfg.seed), {}
        m = self.eval_masks() if self.loader.due(self.step) else None
        return self.loader.step_batch(self.step, lambda seqs: self.eval_nll(m, seqs), self._eval_rows())

    def as_teacher(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the unpruned model in place of the student (it is evaluated with masks None)."""
        student, self.student = self.student, self.teacher
        try:
            return fn()
        finally:
            self.student = student

    def start_domains(self) -> None:
        """At step 0: the reference losses of dynamic batch loading, unless given, are the unpruned
        model's held-out loss per domain (``eval_batches`` batches each)."""
        ld = self.loader
        if ld is None:
            return
        if ld.update_steps is not None and ld.reference is None:
            ref = self.as_teacher(lambda: ld.losses(lambda seqs: self.eval_nll(None, seqs), self._eval_rows()))
            ld.reference = torch.tensor(ref, dtype=torch.float64)
        self.log(f"[prune-lm] domains: {ld.summary()}")

    def final_ppl(self, masks: DecoderMasks) -> dict[str, Any]:
        """results.json's perplexities of the unpruned and the pruned model (and the domains' part)."""
        teacher, pruned = self.as_teacher(lambda: self.perplexities(None)), self.perplexities(masks)
        res: dict[str, Any] = {"eval_ppl_teacher": teacher.pop("all"), "eval_ppl_pruned": pruned.pop("all")}
        if self.loader is not None:
            res["domains"] = {**self.loader.summary(), "eval_ppl_teacher": teacher, "eval_ppl_pruned": pruned}
        return res


__all__ = ["DomainSteps"]
