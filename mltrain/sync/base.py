"""What every synchronization scheme shares: the step hooks, flat parameter vectors, and
the consensus measures for schemes whose replicas drift apart."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mpi4py import MPI

from mltrain.comm import STATS, allreduce_scalar, mean_
from mltrain.linalg.vector import FlatParams

__all__ = ["SyncStrategy", "FlatParams", "consensus_distance"]




def consensus_distance(flat: torch.Tensor, comm: MPI.Comm) -> float:
    """Mean over ranks of ||x_r - mean(x)||; not counted as the scheme's traffic.

    Collective on ``comm``.
    """
    with STATS.paused():
        mean = mean_(flat.clone(), comm)
        return allreduce_scalar(float((flat - mean).norm()), comm) / comm.Get_size()


class SyncStrategy:
    """Called by the trainer at fixed points of every step::

        before_forward(step); loss.backward(); after_backward(step);
        optimizer.step(); after_step(step)

    ``drifts`` is True for schemes whose replicas differ between synchronizations: the
    trainer then logs the consensus distance and evaluates ``consensus()``'s model.
    All hooks are collective on the data axis (they may communicate).
    """

    name = "base"
    drifts = False

    def __init__(self, model: torch.nn.Module, comm: MPI.Comm):
        self.model = model
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.flat = FlatParams(model)

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def consensus_params(self) -> torch.Tensor:
        """The parameters the run stands for (the average over ranks by default).

        Collective on the data axis.
        """
        with STATS.paused():
            return mean_(self.flat.get(), self.comm)

    @contextmanager
    def consensus(self):
        """Swaps the consensus parameters in for evaluation, then restores this rank's.

        Collective on the data axis.
        """
        if not self.drifts:
            yield
            return
        mine = self.flat.get()
        self.flat.set(self.consensus_params())
        try:
            yield
        finally:
            self.flat.set(mine)

    def distance(self) -> float:
        """Consensus distance of the replicas (0 for schemes that keep them equal)."""
        return consensus_distance(self.flat.get(), self.comm) if self.drifts else 0.0

    def close(self) -> None:
        pass
