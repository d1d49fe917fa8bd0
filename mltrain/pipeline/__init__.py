"""Layer 4: pipeline model parallelism: schedules as data, an MPI executor."""
from mltrain.pipeline.executor import Pipeline, default_balance, sequential_layers
from mltrain.pipeline.schedules import Action, SCHEDULES, build_schedule, check

__all__ = ["Action", "Pipeline", "SCHEDULES", "build_schedule", "check", "default_balance",
           "sequential_layers"]
