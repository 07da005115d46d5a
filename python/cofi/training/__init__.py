"""cofi.training: the CoFi loop (teacher fine-tuning, pruning with distillation + Lagrangian,
compact fine-tuning), config/presets, checkpoints, DDP. See ``trainer.Trainer``."""
from .config import ConfigError, TrainConfig
from .config_cli import PRESETS

__all__ = ["PRESETS", "ConfigError", "TrainConfig"]
