"""cofi.nn: modules built on cofi.ops (masked attention, FFN, LayerNorm) for models and runtime."""
from .attention import MaskedMultiHeadAttention  # noqa: E402,F401
from .ffn import MaskedFFN  # noqa: E402,F401
from .layer_norm import MaskedLayerNorm  # noqa: E402,F401
