"""Layer 3: data-parallel synchronization schemes and gradient compression.

A scheme is a strategy object that the trainer calls at fixed points of every step
(``SyncStrategy``); choosing one never forks the trainer. ``build_sync`` makes the one a
config names.
"""
from __future__ import annotations

from mpi4py import MPI

from mltrain.sync.allreduce import AllReduce
from mltrain.sync.base import FlatParams, SyncStrategy, consensus_distance
from mltrain.sync.compression import build_compressor
from mltrain.sync.gossip import DPSGD, SGP, AsyncPushSum, PushSum, exponential_peers
from mltrain.sync.hierarchical import Hierarchical
from mltrain.sync.local import EASGD, LocalSGD

__all__ = ["SyncStrategy", "FlatParams", "consensus_distance", "AllReduce",
           "LocalSGD", "EASGD", "SGP", "DPSGD", "PushSum", "AsyncPushSum", "Hierarchical",
           "exponential_peers", "build_sync", "build_compressor"]


def build_sync(s, c, model, comm: MPI.Comm, *, seed: int = 0) -> SyncStrategy:
    """The scheme the ``[sync]`` section ``s`` names, with the ``[comm]`` section ``c``'s
    buckets, over the data-parallel communicator ``comm`` (``seed``: PowerSGD's start).

    Collective on ``comm`` (some schemes split communicators).
    """
    bucket = dict(bucket_bytes=int(c.bucket_mb * (1 << 20)),
                  views=c.grad_as_bucket_view, max_inflight=c.max_inflight)
    if s.name == "allreduce":
        comp = build_compressor(s.compression, comm, topk_ratio=s.topk_ratio, rank=s.rank,
                                seed=seed)
        return AllReduce(model, comm, compressor=comp, **bucket)
    if s.name == "localsgd":
        return LocalSGD(model, comm, period=s.period, warmup_steps=s.warmup_steps, **bucket)
    if s.name == "easgd":
        return EASGD(model, comm, alpha=s.alpha, period=s.period)
    if s.name == "sgp":
        return SGP(model, comm, asynchronous=s.asynchronous)
    if s.name == "dpsgd":
        return DPSGD(model, comm)
    if s.name == "hierarchical":
        return Hierarchical(model, comm, period=s.period, ranks_per_node=s.ranks_per_node,
                            **bucket)
    if s.name == "ps":  # servers are ranks of their own: the Trainer sets them up
        raise ValueError("sync.name = 'ps': parameter servers run through the Trainer "
                         "(mltrain.train.ps), not as a scheme on a data communicator")
    raise ValueError(f"sync.name: unknown scheme {s.name!r}")
