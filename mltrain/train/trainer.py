"""The Trainer: a run from a Config, end to end.

The flow is config -> grid -> layout (``parallelize``) -> optimizer (the registry in
``optimizers``) -> this loop; nothing here asks which layout or which optimizer it runs.
Everything that can fail because of user input (config against the rank count, dataset
files, checkpoints, memory) is checked with ``agree`` before the first training
collective, so a bad input ends every rank with the same message instead of a hang.
"""
from __future__ import annotations

import math
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.comm import (STATS, CollectiveError, Grid, agree, allreduce_, allreduce_scalar,
                          local_cpu_masks)
from mltrain.config import Config, ConfigError, parse_straggler, to_toml
from mltrain.data import (LABEL_PARTITIONS, ShardLoader, open_dataset, partition,
                          partition_options, steps_per_epoch)
from mltrain.io import (MetricsWriter, latest_checkpoint, load_checkpoint, prepare_folder,
                        save_checkpoint)
from mltrain.nn import build_model
from mltrain.optim.base import Batches, Context, Straggler
from mltrain.train.nested import Nested
from mltrain.train.optimizers import build_method, layer_alignment
from mltrain.train.parallelize import parallelize
from mltrain.train.signals import StopSignals
from mltrain.utils import (check_memory, get_logger, seed_everything, set_threads,
                           torch_dtype)

__all__ = ["Trainer", "StopSignals"]


class Trainer:
    """Builds everything a run needs from ``cfg`` on ``comm``.

    ``model`` replaces the one ``model.*`` describes: any ``torch.nn.Module`` that maps a
    batch of inputs (shape ``[b, *dataset.input_shape]``) to class logits. Its parameters are
    cast to ``run.dtype`` and overwritten with rank 0's, so every rank may build it alike.

    Collective on ``comm`` (construction, ``train`` and ``evaluate``).
    """

    def __init__(self, cfg: Config, comm: MPI.Comm = MPI.COMM_WORLD, *, quiet: bool = False,
                 metrics: bool = True, model: torch.nn.Module | None = None):
        self.cfg, self.comm, self.rank, self.quiet = cfg, comm, comm.Get_rank(), quiet
        self.log = get_logger(rank=self.rank)
        self.dtype = torch_dtype(cfg.run.dtype)

        self.grid = agree(comm, lambda: Grid.for_config(cfg, comm.Get_size()), what="config")
        if cfg.checkpoint.dir:  # unwritable or a file: found now, not after training
            agree(comm, lambda: prepare_folder(cfg.checkpoint.dir) if self.rank == 0 else None,
                  what="config")
        self.gc = self.grid.build(comm)
        self.dp_size, self.dp_rank = self.gc.data.Get_size(), self.gc.data.Get_rank()
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
        self.layout = parallelize(model.to(self.dtype), self.gc, cfg,
                                  align=layer_alignment(cfg))
        self.straggler = Straggler()
        if cfg.run.straggler:  # an emulated slow machine, for comparing schemes
            rank, factor = parse_straggler(cfg.run.straggler)
            self.straggler.factor = factor if rank == self.rank else 1.0
        self.model = self.layout.module  # what the current phase trains
        self.method = self._build(self.model)
        self.nested = (agree(comm, lambda: Nested(self, cfg.optim), what="config")
                       if cfg.optim.nested else None)

        idx = agree(comm, self._my_partition, what="config")
        x, y = agree(comm, lambda: self.dataset.read_train(idx), what="data")
        self.loader = ShardLoader(torch.from_numpy(x).to(self.dtype), torch.from_numpy(y),
                                  cfg.data.batch_size // self.dp_size, self.steps_per_epoch,
                                  cfg.data.shuffle, cfg.run.seed, self.dp_rank)

        self.step = 0
        self._run_steps = 0  # steps trained in this run (a resumed run counts from 0)
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.stopped_by: str | None = None
        if cfg.checkpoint.resume:
            self._resume()
        if self.nested is not None:
            self.nested.start(self.step)

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
        Collective."""
        ctx = Context(self.cfg, self.layout, model, self.straggler, levels)
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
    hierarchy = property(lambda self: self.nested.h if self.nested else None)
    phase = property(lambda self: self.nested.phase if self.nested else 0)
    level_steps = property(lambda self: self.nested.steps if self.nested else [self._run_steps])

    def advance(self) -> torch.Tensor:
        """Trains one step (switching nested-iteration levels when due); returns the local
        loss. Collective."""
        if self.nested is not None:
            self.nested.before(self.step)
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        loss = self.train_step(*self.loader.batch(epoch, pos))
        self.step += 1
        self._run_steps += 1
        if self.nested is not None:
            self.nested.steps[self.nested.phase] += 1
        return loss

    def finish_phases(self) -> None:
        """Brings a nested run that stopped early to the full-depth network. Collective."""
        if self.nested is not None:
            self.nested.finish()

    def work(self) -> float:
        """Work so far in fine-gradient equivalents (coarse levels by their cost)."""
        if self.nested is not None:
            return self.nested.work()
        return self.method.work(self._run_steps, self.cfg.data.batch_size,
                                self.dataset.num_train)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's batch (``x``, ``y``; trust region's
        ``optim.batch`` may take more of the partition); returns the local loss (detached).
        Collective on the grid's axes."""
        after = self.cfg.mgrit.exact_after
        self.layout.set_exact(bool(after) and self.step >= after)
        return self.method.step(Batches(self.loader, self.step, self.dp_size,
                                        self.dataset.num_train, fixed=(x, y)))

    # -- validation ----------------------------------------------------------------------
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
            # Every block and stage, and its optimizer state, from the rank that trains it.
            self.layout.gather()
            self.layout.gather_state(self.optimizer, flat=self.method.flat_state)
            path = save_checkpoint(self.cfg.checkpoint.dir, self.net, self.optimizer,
                                   step=self.step, epoch=epoch, position=pos,
                                   config_text=to_toml(self.cfg), comm=self.comm,
                                   keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = str(path)
        return self.last_checkpoint

    # -- training ------------------------------------------------------------------------
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
            "mgrit_residuals": self.layout.residuals,
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
        # Work in full-gradient equivalents: samples evaluated / training-set size (the
        # multilevel optimizers weigh each level by its cost).
        summary.update(self.method.report(self.dataset.num_train))
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
                if self.layout.chain is not None:  # MGRIT residual norms of the last step
                    extra["mgrit_residuals"] = self.layout.residuals
                if cfg.run.target_loss:  # the whole training set's loss, not the batch's
                    extra["train_loss"] = self.evaluate()["train_loss"]
                self.metrics.write(step=self.step, epoch=epoch, loss=mean,
                                   lr=self.method.lr,
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
            self.layout.gather()  # the whole network on every rank, evaluated serially
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
        """Removes hooks and frees solvers and communicators. Collective."""
        self.method.close()
        self.layout.close()
        self.metrics.close()
        self.gc.free()
