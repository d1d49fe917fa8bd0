"""Layer 4: pipeline model parallelism: schedules as data, an MPI executor, and stages
that are layer-parallel themselves."""
from mltrain.pipeline.executor import (Pipeline, default_balance, residual_span,
                                       sequential_layers)
from mltrain.pipeline.layered import LayeredPipeline, Segment, layered_balance
from mltrain.pipeline.schedules import Action, SCHEDULES, build_schedule, check

__all__ = ["Action", "LayeredPipeline", "Pipeline", "SCHEDULES", "Segment", "build_schedule",
           "check", "default_balance", "layered_balance", "residual_span",
           "sequential_layers"]
