"""Nested iteration: train the coarsest network of a depth hierarchy first, prolong its
weights to the next finer, up to the full depth (``multilevel.nested``); ``run.steps`` is shared
equally by the levels, coarsest first, or each coarse level trains ``multilevel.nested_steps``
and the full network the rest."""
from __future__ import annotations

import torch.nn.functional as F

from mltrain.multilevel import Hierarchy
from mltrain.multilevel.hierarchy import coarse_first, steps_per_level
from mltrain.optim.costs import measure, time_levels

__all__ = ["Nested", "OnePhase", "phases"]


class OnePhase:
    """The schedule of a run without nested iteration: one phase, the full network.
    Nothing here is collective."""

    hierarchy = None
    phase = 0

    def __init__(self, trainer):
        self.t = trainer
        self.steps = [0]  # steps trained in this run (a resumed run counts from 0)

    def start(self, step: int) -> None:
        pass

    def before(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def show(self) -> None:
        pass

    def work(self) -> float:
        t = self.t
        return t.method.work(self.steps[0], t.cfg.data.batch_size, t.dataset.num_train)


def phases(trainer, o):
    """The phase schedule ``multilevel.nested`` asks for. Not collective."""
    return Nested(trainer, o) if o.nested else OnePhase(trainer)


class Nested:
    """The phases of a nested run of ``trainer``: which level trains which step, and the
    switch between levels (the current level's work banked, its weights prolonged, a
    fresh optimizer for the next; the finest level's is the trainer's first). Collective
    on the trainer's communicator where it switches."""

    def __init__(self, trainer, o):
        self.t = trainer
        self.hierarchy = Hierarchy(trainer.model, o.levels, o.cf, o.transfer, o.prolongation)
        self.steps = [0] * self.hierarchy.levels  # steps trained on each level in this run
        self.coarse_work = 0.0  # work of the levels already trained, fine-gradient units
        self.fine = trainer.method
        self.phase = 0
        self.per_level = o.nested_steps  # 0: the run's steps shared equally
        # Each level's plain gradient in full-network gradients (``run.costs``), measured
        # on the first batch when the run starts.
        self.cost = [1.0] * self.hierarchy.levels

    def _measure(self) -> None:
        """Times a gradient of every level on this rank's first batch, averaged over the
        trainer's ranks. Collective on the trainer's communicator."""
        t = self.t
        x, y = t.loader.batch(0, 0)
        prices = measure(time_levels([(m, "lsr1", None) for m in self.hierarchy.models],
                                     F.cross_entropy, x, y), (t.comm,))
        self.cost = [p["gradient"] for p in prices.levels]

    def phase_of(self, step: int) -> int:
        """The level that trains ``step``: ``multilevel.nested_steps`` on each coarse level
        (or the run's steps shared equally), the coarsest first. Not collective."""
        return coarse_first(step, steps_per_level(self.per_level, self.t.total_steps,
                                                  self.hierarchy.levels),
                            self.hierarchy.levels)

    def start(self, step: int) -> None:
        """Enters the level that trains ``step`` (the coarsest for a new run), with the
        levels' costs measured (``run.costs``). A run resumed inside a coarse phase (from
        the checkpoint written where a run stopped on a coarse level) restricts the loaded
        full network down to it: the coarse weights that were prolonged into it, bit for
        bit with injection and constant prolongation (the coarse optimizer starts afresh).
        Collective on the trainer's communicator."""
        if self.t.cfg.run.costs == "measured":
            self._measure()
        level = self.phase_of(step)
        if level > 0:
            if step > 0:
                for lv in range(level):
                    self.hierarchy.restrict_to(lv)
            self.phase = self.hierarchy.levels
            self.enter(level)

    def before(self, step: int) -> None:
        want = self.phase_of(step)
        if want != self.phase:
            self.enter(want)

    def work(self) -> float:
        t = self.t
        own = t.method.work(self.steps[self.phase], t.cfg.data.batch_size,
                            t.dataset.num_train)
        return self.coarse_work + own * self.cost[self.phase]

    def enter(self, level: int) -> None:
        t, hier = self.t, self.hierarchy
        if self.phase < hier.levels:  # not the very first entry
            self.coarse_work += t.method.work(self.steps[self.phase], t.cfg.data.batch_size,
                                              t.dataset.num_train) * self.cost[self.phase]
            t.method.close()
            self._prolong(level)
        self.phase = level
        t.model = hier.models[level]
        # A multilevel optimizer on a coarse level uses the levels below it.
        t.method = self.fine if level == 0 else t._build(t.model, hier.levels - level)
        t.model.train()

    def show(self) -> None:
        """Prolongs the weights of the level in training to every finer network (the
        coarse phase goes on), so that evaluation, ``run.target_loss`` and the bench's
        races see the full-depth network a stop here would give, not its initial weights.
        The finer levels are overwritten by the same prolongation when they are entered;
        before the first step the full network keeps its own initial weights (every method
        starts from the same point). Not collective: call it where drifting replicas are
        already averaged (``Trainer.evaluate`` does, inside the sync's consensus)."""
        if any(self.steps):
            self._prolong(0)

    def _prolong(self, level: int) -> None:
        """Prolongs the weights of the level in training down to ``level``, through every
        level between. Not collective."""
        for lv in range(self.phase - 1, level - 1, -1):
            self.hierarchy.prolong_to(lv)

    def finish(self) -> None:
        """Brings a run that stopped early to the full-depth network."""
        if self.phase > 0:
            self.enter(0)
