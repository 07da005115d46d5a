"""Export a CompactModel: ``torch.export`` (keeps the cofi custom ops) and ONNX (plain aten math),
each checked by running the exported artefact against the eager PyTorch output."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .modeling import CompactModel


class _TupleOutputs(nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> logits tuple (exporters want plain tensors)."""

    def __init__(self, model: CompactModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hs = self.model.encode(input_ids, attention_mask, token_type_ids)
        return self.model.head(hs[-1])


def output_names(model: CompactModel) -> list[str]:
    return ["start_logits", "end_logits"] if model.config.task == "question_answering" else ["logits"]


def example_inputs(model: CompactModel, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """Random (input_ids, attention_mask, token_type_ids) with some padding, for tracing/checks."""
    g = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    low = 3 if model.config.vocab_size > 3 else 0
    ids = torch.randint(low, model.config.vocab_size, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        am[-1, seq // 2:] = 0
        ids[-1, seq // 2:] = model.config.pad_token_id
    return ids.to(dev), am.to(dev), torch.zeros_like(ids).to(dev)


def _check(got: list, want: tuple[torch.Tensor, ...], atol: float, what: str) -> float:
    err = max(float((torch.as_tensor(g).to(w.dtype) - w.cpu()).abs().max()) for g, w in zip(got, want))
    if not err <= atol:
        raise AssertionError(f"cofi.runtime.export: {what} differs from PyTorch by {err:.3g} > {atol}")
    return err


def export_program(model: CompactModel, inputs: tuple[torch.Tensor, ...] | None = None,
                   dynamic: bool = True, check: bool = True, atol: float = 1e-5):
    """``torch.export.export`` of the model (batch and sequence dims dynamic when ``dynamic``).
    With ``check``, runs the program on ``inputs`` and on a second shape against eager."""
    wrapper = _TupleOutputs(model).eval()
    inputs = inputs or example_inputs(model)
    dyn = None
    if dynamic:
        b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings - 2)
        dyn = tuple({0: b, 1: s} for _ in range(3))
    with torch.no_grad():
        prog = torch.export.export(wrapper, inputs, dynamic_shapes=dyn)
        if check:
            _check(list(prog.module()(*inputs)), wrapper(*inputs), atol, "torch.export")
            if dynamic:
                other = example_inputs(model, batch=3, seq=9)
                _check(list(prog.module()(*other)), wrapper(*other), atol, "torch.export (other shape)")
    return prog


def export_onnx(model: CompactModel, path: str, inputs: tuple[torch.Tensor, ...] | None = None,
                opset: int = 18, check: bool = True, atol: float = 1e-4) -> str:
    """Write ``path`` (.onnx; dynamic batch and sequence axes) and, with ``check``, compare
    onnxruntime's outputs with PyTorch's on two input shapes. The graph is traced with
    ``set_backend("torch")`` (the same math in plain aten ops: ONNX has no cofi custom ops)."""
    m = copy.deepcopy(model).float().cpu().set_backend("torch").eval()
    wrapper = _TupleOutputs(m).eval()
    inputs = tuple(t.cpu() for t in (inputs or example_inputs(m)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    b, s = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=m.config.max_position_embeddings - 2)
    with torch.no_grad():
        torch.onnx.export(wrapper, inputs, path, input_names=names, output_names=output_names(m),
                          opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes=tuple({0: b, 1: s} for _ in range(3)))
    if check:
        check_onnx(m, path, atol=atol, inputs=inputs)
    return path


def check_onnx(model: CompactModel, path: str, atol: float = 1e-4,
               inputs: tuple[torch.Tensor, ...] | None = None) -> float:
    """Max abs difference between onnxruntime and PyTorch on two shapes (raises above ``atol``)."""
    import onnxruntime as ort

    m = copy.deepcopy(model).float().cpu().eval()
    wrapper = _TupleOutputs(m).eval()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    err = 0.0
    for inp in (inputs or example_inputs(m), example_inputs(m, batch=3, seq=9)):
        feed = {n: t.cpu().numpy() for n, t in zip(["input_ids", "attention_mask", "token_type_ids"], inp)}
        with torch.no_grad():
            want = wrapper(*inp)
        err = max(err, _check(sess.run(None, feed), want, atol, "ONNX (onnxruntime)"))
    return err
