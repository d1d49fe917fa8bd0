"""The Trainer: a run from a Config, end to end.

The flow is config -> grid -> layout (``parallelize``) -> optimizer (the registry in
``optimizers``) -> this loop; nothing here asks which layout or which optimizer it runs.
Everything that can fail because of user input (config against the rank count, dataset
files, checkpoints, memory) is checked with ``agree`` before the first training
collective, so a bad input ends every rank with the same message instead of a hang.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch
from mpi4py import MPI

from mltrain.comm import STATS, CollectiveError, Grid, agree, local_cpu_masks, node_rank
from mltrain.config import Config, to_toml
from mltrain.data import ShardLoader, open_dataset
from mltrain.io import (MetricsWriter, Snapshot, checkpoint_bytes, load_checkpoint,
                        prepare_folder, resume, save_checkpoint)
from mltrain.nn import build_model, set_depth_penalty
from mltrain.optim.base import Batches, Context, Straggler
from mltrain.train import checks
from mltrain.train.evaluate import evaluate
from mltrain.train.loop import train as run_loop
from mltrain.train.nested import phases
from mltrain.train.optimizers import build_method, layer_alignment
from mltrain.train.parallelize import parallelize
from mltrain.train.ps import ParameterServers
from mltrain.train.signals import StopSignals  # noqa: F401 - part of this module's API
from mltrain.utils import get_logger, seed_everything, set_threads, torch_dtype

__all__ = ["Trainer", "StopSignals"]


class Trainer:
    """Builds everything a run needs from ``cfg`` on ``comm``.

    ``model`` replaces the one ``model.*`` describes: any ``torch.nn.Module`` that maps a
    batch of inputs (shape ``[b, *dataset.input_shape]``) to class logits. Its parameters are
    cast to ``run.dtype`` and overwritten with rank 0's, so every rank may build it alike.
    ``snapshot`` (rank 0's counts; see ``snapshot_bytes``) is resumed from instead of
    ``checkpoint.dir``. ``until`` is the step ``train`` stops at (``total_steps`` unless a
    search pauses the run at a rung). ``node_masks``: the CPU masks of every rank on this
    node (``local_cpu_masks`` of the whole job) and ``local_rank`` this rank's index among
    them (``node_rank`` of the whole job; it picks the GPU) when ``comm`` is only part of it.

    Collective on ``comm`` (construction, ``train`` and ``evaluate``). With ``sync.name =
    ps`` (``mltrain.train.ps``) the ranks take roles: on a server rank the constructor
    serves the whole run and returns when the workers have closed theirs (``serving`` is
    True; ``train`` returns the workers' summary, ``close`` does nothing); on the workers
    everything is collective on the workers' communicator (``self.comm``) and ``close`` (or
    a training error) ends the servers, so it must be called. ``serve = False``: the
    caller drives the trainer itself (search trials, benchmark races) and ``ps`` is
    refused.
    """

    def __init__(self, cfg: Config, comm: MPI.Comm = MPI.COMM_WORLD, *, quiet: bool = False,
                 metrics: bool = True, model: torch.nn.Module | None = None,
                 snapshot: Snapshot | None = None, node_masks: list | None = None,
                 local_rank: int | None = None, serve: bool = True):
        self.cfg, self.comm, self.rank, self.quiet = cfg, comm, comm.Get_rank(), quiet
        self.log = get_logger(rank=self.rank)
        self.dtype = torch_dtype(cfg.run.dtype)

        self.grid = agree(comm, lambda: Grid.for_config(cfg, comm.Get_size()), what="config")
        if cfg.checkpoint.dir:  # unwritable or a file: found now, not after training
            agree(comm, lambda: prepare_folder(cfg.checkpoint.dir) if self.rank == 0 else None,
                  what="config")
        self.ps: ParameterServers | None = None
        self.serving = False
        if cfg.sync.name == "ps":
            if not serve:
                raise CollectiveError("config: sync.name = 'ps': parameter servers run "
                                      "through `mltrain train` (and study, bench ps), not "
                                      "here yet", "ConfigError", [])
            self.ps = ParameterServers(cfg, comm)
            # The servers share the node: the workers' thread counts must leave them room.
            node_masks = self.ps.masks
            if self.ps.is_server:  # serves the whole run here, returns when it is over
                self.serving = True
                self.summary = self.ps.serve()
                return
            comm = self.comm = self.ps.workers
            self.rank = comm.Get_rank()
        self.gc = self.grid.build(comm)
        try:
            self._setup(cfg, comm, model, snapshot, node_masks, local_rank, metrics)
        except CollectiveError as e:  # refused alike on every rank: free what was split
            self.gc.free()
            if self.ps is not None:
                self.ps.start(self, e)
            raise
        if self.ps is not None:
            self.ps.start(self, None)

    def _setup(self, cfg: Config, comm: MPI.Comm, model, snapshot, node_masks, local_rank,
               metrics: bool) -> None:
        """The rest of the construction, once the grid is split. Collective on
        ``comm``."""
        self.dp_size, self.dp_rank = self.gc.data.Get_size(), self.gc.data.Get_rank()
        # A search's trial group shares its node with other groups: their masks count too.
        local_masks = node_masks if node_masks is not None else local_cpu_masks(comm)
        self.threads = set_threads(cfg.run.threads, local_masks)
        if local_rank is None:
            local_rank = node_rank(comm)[0]
        self.device = agree(comm, lambda: checks.device(cfg, local_rank), what="config")

        self.dataset = agree(comm, lambda: open_dataset(cfg.data.name, cfg.data.path,
                                                        cfg.data.num_samples), what="data")
        self.steps_per_epoch = agree(comm, lambda: checks.epoch_steps(cfg, self.dataset),
                                     what="config")
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.steps_per_epoch
        self.until = self.total_steps
        agree(comm, lambda: checks.coarse_phases(cfg, self.total_steps), what="config")
        self.until_work: float | None = None  # a search's stop in fine-gradient equivalents

        if model is None:  # a model too large for the node is refused, not allocated
            agree(comm, lambda: checks.model_memory(cfg, self.dataset, self.dtype,
                                                    len(local_masks), self.device),
                  what="config")
        # Same seed everywhere gives the same initial weights; the broadcast makes it true
        # even across torch builds whose initialisers differ.
        seed_everything(cfg.run.seed)
        if model is None:
            model = build_model(cfg.model.name, self.dataset.input_shape,
                                self.dataset.num_classes, width=cfg.model.width,
                                depth=cfg.model.depth, dtype=self.dtype, init=cfg.model.init,
                                stem_pool=cfg.model.stem_pool)
        agree(comm, lambda: set_depth_penalty(model, cfg.model.depth_penalty), what="config")
        # Built on the host (the same initial weights on every device), then moved.
        self.layout = parallelize(model.to(device=self.device, dtype=self.dtype), self.gc, cfg,
                                  align=layer_alignment(cfg))
        self.straggler = Straggler()
        if cfg.run.straggler_spec:  # an emulated slow machine, for comparing schemes
            rank, factor = cfg.run.straggler_spec
            self.straggler.factor = factor if rank == self.rank else 1.0
        self.model = self.layout.module  # what the current phase trains
        if self.ps is not None:
            self.ps.connect(self)
        self.method = self._build(self.model)
        # Nested iteration trains the coarse levels first; otherwise one phase.
        self.phases = agree(comm, lambda: phases(self, cfg.multilevel), what="config")

        idx = agree(comm, lambda: checks.my_partition(cfg, self.dataset, self.dp_size,
                                                      self.dp_rank), what="config")
        x, y = agree(comm, lambda: self.dataset.read_train(idx), what="data")
        self.loader = ShardLoader(torch.from_numpy(x).to(self.device, self.dtype),
                                  torch.from_numpy(y).to(self.device),
                                  cfg.data.batch_size // self.dp_size, self.steps_per_epoch,
                                  cfg.data.shuffle, cfg.run.seed, self.dp_rank)

        self.step = 0
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.stopped_by: str | None = None
        name = comm.bcast(str(snapshot) if self.rank == 0 and snapshot is not None else None)
        if name is not None:  # rank 0 reads and checks it, the others receive
            meta = load_checkpoint(snapshot if self.rank == 0 else Snapshot(name, b""),
                                   self.net, self.optimizer, comm)
            self.step, self.resumed_from = meta["step"], name
        elif cfg.checkpoint.resume:
            self._resume()
        self.phases.start(self.step)

        self.run_dir: Path | None = None
        self.metrics = MetricsWriter(None, self.rank)
        if metrics:
            stamp = comm.bcast(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
                               if self.rank == 0 else None)
            self.run_dir = Path(cfg.run.out_dir) / f"run-{stamp}"
            self.metrics = agree(comm, lambda: MetricsWriter(self.run_dir / "metrics.jsonl",
                                                             self.rank), what="run.out_dir")


    def _build(self, model: torch.nn.Module, levels: int | None = None):
        """The configured optimizer for ``model`` (multilevel ones over ``levels`` levels).
        Collective on the trainer's communicator."""
        ctx = Context(self.cfg, self.layout, model, self.straggler, levels,
                      ps=self.ps.client if self.ps is not None else None)
        return agree(self.comm, lambda: build_method(ctx), what="config")

    # What the rest of the code and the tests see of the layout and the optimizer.
    net = property(lambda self: self.layout.net,
                   doc="The serial network (checkpoints, evaluation), whole on every rank.")
    lp = property(lambda self: self.layout.lp)
    pipe = property(lambda self: self.layout.pipe)
    chain = property(lambda self: self.layout.chain)
    optimizer = property(lambda self: self.method.state,
                         doc="What checkpoints hold of the optimizer (its state dict).")
    sync = property(lambda self: self.method.sync)
    hierarchy = property(lambda self: self.phases.hierarchy)
    phase = property(lambda self: self.phases.phase)
    level_steps = property(lambda self: self.phases.steps)

    def advance(self) -> torch.Tensor:
        """Trains one step (switching nested-iteration levels when due); returns the local
        loss. Collective on the trainer's communicator."""
        self.phases.before(self.step)
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        loss = self.train_step(*self.loader.batch(epoch, pos))
        self.step += 1
        self.phases.steps[self.phases.phase] += 1
        return loss

    def finish_phases(self) -> None:
        """Brings a nested run that stopped early to the full-depth network. Collective on
        the trainer's communicator."""
        self.phases.finish()

    def work(self) -> float:
        """Work so far in fine-gradient equivalents (coarse levels by their cost)."""
        return self.phases.work()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch (``x``, ``y``; trust region's
        ``tr.batch`` may take more of the partition); returns the local loss (detached).
        Collective on the grid's axes."""
        after = self.cfg.mgrit.exact_after
        self.layout.set_exact(bool(after) and self.step >= after)
        return self.method.step(Batches(self.loader, self.step, self.dp_size,
                                        self.dataset.num_train, fixed=(x, y)))

    # -- checkpoints ---------------------------------------------------------------------
    def _resume(self) -> None:
        step, path = resume(self.cfg.checkpoint.dir, self.net, self.optimizer, self.comm,
                            self.log)
        if path is not None:
            self.step, self.resumed_from = step, path

    def _gathered(self):
        """A context in which ``net`` and ``optimizer`` hold the whole run's state: every
        block and stage, and its optimizer state, from the rank that trains it; drifting
        replicas averaged. Collective on the trainer's communicator."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            with STATS.paused(), self.sync.consensus():
                self.layout.gather()
                self.layout.gather_state(self.optimizer, flat=self.method.flat_state)
                gather = getattr(self.optimizer, "gather_state", None)
                if gather is not None:  # state that lives on the ranks that compute it (APTS)
                    gather()
                yield
        return ctx()

    def save(self) -> str:
        """Writes a checkpoint of the current state. Collective on the trainer's
        communicator."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        with self._gathered():
            path = save_checkpoint(self.cfg.checkpoint.dir, self.net, self.optimizer,
                                   step=self.step, epoch=epoch, position=pos,
                                   config_text=to_toml(self.cfg), comm=self.comm,
                                   keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    def snapshot_bytes(self) -> bytes | None:
        """The checkpoint of the current state as HDF5 bytes on rank 0 (None elsewhere),
        for ``Trainer(snapshot=...)`` in another group. Collective on the trainer's
        communicator."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        with self._gathered():
            return checkpoint_bytes(self.net, self.optimizer, step=self.step, epoch=epoch,
                                    position=pos, config_text=to_toml(self.cfg),
                                    comm=self.comm)

    # -- training ------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs the remaining steps and returns the summary. Collective on the trainer's
        communicator."""
        if self.serving:  # the workers' summary, received when the run ended
            return self.summary
        try:
            self.summary = run_loop(self)
        except CollectiveError as e:  # the servers end with the same error, not a hang
            if self.ps is not None:
                self.ps.finish(e)
            raise
        return self.summary

    def evaluate(self) -> dict:
        """Loss and accuracy on the whole training set and the test set. Collective on the
        grid's axes. In a nested run's coarse phase, of the full-depth network with the
        coarse level's weights prolonged."""
        return evaluate(self.layout, self.model, self.sync, self.loader, self.dataset,
                        self.dtype, show=self.phases.show)

    def close(self) -> None:
        """Removes hooks and frees solvers and communicators. Collective on the trainer's
        communicator."""
        if self.serving:
            return
        self.method.close()
        self.layout.close()
        self.metrics.close()
        self.gc.free()
        if self.ps is not None:
            self.ps.finish(getattr(self, "summary", None))
