"""mltrain: MPI-native training of PyTorch models at supercomputer scale.

Layers (lower never import higher): utils/config (0); comm, ops (1); linalg, nn, data (2);
optim, sync (3); multilevel, mgrit, pipeline, planner (4); train, io (5); cli (6).
See docs/architecture.md.
"""
__version__ = "0.1.0"
