"""A pruning run's budget: the mask set that enforces it (a target sparsity, or a target
architecture as in Sheared-LLaMA's targeted pruning), what it means before the run starts
(parameters kept, measured latency of a model of that size), and the delivered masks (the
training's deterministic masks when they meet the budget, else the learned scores projected onto
it; cofi.masks.projection). docs/design.md, "Delivering the budget"."""
from __future__ import annotations

import time
from typing import Any

import torch

from ..masks import MaskConfig, Masks, MaskSet, TargetArchitecture, encoder_full_size, kept_units, real_sparsity
from ..masks.projection import budget_params, project_to_shape, project_to_sparsity
from ..masks.sparsity import structure_size
from .config import TARGET_SHAPE_KEYS, ConfigError, TrainConfig

# target key -> (TargetArchitecture field, the HF config's size it may not exceed, the mask groups it prunes)
_SHAPE = {"target_hidden": ("hidden_size", "hidden_size", ("hidden",)),
          "target_heads": ("num_heads", "num_attention_heads", ("head",)),
          "target_ffn": ("intermediate_size", "intermediate_size", ("intermediate",)),
          "target_layers": ("num_layers", "num_hidden_layers", ("mha", "ffn"))}


def target_shape(cfg: TrainConfig) -> dict[str, int]:
    """The target-architecture keys that are set (empty: the budget is ``target_sparsity``)."""
    return {k: int(getattr(cfg, k)) for k in TARGET_SHAPE_KEYS if getattr(cfg, k) is not None}


def make_maskset(cfg: TrainConfig, hf_config: Any, device: torch.device) -> MaskSet:
    """The run's mask set. Target-sparsity mode: groups ``cfg.mask_groups``, one Lagrangian on
    the expected sparsity. Target-architecture mode: exactly the groups the set target keys prune
    (hidden; head; intermediate; mha + ffn for layers), one Lagrangian per group; the others are
    not masked, so the model keeps them whole. Each target is checked against the model's size."""
    shape = target_shape(cfg)
    groups = tuple(cfg.mask_groups)
    target = None
    if shape:
        kw, groups = {}, ()
        for key, v in shape.items():
            field, hf_name, gs = _SHAPE[key]
            full = int(getattr(hf_config, hf_name))
            if not 1 <= v <= full:
                raise ConfigError(f"cofi config: {key} must be in [1, {full}] (the model's {hf_name}), got {v}")
            kw[field] = v
            groups += gs
        target = TargetArchitecture(**kw)
    mcfg = MaskConfig.from_hf_config(hf_config, groups=groups, init_mean=cfg.mask_init,
                                     temperature=cfg.temperature, droprate_init=cfg.droprate_init)
    return MaskSet(mcfg, target=target, device=device)


def delivered_masks(ms: MaskSet, cfg: TrainConfig) -> tuple[Masks, dict[str, Any]]:
    """The masks a run delivers from the current scores, with what happened.

    Target shape: exactly that shape (``project_to_shape``). Target sparsity: the deterministic
    masks if their real sparsity (the folded model's count) is within ``sparsity_epsilon`` of the
    target ("converged"), else ``project_to_sparsity`` ("projected": never above the budget,
    closest from below). info: masks (converged | projected | shape), sparsity_before (of the
    deterministic masks), real_sparsity (of the delivered ones), structure (kept units)."""
    det = ms.deterministic(cfg.deterministic_mode)
    before = real_sparsity(det, ms.cfg, "encoder")
    if ms.target is not None:
        masks, how = project_to_shape(ms, ms.target_counts, cfg.deterministic_mode), "shape"
    elif abs(before - cfg.target_sparsity) <= cfg.sparsity_epsilon:
        masks, how = det, "converged"
    else:
        masks, how = project_to_sparsity(ms, cfg.target_sparsity, cfg.deterministic_mode), "projected"
    k = kept_units(masks, ms.cfg)
    structure = {"hidden": k["hidden"], "heads": k["heads"], "ffn": k["ffn"],
                 "layers": sum(a or f for a, f in zip(k["mha_alive"], k["ffn_alive"]))}
    return masks, {"masks": how, "sparsity_before": before, "real_sparsity": real_sparsity(masks, ms.cfg, "encoder"),
                   "structure": structure}


def _uniform_structure(mcfg: MaskConfig, budget: int) -> tuple[int, list[int], list[int]]:
    """(hidden, heads, ffn) of a model with every layer and hidden dim and the same fraction of
    heads and FFN units per layer, the largest within ``budget`` parameters."""
    L, d, H, F, D = mcfg.num_layers, mcfg.hidden_size, mcfg.num_heads, mcfg.intermediate_size, mcfg.head_dim
    best = (d, [0] * L, [0] * L)
    lo, hi = 0.0, 1.0
    for _ in range(40):
        r = 0.5 * (lo + hi)
        h, f = [round(r * H)] * L, [round(r * F)] * L
        if structure_size(d, h, f, [True] * L, [True] * L, D, layer_norm=True) <= budget:
            lo, best = r, (d, h, f)
        else:
            hi = r
    return best


def _time_forward(models: list[torch.nn.Module], ids: torch.Tensor, seconds: float = 1.5) -> list[float]:
    """Median forward seconds of each model on ``ids`` (interleaved rounds, at most ~``seconds``)."""
    times: list[list[float]] = [[] for _ in models]
    mask = torch.ones_like(ids)
    t_end = time.perf_counter() + seconds
    with torch.inference_mode():
        for m in models:  # warm-up
            m(ids, mask)
        for _ in range(5):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(ids, mask)
                times[i].append(time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
    return [sorted(t)[len(t) // 2] for t in times]


def describe_budget(cfg: TrainConfig, student: torch.nn.Module, ms: MaskSet, device: torch.device,
                    measure: bool = True) -> dict[str, Any]:
    """What the budget means, before the run starts: encoder parameters kept of the total, the
    embeddings (not part of the sparsity) separately, and, with ``measure``, the forward latency of
    a model of that size against the unpruned one at the run's batch size and sequence length
    (a model of the target shape; for a sparsity budget, every layer with the same fraction of heads
    and FFN units, the real learned structure differs). Weights are the student's, folded."""
    from ..pruning import prune

    hc = student.config
    full_cfg = MaskConfig.from_hf_config(hc)
    L, d, H, F = full_cfg.num_layers, full_cfg.hidden_size, full_cfg.num_heads, full_cfg.intermediate_size
    full = encoder_full_size(full_cfg)
    if ms.target is not None:
        Lt, dt, Ht, Ft = ms.target.sizes(full_cfg)
        hidden, heads, ffn, layers = dt, [Ht] * L, [Ft] * L, [i < Lt for i in range(L)]
        kept = structure_size(dt, [Ht] * Lt, [Ft] * Lt, [True] * Lt, [True] * Lt, full_cfg.head_dim, layer_norm=True)
        sparsity = 1.0 - kept / full
        what = "target shape"
    else:
        sparsity = float(cfg.target_sparsity)
        kept = budget_params(ms, sparsity)
        hidden, heads, ffn = _uniform_structure(full_cfg, kept)
        layers = [True] * L
        what = "uniform shape of that size"
    emb_rows = hc.vocab_size + hc.max_position_embeddings + hc.type_vocab_size
    out: dict[str, Any] = {
        "budget": "target_shape" if ms.target is not None else "target_sparsity",
        "target_shape": target_shape(cfg) or None, "target_sparsity": sparsity,
        "encoder_params_kept": int(kept), "encoder_params_full": int(full),
        "embedding_params_full": int(emb_rows * d + 2 * d),
        "embedding_params_kept": int(emb_rows * hidden + 2 * hidden),
        "latency_model": {"what": what, "hidden": hidden, "heads": [h if a else 0 for h, a in zip(heads, layers)],
                          "ffn": [f if a else 0 for f, a in zip(ffn, layers)]},
    }
    if measure:
        def ones_first(n: int, k: int) -> torch.Tensor:
            return (torch.arange(n) < k).double()

        masks = Masks(hidden=ones_first(d, hidden), head=torch.stack([ones_first(H, h) for h in heads]),
                      mha=torch.tensor(layers, dtype=torch.float64),
                      intermediate=torch.stack([ones_first(F, f) for f in ffn]), ffn=torch.tensor(layers, dtype=torch.float64))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's draws stay as they were
            small, dense = prune(student, masks).to(device), prune(student, None).to(device)
            B, S = cfg.batch_size, cfg.max_seq_length
            ids = torch.randint(0, hc.vocab_size, (B, S), generator=torch.Generator().manual_seed(0)).to(device)
            t_small, t_dense = _time_forward([small, dense], ids)
        out["latency"] = {"batch": B, "seq": S, "device": str(device), "threads": torch.get_num_threads(),
                          "budget_ms": 1e3 * t_small, "unpruned_ms": 1e3 * t_dense, "speedup": t_dense / t_small}
    return out


def budget_lines(b: dict[str, Any]) -> list[str]:
    """The budget report's log lines."""
    kept, full = b["encoder_params_kept"], b["encoder_params_full"]
    head = (f"target shape {b['target_shape']}" if b["budget"] == "target_shape"
            else f"target sparsity {b['target_sparsity']}")
    lines = [f"[budget] {head}: keep {kept:,} of {full:,} encoder parameters (sparsity {1 - kept / full:.4f}); "
             f"embeddings {b['embedding_params_kept']:,} of {b['embedding_params_full']:,} (not in the sparsity)"]
    if "latency" in b:
        t, m = b["latency"], b["latency_model"]
        lines.append(f"[budget] measured now ({m['what']}: hidden {m['hidden']}, heads {m['heads']}, ffn {m['ffn']}): "
                     f"forward of batch {t['batch']} x {t['seq']} tokens {t['budget_ms']:.1f} ms vs "
                     f"{t['unpruned_ms']:.1f} ms unpruned ({t['speedup']:.2f}x) on {t['device']}, {t['threads']} threads")
    return lines
