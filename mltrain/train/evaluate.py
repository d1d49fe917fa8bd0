"""Evaluation of the whole network on the training and test sets."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mltrain.comm import STATS, agree, allreduce_

__all__ = ["evaluate", "run_summary"]


@torch.no_grad()
def evaluate(layout, model, sync, loader, dataset, dtype: torch.dtype, show=None) -> dict:
    """Loss and accuracy of ``layout.net`` on the whole training set and the test set
    (each data rank takes its partition / a strided shard of the test set, then counts are
    summed); drifting replicas are evaluated at their average. ``model`` (the network
    being trained) is put in eval mode meanwhile; ``show`` (nested iteration) brings its
    averaged weights into ``layout.net`` first. Collective on the layout's axes."""
    model.eval()
    dcomm = layout.data
    rank, size = dcomm.Get_rank(), dcomm.Get_size()
    with STATS.paused(), sync.consensus():
        if show is not None:
            show()
        layout.gather()  # the whole network on every rank, evaluated serially
        train = _score(layout.net, loader.x, loader.y)
        test = (0.0, 0, 0)
        if dataset.num_test:
            test_idx = np.arange(rank, dataset.num_test, size)
            xt, yt = agree(dcomm, lambda: dataset.read_test(test_idx), what="data")
            device = loader.x.device
            test = _score(layout.net, torch.from_numpy(xt).to(device, dtype),
                          torch.from_numpy(yt).to(device))
        sums = torch.tensor([*train, *test], dtype=torch.float64)  # host: six counts for MPI
        allreduce_(sums, dcomm)
    tr_loss, tr_ok, tr_n, _, te_ok, te_n = sums.tolist()
    model.train()
    return {"train_loss": tr_loss / max(tr_n, 1), "train_accuracy": tr_ok / max(tr_n, 1),
            "test_accuracy": te_ok / te_n if te_n else None}


def _score(net, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096):
    loss, ok = 0.0, 0
    for i in range(0, len(x), chunk):
        out = net(x[i:i + chunk])
        loss += F.cross_entropy(out, y[i:i + chunk], reduction="sum").item()
        ok += int((out.argmax(1) == y[i:i + chunk]).sum())
    return loss, ok, len(x)


def run_summary(t, ev: dict, wall: float, comm_bytes: int, comm_calls: int, steps_run: int,
                reached_at: int | None) -> dict:
    """The run summary of trainer ``t`` after ``train`` (``ev``: its final evaluation).
    Not collective."""
    cfg = t.cfg
    return {
        "ranks": t.comm.Get_size(),
        "data_parallel": t.dp_size,
        "threads_per_rank": t.threads,
        "steps": t.step,
        "steps_this_run": steps_run,
        "epochs": t.step / t.steps_per_epoch,
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
        "level_steps": t.level_steps,
        "layer_parallel": t.grid.layer,
        "pipeline_stages": t.grid.pipe,
        "mgrit_residuals": t.layout.residuals,
        "fine_grad_evals": t.work(),
        "sync": cfg.sync.name,
        "compression": cfg.sync.compression,
        "comm_bytes": comm_bytes,
        "comm_calls": comm_calls,
        "checkpoint": t.last_checkpoint,
        "stopped_by": t.stopped_by,
        "resumed_from": t.resumed_from,
        "metrics": str(t.run_dir / "metrics.jsonl") if t.run_dir else None,
    }
