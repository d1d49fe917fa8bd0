"""Layer 4: layer-parallel training of residual networks with MGRIT (XBraid-style)."""
from mltrain.mgrit.layer_parallel import LayerParallel, split_layers
from mltrain.mgrit.solver import MGRITSolver

__all__ = ["LayerParallel", "MGRITSolver", "split_layers"]
