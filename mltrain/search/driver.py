"""``mltrain search``: one MPI job, ``parallel.trial`` trial groups, the search state on
world rank 0.

The world splits into T groups of consecutive ranks (the grid's slowest axis); each group
trains one configuration at a time with whatever data x pipe x layer layout that
configuration asks for, as a ``Trainer`` on the group's communicator. Group leaders ask
world rank 0 for work and hand back results by MPI messages on a duplicate of the world
communicator; rank 0 answers from a thread (``Controller``) while it trains in group 0
itself, so no group waits for another unless the algorithm says so (PBT's generations,
crowding's first population). Snapshots (weights, optimizer state, data position and RNG
streams as checkpoint bytes) travel by MPI: a group that pauses a trial sends its snapshot
to rank 0, the group that continues it receives it from rank 0. Only rank 0 writes files:
the search state (JSON, atomically after every job issued and every result), the
snapshots a resumed search may need, results.csv, best.toml and the plots.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mltrain.comm import CollectiveError, Grid, agree, local_cpu_masks, node_rank
from mltrain.config import Config, ConfigError, config_from, read_text, writable_folder
from mltrain.data import open_dataset
from mltrain.io import MetricsWriter, Snapshot
from mltrain.search import algorithms as algos
from mltrain.search.space import Space, parse_space
from mltrain.train import Trainer, checks
from mltrain.train.signals import StopSignals
from mltrain.utils import available_memory, get_logger

__all__ = ["Plan", "make_plan", "run_search", "STATE", "METRICS"]

TAG_REQ, TAG_JOB, TAG_SNAP_UP, TAG_SNAP_DOWN, TAG_FAIL, TAG_ACK = 71, 72, 73, 74, 75, 76
STATE = "search-state.json"
FORMAT, VERSION = "mltrain-search", 1
METRICS = ("train_loss", "train_accuracy", "test_accuracy", "wall_s", "samples_per_s")
MAXIMIZE = {"test_accuracy": True, "train_accuracy": True, "train_loss": False}


@dataclass
class Plan:
    """Everything decided before any training, the same on every rank."""

    base_text: str | None
    overrides: list[str]
    base: Config
    space_text: str
    space: Space
    algo: str
    budget: int
    R: int
    trials: int
    group_size: int
    out: Path
    resume: bool

    @property
    def opts(self):
        return self.base.search

    @property
    def maximize(self) -> bool:
        return MAXIMIZE[self.opts.metric]

    def forced(self, seed: int | None = None) -> list[str]:
        """What every trial's config is given on top of the base: its full length, no
        checkpoints of its own, one group."""
        out = []
        if self.opts.resource == "steps":
            out.append(f"run.steps={self.R}")
        elif self.opts.resource == "epochs":
            out += ["run.steps=0", f"run.epochs={self.R}"]
        out += ["checkpoint.dir=\"\"", "checkpoint.resume=false", "parallel.trial=1"]
        if seed is not None:
            out.append(f"run.seed={seed}")
        return out

    def trial_config(self, values: dict, seed: int | None = None) -> Config:
        """The configuration a trial trains (ConfigError naming the key). Not collective."""
        return config_from(self.base_text, self.overrides + self.forced(seed), values)

    def score(self, metrics: dict) -> float | None:
        v = metrics.get(self.opts.metric)
        if v is None or not math.isfinite(v):
            return None
        return v if self.maximize else -v

    def algorithm(self) -> algos.Algorithm:
        return algos.make(self.algo, self.space, self.opts, self.R, self.budget,
                          self.base.run.seed, self.maximize)


def make_plan(config: str | None, overrides: list[str], space_path: str, world_size: int,
              *, algo: str | None = None, budget: int | None = None,
              out: str | None = None, resume: bool = False) -> Plan:
    """Reads and checks the base config and the space against the trial groups: every
    value the space can take is one the config accepts and that fits a group's ranks.
    Raises ConfigError. Not collective (every rank runs it; call it inside ``agree``)."""
    base_text = read_text(config, "--config") if config else None
    sets = list(overrides)
    if algo:
        sets.append(f"search.algo={algo}")
    if budget is not None:
        if budget < 1:
            raise ConfigError(f"--budget: {budget} is not a positive number of "
                              "resource units")
        sets.append(f"search.budget={budget}")
    base = config_from(base_text, sets, what=f"--config {config}")
    o = base.search
    T = base.parallel.trial
    if world_size % T:
        raise ConfigError(f"parallel.trial: {world_size} ranks cannot be split into {T} "
                          "equal trial groups")
    G = world_size // T
    if o.resource == "auto":  # what the base config counts its length in
        o.resource = "steps" if base.run.steps else "epochs"
    if o.resource == "work":
        R = o.max_resource
        if not R:
            raise ConfigError("search.max_resource: a trial's length in fine-gradient "
                              "equivalents is required with search.resource = \"work\" "
                              "(run.steps or run.epochs then only cap its steps)")
    elif o.resource == "steps":
        R = o.max_resource or base.run.steps
        if not R:
            raise ConfigError("search.max_resource: 0 takes run.steps, which is 0 (the base "
                              "config trains by epochs): set run.steps or "
                              "search.max_resource, or search.resource = \"epochs\"")
    else:
        R = o.max_resource or base.run.epochs
        if not R:
            raise ConfigError("search.max_resource: 0 takes run.epochs, which is 0: set "
                              "run.epochs or search.max_resource")
    B = o.budget or 16 * R
    if not space_path:
        raise ConfigError("--space: the search space file is required")
    space_text = read_text(space_path, "--space")
    space = parse_space(space_text, f"--space {space_path}")
    plan = Plan(base_text, sets, base, space_text, space, o.algo, B, R, T, G,
                Path(out or o.out_dir or time.strftime("search-%Y%m%d-%H%M%S")), resume)
    _check_space(plan)
    _check_algorithm(plan)
    return plan


# The searched keys that decide how many of a trial's steps go to coarse levels first,
# and, for a trial counted in epochs, how many steps it has.
COARSE_KEYS = ("optim.name", "multilevel.nested", "multilevel.init", "multilevel.levels",
               "multilevel.nested_steps", "multilevel.init_cycles", "data.batch_size",
               "data.num_samples")
# More coarse-key combinations than this and only each number's worst end is tried (more
# coarse steps, fewer steps in all).
MAX_COARSE_TRIALS = 1 << 16


def _check_space(plan: Plan) -> None:
    """Every value of every key (numbers: both ends), with its conditions holding, makes a
    config the loader accepts and whose layout fits a trial group; and no trial the space
    can draw spends all its steps on coarse levels (nested iteration, RMTR's nested
    start): the keys that decide it are checked together (``_coarse_trials``)."""
    def fits(cfg) -> None:
        Grid.for_config(cfg, plan.group_size)
        if cfg.sync.name == "ps":  # servers outlive a rung's pause: not yet
            raise ConfigError("sync.name = 'ps': parameter servers do not run inside "
                              "search trials yet")

    base = plan.trial_config({})
    fits(base)  # the base itself must fit a group
    for p in plan.space.params:
        cond = _conditions(plan.space, p)
        values = p.values if p.kind == "choice" else (p.low, p.high)
        for v in values:
            try:
                cfg = plan.trial_config({**cond, p.key: v})
                fits(cfg)
            except ConfigError as e:
                raise ConfigError(f"--space [{p.key!r}]: the value {v!r} does not work "
                                  f"with the base config on a trial group of "
                                  f"{plan.group_size} ranks: {e}") from None
    datasets: dict = {}
    for values in _coarse_trials(plan.space):
        try:  # a combination the config refuses fails as a trial, as documented
            cfg = plan.trial_config(values)
            if not checks.has_coarse_phases(cfg):
                continue
            steps = cfg.run.steps
            if not steps:  # counted in epochs: the trial's length needs the dataset's size
                where = (cfg.data.name, cfg.data.path, cfg.data.num_samples)
                if where not in datasets:
                    datasets[where] = open_dataset(*where)
                steps = cfg.run.epochs * checks.epoch_steps(cfg, datasets[where])
        except ConfigError:
            continue
        try:
            checks.coarse_phases(cfg, steps)
        except ConfigError as e:
            what = ", ".join(f"{k} = {v!r}" for k, v in values.items()) or "its base values"
            raise ConfigError(f"--space: a trial with {what} spends all its {steps} steps "
                              f"on coarse levels (search.max_resource or the base run.steps "
                              f"or run.epochs set a trial's length): {e}") from None


def _conditions(space: Space, p) -> dict:
    """Values that make ``p`` drawn: each key its condition names at its first allowed
    value, and so on up the chain of conditions. Not collective."""
    out: dict = {}
    todo = [p]
    while todo:
        q = todo.pop()
        for k, ok in q.when.items():
            if k not in out:
                out[k] = ok[0]
                if k in space.by_key:
                    todo.append(space.by_key[k])
    return out


def _coarse_trials(space: Space) -> list[dict]:
    """The searched values of ``COARSE_KEYS`` (and of the keys their conditions name) in
    every combination the space can draw, each key's value dropped where its condition
    does not hold: every choice, the ends of numbers and the values conditions name (in
    between, more levels or coarse steps, or fewer steps in all, only make a trial worse
    toward an end). ``[{}]`` (the base config) when none is searched. Not collective."""
    keys = {k for k in COARSE_KEYS if k in space.by_key}
    for k in list(keys):  # and the keys their conditions name, up the chain
        keys |= {c for c in _conditions(space, space.by_key[k]) if c in space.by_key}
    named: dict = {}  # the numbers conditions name, per key
    for p in space.params:
        for k, ok in p.when.items():
            named.setdefault(k, set()).update(
                v for v in ok if isinstance(v, (int, float)) and not isinstance(v, bool))
    ps = [p for p in space.params if p.key in keys]  # dependency order

    def candidates(p, worst_only: bool) -> list:
        if p.kind == "choice":
            return list(p.values)
        lo, hi = (int(p.low), int(p.high)) if p.kind == "int" else (p.low, p.high)
        if worst_only:  # more coarse steps, or fewer steps in all, is worse
            return [lo if p.key == "data.num_samples" else hi]
        return sorted({lo, hi} | {v for v in named.get(p.key, ()) if lo <= v <= hi})

    options = [candidates(p, False) for p in ps]
    if math.prod(len(o) for o in options) > MAX_COARSE_TRIALS:
        options = [candidates(p, True) for p in ps]
    out: list[dict] = []
    seen: set = set()
    for combo in itertools.product(*options):
        values: dict = {}
        for p, v in zip(ps, combo):  # a condition's key is decided before the key
            if all(values.get(k) in ok for k, ok in p.when.items()):
                values[p.key] = v
        if (key := repr(sorted(values.items()))) not in seen:
            seen.add(key)
            out.append(values)
    return out


def _check_algorithm(plan: Plan) -> None:
    o, R, B = plan.opts, plan.R, plan.budget
    if B < R and plan.algo != "asha":
        raise ConfigError(f"--budget: {B} {o.resource} cannot train one trial of "
                          f"search.max_resource = {R}")
    if plan.algo == "asha":
        r_min = algos.asha_min_resource(o, R)
        if r_min > R:
            raise ConfigError(f"search.min_resource: {r_min} is above search.max_resource "
                              f"= {R}")
        if B < r_min:
            raise ConfigError(f"--budget: {B} cannot train one trial to the lowest rung "
                              f"({r_min})")
    if plan.algo == "pbt":
        interval = algos.pbt_interval(o, R)
        if interval > R:
            raise ConfigError(f"search.interval: {interval} is above search.max_resource "
                              f"= {R}")
        P = algos.pbt_population(o.population, R, B)
        if algos.pbt_horizon(R, interval, P, B) == 0:
            raise ConfigError(f"--budget: {B} cannot train a population of {P} "
                              f"for one interval of {interval}")
    P = algos.crowding_population(o.population)
    if plan.algo == "crowding" and B < P * R:
        raise ConfigError(f"--budget: {B} cannot train the first population ({P} x {R})")
    if plan.algo in ("pbt", "crowding") and o.population == 1:
        raise ConfigError("search.population: a population needs at least 2 members")
    if plan.algo == "grid" and plan.space.bound(o.grid_points) > 1_000_000:
        raise ConfigError("search.grid_points: the grid may have more than a million points "
                          "(fewer grid_points, or fewer keys)")


# -- messages -------------------------------------------------------------------------

def _pause(waited: float) -> float:
    """Sleeps a little longer each time (up to 10 ms) so a waiting rank leaves its core to
    the ranks that train; returns the next pause."""
    time.sleep(waited)
    return min(waited * 2, 0.01)


def _bcast_json(group: MPI.Comm, obj) -> object:
    """``obj`` from the group's rank 0 to every rank, waiting without holding a core.
    Collective on ``group``."""
    if group.Get_size() == 1:
        return obj
    head = np.zeros(1, dtype=np.int64)
    data = b""
    if group.Get_rank() == 0:
        data = json.dumps(obj).encode()
        head[0] = len(data)
    _wait(group.Ibcast(head, root=0))
    buf = np.frombuffer(bytearray(data), dtype=np.uint8) if group.Get_rank() == 0 else \
        np.empty(int(head[0]), dtype=np.uint8)
    _wait(group.Ibcast(buf, root=0))
    return json.loads(buf.tobytes().decode())


def _wait(req: MPI.Request, poll=None) -> None:
    pause = 0.0005
    while not req.Test():
        if poll is not None:
            poll()
        pause = _pause(pause)


# -- the controller on world rank 0 -----------------------------------------------------

class Controller:
    """The search state and the algorithm, on world rank 0; served to every group leader
    (rank 0 included) through messages on ``comm`` (a duplicate of the world). ``poll``
    handles whatever arrived; a thread calls it, or rank 0 between its own waits when the
    MPI library does not allow threads. Not collective."""

    CACHE_BYTES = 1 << 28  # snapshots kept in memory as well as on disk

    def __init__(self, plan: Plan, comm: MPI.Comm, log, algorithm=None):
        self.plan, self.comm, self.log = plan, comm, log
        self.algo = algorithm(plan) if algorithm is not None else plan.algorithm()
        self.lock = threading.RLock()
        self.records: list[dict] = []        # every job issued, with its result once back
        self.inflight: dict[int, dict] = {}  # job id -> job
        self.queue: deque[dict] = deque()    # jobs to issue again after a resume
        self.waiting: list[tuple[int, int]] = []  # (group, leader) waiting for a job
        self.stopped: set[int] = set()
        self.sends: list = []                # pending sends and the buffers they read
        self.snapshots: dict[str, dict] = {}  # name -> {"file", "bytes", "sha256"}
        self.cache: dict[str, bytes] = {}
        self.used = 0
        self.stopping = False  # a trial was stopped by SIGTERM/SIGUSR1: hand out no more
        self.stopped_by = ""
        self.bar = None
        self.out = plan.out
        from mltrain.config import to_toml

        self.base_text = to_toml(plan.trial_config({}))  # what --resume must find again
        (self.out / "snapshots").mkdir(parents=True, exist_ok=True)
        if plan.resume:
            self._load()
        elif (self.out / STATE).exists():
            raise ConfigError(f"--out {self.out}: holds a search already ({STATE}); continue "
                              "it with --resume, or choose another --out")

    # state file ------------------------------------------------------------------------
    def _state(self) -> dict:
        p = self.plan
        return {"format": FORMAT, "version": VERSION, "algo": p.algo, "budget": p.budget,
                "R": p.R, "resource": p.opts.resource, "metric": p.opts.metric,
                "space": p.space_text, "base": self.base_text, "used": self.used,
                "records": self.records, "snapshots": self.snapshots,
                "algorithm": self.algo.state_dict()}

    def save(self) -> None:
        _atomic_write(self.out / STATE, json.dumps(self._state(), separators=(",", ":")).encode())

    def _load(self) -> None:
        path = self.out / STATE
        text = read_text(path, "--resume")
        try:
            st = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--resume: {path} is not a search state ({e})") from None
        p = self.plan
        if not isinstance(st, dict) or st.get("format") != FORMAT or st.get("version") != VERSION:
            raise ConfigError(f"--resume: {path} is not a {FORMAT} state of version {VERSION}")
        for key, mine in (("algo", p.algo), ("budget", p.budget), ("R", p.R),
                          ("resource", p.opts.resource), ("metric", p.opts.metric),
                          ("space", p.space_text), ("base", self.base_text)):
            if st.get(key) != mine:
                what = {"R": "search.max_resource", "space": "--space", "base": "--config/--set",
                        "algo": "--algo", "budget": "--budget"}.get(key, f"search.{key}")
                raise ConfigError(f"--resume: {path} was a search with another {what} "
                                  "(resume with the same config, space, algorithm and budget)")
        try:
            self.algo.load_state_dict(st["algorithm"])
            self.records = list(st["records"])
            self.snapshots = dict(st["snapshots"])
            self.used = int(st["used"])
            limit = (available_memory() or 1 << 40) // 4
            for name, s in self.snapshots.items():
                if not isinstance(s["bytes"], int) or not 0 < s["bytes"] <= limit:
                    raise ConfigError(f"--resume: snapshot {name} claims {s['bytes']} bytes")
                f = self.out / "snapshots" / s["file"]
                if Path(s["file"]).name != s["file"] or not f.is_file() \
                        or f.stat().st_size != s["bytes"]:
                    raise ConfigError(f"--resume: snapshot {f} is missing or not the "
                                      f"{s['bytes']} bytes the state records")
            # Jobs issued but not finished when the search stopped run again, first and
            # in the order they were issued, exactly as they were issued.
            for r in self.records:
                if r.get("result") is None:
                    self.queue.append(r["job"])
            self.records = [r for r in self.records if r.get("result") is not None]
            needed = {j["snapshot"] for j in self.queue if j.get("snapshot")} \
                | self.algo.live_snapshots()
            for name in sorted(needed):
                self._snapshot(name)  # present, and the bytes the state recorded
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"--resume: {path} is damaged ({type(e).__name__}: {e})") \
                from None

    # serving ---------------------------------------------------------------------------
    def poll(self) -> bool:
        """Receives every request and failure report that arrived, hands out jobs to the
        waiting groups; True once every group was told to stop."""
        with self.lock:
            st = MPI.Status()
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_FAIL, status=st):
                self._failure(st.Get_source())
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_REQ, status=st):
                self._request(st.Get_source())
            self._serve()
            self.sends = [(r, b) for r, b in self.sends if not r.Test()]
            return len(self.stopped) == self.plan.trials and not self.sends

    def _request(self, leader: int) -> None:
        msg = self.comm.recv(source=leader, tag=TAG_REQ)
        data = None
        if msg.get("snapshot"):
            buf = np.empty(msg["snapshot"], dtype=np.uint8)
            self.comm.Recv(buf, source=leader, tag=TAG_SNAP_UP)
            data = buf.tobytes()
        if msg.get("result") is not None:
            self._record(msg["group"], msg["result"], data)
        self.waiting.append((msg["group"], leader))

    def _failure(self, source: int) -> None:
        """A rank whose trial raised alone (its group cannot agree): the job is recorded
        as failed before the rank ends the job, so ``--resume`` does not run it again."""
        msg = self.comm.recv(source=source, tag=TAG_FAIL)
        job = self.inflight.get(msg["job"])
        if job is not None:
            self._record(msg["group"], {"job": job["id"], "status": "failed", "used": 0,
                                        "message": msg["message"], "metrics": {}}, None)
        self.comm.send(True, dest=source, tag=TAG_ACK)

    def _serve(self) -> None:
        while self.waiting:
            g, leader = self.waiting[0]
            job = self.next_job()
            if job == algos.WAIT:
                if self.inflight:
                    return
                job = None  # nothing can arrive that would change the answer
            self.waiting.pop(0)
            if job is None:
                self._send(leader, {"stop": True}, None)
                self.stopped.add(g)
            else:
                job["group"] = g
                data = self._snapshot(job["snapshot"]) if job.get("snapshot") else None
                self._send(leader, {"stop": False, "job": job,
                                    "snapshot": len(data) if data else 0}, data)
                self._progress()

    def _send(self, leader: int, msg: dict, data: bytes | None) -> None:
        self.sends.append((self.comm.isend(msg, dest=leader, tag=TAG_JOB), None))
        if data:
            buf = np.frombuffer(data, dtype=np.uint8)
            self.sends.append((self.comm.Isend(buf, dest=leader, tag=TAG_SNAP_DOWN), buf))

    def next_job(self):
        """The next job (a resumed search's unfinished ones first), WAIT or None."""
        if self.stopping:
            return None
        if self.queue:
            job = self.queue.popleft()
        else:
            remaining = self.plan.budget - self.used - sum(
                j["stop"] - j["start"] for j in self.inflight.values())
            job = self.algo.ask(remaining)
            if not isinstance(job, dict):
                return job
            job["id"] = len(self.records)
        self.inflight[job["id"]] = job
        self.records.append({"job": job, "result": None})
        self.save()
        return job

    def _record(self, group: int, result: dict, data: bytes | None) -> None:
        job = self.inflight.pop(result["job"])
        if data is not None:
            result["snapshot"] = self._store(job, data)
        result["score"] = self.plan.score(result.get("metrics", {})) \
            if result["status"] == "ok" else None
        result["group"] = group
        self.used += int(result.get("used", 0))
        result["spent"] = self.used
        for r in self.records:
            if r["job"]["id"] == job["id"]:
                r["result"] = result
        if result["status"] == "stopped":  # a scheduler's signal: run it again on --resume
            self.queue.appendleft(job)
            self.stopping = True
            for r in self.records:
                if r["job"]["id"] == job["id"]:
                    r["result"] = None
            self.used -= int(result.get("used", 0))
            self.stopped_by = result.get("message", "").rsplit(" ", 1)[-1]
            self.save()
            return
        self.algo.tell(job, result)
        dead = self._collect_garbage()
        self.save()  # before the files go: a kill in between leaves orphans, not holes
        for f in dead:
            f.unlink(missing_ok=True)
        from mltrain.search.report import write_results

        write_results(self.plan, self.records, self.out)
        self._progress(result)

    def _progress(self, result: dict | None = None) -> None:
        if self.bar is None:
            return
        done = [r["result"] for r in self.records if r.get("result")]
        best = max((r["score"] for r in done if r.get("score") is not None), default=None)
        failed = sum(r["status"] != "ok" for r in done)
        self.bar.n = min(self.used, self.plan.budget)
        shown = None if best is None else (best if self.plan.maximize else -best)
        self.bar.set_postfix_str(f"done {len(done)} running {len(self.inflight)} failed "
                                 f"{failed} best {self.plan.opts.metric} "
                                 f"{'-' if shown is None else f'{shown:.4g}'}", refresh=True)

    # snapshots -------------------------------------------------------------------------
    def _store(self, job: dict, data: bytes) -> str:
        name = f"trial{job['trial']}-at{job['stop']}"
        fname = f"{name}.h5"
        _atomic_write(self.out / "snapshots" / fname, data, sync=True)
        self.snapshots[name] = {"file": fname, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}
        self.cache[name] = data
        while sum(map(len, self.cache.values())) > self.CACHE_BYTES and len(self.cache) > 1:
            self.cache.pop(next(iter(self.cache)))
        return name

    def _snapshot(self, name: str) -> bytes:
        if name in self.cache:
            return self.cache[name]
        s = self.snapshots.get(name)
        if s is None:
            raise ConfigError(f"--resume: the state names snapshot {name!r}, which it does "
                              "not record")
        f = self.out / "snapshots" / s["file"]
        with open(f, "rb") as fh:
            data = fh.read(s["bytes"] + 1)
        if len(data) != s["bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise ConfigError(f"--resume: snapshot {f} does not match its recorded size "
                              "and SHA-256 (changed since it was written)")
        return data

    def _collect_garbage(self) -> list[Path]:
        """Forgets the snapshots nothing can continue from; returns their files (deleted
        by the caller once the state no longer names them)."""
        live = self.algo.live_snapshots() | {j["snapshot"] for j in self.inflight.values()
                                             if j.get("snapshot")} \
            | {j["snapshot"] for j in self.queue if j.get("snapshot")}
        dead = []
        for name in [n for n in self.snapshots if n not in live]:
            s = self.snapshots.pop(name)
            self.cache.pop(name, None)
            dead.append(self.out / "snapshots" / s["file"])
        return dead


def _atomic_write(path: Path, data: bytes, sync: bool = False) -> None:
    """Writes ``data`` to a temporary file and renames it over ``path``: a killed process
    leaves the old file or the new one, never half of one. ``sync`` also survives a
    crash of the node (fsync before the rename): the state is written twice per job and
    a killed job is what --resume is for, so only snapshots pay for it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- a trial group ----------------------------------------------------------------------

def _local_failure(side: MPI.Comm, error: str | None, timeout: float) -> tuple[bool, str | None]:
    """Whether the group agrees: (True, the lowest failing rank's message or None) once
    every rank of the group arrived, (False, None) when this rank waited ``timeout``
    seconds (its peers are still inside the trial it left). Collective on ``side``."""
    flag = np.array([1 if error else 0], dtype=np.int64)
    out = np.zeros(1, dtype=np.int64)
    req = side.Iallreduce(flag, out, op=MPI.MAX)
    t0, pause = time.monotonic(), 0.0005
    while not req.Test():
        if error and time.monotonic() - t0 > timeout:
            return False, None
        pause = _pause(pause)
    if not out[0]:
        return True, None
    errors = side.allgather(error)
    first = next(i for i, e in enumerate(errors) if e)
    return True, f"rank {first} of the group: {errors[first]}"


def _digest(trainer) -> str | None:
    """SHA-256 of the trained parameters of the whole network (bytes in
    ``named_parameters`` order) on the group's rank 0: results compare bit for bit.
    Collective on the trainer's communicator."""
    trainer.layout.gather()
    if trainer.rank != 0:
        return None
    h = hashlib.sha256()
    for name, p in trainer.net.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_job(plan: Plan, job: dict, group: MPI.Comm, side: MPI.Comm, data: bytes | None,
            node: tuple, world: MPI.Comm, ctrl: MPI.Comm,
            poll=None) -> tuple[dict, bytes | None]:
    """Trains ``job`` on the group; returns (its result, the snapshot bytes on the group's
    rank 0 when the job keeps one). A trial that fails on every rank alike (config, data,
    divergence, a raise) is a failed result; a rank that raised alone reports the failure
    to world rank 0 and ends the job (its peers wait in a collective it left).
    Collective on ``group``."""
    rank = group.Get_rank()
    result = {"job": job["id"], "status": "ok", "message": "", "metrics": {}, "used": 0,
              "curve": []}
    snap, error, trainer = None, None, None
    t0 = time.perf_counter()
    try:
        cfg = agree(group, lambda: plan.trial_config(job["values"], job.get("seed")),
                    what="config")
        snapshot = Snapshot(f"snapshot of trial {job['trial']} at {job['start']}", data) \
            if data is not None else None
        trainer = Trainer(cfg, group, quiet=True, metrics=False, serve=False, snapshot=snapshot,
                          node_masks=node[0], local_rank=node[1])
        trainer.metrics = MetricsWriter(None, rank, keep=True)
        if plan.opts.resource == "work":  # from where the snapshot left it (counts restart)
            w0 = group.allreduce(trainer.work(), op=MPI.MAX)
            trainer.until_work = w0 + (job["stop"] - job["start"])
        else:
            per = 1 if plan.opts.resource == "steps" else trainer.steps_per_epoch
            trainer.until = min(job["stop"] * per, trainer.total_steps)
        result["used"] = job["stop"] - job["start"]
        summary = trainer.train()
        if trainer.stopped_by:  # SIGTERM/SIGUSR1: the job did not finish; --resume reruns it
            trainer.close()
            result.update(status="stopped", message=f"stopped by {trainer.stopped_by}")
            return result, None
        summary["train_loss"] = summary["final_loss"]  # over the whole training set
        result["metrics"] = {k: summary.get(k) for k in METRICS}
        result["steps"] = trainer.step
        result["work"] = trainer.work()
        if trainer.metrics.records is not None:
            result["curve"] = [[r["step"], r["loss"]] for r in trainer.metrics.records
                               if "loss" in r and r.get("event") is None]
        result["digest"] = _digest(trainer)
        if job.get("keep"):
            snap = trainer.snapshot_bytes()
        trainer.close()
    except CollectiveError as e:  # every rank of the group raised it alike
        result.update(status="failed", message=str(e), curve=[])
        if trainer is not None:
            trainer.close()
        snap = None
    except Exception as e:  # noqa: BLE001 - a raising trial is a result, not a crash
        error = f"{type(e).__name__}: {e}"
    agreed, message = _local_failure(side, error, plan.opts.fail_timeout)
    if not agreed:  # record it on rank 0, then end the job: the peers cannot be woken
        ctrl.send({"job": job["id"], "group": world.Get_rank() // group.Get_size(),
                   "message": f"rank {rank} of the group alone: {error}"}, dest=0, tag=TAG_FAIL)
        req = ctrl.irecv(source=0, tag=TAG_ACK)
        t1 = time.monotonic()
        while not req.Test()[0] and time.monotonic() - t1 < 30:
            if poll is not None:  # rank 0 without a controller thread answers itself
                poll()
            time.sleep(0.01)
        print(f"mltrain: error: trial {job['trial']} raised on world rank "
              f"{world.Get_rank()} alone ({error}); recorded as failed, ending the job "
              "(run again with --resume to continue the search)", file=sys.stderr, flush=True)
        world.Abort(1)
    if message is not None:
        result.update(status="failed", message=message, metrics={}, curve=[])
        snap = None
        if trainer is not None:  # every rank left the trial at the same raise
            try:
                trainer.close()
            except Exception:  # noqa: BLE001 - a half-built trainer frees what it can
                pass
    result["wall"] = time.perf_counter() - t0
    return result, snap


def run_search(plan: Plan, world: MPI.Comm, quiet: bool = False, algorithm=None) -> dict:
    """Runs the search to its budget; returns (on world rank 0) the summary. ``algorithm``
    (a function of the plan) replaces ``search.algo``'s (the benchmark's outside
    baselines). Collective on ``world``."""
    log = get_logger(rank=world.Get_rank())
    G = plan.group_size
    me = world.Get_rank()
    gidx = me // G
    agree(world, lambda: writable_folder(plan.out, "--out") if me == 0 else None,
          what="config")
    from mltrain.linalg import has_petsc

    if has_petsc:  # PETSc starts collectively on the whole world: before groups diverge
        from mltrain.linalg.petsc import init

        agree(world, init, what="config")
    ctrl = world.Dup()
    group = world.Split(gidx, me)
    side = group.Dup()
    node = (local_cpu_masks(world), node_rank(world)[0])  # threads and GPU per rank of the node
    controller = None
    thread = None
    done = threading.Event()
    controller = agree(world, lambda: Controller(plan, ctrl, log, algorithm) if me == 0 else None,
                       what="config")
    if controller is not None:
        if not quiet:
            from tqdm import tqdm

            controller.bar = tqdm(total=plan.budget, initial=min(controller.used, plan.budget),
                                  unit=plan.opts.resource, dynamic_ncols=True, leave=True,
                                  desc=f"search {plan.algo}")
        if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
            def serve():
                try:
                    while not done.is_set():
                        if controller.poll():
                            return
                        time.sleep(0.001)
                except BaseException as e:  # noqa: BLE001 - nobody else would see it
                    # A dead controller leaves every group waiting: end the job instead.
                    if isinstance(e, ConfigError):
                        print(f"mltrain: error: {e}", file=sys.stderr, flush=True)
                        world.Abort(2)
                    import traceback

                    traceback.print_exc()
                    world.Abort(1)
            thread = threading.Thread(target=serve, name="mltrain-search", daemon=True)
            thread.start()
        elif plan.trials > 1:
            log.warning("the MPI library gives no MPI_THREAD_MULTIPLE: rank 0 answers the "
                        "other trial groups only between its own trials")
    poll = (lambda: controller.poll()) if controller is not None and thread is None else None
    with StopSignals() as signals:  # between trials too: a job is stopped, never lost
        _group_loop(plan, world, ctrl, group, side, gidx, node, poll, signals)
    if controller is not None:
        while not (controller.poll() if thread is None else not thread.is_alive()):
            time.sleep(0.005)
        done.set()
        if thread is not None:
            thread.join()
        if controller.bar is not None:
            controller.bar.close()
    world.Barrier()
    summary = None
    if controller is not None:
        from mltrain.search.report import summarize, write_plots, write_results

        write_results(plan, controller.records, plan.out)
        write_plots(plan, controller.records, plan.out)
        summary = summarize(plan, controller.records, controller.used)
        summary["stopped_by"] = controller.stopped_by or None
    side.Free()
    group.Free()
    ctrl.Free()
    return summary


def _group_loop(plan: Plan, world: MPI.Comm, ctrl: MPI.Comm, group: MPI.Comm, side: MPI.Comm,
                gidx: int, node: tuple, poll, signals) -> None:
    """A group's life: ask world rank 0 for a job (the leader), train it, hand back the
    result, until told to stop. A scheduler's signal (``signals``, or one a trial's own
    loop caught) ends it after the job in hand, which goes back as not finished.
    Collective on ``group``."""
    last, snap_up = None, None
    leader = group.Get_rank() == 0
    while True:
        msg, data = None, None
        if leader:
            req = {"group": gidx, "result": last, "snapshot": len(snap_up) if snap_up else 0}
            sends = [ctrl.isend(req, dest=0, tag=TAG_REQ)]
            if snap_up:
                sends.append(ctrl.Isend(np.frombuffer(snap_up, dtype=np.uint8), dest=0,
                                        tag=TAG_SNAP_UP))
            pause = 0.0005
            while not ctrl.Iprobe(source=0, tag=TAG_JOB):
                if poll is not None:
                    poll()
                pause = _pause(pause)
            msg = ctrl.recv(source=0, tag=TAG_JOB)
            if msg.get("snapshot"):
                buf = np.empty(msg["snapshot"], dtype=np.uint8)
                ctrl.Recv(buf, source=0, tag=TAG_SNAP_DOWN)
                data = buf.tobytes()
            for r in sends:
                _wait(r, poll)
        msg = _bcast_json(group, msg)
        if msg["stop"]:
            break
        got = side.allreduce(signals.received, op=MPI.MAX)
        if got:  # a signal between trials: this job goes back unstarted
            last = {"job": msg["job"]["id"], "status": "stopped", "used": 0, "metrics": {},
                    "message": f"stopped by {signal.Signals(got).name}"}
            snap_up = None
            continue
        last, snap_up = run_job(plan, msg["job"], group, side, data, node, world, ctrl,
                                poll)
        if not leader:
            last, snap_up = None, None
