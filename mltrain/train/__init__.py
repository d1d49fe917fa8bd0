"""Layer 5: the Trainer, which composes grid, data, model, reducer, optimizer, checkpoints."""
from mltrain.train.trainer import Trainer

__all__ = ["Trainer"]
