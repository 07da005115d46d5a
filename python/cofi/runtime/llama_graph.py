"""``torch.export`` and ONNX of a compact decoder's prefill graph, each checked by running it.

The graph is ``LlamaRuntime``'s forward without a cache: (input_ids [B, S] int64, attention_mask
[B, S] int64) -> (logits [B, S, V], then per attention layer its key and value [B, G_l, S, D] after
RoPE: the present K/V a decoding loop continues from). Batch and sequence axes are dynamic. Plain
aten math (SDPA, linear, rms_norm), so onnxruntime runs it with no custom op.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .compact_llama import CompactLlamaForCausalLM
from .llama_runtime import LlamaRuntime

NAMES_IN = ["input_ids", "attention_mask"]


class PrefillGraph(nn.Module):
    """(input_ids, attention_mask) -> (logits, k_0, v_0, k_1, v_1, ...)."""

    def __init__(self, runtime: LlamaRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        present: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = self.runtime(input_ids, attention_mask, present=present)
        return (logits, *[t for kv in present for t in kv])


def output_names(runtime: LlamaRuntime) -> list[str]:
    layers = [i for i, layer in enumerate(runtime.layers) if layer.attn]
    return ["logits", *[f"present.{i}.{n}" for i in layers for n in ("key", "value")]]


def example_inputs(vocab_size: int, batch: int = 2, seq: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a left-padded attention mask (the last row loses its first third)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, : seq // 3] = 0
    return ids, mask


def _dims(runtime: LlamaRuntime) -> tuple[dict[int, object], ...]:
    mx = int(runtime.config.base.get("max_position_embeddings") or 4096)
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=mx)
    return ({0: b, 1: s}, {0: b, 1: s})


def _err(got, want: tuple[torch.Tensor, ...], atol: float, what: str) -> float:
    err = max(float((torch.as_tensor(g).to(w.dtype) - w).abs().max()) for g, w in zip(got, want, strict=True))
    if not err <= atol:
        raise AssertionError(f"cofi.runtime.llama_graph: {what} differs from PyTorch by {err:.3g} > {atol}")
    return err


def export_prefill_program(model: CompactLlamaForCausalLM | LlamaRuntime, check: bool = True, atol: float = 1e-5):
    """``torch.export.export`` of the prefill graph (dynamic batch and sequence); with ``check`` it is
    run on two shapes against eager."""
    rt = model if isinstance(model, LlamaRuntime) else LlamaRuntime(model)
    g = PrefillGraph(rt).eval()
    inputs = example_inputs(rt.vocab_size)
    with torch.no_grad():
        prog = torch.export.export(g, inputs, dynamic_shapes=_dims(rt))
        if check:
            for inp in (inputs, example_inputs(rt.vocab_size, 3, 9, seed=1)):
                _err(prog.module()(*inp), g(*inp), atol, "torch.export")
    return prog


def export_prefill_onnx(model: CompactLlamaForCausalLM | LlamaRuntime, path: str | os.PathLike, opset: int = 18,
                        check: bool = True, atol: float = 1e-4) -> float | None:
    """Write ``path`` (.onnx, float32, dynamic batch and sequence); with ``check`` compare
    onnxruntime with PyTorch on two shapes and return the max abs difference."""
    src = model if isinstance(model, CompactLlamaForCausalLM) else None
    rt = LlamaRuntime(copy.deepcopy(src).float().cpu().eval()) if src is not None else model
    if rt.dtype != torch.float32:
        raise ValueError(f"cofi.runtime.llama_graph: ONNX export needs a float32 runtime, got {rt.dtype}")
    g = PrefillGraph(rt).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(g, example_inputs(rt.vocab_size), str(path), input_names=NAMES_IN,
                          output_names=output_names(rt), opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes=_dims(rt))
    return check_onnx(rt, path, atol) if check else None


def check_onnx(runtime: LlamaRuntime, path: str | os.PathLike, atol: float = 1e-4) -> float:
    """Max abs difference of onnxruntime vs PyTorch on two input shapes (raises above ``atol``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = PrefillGraph(runtime).eval()
    err = 0.0
    for inp in (example_inputs(runtime.vocab_size), example_inputs(runtime.vocab_size, 3, 9, seed=1)):
        with torch.no_grad():
            want = g(*inp)
        got = sess.run(None, {n: t.numpy() for n, t in zip(NAMES_IN, inp, strict=True)})
        err = max(err, _err(got, want, atol, "ONNX (onnxruntime)"))
    return err


__all__ = ["PrefillGraph", "check_onnx", "export_prefill_onnx", "export_prefill_program", "output_names"]
