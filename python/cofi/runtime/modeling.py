"""The compact (ragged) BERT/RoBERTa model: per-layer head counts and FFN widths, reduced hidden size.

Built on the cofi ops with no masks (``runtime._ops``; without gradients the whole encoder in one
native call, ``runtime._fused``); fused QKV projection per layer; sublayers that are gone cost
nothing. Inference model: no dropout.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import _fused, _ops, workspace
from ..vocab import op_activation
from .config import CONFIG_NAME, WEIGHTS_NAME, CompactConfig, ModelFolderError

CHECKSUM_KEY = "cofi_sha256"  # safetensors metadata: tensors_checksum of the saved weights
# CompactModel.set_backend: which implementation runs the encoder
#   auto:  the fused native encoder when it can run (``_fused.reasons``), else "ops"
#   fused: the fused native encoder (raise when it cannot run)
#   ops:   one public cofi op per attention / FFN / LayerNorm step (autograd, torch.compile / export)
#   torch: the same steps in plain aten ops (``cofi.ops.reference``; ONNX export)
BACKENDS = ("auto", "fused", "ops", "torch")


@dataclass
class CompactOutput:
    """logits [B, num_labels] (classification) or start_logits/end_logits [B, S] (QA);
    hidden_states: embedding output then each layer output, [B, S, hidden_size] each."""

    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def _hidden_z(cfg: CompactConfig) -> torch.Tensor | None:
    """[hidden_size] ones with zeros at the zero padding dims, or None when there are none."""
    if not cfg.zero_hidden_dims:
        return None
    return torch.cat([torch.ones(cfg.real_hidden_size), torch.zeros(cfg.zero_hidden_dims)])


def _check_multiple(method: str, multiple: int) -> None:
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"cofi.runtime: {method} multiple must be an int >= 1, got {multiple!r}")


def _cat0(t: torch.Tensor, extra: int, dim: int) -> nn.Parameter:
    """t with ``extra`` zero slices appended along ``dim``."""
    shape = list(t.shape)
    shape[dim] = extra
    return nn.Parameter(torch.cat([t.detach(), t.new_zeros(shape)], dim))


class CompactAttention(nn.Module):
    """Self-attention sublayer with ``num_heads`` heads (0 = bias only) + post-LN."""

    def __init__(self, d: int, num_heads: int, head_dim: int, eps: float,
                 hidden_z: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.register_buffer("hidden_z", hidden_z, persistent=False)
        w = num_heads * head_dim
        if num_heads > 0:
            self.qkv_weight = _p(3 * w, d)  # rows: [Q heads | K heads | V heads]
            self.qkv_bias = _p(3 * w)
            self.out_weight = _p(d, w)
        self.out_bias = _p(d)
        self.ln_weight = _p(d)
        self.ln_bias = _p(d)
        self.backend = "ops"  # "ops" | "torch" (CompactModel.set_backend)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, S, d] -> [B, S, d]."""
        if self.num_heads == 0:
            return _ops.layer_norm(self.out_bias.expand_as(x).contiguous(), x, self.ln_weight,
                                   self.ln_bias, self.eps, self.backend, self.hidden_z)
        B, S, _ = x.shape
        h, D = self.num_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, S, 3, h, D)
        ctx = _ops.attention(qkv, key_padding_mask, self.backend)  # [B, h, S, D]
        ctx = ctx.transpose(1, 2).reshape(B, S, h * D)
        a = F.linear(ctx, self.out_weight, self.out_bias)
        # under autocast a is low precision and the residual stream keeps the LayerNorm's dtype
        return _ops.layer_norm(a.to(x.dtype), x, self.ln_weight, self.ln_bias, self.eps, self.backend, self.hidden_z)


class CompactFFN(nn.Module):
    """Feed-forward sublayer with ``width`` units (0 = bias only) + post-LN."""

    def __init__(self, d: int, width: int, activation: str, eps: float,
                 hidden_z: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width, self.activation, self.eps = width, activation, eps
        self.register_buffer("hidden_z", hidden_z, persistent=False)
        if width > 0:
            self.w1 = _p(width, d)
            self.b1 = _p(width)
            self.w2 = _p(d, width)
        self.b2 = _p(d)
        self.ln_weight = _p(d)
        self.ln_bias = _p(d)
        self.backend = "ops"  # "ops" | "torch" (CompactModel.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d] -> [B, S, d]."""
        if self.width == 0:
            y = self.b2.expand_as(x).contiguous()
        else:
            y = _ops.ffn(x, self.w1, self.b1, self.w2, self.b2, self.activation, self.backend)
        return _ops.layer_norm(y.to(x.dtype), x, self.ln_weight, self.ln_bias, self.eps, self.backend, self.hidden_z)


class CompactLayer(nn.Module):
    def __init__(self, cfg: CompactConfig, i: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = (CompactAttention(d, cfg.num_heads[i], cfg.head_dim, eps, _hidden_z(cfg))
                          if cfg.attention_present[i] else None)
        self.ffn = (CompactFFN(d, cfg.intermediate_sizes[i], op_activation(cfg.hidden_act, "cofi.runtime"), eps,
                               _hidden_z(cfg)) if cfg.ffn_present[i] else None)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.attention is not None:
            x = self.attention(x, key_padding_mask)
        if self.ffn is not None:
            x = self.ffn(x)
        return x


class CompactEmbeddings(nn.Module):
    def __init__(self, cfg: CompactConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.model_type, self.pad, self.eps = cfg.model_type, cfg.pad_token_id, cfg.layer_norm_eps
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.ln_weight = _p(d)
        self.ln_bias = _p(d)
        self.register_buffer("hidden_z", _hidden_z(cfg), persistent=False)
        self.backend = "ops"  # "ops" | "torch" (CompactModel.set_backend)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [B, S] -> [B, S, d]: LayerNorm of ``lookup``."""
        return self.norm(self.lookup(input_ids, token_type_ids))

    def norm(self, e: torch.Tensor) -> torch.Tensor:
        """The embedding LayerNorm (hidden_z-aware) of e [B, S, d]."""
        return _ops.layer_norm(e, None, self.ln_weight, self.ln_bias, self.eps, self.backend, self.hidden_z)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] (RoBERTa: positions count non-pad tokens, offset by padding_idx) or [1, S] (BERT)."""
        if self.model_type == "roberta":
            keep = input_ids.ne(self.pad).to(torch.long)
            return torch.cumsum(keep, dim=1) * keep + self.pad
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)

    def lookup(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Word + token type + position embeddings before the LayerNorm: [B, S] -> [B, S, d]."""
        pos = self.position_ids(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return e + self.position_embeddings(pos)


class CompactModel(nn.Module):
    """A pruned BERT/RoBERTa for sequence classification or extractive QA.

    ``forward(input_ids [B, S], attention_mask [B, S] (1 = token) | None, token_type_ids | None,
    output_hidden_states=False) -> CompactOutput``. Create with ``cofi.pruning.prune(model, masks)`` or
    ``CompactModel.from_pretrained(dir)``.

    Without gradients the encoder runs as one native call (``cofi::compact_encoder_fwd``, see
    ``runtime._fused``); ``set_backend`` ('auto' | 'fused' | 'ops' | 'torch', see ``BACKENDS``) forces
    an implementation and ``last_backend`` says which one ran ('fused' | 'ops' | 'torch');
    ``fused_reasons()`` says why 'auto' did not pick the fused path (e.g. a bf16 model on CPU, or
    autocast on). bf16 / fp16: cast the model (``from_pretrained(dtype=...)`` or ``.to(dtype)``).
    ``set_unpad(True)``: the fused path runs the layers on the real
    tokens only (packed rows; attention still sees the padded layout), faster for padded batches,
    and both paths then return 0 at padding positions (same results at real tokens). For sequence
    classification without ``output_hidden_states``, the fused path computes only the position-0
    (CLS) rows after the last attention (``cls_tail``, on by default; exact: every later step is
    row-wise; ``set_cls_tail(False)`` computes every row).
    """

    def __init__(self, config: CompactConfig) -> None:
        super().__init__()
        self.config = config
        self.backend = "auto"
        self.last_backend: str | None = None
        self.unpad = False
        self.cls_tail = True
        self.embeddings = CompactEmbeddings(config)
        self.layers = nn.ModuleList(CompactLayer(config, i) for i in range(config.num_layers))
        d, c = config.hidden_size, config.classifier_size or config.original_hidden_size
        self.pooler = self.classifier = self.classifier_dense = self.qa_outputs = None
        if config.task == "question_answering":
            self.qa_outputs = nn.Linear(d, 2)
        elif config.model_type == "bert":
            self.pooler = nn.Linear(d, c)
            self.classifier = nn.Linear(c, config.num_labels)
        else:
            self.classifier_dense = nn.Linear(d, c)
            self.classifier = nn.Linear(c, config.num_labels)
        self.layer_transformation = (nn.Linear(d, config.distill_proj_size)
                                     if config.distill_proj_size else None)
        self.eval()

    # ------------------------------------------------------------------ forward
    def set_backend(self, backend: str) -> "CompactModel":
        """Which implementation runs the encoder (``BACKENDS``): 'auto' (default: fused when it can
        run, else 'ops'), 'fused' (raise when it cannot run), 'ops' (one public cofi op per step) or
        'torch' (the same math in plain aten ops, for ONNX)."""
        if backend not in BACKENDS:
            raise ValueError(f"cofi.runtime: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (CompactAttention, CompactFFN, CompactEmbeddings)):
                m.backend = "torch" if backend == "torch" else "ops"
        return self

    def fused_reasons(self) -> list[str]:
        """Why the fused encoder cannot run now (empty: it can; see ``runtime._fused``)."""
        return _fused.reasons(self)

    def set_unpad(self, unpad: bool = True) -> "CompactModel":
        """Skip padding tokens in the encoder (outputs 0 at padding positions); see the class doc."""
        self.unpad = bool(unpad)
        return self

    def set_cls_tail(self, on: bool = True) -> "CompactModel":
        """Compute only the CLS rows after the last attention when only logits are needed."""
        self.cls_tail = bool(on)
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, all_hidden_states: bool = True,
               cls_only: bool = False) -> list[torch.Tensor]:
        """Hidden states: embedding output then each layer's output, [B, S, hidden_size] each
        (only the last layer's output when ``all_hidden_states`` is False; with ``cls_only`` the
        fused path may return it for position 0 alone, [B, 1, hidden_size])."""
        kpm = None if attention_mask is None else attention_mask.to(torch.bool)
        if self.backend in ("auto", "fused"):
            why = _fused.reasons(self)
            if not why:  # the native calls use the CPU workspace themselves
                self.last_backend = "fused"
                x = _fused.embed(self, input_ids, token_type_ids)
                return _fused.encode(self, x, kpm, all_hidden_states, cls_only and not all_hidden_states)
            if self.backend == "fused":
                raise RuntimeError("cofi.runtime: backend 'fused' cannot run: " + "; ".join(why))
        self.last_backend = "torch" if self.backend == "torch" else "ops"
        # inference reuses earlier calls' memory; with autograd, saved tensors would pin cached blocks
        scope = contextlib.nullcontext() if torch.is_grad_enabled() else workspace.scope(input_ids.device)
        with scope:
            return self._per_op(input_ids, kpm, token_type_ids, all_hidden_states)

    def _per_op(self, input_ids: torch.Tensor, kpm: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                all_hidden_states: bool) -> list[torch.Tensor]:
        """The encoder one public cofi op per step (autograd, torch.compile / export, any backend)."""
        x = self.embeddings(input_ids, token_type_ids)
        # with unpad, the same outputs as the fused path: 0 at padding positions
        keep = kpm.unsqueeze(-1).to(x.dtype) if self.unpad and kpm is not None else None
        hs = [x]
        for layer in self.layers:
            x = layer(x, kpm)
            hs.append(x if keep is None else x * keep)
        return hs if all_hidden_states else [hs[-1]]

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Task head on the last hidden state x [B, S, d]: (logits,) or (start_logits, end_logits)."""
        if self.qa_outputs is not None:
            se = self.qa_outputs(x)
            return se[..., 0].contiguous(), se[..., 1].contiguous()
        cls = x[:, 0]
        if self.pooler is not None:
            return (self.classifier(torch.tanh(self.pooler(cls))),)
        return (self.classifier(torch.tanh(self.classifier_dense(cls))),)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CompactOutput:
        cls_only = self.cls_tail and self.qa_outputs is None and not output_hidden_states
        hs = self.encode(input_ids, attention_mask, token_type_ids, all_hidden_states=output_hidden_states,
                         cls_only=cls_only)
        out = self.head(hs[-1])
        hidden = None
        if output_hidden_states:
            r = self.config.real_hidden_size
            hidden = tuple(h[..., :r] for h in hs) if self.config.zero_hidden_dims else tuple(hs)
        if self.qa_outputs is not None:
            return CompactOutput(start_logits=out[0], end_logits=out[1], hidden_states=hidden)
        return CompactOutput(logits=out[0], hidden_states=hidden)

    # ------------------------------------------------------------------ structure / counting
    def num_encoder_params(self) -> int:
        """Kept encoder parameters counted the paper's way (all layer weights, biases, LayerNorms;
        no embeddings, pooler, classifier, distillation projection); zero padding excluded
        (``CompactConfig.encoder_params``; without padding it equals the layers' parameter count)."""
        return self.config.encoder_params()

    def sparsity(self) -> float:
        """1 - kept encoder params / full encoder params (docs/cofi-reference.md 4.5)."""
        return 1.0 - self.num_encoder_params() / self.config.full_encoder_params()

    def flops_per_token(self, seq_len: int) -> int:
        """Multiply-add x2 FLOPs per token of the encoder matmuls + head-free attention for length S."""
        d, D, f = self.config.hidden_size, self.config.head_dim, 0
        for i, layer in enumerate(self.layers):
            if layer.attention is not None and layer.attention.num_heads:
                w = layer.attention.num_heads * D
                f += 2 * (3 * w * d + w * d) + 2 * 2 * seq_len * w
            if layer.ffn is not None and layer.ffn.width:
                f += 2 * 2 * layer.ffn.width * d
        return f

    def pad_ffn_(self, multiple: int) -> "CompactModel":
        """Append all-zero FFN units so every FFN width is a multiple of ``multiple`` (exact: a unit
        with zero input row and zero bias gives act(0) = 0 and has a zero output column)."""
        _check_multiple("pad_ffn_", multiple)
        for i, layer in enumerate(self.layers):
            ffn = layer.ffn
            if ffn is None or ffn.width == 0 or ffn.width % multiple == 0:
                continue
            extra = multiple - ffn.width % multiple
            with torch.no_grad():
                ffn.w1 = nn.Parameter(torch.cat([ffn.w1, ffn.w1.new_zeros(extra, ffn.w1.shape[1])]))
                ffn.b1 = nn.Parameter(torch.cat([ffn.b1, ffn.b1.new_zeros(extra)]))
                ffn.w2 = nn.Parameter(torch.cat([ffn.w2, ffn.w2.new_zeros(ffn.w2.shape[0], extra)], 1))
            ffn.width += extra
            self.config.intermediate_sizes[i] += extra
            self.config.zero_ffn_units[i] += extra
        return self

    def pad_hidden_(self, multiple: int) -> "CompactModel":
        """Append all-zero residual dims so ``hidden_size`` is a multiple of ``multiple``. Exact: the
        new dims have zero embedding columns, zero rows in every projection writing the residual and
        zero columns in every projection reading it, and every LayerNorm leaves them out of its
        statistics (``hidden_z``) and outputs 0 there. Hidden states returned by ``forward`` drop them.
        """
        _check_multiple("pad_hidden_", multiple)
        cfg = self.config
        extra = -cfg.hidden_size % multiple
        if extra == 0:
            return self
        e = self.embeddings
        with torch.no_grad():
            for emb in (e.word_embeddings, e.position_embeddings, e.token_type_embeddings):
                emb.weight = _cat0(emb.weight, extra, 1)
                emb.embedding_dim += extra
            lns = [e]
            for layer in self.layers:
                a, f = layer.attention, layer.ffn
                if a is not None:
                    if a.num_heads:
                        a.qkv_weight = _cat0(a.qkv_weight, extra, 1)
                        a.out_weight = _cat0(a.out_weight, extra, 0)
                    a.out_bias = _cat0(a.out_bias, extra, 0)
                    lns.append(a)
                if f is not None:
                    if f.width:
                        f.w1 = _cat0(f.w1, extra, 1)
                        f.w2 = _cat0(f.w2, extra, 0)
                    f.b2 = _cat0(f.b2, extra, 0)
                    lns.append(f)
            for m in lns:
                m.ln_weight = _cat0(m.ln_weight, extra, 0)
                m.ln_bias = _cat0(m.ln_bias, extra, 0)
            for lin in (self.pooler, self.classifier_dense, self.qa_outputs, self.layer_transformation):
                if lin is not None:
                    lin.weight = _cat0(lin.weight, extra, 1)
                    lin.in_features += extra
        cfg.hidden_size += extra
        cfg.zero_hidden_dims += extra
        ref = e.ln_weight
        z = _hidden_z(cfg).to(device=ref.device, dtype=ref.dtype)
        for m in lns:
            m.hidden_z = z
        return self

    def pad_(self, multiple: int) -> "CompactModel":
        """``pad_hidden_(multiple)`` then ``pad_ffn_(multiple)``: every GEMM dim a multiple (exact)."""
        return self.pad_hidden_(multiple).pad_ffn_(multiple)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Write model.safetensors (with a checksum of the tensors in its metadata) + config.json,
        and the tokenizer's files when ``tokenizer`` is given: without them the folder can only be
        evaluated with an explicit tokenizer (``cofi eval --tokenizer``)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": "pt", "cofi": "compact", CHECKSUM_KEY: tensors_checksum(sd)}
        save_file(sd, os.path.join(directory, WEIGHTS_NAME), metadata=meta)
        self.config.save(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, pad: int | None = None) -> "CompactModel":
        """Load a folder written by ``save_pretrained`` (safetensors only; nothing is unpickled).
        ``pad``: then ``pad_(pad)`` (exact; whether it pays depends on the shapes and the machine:
        benchmarks/bench_runtime.py measures it).

        The config is checked (``CompactConfig.load``) and so is every tensor against it: names,
        shapes, floating dtypes and finite values; any problem is one :class:`ModelFolderError`."""
        from safetensors import safe_open

        cfg = CompactConfig.load(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ModelFolderError(f"cofi.runtime: {directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors' errors for a damaged file vary
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelFolderError(f"cofi.runtime: {path} is not a readable safetensors file ({first}); "
                                   "the file is damaged or truncated") from None
        with torch.device("meta"):  # shapes only: a damaged config could ask for any size
            want = cls(cfg).state_dict()
        problem = state_dict_problem(want, sd)
        if not problem and CHECKSUM_KEY in meta and meta[CHECKSUM_KEY] != tensors_checksum(sd):
            problem = ("the tensors do not match the checksum saved with them: the file was changed or damaged "
                       "after CompactModel.save_pretrained wrote it")
        if problem:
            raise ModelFolderError(f"cofi.runtime: {path}: {problem}")
        model = cls(cfg).to(sd["embeddings.ln_weight"].dtype)
        model.load_state_dict(sd, strict=True)
        model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
        if pad is not None:
            model.pad_(pad)
        return model.eval()


def tensors_checksum(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name; CPU tensors)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def nonfinite_tensor(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """(name, count) of the first floating tensor with NaN or inf values, or None."""
    for name, t in named:
        if t.is_floating_point() or t.is_complex():
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                return name, bad
    return None


def state_dict_problem(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``got`` (loaded weights) from being ``want``'s (a model's state dict) weights:
    missing or unexpected tensors, other shapes (the config and the weights disagree), non-floating
    dtypes, NaN/inf values; None when it fits."""
    missing = [k for k in want if k not in got]
    if missing:
        return (f"{len(missing)} tensor(s) the config needs are missing (e.g. {missing[0]!r}); "
                "the weights do not belong to this config.json")
    extra = [k for k in got if k not in want]
    if extra:
        return (f"{len(extra)} tensor(s) the config does not know (e.g. {extra[0]!r}); "
                "the weights do not belong to this config.json")
    for k, w in want.items():
        t = got[k]
        if tuple(t.shape) != tuple(w.shape):
            return (f"tensor {k!r} has shape {list(t.shape)} but config.json implies {list(w.shape)}; "
                    "the weights do not belong to this config.json")
        if not t.is_floating_point():
            return f"tensor {k!r} has dtype {t.dtype}, not a floating dtype; the file is damaged"
    bad = nonfinite_tensor(got.items())
    if bad:
        return (f"tensor {bad[0]!r} has {bad[1]} NaN/inf value(s): the weights are broken "
                "(a diverged run or a damaged file); refusing to load them")
    return None

