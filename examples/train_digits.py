"""Train from Python instead of the command line.

    mpiexec -n 2 python examples/train_digits.py [--steps N]

The same run as `python -m mltrain`, with two keys changed in code.
"""
import argparse

from mpi4py import MPI

from mltrain.config import load_config
from mltrain.train import Trainer

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=0, help="0 = the config's epochs")
args = ap.parse_args()

cfg = load_config(None, [f"run.steps={args.steps}", "optim.lr=0.005"])
trainer = Trainer(cfg, MPI.COMM_WORLD, quiet=True, metrics=False)
summary = trainer.train()
trainer.close()
if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"{summary['steps']} steps on {summary['ranks']} ranks: "
          f"test accuracy {summary['test_accuracy']:.3f}")
