"""Layer 5: HDF5 checkpoints and metrics files."""
from mltrain.io.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                   load_checkpoint, prepare_folder, resume,
                                   save_checkpoint, checkpoint_bytes, Snapshot)
from mltrain.io.metrics import MetricsWriter

__all__ = ["CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "prepare_folder", "resume", "save_checkpoint", "MetricsWriter", "checkpoint_bytes",
           "Snapshot"]
