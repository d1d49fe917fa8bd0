"""The training loop of a Trainer: steps, logged losses, evaluations, periodic
checkpoints, the target loss, and the stop at a scheduler's signal."""
from __future__ import annotations

import math
import signal
import time

from mpi4py import MPI

from mltrain.comm import STATS, CollectiveError, allreduce_scalar
from mltrain.train.evaluate import run_summary
from mltrain.train.signals import StopSignals

__all__ = ["train"]


def train(t) -> dict:
    """Runs the remaining steps and returns the summary. Collective on the trainer's
    communicator."""
    from tqdm import tqdm

    cfg = t.cfg
    ckpt_every = cfg.checkpoint.every if cfg.checkpoint.dir else 0
    bar = tqdm(total=t.until, initial=t.step, unit="step", dynamic_ncols=True,
               disable=t.quiet or t.rank != 0, leave=False)
    bytes0, calls0 = STATS.snapshot()
    start_step = t.step
    t.model.train()
    t.stopped_by = None
    t0 = time.perf_counter()
    # The handlers stay until the summary is made: a signal after the last step (SLURM's
    # lead time may start there) must not kill one rank inside the final collectives. Only
    # the flag the ranks agreed on in the loop changes what happens next.
    with StopSignals() as signals:
        reached_at = _loop(t, signals, bar, bytes0, t0, ckpt_every)
        # A nested run stopped on a coarse level writes no checkpoint: resuming restarts
        # its coarse levels from their initial weights, as a periodic checkpoint would.
        coarse = t.phase > 0
        t.finish_phases()
        wall = time.perf_counter() - t0
        bar.close()
        comm_bytes, comm_calls = (a - b for a, b in zip(STATS.snapshot(), (bytes0, calls0)))
        if cfg.checkpoint.dir and not (t.stopped_by and coarse):
            t.save()
        if t.stopped_by:  # the scheduler's grace period is short: no evaluation
            ev = {"train_loss": None, "train_accuracy": None, "test_accuracy": None}
        else:
            ev = t.evaluate()
    summary = run_summary(t, ev, wall, comm_bytes, comm_calls,
                          t.step - start_step, reached_at)
    # Work in full-gradient equivalents: samples evaluated / training-set size (the
    # multilevel optimizers weigh each level by its cost).
    summary.update(t.method.report(t.dataset.num_train))
    t.metrics.write(event="eval", step=t.step, epoch=summary["epochs"],
                    train_loss=ev["train_loss"], test_accuracy=ev["test_accuracy"],
                    comm_bytes=comm_bytes, time=wall)
    t.metrics.write(event="summary", **summary)
    t.metrics.close()
    return summary


def _loop(t, signals: StopSignals, bar, bytes0: int, t0: float,
          ckpt_every: int) -> int | None:
    """The training steps; returns the step at which run.target_loss was reached (None
    if not). Stops early, on every rank at the same logged step (every run.log_every),
    once any rank received SIGTERM or SIGUSR1. Collective on the trainer's communicator."""
    cfg = t.cfg
    while _more(t):
        epoch = t.step // t.steps_per_epoch
        loss = t.advance()
        logged = t.step % cfg.run.log_every == 0 or t.step == t.until
        if logged:
            with STATS.paused():
                mean = allreduce_scalar(loss.item(), t.gc.data) / t.dp_size
            if not math.isfinite(mean):  # the same mean on every rank: all stop here
                raise CollectiveError(
                    f"the training loss is {mean} at step {t.step} (optim.name = "
                    f"{cfg.optim.name!r}): lower optim.lr (tr.radius for trust-region "
                    "methods), or train in run.dtype = 'float64'", "TrainingError", [])
            extra = {"consensus_distance": t.sync.distance()} if t.sync.drifts else {}
            extra.update(t.method.step_metrics())
            if t.layout.chain is not None:  # MGRIT residual norms of the last step
                extra["mgrit_residuals"] = t.layout.residuals
            if cfg.run.target_loss:  # the whole training set's loss, not the batch's
                extra["train_loss"] = t.evaluate()["train_loss"]
            t.metrics.write(step=t.step, epoch=epoch, loss=mean,
                            lr=t.method.lr,
                            time=time.perf_counter() - t0,
                            comm_bytes=STATS.bytes - bytes0, **extra)
            bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            if cfg.run.target_loss and extra["train_loss"] <= cfg.run.target_loss:
                bar.update(1)
                return t.step
        bar.update(1)
        if (cfg.run.eval_every and t.step % (cfg.run.eval_every * t.steps_per_epoch) == 0
                and t.step < t.until):
            ev = t.evaluate()
            t.metrics.write(event="eval", step=t.step,
                            epoch=t.step / t.steps_per_epoch,
                            train_loss=ev["train_loss"],
                            test_accuracy=ev["test_accuracy"],
                            comm_bytes=STATS.bytes - bytes0,
                            time=time.perf_counter() - t0)
        # A signal reaches ranks at different steps: they agree on it where they meet
        # anyway, at the logged steps (a collective every step would tie asynchronous
        # schemes to their slowest rank); the periodic checkpoint below then gives way to
        # the final one.
        got = 0
        if logged:
            with STATS.paused():
                got = t.comm.allreduce(signals.received, op=MPI.MAX)
        if got:
            t.stopped_by = signal.Signals(got).name
            t.metrics.write(event="stopped", step=t.step, signal=t.stopped_by)
            return None
        # Nested iteration writes checkpoints of the full-depth network only: a run
        # stopped before its finest phase starts over.
        if (ckpt_every and t.step % ckpt_every == 0 and t.step < t.until
                and t.phase == 0):
            t.save()
    return None


def _more(t) -> bool:
    """Whether to train another step: before ``t.until`` and, when a search stops the run
    at an amount of work (``t.until_work``), before that (the ranks agree on the largest
    count, so they stop together). Collective on the trainer's communicator when
    ``until_work`` is set."""
    if t.step >= t.until:
        return False
    if t.until_work is None:
        return True
    with STATS.paused():
        return t.comm.allreduce(t.work(), op=MPI.MAX) < t.until_work
