"""cofi.pruning: turn a masked model + deterministic masks into a compact model (exact folding)."""
from .fold import mask_values, prune, prune_state_dict

__all__ = ["mask_values", "prune", "prune_state_dict"]
