"""Process grid: degree arithmetic in plain Python, communicator creation in ``build``.

Axes, slowest to fastest varying in the world rank: ``trial``, ``data``, ``pipe``, ``layer``.
Fast axes get neighbouring ranks, which launchers place on the same node, so the
point-to-point heavy axes (layer, pipe) stay inside a node as long as they fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from mpi4py import MPI

from mltrain.config import ConfigError

AXES = ("trial", "data", "pipe", "layer")


def ps_workers(cfg, world_size: int) -> int:
    """The number of workers of a ``sync.name = ps`` job of ``world_size`` ranks (the
    last ``parallel.servers`` ranks serve). Raises ConfigError when none is left. Not
    collective."""
    s = cfg.parallel.servers
    if s >= world_size:
        raise ConfigError(f"parallel.servers: {s} parameter server{'s' * (s > 1)} on "
                          f"{world_size} rank{'s' * (world_size > 1)} leave no worker (need "
                          f"parallel.servers < ranks)")
    return world_size - s


@dataclass(frozen=True)
class Grid:
    """Degrees of each axis. Pure arithmetic; nothing here communicates."""

    trial: int = 1
    data: int = 1
    pipe: int = 1
    layer: int = 1

    def __post_init__(self) -> None:
        for ax in AXES:
            d = getattr(self, ax)
            if not isinstance(d, int) or d < 1:
                raise ConfigError(f"parallel.{ax}: degree must be a positive integer, got {d!r}")

    @classmethod
    def for_world(cls, world_size: int, *, data: int = 0, pipe: int = 1, layer: int = 1,
                  trial: int = 1) -> "Grid":
        """The grid for ``world_size`` ranks; ``data=0`` takes all ranks the others leave.

        Raises ConfigError when the degrees do not multiply to the world size.
        """
        fixed = pipe * layer * trial
        if fixed < 1:
            raise ConfigError("parallel: degrees must be positive")
        if data == 0:
            if world_size % fixed:
                raise ConfigError(
                    f"parallel: {world_size} ranks cannot be split into trial={trial} x "
                    f"pipe={pipe} x layer={layer} (= {fixed}) groups")
            data = world_size // fixed
        g = cls(trial=trial, data=data, pipe=pipe, layer=layer)
        if g.size != world_size:
            raise ConfigError(
                f"parallel: trial={trial} x data={data} x pipe={pipe} x layer={layer} = "
                f"{g.size} ranks, but the job has {world_size}")
        return g

    @classmethod
    def for_config(cls, cfg, world_size: int) -> "Grid":
        """The grid ``cfg.parallel`` asks for on ``world_size`` ranks, with every check
        that needs only the rank count (the batch against the data axis, micro-batches,
        the straggler's rank). Raises ConfigError. Not collective: the Trainer runs it on
        every rank, ``mltrain jobscript`` before submission."""
        p = cfg.parallel
        if p.trial != 1:
            raise ConfigError(f"parallel.trial: {p.trial} trial groups are for `mltrain "
                              "search`; a training run is one group (set parallel.trial = 1)")
        if cfg.sync.name == "ps":  # the grid is the workers'; the last ranks serve
            world_size = ps_workers(cfg, world_size)
        grid = cls.for_world(world_size, data=p.data, layer=p.layer, pipe=p.pipe)
        if cfg.run.straggler_spec:
            rank, _ = cfg.run.straggler_spec
            if rank >= world_size:
                raise ConfigError(f"run.straggler: rank {rank} does not exist in a job of "
                                  f"{world_size} ranks" if cfg.sync.name != "ps" else
                                  f"run.straggler: rank {rank} is not a worker (ranks "
                                  f"{world_size} and up are parameter servers)")
        b = cfg.data.batch_size
        if b % grid.data:
            raise ConfigError(f"data.batch_size: the global batch {b} is not divisible by "
                              f"the {grid.data} data-parallel ranks")
        if grid.pipe > 1 and b // grid.data < cfg.pipeline.microbatches:
            raise ConfigError(f"pipeline.microbatches: {cfg.pipeline.microbatches} "
                              f"micro-batches of a per-rank batch of {b // grid.data}")
        return grid

    @property
    def size(self) -> int:
        return prod(getattr(self, ax) for ax in AXES)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, ax) for ax in AXES)

    def coords(self, rank: int) -> dict[str, int]:
        """Axis coordinates of a world rank."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside a grid of {self.size}")
        out = {}
        for ax in reversed(AXES):
            d = getattr(self, ax)
            out[ax] = rank % d
            rank //= d
        return {ax: out[ax] for ax in AXES}

    def rank_of(self, **coords: int) -> int:
        """World rank at the given coordinates (missing axes are 0)."""
        rank = 0
        for ax in AXES:
            c = coords.get(ax, 0)
            d = getattr(self, ax)
            if not 0 <= c < d:
                raise ValueError(f"{ax} coordinate {c} outside degree {d}")
            rank = rank * d + c
        return rank

    def axis_ranks(self, axis: str, rank: int) -> list[int]:
        """World ranks that share every coordinate of ``rank`` except ``axis``, in axis order."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}")
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: i}) for i in range(getattr(self, axis))]

    def build(self, comm: MPI.Comm) -> "GridComm":
        """Splits one communicator per axis.

        Collective on ``comm``.
        """
        if comm.Get_size() != self.size:
            raise ConfigError(f"parallel: grid of {self.size} ranks on a communicator of "
                              f"{comm.Get_size()}")
        rank = comm.Get_rank()
        coords = self.coords(rank)
        comms = {}
        for ax in AXES:
            # color: the rank with this axis' coordinate zeroed identifies the group.
            color = self.rank_of(**{**coords, ax: 0})
            comms[ax] = comm.Split(color, coords[ax])
        return GridComm(grid=self, world=comm, rank=rank, coords=coords, comms=comms)


@dataclass
class GridComm:
    """A built grid: the world communicator and one sub-communicator per axis."""

    grid: Grid
    world: MPI.Comm
    rank: int
    coords: dict[str, int]
    comms: dict[str, MPI.Comm] = field(repr=False)

    @property
    def data(self) -> MPI.Comm:
        return self.comms["data"]

    def over(self, *axes: str) -> MPI.Comm:
        """One communicator over several axes at once: the ranks that share every other
        coordinate (``over("data", "pipe", "layer")`` is a trial group). Made on first
        use and kept; ordered by the world rank. Collective on the world communicator the
        first time a set of axes is asked for."""
        unknown = [a for a in axes if a not in AXES]
        if unknown or not axes:
            raise ValueError(f"unknown axes {unknown or axes!r} (known: {', '.join(AXES)})")
        key = "+".join(a for a in AXES if a in axes)
        if key not in self.comms:
            color = self.grid.rank_of(**{**self.coords, **{a: 0 for a in axes}})
            self.comms[key] = self.world.Split(color, self.rank)
        return self.comms[key]

    def free(self) -> None:
        """Frees the axis communicators. Collective on the world communicator."""
        for c in self.comms.values():
            if c != MPI.COMM_NULL:
                c.Free()
        self.comms = {}
