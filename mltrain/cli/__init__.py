"""``python -m mltrain [train|info|bench|search|partition|study|plan|simulate|jobscript] [--config F]
[--set k=v ...]``.

With no subcommand it trains the built-in default. User errors (config, data, checkpoint)
end every rank with the same one-line message and exit code 2; any other exception on any
rank aborts the whole job (exit 1), never a hang.
"""
from __future__ import annotations

import argparse
import json
import sys

EXIT_USER_ERROR = 2
# Exception kinds (CollectiveError.kind) that are the user's to fix: one line, exit 2.
# MemoryError is a model or dataset too large for the node; TrainingError a run that
# diverged.
_USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "CollectiveError",
                "MemoryError", "TrainingError")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE.toml", help="TOML config (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--petsc", default="", metavar='"OPTIONS"',
                   help='PETSc options, e.g. "-mltrain_tr_ksp_type gltr -log_view"')
    return p


def _train_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--summary", metavar="OUT.json", help="write the run summary as JSON")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    # No subcommand means train, so the top level takes train's options too.
    parser = argparse.ArgumentParser(
        prog="mltrain", parents=[common, _train_opts()],
        description="MPI-native training of PyTorch models. Run under mpiexec/srun.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", parents=[common, _train_opts()], help="train (the default command)")
    i = sub.add_parser("info", parents=[common], help="versions, MPI libraries, ranks, threads")
    i.add_argument("--check-mpi", action="store_true",
                   help="exit 1 unless mpi4py and PETSc load the same MPI library")
    b = sub.add_parser("bench", parents=[common], help="benchmarks against a baseline")
    b.add_argument("what", choices=["dp", "sync", "kernels", "tr", "multilevel", "mgrit",
                                    "hardware", "pipeline", "startup", "search", "ps", "prices"],
                   help="dp: data-parallel step vs DDP, reducer vs raw allreduce; sync: every "
                   "scheme vs allreduce, with and without a straggler; kernels: C++ kernels vs "
                   "torch references; tr: SGD, Adam and trust region under one work budget; "
                   "multilevel: RMTR and APTS against tuned SGD/Adam, L-BFGS, TR and nested "
                   "iteration over batch regimes, initializations and seeds; mgrit: "
                   "layer-parallel forward+backward vs serial autograd; "
                   "hardware: measure this machine for the planner; pipeline: pipelined vs "
                   "unpipelined steps, and the planner's predictions; startup: launch to exit and "
                   "memory per rank at several rank counts vs a bare torch + MPI job (run it "
                   "as one process, it starts the jobs); search: every search algorithm and "
                   "Optuna's TPE at one budget over seeds, and the wall time with trial "
                   "groups; ps: parameter servers (k = 0, 4, -1) against allreduce and "
                   "(asynchronous) SGP, with and without a 2x straggler, per data partition; "
                   "prices: how much the start-up prices of work figures vary between "
                   "start-ups, the current timing protocol against the previous one")
    b.add_argument("--json", metavar="OUT.json", help="write the figures as JSON")
    b.add_argument("--steps", type=int, default=0,
                   help="timed steps per variant (0 = 30 for dp, 32 for sync)")
    b.add_argument("--reps", type=int, default=0, help="timed reductions per variant (dp, "
                   "0 = 20); jobs per variant (startup, 0 = 2); start-ups per protocol "
                   "(prices, 0 = 12)")
    b.add_argument("--ranks", default="8,16,32", help="startup: rank counts")
    b.add_argument("--sizes", default="", help="kernels: element counts, e.g. 1e4,1e6")
    b.add_argument("--budget", type=float, default=10.0,
                   help="tr, multilevel: (fine-)gradient equivalents of work per method; "
                   "search: full trials' worth of steps per search")
    b.add_argument("--datasets", default="digits",
                   help="search: digits and/or mnist (mnist: --set data.path=IDX folder)")
    b.add_argument("--target", type=float, default=0.1,
                   help="multilevel: training loss each method races to")
    b.add_argument("--milestones", default="",
                   help="multilevel: comma-separated training losses above --target at which "
                   "each method's work (and TR's over it) is reported too, from the same runs")
    b.add_argument("--target-acc", type=float, default=None,
                   help="multilevel: test accuracy whose sequential steps are compared")
    b.add_argument("--methods", default="", help="multilevel: a comma-separated subset of "
                   "sgd,adam,lbfgs,tr,rmtr-3,apts,apts-tr,nested-adam (the default: all), "
                   "rmtr-3-nested, nested-tr and rmtr-4; search: of "
                   "random,grid,asha,pbt,thompson,crowding,tpe; ps: of "
                   "allreduce,sgp,sgp-async,'ps k=0','ps k=4','ps k=-1','ps-rma k=-1' "
                   "(one-sided; needs optim.momentum=0)")
    b.add_argument("--transport", action="store_true",
                   help="ps: time the servers' two-sided loop against MPI one-sided "
                   "Accumulate/Get (asynchronous plain SGD, no compute; --sizes: elements)")
    b.add_argument("--partitions", default="iid,dirichlet",
                   help="ps: data partitions (iid; dirichlet: label skew, alpha 0.1)")
    b.add_argument("--regimes", default="hybrid,large,full",
                   help="multilevel: batch regimes (hybrid, large, full)")
    b.add_argument("--inits", default="independent,smooth",
                   help="multilevel: initializations (independent, smooth in depth)")
    b.add_argument("--seeds", type=int, default=5, help="multilevel: seeds per cell; "
                   "search: seeds per method")
    b.add_argument("--lrs", type=int, default=6,
                   help="multilevel: log-spaced learning rates tuned for SGD and Adam")
    b.add_argument("--large-batch", type=int, default=512,
                   help="multilevel: the global batch of the large-batch regime")
    b.add_argument("--resolution", type=float, default=0.01,
                   help="multilevel: check the targets whenever the work grew by this fraction")
    b.add_argument("--from-json", metavar="IN.json", help="multilevel: print the tables and "
                   "write --plot/--markdown of a run saved with --json, without training")
    b.add_argument("--markdown", metavar="OUT.md",
                   help="multilevel, search, ps: write the tables as markdown")
    b.add_argument("--plot", metavar="OUT.png", help="tr, multilevel: loss and accuracy "
                   "against work; search: best accuracy against budget; ps: throughput kept and accuracy")
    b.add_argument("--depths", default="64,128,256,512,1024",
                   help="mgrit: residual layer counts")
    b.add_argument("--cf", type=int, default=8, help="mgrit: coarsening factor")
    b.add_argument("--out", metavar="HW.toml", help="hardware: write the hardware file")
    se = sub.add_parser("search", parents=[common],
                        help="hyperparameter search in one MPI job: parallel.trial groups "
                        "each train one configuration at a time (docs/search.md)")
    se.add_argument("--space", required=True, metavar="SPACE.toml",
                    help="one table per config key: range, log, int or choice, and when")
    se.add_argument("--algo", default=None,
                    choices=["random", "grid", "asha", "pbt", "thompson", "crowding"],
                    help="search algorithm (default: search.algo)")
    se.add_argument("--budget", type=int, default=None,
                    help="search.resource units summed over every trial (default: "
                    "search.budget)")
    se.add_argument("--out", default=None, help="output folder (default: search.out_dir)")
    se.add_argument("--resume", action="store_true",
                    help="continue the search saved in --out (same config, space, "
                    "algorithm and budget); finished jobs are not run again")
    se.add_argument("--summary", metavar="OUT.json", help="write the search summary as JSON")
    pt = sub.add_parser("partition", parents=[common],
                        help="compute a partition without MPI: sizes, label histograms, skew")
    pt.add_argument("--ranks", type=int, required=True, help="number of data-parallel ranks")
    pt.add_argument("--json", metavar="OUT.json", help="write sizes, label_histograms, skew")
    pt.add_argument("--plot", metavar="OUT.png", help="stacked bar chart of labels per rank")
    st = sub.add_parser("study", parents=[common],
                        help="run every combination of a parameter grid at several rank "
                        "counts (one MPI job each); write CSV, markdown and plots")
    st.add_argument("--grid", default="", help='e.g. "data.partition=iid,dirichlet;'
                    'sync.name=allreduce,localsgd" (default: study.grid)')
    st.add_argument("--ranks", default="", help="e.g. 1,2,4 (default: study.ranks)")
    st.add_argument("--out", default="", help="output folder (default: study.out_dir)")
    st.add_argument("--launcher", default=None,
                    help='launch command with {ranks}, e.g. "srun -n {ranks}" (default: '
                    "the environment's mpiexec -n {ranks})")
    pl = sub.add_parser("plan", parents=[common], help="rank decompositions (data x pipe, "
                        "micro-batches, stages) of the configured model for a hardware file")
    pl.add_argument("--hardware", required=True, metavar="HW.toml")
    pl.add_argument("--ranks", type=int, required=True)
    pl.add_argument("--top", type=int, default=10, help="configurations to show")
    pl.add_argument("--json", metavar="OUT.json", help="write the ranked configurations")
    pl.add_argument("--write", metavar="CONFIG.toml",
                    help="write the config with the best parallel.* and pipeline.* keys")
    sm = sub.add_parser("simulate", parents=[common], help="predicted step time and scaling "
                        "efficiency of the best decomposition at each rank count")
    sm.add_argument("--hardware", required=True, metavar="HW.toml")
    sm.add_argument("--ranks", default="1,2,4,8,16,32,64,128,256,512,1024")
    sm.add_argument("--json", metavar="OUT.json")
    sm.add_argument("--plot", metavar="OUT.png")
    j = sub.add_parser("jobscript", parents=[common], help="print a SLURM batch script")
    j.add_argument("--nodes", type=int, required=True)
    j.add_argument("--ntasks-per-node", type=int, required=True)
    j.add_argument("--cpus-per-task", type=int, default=0, help="0 = leave to the cluster")
    j.add_argument("--time", default="01:00:00")
    j.add_argument("--partition", default="")
    j.add_argument("--account", default="")
    j.add_argument("--job-name", default="mltrain")
    j.add_argument("--launcher", choices=["srun", "mpiexec"], default="srun",
                   help="srun (default; with the --mpi plugin this environment's MPI needs) "
                   "or this environment's own mpiexec inside the allocation")
    j.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                   help="ask SLURM for SIGUSR1 this long before the time limit: the job "
                   "finishes its step, writes a checkpoint (checkpoint.dir) and stops, and the "
                   "same script submitted again resumes (0 = no signal)")
    j.add_argument("--mpi", default="", metavar="PLUGIN",
                   help="srun's --mpi plugin (default: pmi2 for MPICH and Intel MPI, pmix "
                   "for Open MPI)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Collective on COMM_WORLD for every command but ``jobscript``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    # PETSc options start with '-', which argparse takes for an option of its own:
    # `--petsc "-log_view"` becomes `--petsc=-log_view`.
    argv, i = [], 0
    while i < len(raw):
        if raw[i] == "--petsc" and i + 1 < len(raw):
            argv.append(f"--petsc={raw[i + 1]}")
            i += 2
        else:
            argv.append(raw[i])
            i += 1
    args = build_parser().parse_args(argv)
    command = args.command or "train"
    if command in ("jobscript", "partition", "study", "plan", "simulate") or (
            command == "bench" and args.what == "startup"):  # no MPI here: they start jobs
        return _without_mpi(command, args)

    import os

    # The launcher's variables as it set them: a singleton MPI may add its own at init.
    launched_env = dict(os.environ)
    # Before MPI_Init, which under an srun step without wiring for this MPI aborts (Open
    # MPI) or starts each task as its own 1-rank job (MPICH).
    from mltrain.cli.slurm import slurm_guard, slurm_wiring_guard

    if slurm_wiring_guard(launched_env):
        return EXIT_USER_ERROR
    from mpi4py import MPI

    from mltrain.comm import CollectiveError, agree, install_abort_hook

    comm = MPI.COMM_WORLD
    install_abort_hook(comm)
    # Before any collective: srun steps whose tasks are each a 1-rank MPI job stop here.
    if slurm_guard(comm.Get_size(), MPI.Get_library_version(), env=launched_env):
        return EXIT_USER_ERROR
    try:
        if args.petsc:  # before anything initialises PETSc, so the options take effect
            import shlex

            from mltrain.linalg import has_petsc
            from mltrain.linalg.petsc import init

            def start_petsc():
                from mltrain.config import ConfigError

                if not has_petsc:
                    raise ConfigError("--petsc: PETSc (petsc4py) is not installed")
                try:
                    words = shlex.split(args.petsc)
                except ValueError as e:  # an unbalanced quote
                    raise ConfigError(f"--petsc {args.petsc!r}: {e}") from None
                init(words)
            agree(comm, start_petsc, what="config")
        if command == "info":
            from mltrain.cli.info import run_info

            return run_info(args.check_mpi)
        from mltrain.config import load_config

        cfg = agree(comm, lambda: load_config(args.config, args.overrides), what="config")
        if command == "search":
            return _search(args, comm)
        if command == "bench":
            from mltrain.cli.bench import run_bench

            return run_bench(args.what, cfg, args, comm)
        return _train(cfg, args, comm)
    except CollectiveError as e:
        if e.kind not in _USER_ERRORS:
            raise
        if comm.Get_rank() == 0:
            kind = "out of memory: " if e.kind == "MemoryError" else ""
            print(f"mltrain: error: {kind}{e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        # torch's CPU allocator reports failure as a RuntimeError.
        oom = isinstance(e, MemoryError) or "can't allocate memory" in str(e)
        if type(e).__name__ not in _USER_ERRORS and not oom:
            raise  # a bug: the abort hook prints the traceback and ends the job
        # A user error found on this rank alone, outside `agree` (its peers may be inside
        # a collective): the line, then end every rank with exit code 2.
        print("mltrain: error: " + (f"out of memory on rank {comm.Get_rank()} ({e}); lower "
                                     "data.batch_size or model.width, or use more nodes"
                                     if oom else str(e)), file=sys.stderr, flush=True)
        if comm.Get_size() == 1:  # nobody to wake: no MPI abort banner
            return EXIT_USER_ERROR
        comm.Abort(EXIT_USER_ERROR)


def _without_mpi(command: str, args) -> int:
    from mltrain.config import ConfigError, load_config
    from mltrain.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        if command == "jobscript":
            from mltrain.cli.jobscript import jobscript

            print(jobscript(cfg, args), end="")
            return 0
        if command == "study":
            from mltrain.cli.study import run_study

            return run_study(args)
        if command == "bench":  # startup
            from mltrain.cli import bench_startup

            check_writable(args.json, "--json")
            return bench_startup.run(args)
        if command in ("plan", "simulate"):
            from mltrain.cli.plan import run_plan, run_simulate

            for path, what in ((args.json, "--json"), (getattr(args, "write", None), "--write"),
                               (getattr(args, "plot", None), "--plot")):
                check_writable(path, what)
            return run_plan(cfg, args) if command == "plan" else run_simulate(cfg, args)
        from mltrain.cli.partition import run_partition

        check_writable(args.json, "--json")
        check_writable(args.plot, "--plot")
        return run_partition(cfg, args)
    except (ConfigError, DataError) as e:
        print(f"mltrain: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def check_writable(path: str | None, what: str) -> None:
    """Raises ConfigError unless ``path`` can be created (checked before any training, so a
    typo does not cost the run). Not collective."""
    import os

    from mltrain.config import ConfigError

    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError(f"{what} {path}: folder {folder} does not exist or is not writable")


def _search(args, comm) -> int:
    from mltrain.comm import agree
    from mltrain.search.driver import make_plan, run_search

    def plan():
        check_writable(args.summary, "--summary")
        return make_plan(args.config, args.overrides, args.space, comm.Get_size(),
                         algo=args.algo, budget=args.budget, out=args.out, resume=args.resume)
    summary = comm.bcast(run_search(agree(comm, plan, what="config"), comm, quiet=args.quiet))
    if summary["stopped_by"]:
        import signal

        if comm.Get_rank() == 0:
            print(f"mltrain: search stopped by {summary['stopped_by']}: continue it with "
                  f"--resume --out {summary['out']}", file=sys.stderr)
        sig = getattr(signal, summary["stopped_by"], signal.SIGTERM)
        return 128 + int(sig)
    if comm.Get_rank() == 0:
        if args.summary:
            with open(args.summary, "w") as f:
                json.dump(summary, f, indent=2)
        best = summary["best"]
        print(f"mltrain: search {summary['algo']}: {summary['jobs']} jobs, "
              f"{summary['trials']} trials ({summary['failed']} failed), "
              f"{summary['spent']} of {summary['budget']} spent | best {summary['metric']} "
              + ("-" if best is None else f"{best:.4g} (trial {summary['best_trial']})")
              + f" | {summary['out']}/results.csv, best.toml")
    return 0


def _train(cfg, args, comm) -> int:
    from mltrain.comm import agree
    from mltrain.train import Trainer

    agree(comm, lambda: check_writable(args.summary, "--summary"), what="config")
    trainer = Trainer(cfg, comm, quiet=args.quiet)
    summary = trainer.train()
    trainer.close()
    if comm.Get_rank() == 0 and args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    if summary["stopped_by"]:
        import signal

        if comm.Get_rank() == 0:
            ck = summary["checkpoint"]
            print(f"mltrain: stopped by {summary['stopped_by']} after step {summary['steps']} "
                  + (f"; checkpoint {ck}: run again with --set checkpoint.resume=true to "
                     "continue" if ck else "; no checkpoint (checkpoint.dir is not set, or "
                     "nested iteration was still on a coarse level)"),
                  file=sys.stderr)
        # The shell's convention for a process ended by a signal: not a success.
        return 128 + int(signal.Signals[summary["stopped_by"]])
    if comm.Get_rank() == 0:
        acc = summary["test_accuracy"]
        print(f"mltrain: {summary['steps']} steps ({summary['epochs']:.1f} epochs) on "
              f"{summary['ranks']} ranks"
              + (f" + {summary['servers']} parameter server{'s' * (summary['servers'] > 1)}"
                 if summary.get("servers") else "")
              + f" in {summary['wall_s']:.1f} s "
              f"({summary['samples_per_s']:.0f} samples/s) | loss {summary['final_loss']:.4f}"
              f" | train acc {summary['train_accuracy']:.2%}"
              + (f" | test acc {acc:.2%}" if acc is not None else "")
              + f" | comm {summary['comm_bytes'] / 2**20:.1f} MiB")
    return 0
