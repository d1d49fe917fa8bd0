"""pytest under MPI: ``mpiexec -n P python -m mpi4py tests/mpi_pytest.py [pytest args]``.

Runs the tests marked ``mpi`` on every rank. Rank 0 prints to the terminal; the other
ranks write to .test-logs/rank<N>.log, whose tail is shown when that rank failed. The exit
code is the worst of all ranks'.
"""
import os
import sys
from pathlib import Path

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
logdir = Path(__file__).resolve().parents[1] / ".test-logs"
if rank > 0:
    logdir.mkdir(exist_ok=True)
    log = open(logdir / f"rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)

import pytest  # noqa: E402

code = int(pytest.main(["--with-mpi", "-m", "mpi", *sys.argv[1:]]))
codes = comm.allgather(code)
if rank == 0:
    for r, c in enumerate(codes):
        if c != 0 and r > 0:
            tail = (logdir / f"rank{r}.log").read_text().splitlines()[-60:]
            print(f"\n---- rank {r} failed (exit {c}); last lines of its log:\n" + "\n".join(tail))
    print(f"mpi ranks: {comm.Get_size()}, worst exit code {max(codes)}")
sys.stdout.flush()
sys.exit(max(codes))
