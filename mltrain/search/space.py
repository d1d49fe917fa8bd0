"""Search spaces: one TOML table per config key, checked against the config before any
trial runs; drawing, enumerating, perturbing, crossing and measuring configurations.

A space file::

    ["optim.lr"]
    log = [1e-4, 1e-1]          # floats, uniform in log
    ["optim.momentum"]
    range = [0.5, 0.99]         # floats, uniform
    ["sync.period"]
    int = [2, 16]               # integers, uniform, both ends included
    when = { "sync.name" = "localsgd" }   # only drawn when the condition holds
    ["sync.name"]
    choice = ["allreduce", "localsgd"]    # categorical

A configuration is a dict {key: value} of the keys that are active (their ``when`` holds);
the others keep the base config's value. Nothing here communicates; every random choice
takes a ``random.Random`` so a search is reproducible from its seed.
"""
from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass, field
from typing import Any

from mltrain.config import ConfigError, check_value, key_field, read_text

__all__ = ["Param", "Space", "load_space", "parse_space", "FORBIDDEN"]

KINDS = ("range", "log", "int", "choice")
# Keys a trial may not set: the search's own, where outputs go, how the ranks are split
# into groups, checkpoints (trials are paused and resumed by the search itself), a trial's
# length (the resource the search hands out).
FORBIDDEN = ("search.", "study.", "parallel.trial", "run.out_dir", "checkpoint.",
             "run.steps", "run.epochs")


@dataclass(frozen=True)
class Param:
    """One searched key. ``low``/``high`` for range, log and int; ``values`` for choice;
    ``when``: {key: allowed values} that must all hold for the key to be drawn."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    @property
    def numeric(self) -> bool:
        return self.kind != "choice"

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "range":
            return rng.uniform(self.low, self.high)
        if self.kind == "log":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        return self.values[rng.randrange(len(self.values))]

    def unit(self, v: Any) -> float:
        """``v`` mapped to [0, 1] (numbers); for choice, its index."""
        if self.kind == "choice":
            return float(self.values.index(v))
        if self.high == self.low:
            return 0.0
        if self.kind == "log":
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (v - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> Any:
        """The value at ``u`` in [0, 1] (clipped); integers rounded."""
        u = min(max(u, 0.0), 1.0)
        if self.kind == "log":  # clipped: exp(log(high)) may round above high
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
            return min(max(v, self.low), self.high)
        v = self.low + u * (self.high - self.low)
        if self.kind == "int":
            return int(min(max(round(v), self.low), self.high))
        return min(max(v, self.low), self.high)

    def points(self, n: int) -> list:
        """Grid values: every choice; ``n`` evenly spaced numbers (in log for log; integers
        deduplicated, all of them when there are at most ``n``)."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "int" and self.high - self.low + 1 <= n:
            return list(range(int(self.low), int(self.high) + 1))
        if n == 1:
            return [self.from_unit(0.5)]
        out = [self.from_unit(i / (n - 1)) for i in range(n)]
        if self.kind == "int":
            out = sorted(set(out))
        return out

    def active(self, values: dict) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when.items())


class Space:
    """The parameters of a search in dependency order (a key after the keys its ``when``
    names). Not collective."""

    def __init__(self, params: list[Param]):
        self.params = _ordered(params)
        self.by_key = {p.key: p for p in self.params}

    def __len__(self) -> int:
        return len(self.params)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def finite(self) -> bool:
        return all(p.kind in ("choice", "int") for p in self.params)

    def draw(self, rng: random.Random) -> dict:
        """A configuration drawn from the prior (every active key)."""
        out: dict = {}
        for p in self.params:
            if p.active(out):
                out[p.key] = p.draw(rng)
        return out

    def complete(self, values: dict, rng: random.Random, donors: tuple[dict, ...] = ()) -> dict:
        """``values`` restricted to its active keys, with a value for every active key that
        lacks one: the first donor's that has it, else drawn."""
        out: dict = {}
        for p in self.params:
            if not p.active(out):
                continue
            if p.key in values:
                out[p.key] = values[p.key]
            else:
                donor = next((d for d in donors if p.key in d), None)
                out[p.key] = donor[p.key] if donor is not None else p.draw(rng)
        return out

    def grid(self, n: int) -> list[dict]:
        """Every combination of ``points(n)`` of the active keys, in key order."""
        combos: list[dict] = [{}]
        for p in self.params:
            nxt = []
            for c in combos:
                if p.active(c):
                    nxt.extend({**c, p.key: v} for v in p.points(n))
                else:
                    nxt.append(c)
            combos = nxt
        return combos

    def bound(self, n: int) -> int:
        """An upper bound on ``len(grid(n))`` (conditions ignored), without building it."""
        out = 1
        for p in self.params:
            k = len(p.values) if p.kind == "choice" else (
                min(int(p.high - p.low) + 1, n) if p.kind == "int" else n)
            out *= k + (1 if p.when else 0)
        return out

    def size(self, limit: int = 1 << 20) -> int | None:
        """Number of distinct configurations when every key is categorical or integer and
        there are at most about ``limit`` (None otherwise: too many to list)."""
        if not self.finite:
            return None
        big = 1 << 62
        if self.bound(big) > limit:
            return None
        return len(self.grid(big))

    def distance(self, a: dict, b: dict) -> float:
        """Mean over keys: |difference| in unit coordinates for numbers, 0 or 1 for
        choices; a key active in one configuration only counts 1."""
        if not self.params:
            return 0.0
        total = 0.0
        for p in self.params:
            ina, inb = p.key in a, p.key in b
            if ina and inb:
                if p.numeric:
                    total += abs(p.unit(a[p.key]) - p.unit(b[p.key]))
                else:
                    total += float(a[p.key] != b[p.key])
            elif ina or inb:
                total += 1.0
        return total / len(self.params)

    def crossover(self, a: dict, b: dict, rng: random.Random) -> tuple[dict, dict]:
        """Uniform crossover: each key's value from one parent or the other (a fair coin
        per key), the second child taking the other parent's; then completed."""
        c1, c2 = {}, {}
        for p in self.params:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            if p.key in first:
                c1[p.key] = first[p.key]
            if p.key in second:
                c2[p.key] = second[p.key]
        return self.complete(c1, rng, (a, b)), self.complete(c2, rng, (b, a))

    def mutate(self, values: dict, rng: random.Random, rate: float,
               sigma: float = 0.1) -> dict:
        """Each active key mutated with probability ``rate``: numbers moved by a normal
        step of ``sigma`` in unit coordinates (clipped), choices redrawn among the other
        values."""
        out = dict(values)
        for p in self.params:
            if p.key not in out or rng.random() >= rate:
                continue
            if p.numeric:
                out[p.key] = p.from_unit(p.unit(out[p.key]) + rng.gauss(0.0, sigma))
            elif len(p.values) > 1:
                others = [v for v in p.values if v != out[p.key]]
                out[p.key] = others[rng.randrange(len(others))]
        return self.complete(out, rng, (values,))

    def perturb(self, values: dict, rng: random.Random, factor: float, resample: float,
                fixed: tuple[str, ...] = ()) -> dict:
        """PBT's explore: each active key not in ``fixed`` is redrawn from the prior with
        probability ``resample``, else numbers are multiplied by 1 - factor or 1 + factor
        (a fair coin; clipped; integers move by at least 1) and choices kept."""
        out = dict(values)
        for p in self.params:
            if p.key not in out or p.key in fixed:
                continue
            if rng.random() < resample:
                out[p.key] = p.draw(rng)
            elif p.numeric:
                up = rng.random() < 0.5
                v = out[p.key] * ((1 + factor) if up else (1 - factor))
                if p.kind == "int":
                    step = round(v) - out[p.key]
                    v = out[p.key] + (step if step else (1 if up else -1))
                    v = int(min(max(v, p.low), p.high))
                else:
                    v = min(max(v, p.low), p.high)
                out[p.key] = v
        return self.complete(out, rng, (values,))


def _ordered(params: list[Param]) -> list[Param]:
    """``params`` with every key after the keys its ``when`` names (stable otherwise);
    ConfigError on a cycle."""
    by_key = {p.key: p for p in params}
    out, done, busy = [], set(), set()

    def visit(p: Param, chain: tuple[str, ...]) -> None:
        if p.key in done:
            return
        if p.key in busy:
            raise ConfigError(f"--space: the conditions of {' -> '.join(chain + (p.key,))} "
                              "form a cycle")
        busy.add(p.key)
        for k in p.when:
            visit(by_key[k], chain + (p.key,))
        busy.discard(p.key)
        done.add(p.key)
        out.append(p)

    for p in params:
        visit(p, ())
    return out


def _number(key: str, kind: str, v: Any, integer: bool) -> float:
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) \
        and not isinstance(v, bool)
    if not ok or (isinstance(v, float) and not math.isfinite(v)):
        raise ConfigError(f"--space [{key!r}]: {kind} = [low, high] takes two "
                          f"{'integers' if integer else 'finite numbers'}, got {v!r}")
    return v


def _check_value(key: str, value: Any, what: str) -> Any:
    """``value`` as the config takes it for ``key``; ConfigError naming both otherwise."""
    try:
        return check_value(key, value)
    except ConfigError as e:
        raise ConfigError(f"--space [{key!r}]: {what} {value!r} is not a value the config "
                          f"takes ({e})") from None


def parse_space(text: str, what: str = "--space") -> Space:
    """The space in TOML ``text``: every key a config key a trial may set, every range
    non-empty, every value one the config accepts, every condition on a searched key and
    a value it can take. Raises ConfigError naming the key. Not collective."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what}: not valid TOML ({e})") from None
    if not doc:
        raise ConfigError(f"{what}: no keys to search (one table per key, e.g. "
                          "[\"optim.lr\"] log = [1e-4, 1e-1])")
    params = []
    for key, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{what}: {key!r} must be a table (quote the key: "
                              f"[\"{key}\"])")
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FORBIDDEN):
            raise ConfigError(f"{what}: {key} cannot be searched (the search sets it itself)")
        try:
            typ = key_field(key).type
        except ConfigError as e:
            raise ConfigError(f"{what}: {e}") from None
        kinds = [k for k in KINDS if k in table]
        unknown = sorted(set(table) - set(KINDS) - {"when"})
        if unknown:
            raise ConfigError(f"{what} [{key!r}]: unknown entry {unknown[0]!r} (one of "
                              f"{', '.join(KINDS)}, and when)")
        if len(kinds) != 1:
            raise ConfigError(f"{what} [{key!r}]: give exactly one of {', '.join(KINDS)}")
        kind = kinds[0]
        spec = table[kind]
        if kind == "choice":
            if not isinstance(spec, list) or not spec:
                raise ConfigError(f"{what} [{key!r}]: choice = [...] needs at least one value")
            vals = tuple(_check_value(key, v, "choice") for v in spec)
            if len(set(map(repr, vals))) != len(vals):
                raise ConfigError(f"{what} [{key!r}]: choice lists a value twice")
            p = Param(key, kind, values=vals)
        else:
            if not isinstance(spec, list) or len(spec) != 2:
                raise ConfigError(f"{what} [{key!r}]: {kind} = [low, high]")
            integer = kind == "int"
            if integer and typ != "int":
                raise ConfigError(f"{what} [{key!r}]: int ranges are for integer keys; "
                                  f"{key} is a {typ} (use range or log)")
            if not integer and typ != "float":
                raise ConfigError(f"{what} [{key!r}]: {kind} ranges are for float keys; "
                                  f"{key} is {'an' if typ == 'int' else 'a'} {typ} (use "
                                  f"{'int' if typ == 'int' else 'choice'})")
            low, high = (_number(key, kind, v, integer) for v in spec)
            if low > high or (not integer and low == high):
                raise ConfigError(f"{what} [{key!r}]: empty range {kind} = [{low}, {high}]")
            if kind == "log" and low <= 0:
                raise ConfigError(f"{what} [{key!r}]: log = [low, high] needs low > 0")
            for v in (low, high):
                _check_value(key, v, "the end")
            p = Param(key, kind, low=low, high=high)
        when = table.get("when", {})
        if not isinstance(when, dict):
            raise ConfigError(f"{what} [{key!r}]: when = {{ \"key\" = value }}")
        params.append((p, when))
    keys = {p.key: p for p, _ in params}
    out = []
    for p, when in params:
        cond = {}
        for k, allowed in when.items():
            if k not in keys:
                raise ConfigError(f"{what} [{p.key!r}]: when names {k!r}, which the space "
                                  "does not search (conditions are on searched keys)")
            if k == p.key:
                raise ConfigError(f"{what} [{p.key!r}]: a key cannot depend on itself")
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            q = keys[k]
            for v in allowed:
                v = _check_value(k, v, f"the condition of {p.key!r} on")
                possible = (v in q.values if q.kind == "choice" else q.low <= v <= q.high)
                if not possible:
                    raise ConfigError(f"{what} [{p.key!r}]: when {k} = {v!r}, a value "
                                      f"{k} never takes in this space")
            cond[k] = tuple(_check_value(k, v, "condition") for v in allowed)
        out.append(Param(p.key, p.kind, p.low, p.high, p.values, cond))
    return Space(out)


def load_space(path: str) -> Space:
    """``parse_space`` of the file ``path`` (a regular UTF-8 file). Not collective."""
    return parse_space(read_text(path, "--space"), f"--space {path}")
