"""cofi.training: the CoFi loop (teacher fine-tuning, pruning with distillation + Lagrangian,
compact fine-tuning), config/presets, checkpoints, DDP. See ``trainer.Trainer``."""
from .config import PRESETS, ConfigError, TrainConfig

__all__ = ["PRESETS", "ConfigError", "TrainConfig"]
