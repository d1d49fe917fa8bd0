"""``mltrain jobscript``: a ready-to-submit SLURM batch script for a config.

The config is validated against the job's rank count here, before submission, so a batch
size the data-parallel degree does not divide is found in seconds, not after the queue.
"""
from __future__ import annotations

import os
import shlex
import sys

from mltrain.config import ConfigError, to_toml


def jobscript(cfg, args) -> str:
    """The sbatch script text. Not collective (no MPI)."""
    from mltrain.comm.grid import Grid

    if args.nodes < 1 or args.ntasks_per_node < 1:
        raise ConfigError("--nodes and --ntasks-per-node must be positive")
    ranks = args.nodes * args.ntasks_per_node
    grid = Grid.for_world(ranks, data=cfg.parallel.data)
    if cfg.data.batch_size % grid.data:
        raise ConfigError(f"data.batch_size: the global batch {cfg.data.batch_size} is not "
                          f"divisible by the {grid.data} data-parallel ranks of this job")
    venv = sys.prefix
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={args.ntasks_per_node}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --output=%x-%j.out",
    ]
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    config_file = "mltrain-${SLURM_JOB_ID}.toml"
    lines += [
        "",
        "set -euo pipefail",
        f"# {ranks} ranks: data-parallel degree {grid.data}",
        f"source {shlex.quote(os.path.join(venv, 'bin', 'activate'))}",
        "# One torch thread per allocated core (mltrain's run.threads = 0 divides the node).",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "",
        "# The resolved config, frozen into the job so later edits cannot change it.",
        f"cat > \"{config_file}\" <<'MLTRAIN_CONFIG'",
        to_toml(cfg).rstrip(),
        "MLTRAIN_CONFIG",
        "",
        "# Add --mpi=pmix or --mpi=pmi2 if your site's srun needs it for this MPI.",
        f'srun python -m mltrain train --quiet --config "{config_file}" '
        '--summary "summary-${SLURM_JOB_ID}.json"',
        "",
    ]
    return "\n".join(lines)
