"""A real training job in which one rank fails mid-run: ``fault.py raise|kill|hang``.

raise: rank 1 raises at step 3 while the others are inside the step's allreduce.
kill:  rank 1 is killed by SIGKILL at step 3.
The job must end quickly with a non-zero exit on its own; never hang.
"""
import os
import signal
import sys

from mpi4py import MPI

from mltrain.comm import install_abort_hook
from mltrain.config import load_config
from mltrain.train import Trainer

mode = sys.argv[1]
comm = MPI.COMM_WORLD
install_abort_hook(comm)
cfg = load_config(None, ["run.steps=1000", "model.width=8", "run.threads=1", "data.batch_size=48"])
trainer = Trainer(cfg, comm, quiet=True, metrics=False)
step_fn = trainer.train_step


def faulty(x, y):
    if comm.Get_rank() == 1 and trainer.step == 3:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure on rank 1")
    return step_fn(x, y)


trainer.train_step = faulty
trainer.train()
