"""Layer 4: multilevel training over depth hierarchies of residual networks."""
from mltrain.multilevel.hierarchy import (Hierarchy, check_protocol, coarsen, prolong_vec,
                                          restrict_vec)
from mltrain.multilevel.mgopt import MGOpt

__all__ = ["Hierarchy", "check_protocol", "coarsen", "prolong_vec", "restrict_vec", "MGOpt"]
