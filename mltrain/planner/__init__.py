"""Layer 4: the planner: which decomposition (data x pipe x layer, micro-batches, stage
boundaries) trains a model fastest on given hardware."""
from mltrain.planner.cost import Hardware, Profile, load_hardware
from mltrain.planner.partition import best_partition, brute_force_partition, stage_costs
from mltrain.planner.search import plan, profile_layers, profile_model

__all__ = ["Hardware", "Profile", "best_partition", "brute_force_partition", "load_hardware",
           "plan", "profile_layers", "profile_model", "stage_costs"]
