"""Layer 1: the process grid, tensor collectives, the gradient reducer, collective errors."""
from mltrain.comm.collectives import (STATS, CommStats, allgather, allgatherv, allreduce_,
                                      allreduce_scalar, broadcast_, iallreduce_, irecv, isend,
                                      local_cpu_masks, mean_, node_rank, reduce_)
from mltrain.comm.errors import CollectiveError, agree, collective, install_abort_hook
from mltrain.comm.grid import AXES, Grid, GridComm
from mltrain.comm.reducer import GradReducer, broadcast_parameters

__all__ = ["AXES", "Grid", "GridComm", "STATS", "CommStats", "allgather", "allgatherv", "allreduce_",
           "allreduce_scalar", "broadcast_", "iallreduce_", "irecv", "isend", "local_cpu_masks",
           "mean_", "node_rank", "reduce_", "CollectiveError", "agree", "collective", "install_abort_hook", "GradReducer",
           "broadcast_parameters"]
