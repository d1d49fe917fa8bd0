"""The planner's cost model: hardware, a model's per-layer profile, and the predicted step
time and memory of a decomposition (data x pipe, micro-batches, stage boundaries). Pure
arithmetic; not collective.

Terms (each a function, each tested against hand-computed values):
- point-to-point transfer: latency + bytes / bandwidth (intra- or inter-node);
- gradient allreduce over D ranks: the faster of ring, 2 (D-1)/D bytes/bw + 2 (D-1)
  latency, and tree, 2 ceil(log2 D) (latency + bytes/bw);
- a pipeline of S stages and M micro-batches: (M + S - 1) times the slowest stage's time
  per micro-batch (the bubble is (S - 1) / (M + S - 1) of it), a stage's time being its
  layers' forward and backward plus sending its output forward and receiving its gradient;
- memory per rank: parameters, gradients and optimizer state of its stage, plus the
  activations of the micro-batches in flight (M for GPipe, S - s for 1F1B);
- oversubscription: when more ranks share a node than it has cores, each rank gets
  cores / ranks of one for the whole step (an MPI rank that waits polls, so waiting does not
  free its core): the step takes ranks / cores times longer;
- hand-overs on shared cores: 1F1B alternates forwards and backwards, so in its steady
  state each of the 2 (M - 1) micro-batch passes after the first waits for the neighbouring
  stage's message, produced just before. With a core per rank that wait is the link's
  latency (in the stage time above); with cores shared the waiting rank must be scheduled
  again, which costs ``handover_s`` (measured by ``bench hardware``) each time. GPipe's
  passes queue up behind each other and do not wait so. A layer-parallel stage (MGRIT)
  waits so at each neighbour message and broadcast of its solves
  (``mltrain.mgrit.model.waits``), in each of the pipeline's M + S - 1 stage passes.
  The gradient allreduce waits so when its D ranks on a node outnumber the node's C cores:
  they cannot all run at once, and at each of its 2 ceil(log2 D) exchange steps (recursive
  halving and doubling, what MPI libraries use for gradient-sized messages) the partner is
  not running with probability (D - C) / (D - 1) (the other ranks share the C - 1 cores
  besides the rank's own evenly), and must first be scheduled.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from mltrain.config import ConfigError, read_text

__all__ = ["Hardware", "Profile", "p2p_time", "allreduce_time", "bubble_fraction",
           "pipeline_time", "extra_waits", "reduce_waits", "handover_time", "stage_memory",
           "load_hardware"]

# Fields a hardware file may leave out (their defaults: a core per rank, no hand-over cost).
OPTIONAL = ("cores_per_node", "handover_s")


@dataclass(frozen=True)
class Hardware:
    """A machine: ``nodes`` of ``ranks_per_node``; ``memory_per_rank`` bytes;
    ``compute_speed`` relative to the machine the profile was measured on (2 = twice as
    fast); bandwidths in bytes/s and latencies in s, within a node and between nodes;
    ``cores_per_node`` (optional; 0: at least one core or accelerator per rank) for runs
    with more ranks on a node than cores; ``handover_s`` (optional, s): what a pipeline
    stage's wait for its neighbour's message costs beyond the latency when the node's cores
    are shared (0 with a core per rank)."""
    ranks_per_node: int
    nodes: int
    memory_per_rank: float
    compute_speed: float
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    cores_per_node: int = 0
    handover_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"hardware.{f.name}: expected a number, got {v!r}")
            zero_ok = f.name.endswith("latency") or f.name in OPTIONAL
            if zero_ok and v < 0 or not zero_ok and v <= 0:
                raise ConfigError(f"hardware.{f.name}: impossible value {v!r}")
        for name in ("ranks_per_node", "nodes", "cores_per_node"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ConfigError(f"hardware.{name}: must be a whole number")

    @property
    def ranks(self) -> int:
        return int(self.ranks_per_node * self.nodes)

    def oversubscription(self, ranks: int) -> float:
        """How many times longer a step takes because ``ranks`` ranks (filling nodes in
        order) share a node's cores: ranks on a node / cores, at least 1."""
        on_node = min(ranks, self.ranks_per_node)
        return max(on_node / self.cores_per_node, 1.0) if self.cores_per_node else 1.0


def load_hardware(path: str | Path) -> Hardware:
    """A hardware description from TOML (a ``[hardware]`` table with every field of
    ``Hardware``). Raises ConfigError naming a missing, unknown or impossible field."""
    try:
        data = tomllib.loads(read_text(path, "--hardware"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--hardware: {path} is not valid TOML: {e}") from None
    table = data.get("hardware")
    if not isinstance(table, dict):
        raise ConfigError(f"--hardware: {path} has no [hardware] table")
    names = [f.name for f in fields(Hardware)]
    missing = [n for n in names if n not in table and n not in OPTIONAL]
    if missing:
        raise ConfigError(f"hardware.{missing[0]}: missing in {path}")
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(f"hardware.{unknown[0]}: unknown field in {path}")
    return Hardware(**{n: table[n] for n in names if n in table})


@dataclass
class Profile:
    """Per layer: forward and backward seconds per sample, output activation bytes per
    sample, parameter bytes and optimizer-state bytes (Adam: two per parameter); the fixed
    seconds of a forward and backward call whatever its batch (``fixed_s``), and the
    layer's share of an optimizer step (``optimizer_s``)."""
    forward_s: list[float]
    backward_s: list[float]
    activation_bytes: list[float]
    parameter_bytes: list[float]
    optimizer_bytes: list[float]
    fixed_s: list[float] | None = None
    optimizer_s: list[float] | None = None
    # A residual network's MGRIT unit costs (``mltrain.mgrit.profile.SOLVER_COSTS``, in
    # that order), measured through the solver: seconds per sample and fixed seconds per
    # step (None: derived from the blocks' layer timings).
    mgrit_slope: list[float] | None = None
    mgrit_fixed: list[float] | None = None

    def compute_s(self, i: int, j: int, samples: float) -> float:
        """Forward and backward of layers i .. j-1 on a batch of ``samples``."""
        per = sum(self.forward_s[i:j]) + sum(self.backward_s[i:j])
        return per * samples + (sum(self.fixed_s[i:j]) if self.fixed_s else 0.0)

    def mgrit_costs(self, samples: float) -> dict[str, float] | None:
        """The measured MGRIT unit costs on a batch of ``samples`` (None if not measured)."""
        if self.mgrit_slope is None or self.mgrit_fixed is None:
            return None
        from mltrain.mgrit.profile import SOLVER_COSTS

        return {k: a * samples + c
                for k, a, c in zip(SOLVER_COSTS, self.mgrit_slope, self.mgrit_fixed)}

    def step_s(self, i: int, j: int) -> float:
        """The optimizer step of layers i .. j-1."""
        return sum(self.optimizer_s[i:j]) if self.optimizer_s else 0.0

    @property
    def layers(self) -> int:
        return len(self.forward_s)


def p2p_time(nbytes: float, hw: Hardware, inter_node: bool = False) -> float:
    if inter_node:
        return hw.inter_latency + nbytes / hw.inter_bandwidth
    return hw.intra_latency + nbytes / hw.intra_bandwidth


def allreduce_time(nbytes: float, D: int, hw: Hardware, inter_node: bool = False) -> float:
    if D <= 1 or nbytes == 0:
        return 0.0
    bw = hw.inter_bandwidth if inter_node else hw.intra_bandwidth
    lat = hw.inter_latency if inter_node else hw.intra_latency
    ring = 2 * (D - 1) / D * nbytes / bw + 2 * (D - 1) * lat
    tree = 2 * math.ceil(math.log2(D)) * (lat + nbytes / bw)
    return min(ring, tree)


def bubble_fraction(S: int, M: int) -> float:
    return (S - 1) / (M + S - 1)


def pipeline_time(stage_s: list[float], M: int) -> float:
    """A flushed pipeline (GPipe or 1F1B) of micro-batch stage times ``stage_s``."""
    return (M + len(stage_s) - 1) * max(stage_s)


def extra_waits(schedule: str, S: int, M: int) -> int:
    """The waits for a neighbour's just-produced message that a schedule makes beyond
    GPipe's: 2 (M - 1) for 1F1B's alternation; none for GPipe or one stage."""
    return 2 * (M - 1) if schedule == "1f1b" and S > 1 else 0


def reduce_waits(D: int, hw: Hardware) -> float:
    """The gradient allreduce's expected waits for a partner not yet scheduled, when the
    data axis' ranks on a node outnumber its cores: 2 ceil(log2 D) exchange steps, each
    finding the partner descheduled with probability (ranks - cores) / (ranks - 1) on the
    node; none when they fit."""
    on_node = min(D, hw.ranks_per_node)
    if D <= 1 or not hw.cores_per_node or on_node <= hw.cores_per_node:
        return 0.0
    return 2 * math.ceil(math.log2(D)) * (on_node - hw.cores_per_node) / (on_node - 1)


def handover_time(schedule: str, S: int, M: int, hw: Hardware, ranks: int,
                  chain_waits: int = 0, data: int = 1) -> float:
    """Those waits, ``chain_waits`` in each of the M + S - 1 stage passes on the
    pipeline's critical path (MGRIT's neighbour messages in a layer-parallel stage), and
    the gradient allreduce's over ``data`` ranks (``reduce_waits``), at ``hw.handover_s``
    each on a node whose cores ranks share; none with a core per rank."""
    if hw.oversubscription(ranks) <= 1:
        return 0.0
    return (extra_waits(schedule, S, M) + (M + S - 1) * chain_waits
            + reduce_waits(data, hw)) * hw.handover_s


def stage_memory(param_bytes: float, optimizer_bytes: float, activation_bytes: float,
                 in_flight: int) -> float:
    """Parameters and their gradients, optimizer state, activations of the micro-batches
    in flight (``activation_bytes`` for one micro-batch)."""
    return 2 * param_bytes + optimizer_bytes + activation_bytes * in_flight
