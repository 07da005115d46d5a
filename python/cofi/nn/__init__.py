"""cofi.nn: modules built on cofi.ops (masked attention, FFN, LayerNorm) for models and runtime."""
