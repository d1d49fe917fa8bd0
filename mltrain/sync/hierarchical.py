"""Two-level synchronization (the idea of DASO, Coquelin et al. 2022): gradients averaged
inside a node every step, parameters across nodes every ``period`` steps, the inter-node
message in bfloat16."""
from __future__ import annotations

import torch
from mpi4py import MPI

from mltrain import ops
from mltrain.comm import GradReducer, allgather, allgatherv
from mltrain.config import ConfigError
from mltrain.sync.base import SyncStrategy

__all__ = ["Hierarchical"]


class Hierarchical(SyncStrategy):
    """Nodes come from MPI's shared-memory split, or from ``ranks_per_node`` (consecutive
    ranks; for testing on one machine). All nodes must have the same number of ranks.

    Across nodes, what travels is the change since the last synchronization (small, so
    bfloat16's 8-bit mantissa costs little), averaged over nodes and added to the common
    reference. Each of a node's L ranks handles 1/L of the vector with its peers on the
    other nodes; the node then gathers the slices (a shared-memory transfer).
    """

    name = "hierarchical"
    drifts = True

    def __init__(self, model, comm, *, period: int, ranks_per_node: int, bucket_bytes: int,
                 views: bool, max_inflight: int):
        super().__init__(model, comm)
        self.period = period
        if ranks_per_node > 0:
            self.node = comm.Split(self.rank // ranks_per_node, self.rank)
        else:
            self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        sizes = comm.allgather(self.node.Get_size())
        if len(set(sizes)) != 1:
            self.node.Free()
            raise ConfigError(f"sync.name = 'hierarchical' needs nodes of equal size; rank "
                              f"counts per node are {sorted(set(sizes))} (set "
                              "sync.ranks_per_node to a divisor of the rank count)")
        self.local = self.node.Get_rank()
        self.cross = comm.Split(self.local, self.rank)
        self.num_nodes = self.cross.Get_size()
        self.reducer = GradReducer(model.parameters(), self.node, bucket_bytes, views,
                                   max_inflight)
        self.ref = self.flat.get()
        n, L = self.flat.numel, self.node.Get_size()
        self.counts = [n // L + (k < n % L) for k in range(L)]  # torch.tensor_split's sizes
        self.lo = sum(self.counts[:self.local])
        self.hi = self.lo + self.counts[self.local]

    def before_forward(self, step):
        self.reducer.prepare()

    def after_backward(self, step):
        self.reducer.finish()

    def after_step(self, step):
        if (step + 1) % self.period or self.num_nodes == 1:
            return
        x = self.flat.get()
        ref = self.ref[self.lo:self.hi]
        delta = (x[self.lo:self.hi] - ref).to(torch.bfloat16)
        deltas = allgather(delta, self.cross).to(torch.float32)  # [nodes, slice]
        total = ops.sum_buffers(torch.empty_like(deltas[0]), list(deltas))  # rank order
        mine = ref + total.div_(self.num_nodes).to(ref.dtype)
        self.ref = allgatherv(mine, self.counts, self.node)
        self.flat.set(self.ref)

    def close(self):
        self.reducer.remove()
        self.cross.Free()
        self.node.Free()
