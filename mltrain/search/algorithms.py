"""Search algorithms as state machines: ``ask`` for the next job, ``tell`` its result.

They know nothing of MPI, trial groups or files. A job is a dict::

    {"trial": id, "values": {key: value}, "start": r0, "stop": r1,
     "snapshot": name or None,   # the state to continue from (None: a fresh start at 0)
     "keep": bool,               # whether the search needs the state at ``stop``
     "seed": int or None,        # run.seed for this trial (None: the base config's)
     "info": {...}}              # rung, generation, arm, slot: what the results show

and a result ``{"status": "ok"|"failed", "score": float or None, "snapshot": name or
None, ...}`` where a higher score is better (the driver negates losses) and a failed trial
has no score. Resources (``start``, ``stop``, budgets) are in ``search.resource`` units.

``ask(remaining)`` returns a job whose cost ``stop - start`` fits ``remaining``, ``WAIT``
when the algorithm needs results first, or None when it is finished. Given the same seed
and the same sequence of asks and tells, every algorithm makes the same choices; its
whole state is JSON (``state_dict``), so a search resumes where it was. Not collective.
"""
from __future__ import annotations

import math
import random

from mltrain.config import ConfigError

__all__ = ["ALGORITHMS", "WAIT", "Algorithm", "RandomSearch", "GridSearch", "ASHA", "PBT",
           "Thompson", "Crowding", "fitness", "make", "asha_rungs", "asha_min_resource", "pbt_interval", "pbt_horizon", "pbt_population",
           "crowding_population"]

WAIT = "wait"

# PBT's explore leaves these as the member drew them: a snapshot cannot follow a change of
# the optimizer, the model, the layout, the precision or the curvature memory, and a new
# batch size would change what a step (and the snapshot's data position) means.
PBT_FIXED = ("optim.name", "model.", "parallel.", "run.dtype", "run.seed", "tr.curvature",
             "tr.memory", "multilevel.", "mgopt.", "apts.", "pipeline.", "data.")


def fitness(score: float | None, maximize: bool) -> float:
    """A score as a reward in [0, 1]: an accuracy as it is (clipped), a loss L (score -L)
    as 1 / (1 + L); a failed trial 0."""
    if score is None or not math.isfinite(score):
        return 0.0
    if maximize:
        return min(max(score, 0.0), 1.0)
    return 1.0 / (1.0 + max(-score, 0.0))


def _rank_key(trial: int, score: float | None) -> tuple:
    """Best first; failed last; equal scores by trial id (lower first), so no choice
    depends on the order results arrived in."""
    return (score is None, -(score if score is not None else 0.0), trial)


class Algorithm:
    """What every algorithm shares: the space, the options (``search.*``), a trial's full
    resource ``R``, the budget, the base run.seed, its own RNG and trial counter."""

    name = ""
    _fields: tuple[str, ...] = ()  # attributes state_dict keeps besides rng and counter

    def __init__(self, space, opts, R: int, budget: int, base_seed: int = 0,
                 maximize: bool = True):
        self.space, self.opts, self.R, self.budget = space, opts, R, budget
        self.base_seed, self.maximize = base_seed, maximize
        self.rng = random.Random(opts.seed)
        self.next_trial = 0

    def _job(self, values: dict, start: int, stop: int, *, trial: int | None = None,
             snapshot: str | None = None, keep: bool = False, seed: int | None = None,
             **info) -> dict:
        if trial is None:
            trial, self.next_trial = self.next_trial, self.next_trial + 1
        return {"trial": trial, "values": dict(values), "start": start, "stop": stop,
                "snapshot": snapshot, "keep": keep, "seed": seed, "info": info}

    def ask(self, remaining: int):
        raise NotImplementedError

    def tell(self, job: dict, result: dict) -> None:
        pass

    def live_snapshots(self) -> set[str]:
        """Snapshots the algorithm may still continue from (others may be deleted)."""
        return set()

    def state_dict(self) -> dict:
        s = self.rng.getstate()
        return {"algo": self.name, "rng": [s[0], list(s[1]), s[2]],
                "next_trial": self.next_trial,
                **{f: getattr(self, f) for f in self._fields}}

    def load_state_dict(self, d: dict) -> None:
        if d.get("algo") != self.name:
            raise ConfigError(f"--resume: the saved search ran {d.get('algo')!r}, not "
                              f"{self.name!r}")
        r = d["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        self.next_trial = d["next_trial"]
        for f in self._fields:
            setattr(self, f, d[f])


class RandomSearch(Algorithm):
    """Independent draws from the prior, each trained for the full resource."""

    name = "random"

    def ask(self, remaining: int):
        if remaining < self.R:
            return None
        return self._job(self.space.draw(self.rng), 0, self.R)


class GridSearch(Algorithm):
    """Every combination of ``search.grid_points`` points per number range and every
    choice, each trained for the full resource, in ``search.grid_order``: a permutation
    drawn from the search's seed (as Optuna's GridSampler takes its points in random order:
    a budget smaller than the grid then samples the whole space instead of its first
    corner) or key order."""

    name = "grid"
    _fields = ("index",)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.configs = self.space.grid(self.opts.grid_points)
        if self.opts.grid_order == "shuffled":  # drawn before any state load: same on resume
            self.rng.shuffle(self.configs)
        self.index = 0

    def ask(self, remaining: int):
        if self.index >= len(self.configs) or remaining < self.R:
            return None
        self.index += 1
        return self._job(self.configs[self.index - 1], 0, self.R, index=self.index - 1)


def asha_min_resource(opts, R: int) -> int:
    """ASHA's lowest rung: ``search.min_resource``, or R / eta^3 (at least 1)."""
    return opts.min_resource or max(1, R // opts.eta ** 3)


def pbt_interval(opts, R: int) -> int:
    """PBT's resource between exploits: ``search.interval``, or R / 5 (at least 1)."""
    return opts.interval or max(1, R // 5)


def asha_rungs(R: int, r_min: int, eta: int) -> list[int]:
    """Rung resources: R, R / eta, R / eta^2, ... (rounded) down to the last that is at
    least ``r_min``, lowest first; so the top rung is the full resource and every rung is
    eta times the one below up to rounding."""
    rungs, k = [], 0
    while True:
        r = max(1, round(R / eta ** k))
        if r < max(1, r_min) or (rungs and r >= rungs[-1]):
            break
        rungs.append(r)
        k += 1
    return sorted(rungs) or [R]


class ASHA(Algorithm):
    """Asynchronous successive halving (Li et al., MLSys 2020). A free group gets, from
    the highest rung down, a trial in the top 1/eta of its rung not yet promoted (it
    continues from its snapshot to the next rung); otherwise a new trial at the lowest
    rung. No group waits for another."""

    name = "asha"
    _fields = ("results", "promoted", "values", "snapshots")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rungs = asha_rungs(self.R, asha_min_resource(self.opts, self.R), self.opts.eta)
        self.results: list[dict[str, float | None]] = [{} for _ in self.rungs]  # trial -> score
        self.promoted: list[list[int]] = [[] for _ in self.rungs]
        self.values: dict[str, dict] = {}
        self.snapshots: dict[str, str] = {}

    def candidates(self, k: int) -> list[int]:
        """The trials of rung ``k`` in its top floor(n / eta) (failed ones never), best
        first, not yet promoted."""
        ranked = sorted(((int(t), s) for t, s in self.results[k].items()),
                        key=lambda ts: _rank_key(*ts))
        top = ranked[:len(ranked) // self.opts.eta]
        return [t for t, s in top if s is not None and t not in self.promoted[k]]

    def ask(self, remaining: int):
        for k in reversed(range(len(self.rungs) - 1)):
            cost = self.rungs[k + 1] - self.rungs[k]
            for t in self.candidates(k):
                if cost > remaining:
                    break
                self.promoted[k].append(t)
                return self._job(self.values[str(t)], self.rungs[k], self.rungs[k + 1],
                                 trial=t, snapshot=self.snapshots.get(str(t)),
                                 keep=k + 2 < len(self.rungs), rung=k + 1)
        if self.rungs[0] > remaining:
            return None
        job = self._job(self.space.draw(self.rng), 0, self.rungs[0],
                        keep=len(self.rungs) > 1, rung=0)
        self.values[str(job["trial"])] = job["values"]
        return job

    def tell(self, job: dict, result: dict) -> None:
        t = str(job["trial"])
        self.results[job["info"]["rung"]][t] = result.get("score")
        if result.get("snapshot"):
            self.snapshots[t] = result["snapshot"]
        else:
            self.snapshots.pop(t, None)

    def live_snapshots(self) -> set[str]:
        return set(self.snapshots.values())


def pbt_population(population: int, R: int, budget: int) -> int:
    """``search.population``, or (0) as many members as the budget trains to R, at least
    2."""
    return population or max(2, budget // R)


def crowding_population(population: int) -> int:
    return population or 8


def pbt_horizon(R: int, interval: int, population: int, budget: int) -> int:
    """The resource every PBT member trains to: R, or less when the budget cannot pay
    R for each member (whole intervals)."""
    return min(R, (budget // (population * interval)) * interval)


class PBT(Algorithm):
    """Population based training (Jaderberg et al. 2017) in synchronous generations:
    every member trains ``interval`` more; then truncation selection: each member of the
    bottom fraction (and every failed member) copies the weights and optimizer state of a
    member drawn from the top fraction (its snapshot) and explores: the copied
    hyperparameters perturbed (``Space.perturb``; ``PBT_FIXED`` keys kept). An exploited
    member continues as a new trial id whose ``parent`` is the copied one."""

    name = "pbt"
    _fields = ("members", "generation", "issued", "returned", "history")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        o = self.opts
        self.P = pbt_population(o.population, self.R, self.budget)
        self.interval = pbt_interval(o, self.R)
        self.horizon = pbt_horizon(self.R, self.interval, self.P, self.budget)
        self.members: list[dict] = []
        self.generation = 0
        self.issued: list[int] = []
        self.returned: list[int] = []
        self.history: list[dict] = []  # one record per exploit

    def _fixed(self) -> tuple[str, ...]:
        return tuple(k for k in self.space.keys
                     if any(k == f or (f.endswith(".") and k.startswith(f)) for f in PBT_FIXED))

    def ask(self, remaining: int):
        start = self.generation * self.interval
        if start >= self.horizon or (self.members and not any(
                m["score"] is not None or self.generation == 0 for m in self.members)):
            return None
        if not self.members:
            for _ in range(self.P):
                self.members.append({"trial": self.next_trial, "values": self.space.draw(self.rng),
                                     "snapshot": None, "score": None, "parent": None})
                self.next_trial += 1
        stop = min(start + self.interval, self.horizon)
        for i, m in enumerate(self.members):
            if i in self.issued:
                continue
            if stop - start > remaining:
                return None
            self.issued.append(i)
            return self._job(m["values"], start, stop, trial=m["trial"],
                             snapshot=m["snapshot"], keep=stop < self.horizon,
                             generation=self.generation, member=i, parent=m["parent"])
        return WAIT

    def tell(self, job: dict, result: dict) -> None:
        i = job["info"]["member"]
        m = self.members[i]
        m["score"] = result.get("score")
        m["snapshot"] = result.get("snapshot")
        self.returned.append(i)
        if len(self.returned) == self.P:
            self._next_generation()

    def _next_generation(self) -> None:
        self.generation += 1
        self.issued, self.returned = [], []
        if self.generation * self.interval >= self.horizon:
            return
        P = self.P
        ranked = sorted(range(P), key=lambda i: _rank_key(i, self.members[i]["score"]))
        q = min(math.ceil(self.opts.truncation * P), P // 2) if self.opts.truncation > 0 else 0
        top = [i for i in ranked[:q] if self.members[i]["score"] is not None
               and self.members[i]["snapshot"]]
        if not top:  # nobody to copy: members continue as they are
            top = [i for i in ranked if self.members[i]["score"] is not None
                   and self.members[i]["snapshot"]][:1]
        losers = [i for i in ranked[P - q:] if i not in top]
        losers += [i for i in ranked if self.members[i]["score"] is None and i not in losers
                   and i not in top]
        if not top:
            return
        fixed = self._fixed()
        for b in losers:
            t = top[self.rng.randrange(len(top))]
            src = self.members[t]
            values = self.space.perturb(src["values"], self.rng, self.opts.perturb,
                                        self.opts.resample, fixed)
            self.history.append({"generation": self.generation, "member": b,
                                 "replaced": self.members[b]["trial"], "copied": src["trial"],
                                 "trial": self.next_trial})
            self.members[b] = {"trial": self.next_trial, "values": values,
                               "snapshot": src["snapshot"], "score": None,
                               "parent": src["trial"]}
            self.next_trial += 1

    def live_snapshots(self) -> set[str]:
        return {m["snapshot"] for m in self.members if m["snapshot"]}


class Thompson(Algorithm):
    """Thompson sampling over configurations as arms (after Yu, Kveton and Mengshoel,
    ECML PKDD 2017): a finite space no larger than ``search.arms`` is taken whole, else
    ``search.arms`` configurations are drawn from the prior. Each arm has a Beta(1, 1)
    prior on the probability that a pull succeeds; a free group draws one sample from
    every posterior and pulls the arm with the largest (the lowest index on a tie). A
    pull trains the arm's configuration with run.seed = base seed + its pull count (so
    pulls differ), and its reward r = ``fitness`` (accuracy, or 1 / (1 + loss)) updates
    the posterior by a Bernoulli(r) success (Agrawal and Goyal's trick for rewards in
    [0, 1]): alpha += b, beta += 1 - b."""

    name = "thompson"
    _fields = ("arms", "alpha", "beta", "pulls", "successes")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        n = self.opts.arms
        size = self.space.size()
        if size is not None and size <= n:
            self.arms = self.space.grid(1 << 30)
        else:
            self.arms = [self.space.draw(self.rng) for _ in range(n)]
        self.alpha = [1.0] * len(self.arms)
        self.beta = [1.0] * len(self.arms)
        self.pulls = [0] * len(self.arms)
        self.successes: list[int] = []

    def ask(self, remaining: int):
        if remaining < self.R:
            return None
        draws = [self.rng.betavariate(a, b) for a, b in zip(self.alpha, self.beta)]
        arm = max(range(len(draws)), key=lambda i: (draws[i], -i))
        self.pulls[arm] += 1
        return self._job(self.arms[arm], 0, self.R, seed=self.base_seed + self.pulls[arm] - 1,
                         arm=arm)

    def tell(self, job: dict, result: dict) -> None:
        arm = job["info"]["arm"]
        r = fitness(result.get("score"), self.maximize)
        b = 1 if self.rng.random() < r else 0
        self.alpha[arm] += b
        self.beta[arm] += 1 - b
        self.successes.append(b)

    def posterior_mean(self) -> list[float]:
        return [a / (a + b) for a, b in zip(self.alpha, self.beta)]


class Crowding(Algorithm):
    """A niching genetic algorithm with crowding (Mahfoud 1995; Mengshoel and Goldberg,
    Evol. Comput. 2008). A population of ``search.population`` configurations (drawn,
    trained); then pairs of parents drawn at random make two children (uniform crossover
    with probability ``search.crossover``, then mutation of each key with probability
    ``search.mutation``); once both children are trained, each competes with its closest
    parent (the pairing of children to parents with the smaller summed distance): it
    replaces the parent when better (deterministic crowding) or with probability
    f_child / (f_child + f_parent) (probabilistic crowding; f = ``fitness``). Parents
    compete as their slots hold them when the children return (several pairs may be in
    flight with several trial groups)."""

    name = "crowding"
    _fields = ("slots", "started", "pairs", "events", "next_pair")

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.P = crowding_population(self.opts.population)
        self.rate = self.opts.mutation or 1.0 / max(len(self.space), 1)
        self.slots: list[dict | None] = [None] * self.P
        self.started = 0
        self.pairs: list[dict] = []
        self.events: list[dict] = []
        self.next_pair = 0

    def ask(self, remaining: int):
        if remaining < self.R:
            return None
        if self.started < self.P:
            self.started += 1
            return self._job(self.space.draw(self.rng), 0, self.R, slot=self.started - 1)
        if any(s is None for s in self.slots):
            return WAIT
        for pair in self.pairs:
            for c, child in enumerate(pair["children"]):
                if child["trial"] is None:
                    return self._issue(pair, c)
        if remaining < 2 * self.R:  # a pair competes only once both children are back
            return None
        i, j = self.rng.sample(range(self.P), 2)
        a, b = self.slots[i]["values"], self.slots[j]["values"]
        if self.rng.random() < self.opts.crossover:
            c1, c2 = self.space.crossover(a, b, self.rng)
        else:
            c1, c2 = dict(a), dict(b)
        c1 = self.space.mutate(c1, self.rng, self.rate)
        c2 = self.space.mutate(c2, self.rng, self.rate)
        self.next_pair += 1
        pair = {"id": self.next_pair - 1, "parents": [i, j],
            "children": [{"trial": None, "values": c1, "score": None, "done": False},
                         {"trial": None, "values": c2, "score": None, "done": False}]}
        self.pairs.append(pair)
        return self._issue(pair, 0)

    def _issue(self, pair: dict, c: int) -> dict:
        child = pair["children"][c]
        job = self._job(child["values"], 0, self.R, pair=pair["id"], child=c)
        child["trial"] = job["trial"]
        return job

    def tell(self, job: dict, result: dict) -> None:
        info, score = job["info"], result.get("score")
        if "slot" in info:
            self.slots[info["slot"]] = {"trial": job["trial"], "values": job["values"],
                                        "score": score}
            return
        pair = next(p for p in self.pairs if p["id"] == info["pair"])
        child = pair["children"][info["child"]]
        child["score"], child["done"] = score, True
        if all(ch["done"] for ch in pair["children"]):
            self.pairs.remove(pair)
            self._compete(pair)

    def closest(self, parents: list[dict], children: list[dict]) -> list[tuple[int, int]]:
        """(parent index, child index) pairs: child 0 with parent 0 and child 1 with parent
        1 unless the crossed pairing is closer in summed distance."""
        d = self.space.distance
        straight = d(parents[0]["values"], children[0]["values"]) + \
            d(parents[1]["values"], children[1]["values"])
        crossed = d(parents[0]["values"], children[1]["values"]) + \
            d(parents[1]["values"], children[0]["values"])
        return [(0, 0), (1, 1)] if straight <= crossed else [(0, 1), (1, 0)]

    def wins(self, child: dict, parent: dict) -> bool:
        """Whether ``child`` replaces ``parent`` (the RNG is drawn only by probabilistic
        crowding)."""
        if self.opts.replacement == "deterministic":
            return child["score"] is not None and (
                parent["score"] is None or child["score"] > parent["score"])
        fc = fitness(child["score"], self.maximize)
        fp = fitness(parent["score"], self.maximize)
        p = 0.5 if fc + fp == 0 else fc / (fc + fp)
        return self.rng.random() < p

    def _compete(self, pair: dict) -> None:
        slots = pair["parents"]
        parents = [self.slots[s] for s in slots]
        children = pair["children"]
        for pi, ci in self.closest(parents, children):
            child, parent = children[ci], parents[pi]
            won = self.wins(child, parent)
            self.events.append({"pair": pair["id"], "slot": slots[pi], "parent": parent["trial"],
                                "child": child["trial"], "replaced": won})
            if won:
                self.slots[slots[pi]] = {"trial": child["trial"], "values": child["values"],
                                         "score": child["score"]}


ALGORITHMS = {a.name: a for a in (RandomSearch, GridSearch, ASHA, PBT, Thompson, Crowding)}


def make(name: str, space, opts, R: int, budget: int, base_seed: int = 0,
         maximize: bool = True) -> Algorithm:
    """The algorithm ``name`` (``search.algo``)."""
    return ALGORITHMS[name](space, opts, R, budget, base_seed, maximize)
