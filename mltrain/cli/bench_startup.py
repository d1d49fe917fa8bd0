"""``mltrain bench startup``: how long a job takes to start and how much memory a rank
holds, against the floor every torch + MPI program pays, at several rank counts.

Each measurement is a whole MPI job, started the way users start one (``mltrain.launch``):

- floor: ``import torch``, ``from mpi4py import MPI``, one ``torch.optim.SGD`` (torch's
  optimizers import ``torch._dynamo`` on first use, about a second per rank that mltrain
  cannot avoid), a barrier;
- mltrain: the default job (``python -m mltrain``) for one step, with evaluation.

Both are timed from launch to exit, best of ``reps``; the peak resident memory is that of
the largest process of the job (a rank). The ratio mltrain / floor is what mltrain itself
adds. Run it as one process (it starts the jobs itself). Not collective.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from mltrain.cli.study import parse_ranks
from mltrain.launch import mpiexec_argv

FLOOR = ("import torch, torch.nn as nn; from mpi4py import MPI; "
         "torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1); MPI.COMM_WORLD.Barrier()")

# Runs argv as a child and prints its wall time and the largest resident set of any process
# of its tree (RUSAGE_CHILDREN covers exactly that job, since this wrapper runs only it).
_WRAP = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"code": r.returncode, "wall_s": wall, "rss_mib": rss,
                  "stderr": r.stderr[-2000:]}))
"""


def _job(argv: list[str], env: dict, timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _WRAP, *argv], capture_output=True, text=True,
                         env=env, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"mltrain: error: bench startup: the job wrapper failed: "
                         f"{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["code"] != 0:
        raise SystemExit(f"mltrain: error: bench startup: {' '.join(argv[:4])} ... exited "
                         f"{res['code']}: {res['stderr']}")
    return res


def bench_startup(ranks: list[int], reps: int = 2, timeout: float = 900) -> dict:
    """Measures the floor and mltrain's default job at each rank count (best of ``reps``,
    interleaved so that a slow phase of the machine hits both alike)."""
    rows = []
    for n in ranks:
        launch, env = mpiexec_argv(n, {**os.environ, "OMP_NUM_THREADS": "1"})
        floor_cmd = [*launch, sys.executable, "-c", FLOOR]
        ml_cmd = [*launch, sys.executable, "-m", "mltrain", "--quiet", "--set", "run.steps=1"]
        best = {"floor": None, "mltrain": None}
        for _ in range(reps):
            for name, cmd in (("floor", floor_cmd), ("mltrain", ml_cmd)):
                r = _job(cmd, env, timeout)
                b = best[name]
                best[name] = r if b is None or r["wall_s"] < b["wall_s"] else b
                best[name]["rss_mib"] = max(best[name]["rss_mib"], r["rss_mib"])
        f, m = best["floor"], best["mltrain"]
        rows.append({"ranks": n, "floor_s": f["wall_s"], "mltrain_s": m["wall_s"],
                     "ratio": m["wall_s"] / f["wall_s"], "floor_rss_mib": f["rss_mib"],
                     "mltrain_rss_mib": m["rss_mib"],
                     "rss_ratio": m["rss_mib"] / f["rss_mib"]})
    return {"reps": reps, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(args) -> int:
    """The CLI: prints the table, writes --json. Not collective (run as one process)."""
    res = bench_startup(parse_ranks(args.ranks), reps=args.reps or 2)
    print("bench startup: launch to exit of a 1-step default job vs the torch + MPI floor "
          f"(best of {res['reps']}); memory: the largest rank")
    print(f"  {'ranks':>6}{'floor s':>9}{'mltrain s':>11}{'ratio':>7}"
          f"{'floor MiB':>11}{'mltrain MiB':>13}{'ratio':>7}")
    for r in res["rows"]:
        print(f"  {r['ranks']:>6}{r['floor_s']:>9.1f}{r['mltrain_s']:>11.1f}{r['ratio']:>7.2f}"
              f"{r['floor_rss_mib']:>11.0f}{r['mltrain_rss_mib']:>13.0f}{r['rss_ratio']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "startup", **res}, f, indent=2)
    return 0
