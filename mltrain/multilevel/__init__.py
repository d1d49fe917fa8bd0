"""Layer 4: multilevel training over depth hierarchies of residual networks."""
from mltrain.multilevel.hierarchy import (Hierarchy, check_protocol, coarsen, prolong_vec,
                                          restrict_grad, restrict_vec, to_finest)
from mltrain.multilevel.mgopt import MGOpt
from mltrain.multilevel.rmtr import RMTR

__all__ = ["Hierarchy", "check_protocol", "coarsen", "prolong_vec", "restrict_grad",
           "restrict_vec", "to_finest", "MGOpt", "RMTR"]
