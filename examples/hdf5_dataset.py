"""Train on your own data: write it as HDF5 (datasets x, y and optionally x_test, y_test)
and point data.path at the file. Each rank then reads only its partition.

    mpiexec -n 2 python examples/hdf5_dataset.py [--steps N] [--file data.h5]
"""
import argparse
import os
import tempfile

import h5py
import numpy as np
from mpi4py import MPI

from mltrain.config import load_config
from mltrain.data import open_dataset
from mltrain.train import Trainer

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--file", default=os.path.join(tempfile.gettempdir(), "mltrain-example.h5"))
args = ap.parse_args()
comm = MPI.COMM_WORLD

if comm.Get_rank() == 0:  # one writer; here we reuse the digits as "your" data
    d = open_dataset("digits")
    x, y = d.read_train(np.arange(d.num_train))
    xt, yt = d.read_test(np.arange(d.num_test))
    with h5py.File(args.file, "w") as f:
        f["x"], f["y"], f["x_test"], f["y_test"] = x, y, xt, yt
comm.Barrier()

cfg = load_config(None, [f"run.steps={args.steps}", "data.name=hdf5", f"data.path={args.file}"])
trainer = Trainer(cfg, comm, quiet=True, metrics=False)
summary = trainer.train()
trainer.close()
if comm.Get_rank() == 0:
    print(f"HDF5 data, {summary['steps']} steps on {summary['ranks']} ranks: test accuracy "
          f"{summary['test_accuracy']:.3f}")
