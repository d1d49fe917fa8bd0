"""Model-parallel ownership: parameters (and their optimizer state) split over the ranks of
an axis, each on its owner, brought to every rank for checkpoints and evaluation."""
from __future__ import annotations

import torch
from mpi4py import MPI

from mltrain.comm.collectives import broadcast_

__all__ = ["gather_params", "gather_state"]


@torch.no_grad()
def gather_params(groups: list[list[torch.nn.Parameter]], comm: MPI.Comm) -> None:
    """``groups[r]``: the parameters rank r owns (the same lists on every rank). Copies each
    group from its owner to every rank, one broadcast per rank. Collective on ``comm``."""
    me = comm.Get_rank()
    for r, params in enumerate(groups):
        if not params:
            continue
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        broadcast_(flat, comm, root=r)
        if r != me:
            off = 0
            for p in params:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()


def gather_state(optimizer: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]],
                 comm: MPI.Comm) -> None:
    """Brings the optimizer state (momentum, Adam moments) of ``groups[r]`` from rank r to
    every rank, so a checkpoint from any rank holds all of it. Collective on ``comm``."""
    me = comm.Get_rank()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(params)}
    for r, group in enumerate(groups):
        owned = [index[id(p)] for p in group if id(p) in index]
        meta = None
        if r == me:  # small metadata by pickle; tensors as raw buffers
            meta = [(i, k, (tuple(v.shape), str(v.dtype).split(".")[1], v.is_cpu)
                     if isinstance(v, torch.Tensor) else v)
                    for i in owned for k, v in optimizer.state[params[i]].items()]
        for i, k, v in comm.bcast(meta, root=r):
            if isinstance(v, tuple):
                # Where the owner keeps it: with the parameter, except what torch keeps on
                # the host for device parameters too (Adam's step count).
                device = "cpu" if v[2] else params[i].device
                t = (optimizer.state[params[i]][k].contiguous() if r == me else
                     torch.empty(v[0], dtype=getattr(torch, v[1]), device=device))
                broadcast_(t, comm, root=r)
                v = t
            if r != me:
                optimizer.state[params[i]][k] = v
