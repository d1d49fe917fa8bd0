"""``mltrain jobscript``: a ready-to-submit SLURM batch script for a config.

The config is validated against the job's rank count here, before submission, so a batch
size the data-parallel degree does not divide is found in seconds, not after the queue.

The launch line follows the MPI that mpi4py in this environment uses (``mltrain.launch``):
``srun --mpi=pmi2`` for MPICH and Intel MPI, ``srun --mpi=pmix`` for Open MPI; with another
plugin the ranks do not find each other and each task is a 1-rank job (the start-up guard
in ``mltrain.cli`` stops that with exit 2). ``--launcher mpiexec`` uses the environment's
own ``mpiexec`` inside the allocation instead.

Nothing the user gives reaches the shell unchecked: the ``#SBATCH`` values are checked
against what SLURM accepts (no spaces, quotes or control characters), the config travels
base64-encoded (no value can end or escape it) and paths are quoted.
"""
from __future__ import annotations

import base64
import os
import re
import shlex
import sys

from mltrain.config import ConfigError, check_ranks, to_dict, to_toml

__all__ = ["SRUN_MPI", "VENDOR_NAMES", "embed_text", "jobscript", "srun_mpi_flag"]

# The srun MPI plugin each MPI's process manager interface needs.
SRUN_MPI = {"mpich": "pmi2", "intel": "pmi2", "openmpi": "pmix"}
VENDOR_NAMES = {"mpich": "MPICH", "intel": "Intel MPI", "openmpi": "Open MPI"}

# What each #SBATCH value may look like: SLURM's own syntax, without anything a shell or
# sbatch's option parser would split or interpret.
_FIELDS = {
    "--job-name": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}"),
                   "letters, digits and . _ + - (starting with a letter or digit)"),
    "--time": (re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE|unlimited|infinite"),
               "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "--partition": (re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
                    "partition names of letters, digits and . _ -, separated by commas"),
    "--account": (re.compile(r"[A-Za-z0-9._-]+"), "letters, digits and . _ -"),
    "--mpi": (re.compile(r"[A-Za-z0-9_]+"), "an srun MPI plugin name such as pmi2 or pmix"),
}
_HEREDOC_END = "MLTRAIN_CONFIG_BASE64"  # '_' is not in the base64 alphabet


def srun_mpi_flag(vendor: str) -> str | None:
    """The ``srun --mpi`` value for an MPI vendor (``mltrain.launch.mpi_vendor``), None if
    unknown. Not collective."""
    return SRUN_MPI.get(vendor)


def _check_field(option: str, value: str) -> str:
    pattern, allowed = _FIELDS[option]
    if not pattern.fullmatch(value):
        raise ConfigError(f"{option} {value!r}: not a valid value; allowed: {allowed}")
    return value


def _check_toml(cfg) -> str:
    """The config's TOML text, proven to read back to the same values (so the job does not
    fail on it after the queue)."""
    import tomllib

    text = to_toml(cfg)
    try:
        ok = tomllib.loads(text) == to_dict(cfg)
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise ConfigError("the config does not read back from its TOML form, so it cannot be "
                          "frozen into a job script")
    return text


def embed_text(text: str, path_expr: str, python_expr: str) -> list[str]:
    """Bash lines that write ``text`` (any characters) to the file ``path_expr`` (a quoted
    bash word), base64-encoded so that no content can end the here-document or reach the
    shell. Decoded by ``python_expr`` (a quoted bash word). Not collective."""
    b64 = base64.encodebytes(text.encode("utf-8")).decode("ascii").rstrip("\n")
    decode = "import base64, sys; sys.stdout.buffer.write(base64.b64decode(sys.stdin.read()))"
    return [f"{python_expr} -c '{decode}' > {path_expr} <<'{_HEREDOC_END}'",
            *b64.split("\n"), _HEREDOC_END]


def _comment(text: str) -> list[str]:
    """``text`` as bash comment lines (control characters shown as '?')."""
    shown = "".join(c if c == "\n" or c.isprintable() else "?" for c in text)
    return [f"#   {line}".rstrip() for line in shown.rstrip("\n").split("\n")]


def jobscript(cfg, args) -> str:
    """The sbatch script text. Not collective (no MPI)."""
    from mltrain.comm.grid import Grid
    from mltrain.launch import mpi_vendor, mpiexec_path

    if args.nodes < 1 or args.ntasks_per_node < 1:
        raise ConfigError("--nodes and --ntasks-per-node must be positive")
    if args.cpus_per_task < 0:
        raise ConfigError("--cpus-per-task must be 0 (leave it to the cluster) or positive")
    for option, value in (("--job-name", args.job_name), ("--time", args.time),
                          ("--partition", args.partition), ("--account", args.account),
                          ("--mpi", args.mpi)):
        if value or option in ("--job-name", "--time"):
            _check_field(option, value)
    if args.mpi and args.launcher != "srun":
        raise ConfigError("--mpi chooses srun's MPI plugin; it does not apply to "
                          f"--launcher {args.launcher}")
    if not 0 <= args.signal_lead <= 65535:  # SLURM's limit for --signal's time
        raise ConfigError(f"--signal-lead: expected 0..65535 seconds, got {args.signal_lead}")
    ranks = check_ranks(args.nodes * args.ntasks_per_node, "--nodes x --ntasks-per-node")
    grid = Grid.for_config(cfg, ranks)  # the job's own start-up checks, before the queue
    resumes = bool(cfg.checkpoint.dir) and cfg.sync.name in ("allreduce", "ps")
    if resumes:  # submitting the script again continues from the newest checkpoint
        import dataclasses

        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                     resume=True))
    toml = _check_toml(cfg)

    venv = os.path.abspath(sys.prefix)
    python = os.path.join(venv, "bin", "python")
    if not os.access(python, os.X_OK):
        python = os.path.abspath(sys.executable)
    mpiexec = os.path.abspath(mpiexec_path(venv))
    vendor = mpi_vendor(mpiexec)
    name = VENDOR_NAMES.get(vendor, "an MPI mltrain could not identify")

    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={args.ntasks_per_node}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --output=%x-%j.out",
    ]
    if args.signal_lead:
        lines.append(f"#SBATCH --signal=USR1@{args.signal_lead}")
    if args.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    if cfg.run.device == "cuda":
        # One GPU per rank (docs/gpu.md). Under srun each task sees its own GPU; mpiexec
        # starts the ranks itself, so they see the node's GPUs and take local rank mod count.
        lines.append("#SBATCH --gpus-per-task=1" if args.launcher == "srun" else
                     f"#SBATCH --gpus-per-node={args.ntasks_per_node}")
    lines += [
        "# Written by `mltrain jobscript`. Check it against the cluster without queueing:",
        "#   sbatch --test-only THIS_FILE",
        f"# {ranks} ranks: data {grid.data} x pipe {grid.pipe} x layer {grid.layer}"
        + (f" + {cfg.parallel.servers} parameter server"
           f"{'s' * (cfg.parallel.servers > 1)} (the last ranks)"
           if cfg.sync.name == "ps" else "") + ". MPI of the "
        f"environment: {name}.",
        *([f"# SIGUSR1 {args.signal_lead} s before the time limit (and SIGTERM at it) make the "
           "ranks", "# finish their step" + (", write a checkpoint" if cfg.checkpoint.dir else "")
           + " and stop (exit code 138 or 143)."] if args.signal_lead else []),
        *(["# checkpoint.resume is on: submit this script again to continue where it "
           "stopped."] if resumes else []),
        "",
        "set -euo pipefail",
        "# The environment (tools/bootstrap.sh); it must be on a file system the compute "
        "nodes see.",
        f"venv={shlex.quote(venv)}",
        f"python={shlex.quote(python)}",
        'if [[ ! -x $python ]]; then',
        '  echo "mltrain: error: no Python environment at $venv on $(hostname)" \\',
        '       "(build it with tools/bootstrap.sh where the compute nodes see it)" >&2',
        "  exit 2",
        "fi",
        'export PATH="$venv/bin:$PATH"',
        *(["# Device buffers go to MPI through pinned host memory; if this MPI reads GPU "
           "memory", "# (CUDA-aware Open MPI/MPICH, Cray MPICH with MPICH_GPU_SUPPORT_ENABLED=1):",
           "# export MLTRAIN_CUDA_AWARE_MPI=1"] if cfg.run.device == "cuda" else []),
        "# One thread per allocated CPU for OpenMP libraries; torch's threads follow run.threads",
        "# (0 = SLURM_CPUS_PER_TASK, else the CPUs this rank may run on).",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "",
        "# The resolved config, frozen into the job so later edits cannot change it. It is",
        "# stored base64-encoded (no value can end or escape it); as TOML it reads:",
        *_comment(toml),
        'config="mltrain-${SLURM_JOB_ID:?submit this script with sbatch}.toml"',
        *embed_text(toml, '"$config"', '"$python"'),
        "",
    ]
    train = '"$python" -m mltrain train --quiet --config "$config" ' \
            '--summary "summary-${SLURM_JOB_ID}.json"'
    if args.launcher == "mpiexec":
        lines += [
            f"# {name}'s own launcher inside the allocation (it asks SLURM for the nodes).",
            f"mpiexec={shlex.quote(mpiexec)}",
            'if [[ ! -x $mpiexec ]]; then',
            '  echo "mltrain: error: no mpiexec at $mpiexec on $(hostname)" >&2',
            "  exit 2",
            "fi",
            *(["# Open MPI's mpiexec refuses root without consent (containers, test clusters).",
               'if [[ $(id -u) == 0 ]]; then',
               "  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
               "fi"] if vendor == "openmpi" else []),
            f'"$mpiexec" -n "$SLURM_NTASKS" {train}',
        ]
    else:
        flag = args.mpi or srun_mpi_flag(vendor)
        if args.mpi:
            lines.append(f"# --mpi={args.mpi} as asked (for {name} mltrain would use "
                         f"--mpi={srun_mpi_flag(vendor) or '?'}).")
        elif flag:
            lines += [f"# {name} needs srun's --mpi={flag} (MPICH and Intel MPI: pmi2, Open "
                      "MPI: pmix);", "# with another plugin each task is a 1-rank job."]
        else:
            lines.append("# Unknown MPI: pass --mpi=pmi2 (MPICH, Intel MPI) or --mpi=pmix "
                         "(Open MPI) to srun, or use `mltrain jobscript --launcher mpiexec`.")
        if vendor == "intel" and not args.mpi:
            lines.append("# Intel MPI under srun also needs Slurm's PMI-2 library: "
                         "export I_MPI_PMI_LIBRARY=<slurm>/lib/libpmi2.so")
        lines.append(("srun" + (f" --mpi={flag}" if flag else "")) + " " + train)
    lines.append("")
    return "\n".join(lines)
