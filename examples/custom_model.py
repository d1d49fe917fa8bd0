"""Bring your own PyTorch model: mltrain parallelizes it, the model knows nothing of MPI.

    mpiexec -n 2 python examples/custom_model.py [--steps N] [--set SECTION.KEY=VALUE ...]

The model below follows mltrain's residual-block protocol (``opening``, ``blocks`` each
with a step ``h``, ``closing``), which the layer-parallel and multilevel trainers use;
for data parallelism any module that maps inputs to logits will do. Multilevel training of
it over a depth hierarchy (docs/multilevel.md):

    mpiexec -n 2 python examples/custom_model.py --set optim.name=rmtr --set multilevel.levels=2
    mpiexec -n 2 python examples/custom_model.py --set multilevel.nested=true --set multilevel.levels=2
"""
import argparse

import torch
from mpi4py import MPI
from torch import nn

from mltrain.config import load_config
from mltrain.train import Trainer


class ConvResidualBlock(nn.Module):
    def __init__(self, channels: int, h: float):
        super().__init__()
        self.h = h
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.h * torch.tanh(self.conv(x))


class ConvODENet(nn.Module):
    def __init__(self, channels=8, depth=4, classes=10, T=1.0):
        super().__init__()
        self.opening = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvResidualBlock(channels, T / depth) for _ in range(depth))
        self.closing = nn.Sequential(nn.Flatten(), nn.Linear(channels * 8 * 8, classes))

    def forward(self, x):
        x = self.opening(x)
        for block in self.blocks:
            x = block(x)
        return self.closing(x)


ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
args = ap.parse_args()

cfg = load_config(None, [f"run.steps={args.steps}", "data.batch_size=64", *args.set])
trainer = Trainer(cfg, MPI.COMM_WORLD, quiet=True, metrics=False, model=ConvODENet())
summary = trainer.train()
trainer.close()
if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"ConvODENet, {summary['steps']} steps on {summary['ranks']} ranks: test accuracy "
          f"{summary['test_accuracy']:.3f}")
