"""The two roles of a ``sync.name = "ps"`` job (``mltrain.sync.ps``) inside the Trainer.

The last ``parallel.servers`` ranks serve, the others work. Workers build a Trainer on
their own communicator (the grid, the data partition and every collective are theirs);
a server's Trainer constructor serves the whole run and returns when the workers have
closed theirs. Start and end are the only exchanges over the whole job, so a refusal on
the workers (bad config, data or checkpoint) reaches the servers as the same error, and
the workers' summary (or their training error) reaches them at the end:

* ``start``: worker 0 broadcasts whether construction succeeded; if it did, it gives each
  server its shard of the (possibly resumed) parameters and optimizer state;
* ``finish``: after every worker has sent DONE, worker 0 broadcasts the summary.
"""
from __future__ import annotations

import torch
from mpi4py import MPI

from mltrain.comm import CollectiveError, local_cpu_masks
from mltrain.config import ConfigError
from mltrain.linalg.vector import FlatParams
from mltrain.optim import build_optimizer
from mltrain.sync.ps import (MAX_FLOAT32_STEPS, PSClient, PSServer, flat_state,
                             receive_initial, shard_bounds)
from mltrain.train.signals import StopSignals

__all__ = ["ParameterServers"]


class ParameterServers:
    """This rank's role in a ``sync.name = ps`` job of ``world``'s ranks.

    ``workers``: the workers' communicator (servers get one of their own, unused);
    ``client``: a worker's ``PSClient`` once ``connect`` ran. Construction is collective on
    ``world``; so are ``serve`` (servers) and ``start`` / ``finish`` (workers), which
    match each other.
    """

    def __init__(self, cfg, world: MPI.Comm):
        self.cfg, self.world = cfg, world
        P, S = world.Get_size(), cfg.parallel.servers
        self.W = P - S  # Grid.for_config refused S >= P
        self.server_ranks = list(range(self.W, P))
        self.is_server = world.Get_rank() >= self.W
        self.masks = local_cpu_masks(world)  # every rank of the node, servers included
        self.comm = world.Dup()  # the servers' traffic, apart from every other message
        self.workers = world.Split(int(self.is_server), world.Get_rank())
        self.client: PSClient | None = None
        self.bounds: list[tuple[int, int]] = []
        self._finished = False

    # -- workers ---------------------------------------------------------------------------
    def connect(self, t) -> None:
        """The shard bounds of ``t.model``'s parameters and this worker's client; refuses
        a server count the parameters cannot fill and float32 step counts a message
        cannot carry. Collective on the workers' communicator (``agree``)."""
        from mltrain.comm import agree

        n = FlatParams(t.model).numel

        def check():
            if t.dtype == torch.float32 and t.total_steps >= MAX_FLOAT32_STEPS:
                raise ConfigError(f"run.steps: {t.total_steps} steps are beyond what a float32 "
                                 "parameter-server message counts exactly (2^24); use "
                                 "run.dtype = 'float64'")
            return shard_bounds(n, len(self.server_ranks))
        self.bounds = agree(self.workers, check, what="config")
        if self.cfg.sync.transport == "rma":
            from mltrain.sync.ps_rma import RMAClient

            self.client = RMAClient(self.comm, self.server_ranks, self.bounds, self.W,
                                    self.cfg.optim.lr)
        else:
            self.client = PSClient(self.comm, self.server_ranks, self.bounds, self.W)

    def start(self, t, failure: CollectiveError | None) -> None:
        """Tells the servers whether the workers' construction succeeded; if so, worker 0
        sends each its shard of the parameters and optimizer state. Collective on
        ``world`` (matches ``serve``)."""
        msg = None
        if self.world.Get_rank() == 0:
            msg = (("failed", str(failure), failure.kind, failure.ranks) if failure else
                   ("ok", t.dtype, self.bounds, t.step))
        self.world.bcast(msg, root=0)
        if failure is not None:
            self._free()
            return
        if self.world.Get_rank() == 0:
            params = [p for p in t.model.parameters() if p.requires_grad]
            self.client.send_initial(FlatParams(t.model).get().cpu(),
                                     {k: v.cpu() for k, v in
                                      flat_state(t.optimizer, params).items()})
        if self.cfg.sync.transport == "rma":  # the servers' windows, once they hold x0
            self.client.open(t.step)

    def finish(self, outcome) -> None:
        """After this worker's DONE: worker 0 hands the servers the run's summary (a dict)
        or its training error (a CollectiveError), then the communicators are freed.
        Collective on ``world`` (matches the end of ``serve``); once."""
        if self._finished:
            return
        self._finished = True
        if self.client is not None:
            self.client.done()
        msg = None
        if self.world.Get_rank() == 0:
            msg = (("failed", str(outcome), outcome.kind, outcome.ranks)
                   if isinstance(outcome, CollectiveError) else ("ok", outcome))
        self.world.bcast(msg, root=0)
        self._free()

    # -- servers ---------------------------------------------------------------------------
    def serve(self) -> dict | None:
        """A server's whole run: waits for the workers' construction, receives its shard,
        answers pushes until every worker is done and returns the workers' summary. Raises
        the workers' CollectiveError when they failed. Collective on ``world``."""
        msg = self.world.bcast(None, root=0)
        if msg[0] == "failed":
            self._free()
            raise CollectiveError(*msg[1:])
        _, dtype, bounds, step = msg
        lo, hi = bounds[self.world.Get_rank() - self.W]
        shard, state = receive_initial(self.comm, 0, hi - lo, dtype)
        # The workers own the cores; an update of one shard is memory-bound anyway.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        o = self.cfg.optim
        if self.cfg.sync.transport == "rma":
            from mltrain.sync.ps_rma import RMAServer

            server = RMAServer(self.comm, shard, list(range(self.W)),
                               first=self.world.Get_rank() == self.W, start=step)
        else:
            server = PSServer(self.comm, shard, list(range(self.W)),
                              self.cfg.sync.staleness,
                              lambda ps: build_optimizer(o.name, ps, lr=o.lr,
                                                         momentum=o.momentum,
                                                         weight_decay=o.weight_decay),
                              state, start=step)
        # A scheduler's SIGTERM reaches servers too: the workers stop, checkpoint (from
        # the servers) and say DONE; a server must live until then.
        try:
            with StopSignals():
                server.serve()
                end = self.world.bcast(None, root=0)
        finally:
            torch.set_num_threads(threads)
        self.shard, self.server = server.param.detach(), server
        self._free()
        if end[0] == "failed":
            raise CollectiveError(*end[1:])
        return end[1]

    def _free(self) -> None:
        """Frees the servers' communicator and this side's split. Collective on ``world``
        (both frees are collective on the communicators they free)."""
        for c in (self.comm, self.workers):
            if c != MPI.COMM_NULL:
                c.Free()
        self.comm = self.workers = MPI.COMM_NULL
