"""The Trainer: data-parallel training from a Config, end to end.

Everything that can fail because of user input (config against the rank count, dataset
files, checkpoints) is checked with ``agree`` before the first training collective, so a
bad input ends every rank with the same message instead of a hang.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.comm import (STATS, CollectiveError, GradReducer, Grid, agree, allreduce_,
                          allreduce_scalar, broadcast_parameters, local_cpu_masks)
from mltrain.config import Config, ConfigError, parse_balance, parse_straggler, to_toml
from mltrain.data import (LABEL_PARTITIONS, ShardLoader, open_dataset, partition,
                          partition_options, steps_per_epoch)
from mltrain.io import (MetricsWriter, latest_checkpoint, load_checkpoint, prepare_folder,
                        save_checkpoint)
from mltrain.mgrit import LayerParallel
from mltrain.pipeline import LayeredPipeline, Pipeline, sequential_layers
from mltrain.multilevel import RMTR, Hierarchy, MGOpt
from mltrain.nn import build_model
from mltrain.optim import build_optimizer
from mltrain.optim.tr import TrustRegion
from mltrain.sync import SyncStrategy, build_sync
from mltrain.utils import (check_memory, get_logger, seed_everything, set_threads,
                           torch_dtype)

__all__ = ["Trainer", "StopSignals"]

# What SLURM sends: SIGTERM at the time limit (SIGKILL follows after KillWait, 30 s by
# default) and, with `sbatch --signal=USR1@SECONDS`, SIGUSR1 that long before it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While active, SIGTERM and SIGUSR1 are recorded instead of ending the process, so the
    training loop finishes its step, writes a checkpoint and exits. Not collective (the
    loop agrees on the flag). Only the main thread can install handlers; elsewhere this
    does nothing."""

    def __init__(self):
        self.received = 0
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()


class Trainer:
    """Builds everything a run needs from ``cfg`` on ``comm``.

    ``model`` replaces the one ``model.*`` describes: any ``torch.nn.Module`` that maps a
    batch of inputs (shape ``[b, *dataset.input_shape]``) to class logits. Its parameters are
    cast to ``run.dtype`` and overwritten with rank 0's, so every rank may build it alike.

    Collective on ``comm`` (construction, ``train`` and ``evaluate``).
    """

    def __init__(self, cfg: Config, comm: MPI.Comm = MPI.COMM_WORLD, *, quiet: bool = False,
                 metrics: bool = True, model: torch.nn.Module | None = None):
        self.cfg = cfg
        self.comm = comm
        self.rank = comm.Get_rank()
        self.quiet = quiet
        self.log = get_logger(rank=self.rank)
        self.dtype = torch_dtype(cfg.run.dtype)

        self.grid = agree(comm, self._check_grid, what="config")
        if cfg.checkpoint.dir:  # unwritable or a file: found now, not after training
            agree(comm, lambda: prepare_folder(cfg.checkpoint.dir) if self.rank == 0 else None,
                  what="config")
        self.gc = self.grid.build(comm)
        dcomm = self.gc.data
        self.dp_size, self.dp_rank = dcomm.Get_size(), dcomm.Get_rank()
        local_masks = local_cpu_masks(comm)
        self.threads = set_threads(cfg.run.threads, local_masks)

        self.dataset = agree(comm, lambda: open_dataset(cfg.data.name, cfg.data.path,
                                                        cfg.data.num_samples), what="data")
        self.steps_per_epoch = agree(comm, self._check_sizes, what="config")
        self.total_steps = cfg.run.steps or cfg.run.epochs * self.steps_per_epoch

        if model is None:  # a model too large for the node is refused, not allocated
            agree(comm, lambda: self._check_model_memory(len(local_masks)), what="config")
        # Same seed everywhere gives the same initial weights; the broadcast makes it true
        # even across torch builds whose initialisers differ.
        seed_everything(cfg.run.seed)
        if model is None:
            model = build_model(cfg.model.name, self.dataset.input_shape,
                                self.dataset.num_classes, width=cfg.model.width,
                                depth=cfg.model.depth, dtype=self.dtype)
        self.model = model.to(self.dtype)
        self.lp: LayerParallel | None = None
        mgrit = cfg.mgrit.solver()
        if cfg.parallel.layer > 1 and cfg.parallel.pipe == 1:
            o = cfg.optim
            # RMTR's coarse levels split where the finest does: align to its hierarchy.
            align = o.cf ** (o.levels - 1) if o.name == "rmtr" else 1
            self.lp = agree(comm, lambda: LayerParallel(
                self.model, self.gc.comms["layer"], align=align, **mgrit), what="config")
            self.model = self.lp
        self.pipe: Pipeline | None = None
        if cfg.parallel.pipe > 1 and cfg.parallel.layer > 1:  # stages layer-parallel
            p = cfg.pipeline
            self.pipe = agree(comm, lambda: LayeredPipeline(
                self.model, self.gc.comms["pipe"], self.gc.comms["layer"],
                microbatches=p.microbatches, schedule=p.schedule,
                balance=parse_balance(p.balance), **mgrit), what="config")
            self._layers = self.pipe.segments
        elif cfg.parallel.pipe > 1:
            p = cfg.pipeline
            self._layers = agree(comm, lambda: sequential_layers(self.model), what="config")
            self.pipe = agree(comm, lambda: Pipeline(
                self._layers, self.gc.comms["pipe"], microbatches=p.microbatches,
                schedule=p.schedule, balance=parse_balance(p.balance)), what="config")
        # Layer ranks and pipeline stages hold replicas of the whole network too: the same
        # weights everywhere.
        broadcast_parameters(self.model, comm if self.lp or self.pipe else dcomm)
        self._pipe_reducer: GradReducer | None = None
        self.optimizer, self.sync = self._optimizer_and_sync(self.model)
        self.hierarchy = None
        if cfg.optim.nested:
            o = cfg.optim
            self.hierarchy = agree(comm, lambda: Hierarchy(self.model, o.levels, o.cf,
                                                           o.transfer, o.prolongation),
                                   what="config")
        self.level_steps = [0] * (cfg.optim.levels if cfg.optim.nested else 1)
        self.coarse_work = 0.0  # nested iteration: work of the levels already trained
        self._fine = (self.optimizer, self.sync)
        self.phase = 0

        idx = agree(comm, self._my_partition, what="config")
        x, y = agree(comm, lambda: self.dataset.read_train(idx), what="data")
        self.loader = ShardLoader(torch.from_numpy(x).to(self.dtype), torch.from_numpy(y),
                                  cfg.data.batch_size // self.dp_size, self.steps_per_epoch,
                                  cfg.data.shuffle, cfg.run.seed, self.dp_rank)

        self.slowdown = 1.0  # run.straggler: this rank's compute takes this many times longer
        if cfg.run.straggler:
            rank, factor = parse_straggler(cfg.run.straggler)
            self.slowdown = factor if rank == self.rank else 1.0

        self.step = 0
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        if cfg.checkpoint.resume:
            self._resume()
        if self._phase_of(self.step) > 0:  # nested iteration starts on the coarsest level
            self.phase = len(self.level_steps)
            self._enter_phase(self._phase_of(self.step))

        self.run_dir: Path | None = None
        self.metrics = MetricsWriter(None, self.rank)
        if metrics:
            stamp = comm.bcast(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
                               if self.rank == 0 else None)
            self.run_dir = Path(cfg.run.out_dir) / f"run-{stamp}"
            self.metrics = agree(comm, lambda: MetricsWriter(self.run_dir / "metrics.jsonl",
                                                             self.rank), what="run.out_dir")

    @property
    def net(self) -> torch.nn.Module:
        """The serial network being trained (checkpoints, evaluation): the model, or the
        one a layer-parallel wrapper holds."""
        return self.lp.model if self.lp is not None else self.model

    @property
    def chain(self) -> LayerParallel | None:
        """Where this rank runs MGRIT: the layer-parallel model, or its layer-parallel
        pipeline stage (None without a layer axis)."""
        if self.lp is not None:
            return self.lp
        return self.pipe.lp if isinstance(self.pipe, LayeredPipeline) else None

    def _optimizer_and_sync(self, model, levels: int | None = None):
        """The configured optimizer and synchronization scheme for ``model``; multilevel
        optimizers get ``levels`` levels (default optim.levels). Collective."""
        o, comm, dcomm = self.cfg.optim, self.comm, self.gc.data
        tr = dict(radius=o.radius, radius_max=o.radius_max, eta1=o.eta1, eta2=o.eta2,
                  gamma1=o.gamma1, gamma2=o.gamma2, curvature=o.curvature,
                  ksp_type=o.ksp_type, max_it=o.max_it, memory=o.memory,
                  grow_after=o.grow_after if o.batch == "hybrid" else 0)
        if self.pipe is not None:
            opt = build_optimizer(o.name, model.parameters(), lr=o.lr, momentum=o.momentum,
                                  weight_decay=o.weight_decay)
            # Micro-batches accumulate the stage's gradients; they are averaged over the
            # data axis once, after the step's last backward (no hooks armed).
            c = self.cfg.comm
            self._pipe_reducer = (GradReducer(
                list(self.pipe.parameters()), dcomm, int(c.bucket_mb * 2 ** 20),
                grad_as_bucket_view=False, max_inflight=c.max_inflight)
                if self.dp_size > 1 else None)
            return opt, SyncStrategy(model, dcomm)
        # Second order and multilevel: they average their own gradients and products.
        if o.name == "tr":
            if self.lp is not None and model is self.lp:  # weight space over the layer axis
                lp = self.lp
                opt = agree(comm, lambda: TrustRegion(
                    lp.vector_parameters(), dcomm, layer_comm=lp.comm,
                    after_set=lp.sync_replicated, **tr), what="config")
            else:
                opt = agree(comm, lambda: TrustRegion(model.parameters(), dcomm, **tr),
                            what="config")
            return opt, SyncStrategy(model, dcomm)
        if o.name in ("rmtr", "mgopt"):
            def build():
                layered = self.lp is not None and model is self.lp
                h = Hierarchy(self.lp.model if layered else model, levels or o.levels, o.cf,
                              o.transfer, o.prolongation)
                common = dict(pre_smooth=o.pre_smooth, post_smooth=o.post_smooth,
                              coarse_iters=o.coarse_iters)
                if o.name == "rmtr":
                    return RMTR(h, dcomm, cycle=o.cycle, kappa=o.kappa,
                                layered=self._layered_levels(h) if layered else None,
                                **common, **tr)
                return MGOpt(h, dcomm, lr=o.lr, smoother=o.smoother, momentum=o.momentum,
                             tr=tr, **common)
            return agree(comm, build, what="config"), SyncStrategy(model, dcomm)
        opt = build_optimizer(o.name, model.parameters(), lr=o.lr, momentum=o.momentum,
                              weight_decay=o.weight_decay)
        # Layer-parallel: each rank reduces the gradients of what it trains, nothing else.
        synced = self.lp.local_modules() if self.lp is not None and model is self.lp else model
        return opt, agree(comm, lambda: build_sync(self.cfg, synced, dcomm), what="config")

    def _layered_levels(self, h: Hierarchy) -> list[LayerParallel]:
        """One LayerParallel per level of ``h``: the finest is the run's, each coarse one
        splits its blocks where the finest does."""
        return [self.lp] + [self.lp.sibling(h.models[lv], h.cf ** lv)
                            for lv in range(1, h.levels)]

    # -- nested iteration ----------------------------------------------------------------
    def _phase_of(self, step: int) -> int:
        """The nested-iteration level that trains step ``step``: run.steps is shared
        equally, coarsest first; 0 without nested iteration."""
        if self.hierarchy is None:
            return 0
        L = self.hierarchy.levels
        return max(L - 1 - step // max(self.total_steps // L, 1), 0)

    def _enter_phase(self, level: int) -> None:
        """Switches training to level ``level`` of the nested hierarchy: the current
        level's work is banked, its weights prolonged down to ``level``, a fresh optimizer
        built (the finest level's is the one built at start). Collective."""
        h = self.hierarchy
        if self.phase < h.levels:  # not the very first entry
            self.coarse_work += self._work(self.level_steps[self.phase]) * h.cost[self.phase]
            self.sync.close()
            if hasattr(self.optimizer, "close"):
                self.optimizer.close()
            for lv in range(self.phase - 1, level - 1, -1):
                h.prolong_to(lv)
        self.phase = level
        self.model = h.models[level]
        if level == 0:
            self.optimizer, self.sync = self._fine
        else:  # a multilevel optimizer uses the levels below this one
            self.optimizer, self.sync = self._optimizer_and_sync(self.model, h.levels - level)
        self.model.train()

    def advance(self) -> torch.Tensor:
        """Trains one step (switching nested-iteration levels when due); returns the local
        loss. Collective."""
        want = self._phase_of(self.step)
        if want != self.phase:
            self._enter_phase(want)
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        loss = self.train_step(*self.loader.batch(epoch, pos))
        self.step += 1
        self.level_steps[self.phase] += 1
        return loss

    def finish_phases(self) -> None:
        """Brings a nested run that stopped early to the full-depth network. Collective."""
        if self.phase > 0:
            self._enter_phase(0)

    def work(self) -> float:
        """Work so far in fine-gradient equivalents (coarse levels by their cost)."""
        cost = self.hierarchy.cost[self.phase] if self.hierarchy is not None else 1.0
        return self.coarse_work + self._work(self.level_steps[self.phase]) * cost

    def _work(self, steps: int) -> float:
        """The current optimizer's work, in gradient equivalents of its own network:
        counted samples for trust-region and multilevel optimizers (every level by its cost),
        ``steps`` batches for first-order methods."""
        if hasattr(self.optimizer, "work"):
            return self.optimizer.work(self.dataset.num_train)
        return steps * self.cfg.data.batch_size / self.dataset.num_train

    # -- validation ----------------------------------------------------------------------
    def _check_grid(self) -> Grid:
        return Grid.for_config(self.cfg, self.comm.Get_size())

    def _check_model_memory(self, share: int) -> None:
        """ConfigError when the configured model, its gradients and optimizer state would
        not fit in this rank's share of the node's available memory (sized on the meta
        device: nothing is allocated)."""
        c = self.cfg
        with torch.device("meta"):
            m = build_model(c.model.name, self.dataset.input_shape, self.dataset.num_classes,
                            width=c.model.width, depth=c.model.depth, dtype=self.dtype)
        nbytes = sum(p.numel() for p in m.parameters()) * self.dtype.itemsize
        # Parameters and gradients, plus what the optimizer keeps per parameter.
        copies = {"sgd": 1, "adam": 2}.get(c.optim.name, 2 * c.optim.memory + 2)
        check_memory(nbytes * (2 + copies), f"model.width = {c.model.width}, model.depth = "
                     f"{c.model.depth} ({nbytes / 2 ** 20:.0f} MiB of parameters)",
                     share=share, error=ConfigError)

    def _check_sizes(self) -> int:
        b = self.cfg.data.batch_size
        spe = steps_per_epoch(self.dataset.num_train, b)
        if spe < 1:
            raise ConfigError(f"data.batch_size: {b} is larger than the training set "
                              f"({self.dataset.num_train} samples)")
        return spe

    def _my_partition(self):
        d = self.cfg.data
        labels = (self.dataset.train_labels() if d.partition in LABEL_PARTITIONS else None)
        return partition(self.dataset.num_train, self.dp_size, self.dp_rank, d.partition,
                         self.cfg.run.seed, labels, **partition_options(d))

    # -- checkpoints ---------------------------------------------------------------------
    def _resume(self) -> None:
        folder = self.cfg.checkpoint.dir
        path = self.comm.bcast(latest_checkpoint(folder) if self.rank == 0 else None)
        if path is None:
            self.log.info(f"checkpoint.resume: no checkpoint in {folder}; starting fresh")
            return
        meta = load_checkpoint(path, self.net, self.optimizer, self.comm)
        self.step = meta["step"]
        self.resumed_from = str(path)
        self.log.info(f"resumed from {path} at step {self.step}")
        if meta["world_size"] != self.comm.Get_size() and self.rank == 0:
            self.log.warning(f"{path} was written by {meta['world_size']} ranks, this job has "
                             f"{self.comm.Get_size()}: parameters and optimizer state are "
                             "restored, but partitions and RNG streams differ, so the run will "
                             "not be bit-identical to an uninterrupted one")

    def save(self) -> str:
        """Writes a checkpoint of the current state. Collective on the world communicator."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        with STATS.paused(), self.sync.consensus():  # drifting replicas: their average
            if self.lp is not None:  # every block and its optimizer state from its owner
                self.lp.gather()
                if not getattr(self.optimizer, "flat_state", False):  # else replicated
                    self.lp.gather_state(self.optimizer)
            if self.pipe is not None:  # every stage and its optimizer state likewise
                self.pipe.gather(self._layers)
                self.pipe.gather_state(self.optimizer, self._layers)
            path = save_checkpoint(self.cfg.checkpoint.dir, self.net, self.optimizer,
                                   step=self.step, epoch=epoch, position=pos,
                                   config_text=to_toml(self.cfg), comm=self.comm,
                                   keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    # -- training ------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the local loss (detached).

        Collective on the data axis.
        """
        if self.pipe is not None:
            return self._pipeline_step(x, y)
        if hasattr(self.optimizer, "tr_step"):  # trust region, RMTR, MG/OPT
            x, y, weight = self._tr_batch(x, y)
            return torch.tensor(self.optimizer.tr_step(self.model, F.cross_entropy, x, y,
                                                       weight))
        self.sync.before_forward(self.step)
        self._exact_sweeps()
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.slowdown > 1.0:  # an emulated slow machine, for comparing schemes
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
        self.sync.after_backward(self.step)
        self.optimizer.step()
        self.sync.after_step(self.step)
        return loss.detach()

    def _exact_sweeps(self) -> None:
        """MGRIT or exact sweeps for this step (``mgrit.exact_after``)."""
        if self.chain is not None:
            after = self.cfg.mgrit.exact_after
            self.chain.exact = bool(after) and self.step >= after

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One pipelined step: the stage's gradients, averaged over the data axis, then the
        optimizer. Collective on the pipe and data axes."""
        self.optimizer.zero_grad(set_to_none=True)
        self._exact_sweeps()
        loss = self.pipe.step(x, y)
        if self._pipe_reducer is not None:
            self._pipe_reducer.reduce()
        self.optimizer.step()
        return torch.tensor(loss)

    def _tr_batch(self, x, y):
        """The trust-region step's data: the mini-batch, the whole partition (full), or
        ``batch_factor`` consecutive mini-batches (hybrid). Returns (x, y, weight) where
        weight = local samples x ranks / global samples (1 for equal shares)."""
        mode = self.cfg.optim.batch
        f = self.optimizer.batch_factor if mode == "hybrid" else 1
        spe = self.steps_per_epoch
        if mode == "full" or f >= spe:
            x, y = self.loader.x, self.loader.y
            return x, y, len(x) * self.dp_size / self.dataset.num_train
        if f > 1:
            epoch, pos = divmod(self.step, spe)
            parts = [self.loader.batch(epoch, (pos + j) % spe) for j in range(f)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return x, y, 1.0

    def train(self) -> dict:
        """Runs the remaining steps and returns the summary. Collective."""
        from tqdm import tqdm

        cfg = self.cfg
        ckpt_every = cfg.checkpoint.every if cfg.checkpoint.dir else 0
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or self.rank != 0, leave=False)
        bytes0, calls0 = STATS.snapshot()
        start_step = self.step
        self.model.train()
        self.stopped_by: str | None = None
        t0 = time.perf_counter()
        with StopSignals() as signals:
            reached_at = self._loop(signals, bar, bytes0, t0, ckpt_every)
        self.finish_phases()
        wall = time.perf_counter() - t0
        bar.close()
        comm_bytes, comm_calls = (a - b for a, b in zip(STATS.snapshot(), (bytes0, calls0)))
        if cfg.checkpoint.dir:
            self.save()
        if self.stopped_by:  # the scheduler's grace period is short: no evaluation
            ev = {"train_loss": None, "train_accuracy": None, "test_accuracy": None}
        else:
            ev = self.evaluate()
        steps_run = self.step - start_step
        summary = {
            "ranks": self.comm.Get_size(),
            "data_parallel": self.dp_size,
            "threads_per_rank": self.threads,
            "steps": self.step,
            "steps_this_run": steps_run,
            "epochs": self.step / self.steps_per_epoch,
            "final_loss": ev["train_loss"],
            "train_accuracy": ev["train_accuracy"],
            "test_accuracy": ev["test_accuracy"],
            "wall_s": wall,
            "samples_per_s": steps_run * cfg.data.batch_size / wall if wall > 0 else 0.0,
            "target_loss": cfg.run.target_loss or None,
            "target_reached": (ev["train_loss"] <= cfg.run.target_loss
                               if cfg.run.target_loss and ev["train_loss"] is not None
                               else None),
            "target_reached_at_step": reached_at,
            "level_steps": self.level_steps,
            "layer_parallel": self.grid.layer,
            "pipeline_stages": self.grid.pipe,
            "mgrit_residuals": dict(self.chain.residuals) if self.chain is not None else None,
            "fine_grad_evals": self.work(),
            "sync": cfg.sync.name,
            "compression": cfg.sync.compression,
            "comm_bytes": comm_bytes,
            "comm_calls": comm_calls,
            "checkpoint": self.last_checkpoint,
            "stopped_by": self.stopped_by,
            "resumed_from": self.resumed_from,
            "metrics": str(self.run_dir / "metrics.jsonl") if self.run_dir else None,
        }
        if hasattr(self.optimizer, "report"):
            # Work in full-gradient equivalents: samples evaluated / training-set size (the
            # multilevel optimizers weigh each level by its cost).
            summary.update(self.optimizer.report(self.dataset.num_train))
        self.metrics.write(event="eval", step=self.step, epoch=summary["epochs"],
                           train_loss=ev["train_loss"], test_accuracy=ev["test_accuracy"],
                           comm_bytes=comm_bytes, time=wall)
        self.metrics.write(event="summary", **summary)
        self.metrics.close()
        return summary

    def _loop(self, signals: StopSignals, bar, bytes0: int, t0: float,
              ckpt_every: int) -> int | None:
        """The training steps; returns the step at which run.target_loss was reached (None
        if not). Stops early, on every rank at the same step, once any rank received
        SIGTERM or SIGUSR1. Collective."""
        cfg = self.cfg
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            loss = self.advance()
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                with STATS.paused():
                    mean = allreduce_scalar(loss.item(), self.gc.data) / self.dp_size
                if not math.isfinite(mean):  # the same mean on every rank: all stop here
                    raise CollectiveError(
                        f"the training loss is {mean} at step {self.step} (optim.name = "
                        f"{cfg.optim.name!r}, optim.lr = {cfg.optim.lr:g}): lower optim.lr"
                        + (" or optim.radius" if cfg.optim.name in ("tr", "rmtr") else "")
                        + ", or train in run.dtype = 'float64'", "TrainingError", [])
                extra = {"consensus_distance": self.sync.distance()} if self.sync.drifts else {}
                if self.chain is not None:  # MGRIT residual norms, per iteration, last step
                    extra["mgrit_residuals"] = dict(self.chain.residuals)
                if cfg.run.target_loss:  # the whole training set's loss, not the batch's
                    extra["train_loss"] = self.evaluate()["train_loss"]
                self.metrics.write(step=self.step, epoch=epoch, loss=mean,
                                   lr=self.optimizer.param_groups[0]["lr"],
                                   time=time.perf_counter() - t0,
                                   comm_bytes=STATS.bytes - bytes0, **extra)
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                if cfg.run.target_loss and extra["train_loss"] <= cfg.run.target_loss:
                    bar.update(1)
                    return self.step
            bar.update(1)
            if (cfg.run.eval_every and self.step % (cfg.run.eval_every * self.steps_per_epoch) == 0
                    and self.step < self.total_steps):
                ev = self.evaluate()
                self.metrics.write(event="eval", step=self.step,
                                   epoch=self.step / self.steps_per_epoch,
                                   train_loss=ev["train_loss"],
                                   test_accuracy=ev["test_accuracy"],
                                   comm_bytes=STATS.bytes - bytes0,
                                   time=time.perf_counter() - t0)
            # A signal reaches ranks at different steps: they agree after every step
            # (one integer; the periodic checkpoint below is then skipped for the final one).
            with STATS.paused():
                got = self.comm.allreduce(signals.received, op=MPI.MAX)
            if got:
                self.stopped_by = signal.Signals(got).name
                self.metrics.write(event="stopped", step=self.step, signal=self.stopped_by)
                return None
            # Nested iteration writes checkpoints of the full-depth network only: a run
            # stopped before its finest phase starts over.
            if (ckpt_every and self.step % ckpt_every == 0 and self.step < self.total_steps
                    and self.phase == 0):
                self.save()
        return None

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and accuracy on the whole training set and the test set (each rank takes
        its partition / a strided shard, then counts are summed). Collective on data axis."""
        self.model.eval()
        dcomm = self.gc.data
        x, y = self.loader.x, self.loader.y
        with STATS.paused(), self.sync.consensus():  # drifting replicas: their average
            if self.lp is not None:  # the whole network on every rank, evaluated serially
                self.lp.gather()
            if self.pipe is not None:
                self.pipe.gather(self._layers)
            train = self._score(x, y)
            test = (0.0, 0, 0)
            if self.dataset.num_test:
                test_idx = np.arange(self.dp_rank, self.dataset.num_test, self.dp_size)
                xt, yt = agree(dcomm, lambda: self.dataset.read_test(test_idx), what="data")
                test = self._score(torch.from_numpy(xt).to(self.dtype), torch.from_numpy(yt))
            sums = torch.tensor([*train, *test], dtype=torch.float64)
            allreduce_(sums, dcomm)
        tr_loss, tr_ok, tr_n, _, te_ok, te_n = sums.tolist()
        self.model.train()
        return {"train_loss": tr_loss / max(tr_n, 1), "train_accuracy": tr_ok / max(tr_n, 1),
                "test_accuracy": te_ok / te_n if te_n else None}

    def _score(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
        loss, ok = 0.0, 0
        for i in range(0, len(x), chunk):
            out = self.net(x[i:i + chunk])
            loss += F.cross_entropy(out, y[i:i + chunk], reduction="sum").item()
            ok += int((out.argmax(1) == y[i:i + chunk]).sum())
        return loss, ok, len(x)

    def close(self) -> None:
        """Removes hooks and frees communicators. Collective."""
        self.sync.close()
        if self._pipe_reducer is not None:
            self._pipe_reducer.remove()
        if hasattr(self.optimizer, "close"):
            self.optimizer.close()
        self.metrics.close()
        self.gc.free()
