"""Pipeline schedules as data: for each stage, the list of actions it performs in order.

Actions: ``F`` (forward of micro-batch m), ``B`` (backward of m), ``SEND_ACT`` / ``RECV_ACT``
(the activation of m to / from the next / previous stage), ``SEND_GRAD`` / ``RECV_GRAD``
(its gradient to / from the previous / next stage). Sends do not block; a receive waits for
its matching send. ``check`` simulates a schedule under exactly those rules and raises on a
deadlock, an unmatched message or a backward before its forward. Pure Python; nothing here
communicates.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Action", "SCHEDULES", "build_schedule", "check", "gpipe", "one_f_one_b"]


class Action(NamedTuple):
    kind: str  # F, B, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD
    mb: int
    peer: int = -1  # the other stage of a message


def _forward(s: int, S: int, m: int) -> list[Action]:
    acts = [Action("RECV_ACT", m, s - 1)] if s > 0 else []
    acts.append(Action("F", m))
    if s < S - 1:
        acts.append(Action("SEND_ACT", m, s + 1))
    return acts


def _backward(s: int, S: int, m: int) -> list[Action]:
    acts = [Action("RECV_GRAD", m, s + 1)] if s < S - 1 else []
    acts.append(Action("B", m))
    if s > 0:
        acts.append(Action("SEND_GRAD", m, s - 1))
    return acts


def gpipe(S: int, M: int) -> list[list[Action]]:
    """GPipe (Huang et al. 2019): every stage runs all M forwards, then all M backwards."""
    return [[a for m in range(M) for a in _forward(s, S, m)]
            + [a for m in range(M) for a in _backward(s, S, m)] for s in range(S)]


def one_f_one_b(S: int, M: int) -> list[list[Action]]:
    """1F1B with a flush (PipeDream-flush): stage s starts with min(S - s - 1, M) forwards,
    then alternates one forward and one backward, then drains the backwards. At most
    S - s micro-batches are in flight on stage s (GPipe keeps M)."""
    out = []
    for s in range(S):
        warm = min(S - s - 1, M)
        acts = [a for m in range(warm) for a in _forward(s, S, m)]
        f, b = warm, 0
        while f < M:
            acts += _forward(s, S, f)
            f += 1
            acts += _backward(s, S, b)
            b += 1
        while b < M:
            acts += _backward(s, S, b)
            b += 1
        out.append(acts)
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, S: int, M: int) -> list[list[Action]]:
    if name not in SCHEDULES:
        raise ValueError(f"pipeline.schedule: {name!r} is not one of {tuple(SCHEDULES)}")
    if S < 1 or M < 1:
        raise ValueError(f"pipeline: need at least one stage and one micro-batch, got {S}, {M}")
    return SCHEDULES[name](S, M)


def check(schedule: list[list[Action]], M: int) -> dict:
    """Simulates ``schedule`` (non-blocking sends, blocking receives). Raises ValueError on
    a deadlock, a message without its partner, a receive of something never sent, a
    backward before its forward, or a micro-batch not run exactly once each way on every
    stage. Returns {"steps": rounds of the simulation, "peak_in_flight": per stage}."""
    S = len(schedule)
    for s, acts in enumerate(schedule):
        for kind in ("F", "B"):
            got = sorted(a.mb for a in acts if a.kind == kind)
            if got != list(range(M)):
                raise ValueError(f"stage {s}: {kind} runs micro-batches {got}, not 0..{M - 1}")
    sent: set[tuple[str, int, int, int]] = set()  # (kind, mb, from, to)
    pos = [0] * S
    done_f = [set() for _ in range(S)]
    inflight = [0] * S
    peak = [0] * S
    rounds = 0
    while any(pos[s] < len(schedule[s]) for s in range(S)):
        progress = False
        for s in range(S):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                if a.kind in ("SEND_ACT", "SEND_GRAD"):
                    want = s + 1 if a.kind == "SEND_ACT" else s - 1
                    if a.peer != want:
                        raise ValueError(f"stage {s}: {a} goes to stage {a.peer}, not {want}")
                    sent.add((a.kind[5:], a.mb, s, a.peer))
                elif a.kind in ("RECV_ACT", "RECV_GRAD"):
                    key = (a.kind[5:], a.mb, a.peer, s)
                    if key not in sent:
                        break  # blocks until the partner sends
                    sent.remove(key)
                elif a.kind == "F":
                    done_f[s].add(a.mb)
                    inflight[s] += 1
                    peak[s] = max(peak[s], inflight[s])
                elif a.kind == "B":
                    if a.mb not in done_f[s]:
                        raise ValueError(f"stage {s}: backward of micro-batch {a.mb} before "
                                         "its forward")
                    inflight[s] -= 1
                else:
                    raise ValueError(f"stage {s}: unknown action {a}")
                pos[s] += 1
                progress = True
        rounds += 1
        if not progress:
            stuck = {s: schedule[s][pos[s]] for s in range(S) if pos[s] < len(schedule[s])}
            raise ValueError(f"deadlock: stages wait at {stuck}")
    if sent:
        raise ValueError(f"messages sent but never received: {sorted(sent)}")
    return {"steps": rounds, "peak_in_flight": peak}
