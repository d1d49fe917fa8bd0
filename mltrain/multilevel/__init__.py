"""Layer 4: multilevel training over depth hierarchies of residual networks."""
from mltrain.multilevel.hierarchy import Hierarchy, check_protocol, coarsen

__all__ = ["Hierarchy", "check_protocol", "coarsen"]
