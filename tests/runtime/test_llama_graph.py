"""The compact decoder's prefill graph exported with torch.export and to ONNX, each run against eager
PyTorch (logits and the present K/V of every attention layer, padded batch, a second shape)."""
from __future__ import annotations

import os
import sys

import onnx
import torch
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.llama_graph import check_onnx, export_prefill_onnx, export_prefill_program, output_names
from cofi.runtime.llama_runtime import LlamaRuntime

sys.path.insert(0, os.path.dirname(__file__))
from llama_tiny import pair, ragged_masks


def test_prefill_graph_torch_export_and_onnxruntime(tmp_path):
    _, m = pair("llama", dtype=torch.float32, num_hidden_layers=2)
    compact = fold_llama(m, ragged_masks(m.shape))
    rt = LlamaRuntime(compact)
    export_prefill_program(rt)  # raises when the program differs from eager on either shape
    path = tmp_path / "prefill.onnx"
    err = export_prefill_onnx(compact, path)
    assert err is not None and err <= 1e-4
    names = [o.name for o in onnx.load(str(path)).graph.output]
    assert names == output_names(rt) == ["logits", "present.0.key", "present.0.value"]  # layer 1: no attention
    assert check_onnx(rt, path) <= 1e-4
