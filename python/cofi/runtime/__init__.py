"""cofi.runtime: the compact (ragged) pruned model, save/load, export and batch inference.
(``cofi.runtime.workspace``: the CPU memory cache inference runs in.)"""
from . import workspace
from .config import CompactConfig
from .inference import predict
from .modeling import BACKENDS, CompactModel, CompactOutput

__all__ = [
    "BACKENDS",
    "CompactConfig",
    "CompactModel",
    "CompactOutput",
    "predict",
    "workspace",
]
