"""Typed configuration: TOML files and ``--set section.key=value`` overrides.

Every key lives in a dataclass field below, with its type, default and allowed values, so
this module is also the reference for ``docs/configuration.md`` (a test keeps the two in
step). Loading is pure Python and identical on every rank; nothing here communicates.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "ConfigError", "Config", "load_config", "parse_override", "parse_straggler", "to_toml",
    "to_dict", "describe_keys", "parse_balance", "check_ranks", "read_text", "writable_folder", "RULES", "rules_table", "MOVED",
    "MAX_RANKS", "resolve", "config_from", "key_field", "toml_value", "check_value",
    "model_label",
]


class ConfigError(ValueError):
    """A user error in the configuration; the message names the offending key."""


def _f(default, doc, *, choices=None, min=None, max=None):
    """A config field with its documentation and constraints in the metadata."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "min": min, "max": max})


@dataclass
class RunConfig:
    seed: int = _f(0, "seed of every random choice (initial weights, partitions, shuffles)",
                   min=0, max=2 ** 32 - 1)
    steps: int = _f(0, "optimizer steps; 0 = use run.epochs", min=0)
    epochs: int = _f(30, "passes over the training set when run.steps = 0", min=0)
    dtype: str = _f("float32", "floating-point type of parameters and data",
                    choices=("float32", "float64"))
    threads: int = _f(0, "torch threads per rank; 0 = SLURM_CPUS_PER_TASK, else the CPUs "
                      "this rank is bound to, else the node's CPUs / ranks per node",
                      min=0, max=1024)
    out_dir: str = _f("runs", "folder for per-run outputs (metrics JSONL)")
    straggler: str = _f("", "'RANK:FACTOR' slows one rank's compute by FACTOR (sleeps "
                        "FACTOR-1 times its forward+backward time); empty = none")
    target_loss: float = _f(0.0, "stop once the loss over the whole training set reaches this "
                            "(checked every run.log_every steps; 0 = off)", min=0.0)
    eval_every: int = _f(0, "epochs between test evaluations recorded in the metrics "
                         "(0 = only at the end)", min=0)
    log_every: int = _f(10, "steps between metrics records (the loss is reduced over ranks then)",
                        min=1)
    device: str = _f("cpu", "where parameters, data and gradients live: cpu, cuda (one GPU "
                     "per rank: the node-local rank modulo the visible GPUs) or auto (cuda "
                     "when a GPU is visible, else cpu)", choices=("cpu", "cuda", "auto"))
    amp: str = _f("off", "mixed precision: bf16 runs forward and loss under autocast in "
                  "bfloat16 with float32 master weights and gradients (first-order "
                  "optimizers; run.dtype = float32)", choices=("off", "bf16"))
    costs: str = _f("measured", "how work figures price an evaluation: measured (each kind "
                    "on each level timed at start-up, in plain gradients of the full "
                    "network) or unit (every evaluation 1: counts, reproducible to the bit)",
                    choices=("measured", "unit"))

    @property
    def straggler_spec(self) -> tuple[int, float] | None:
        """``straggler`` as (rank, factor), None when empty (ConfigError when malformed)."""
        return parse_straggler(self.straggler) if self.straggler else None


@dataclass
class DataConfig:
    name: str = _f("digits", "dataset", choices=("digits", "idx", "hdf5", "synthetic"))
    path: str = _f("", "IDX folder (MNIST file names) or HDF5 file with datasets x, y")
    batch_size: int = _f(64, "GLOBAL batch size, split evenly across data-parallel ranks", min=1)
    partition: str = _f("iid", "how the training set is split across data-parallel ranks",
                        choices=("contiguous", "strided", "iid", "shards", "dirichlet",
                                 "classes", "quantity"))
    shards_per_rank: int = _f(2, "label-sorted shards per rank (partition = shards)", min=1)
    alpha: float = _f(0.5, "Dirichlet concentration (partition = dirichlet, quantity); "
                      "small = skewed", min=0.0)
    min_size: int = _f(10, "least samples per rank (dirichlet, quantity: redrawn until met)",
                       min=1)
    classes_per_rank: int = _f(2, "classes each rank holds (partition = classes)", min=1)
    shuffle: bool = _f(True, "reshuffle each rank's partition every epoch")
    num_samples: int = _f(4096, "training samples of the synthetic dataset", min=1)


@dataclass
class ModelConfig:
    name: str = _f("resnet", "architecture", choices=("mlp", "resnet", "cnn"))
    width: int = _f(64, "hidden features (mlp, resnet) or channels (cnn)", min=1)
    depth: int = _f(4, "hidden layers (mlp), residual blocks (resnet), conv blocks (cnn)", min=1)
    init: str = _f("independent", "initial weights: independent draws per layer, or smooth "
                   "(resnet: blocks linear in depth between the first and last block's draws)",
                   choices=("independent", "smooth"))
    depth_penalty: float = _f(0.0, "alpha of the smoothness-in-depth term alpha/2 sum_k "
                              "||theta_{k+1} - theta_k||^2 / h added to the training "
                              "objective (resnet; 0: none; docs/multilevel.md)", min=0.0)
    stem_pool: int = _f(1, "resnet: average-pool the input images by this factor before the "
                        "opening layer (a cheap stem, so the residual blocks dominate the "
                        "cost; must divide the image size; 1: none)", min=1)


def model_label(m: "ModelConfig") -> str:
    """The network a benchmark reports, as ``[model]`` sets it (the non-default extras
    named). Not collective."""
    return (f"{m.name} width {m.width} depth {m.depth}"
            + (f" depth_penalty {m.depth_penalty:g}" if m.depth_penalty else "")
            + (f" stem_pool {m.stem_pool}" if m.stem_pool > 1 else ""))


@dataclass
class OptimConfig:
    name: str = _f("adam", "optimizer (tr: trust region, see [tr]; rmtr, mgopt: multilevel, "
                   "see [multilevel]; apts: domain decomposition, see [apts])",
                   choices=("sgd", "adam", "tr", "rmtr", "mgopt", "apts"))
    lr: float = _f(3e-3, "learning rate (sgd, adam; mgopt's first-order smoothers)", min=0.0)
    momentum: float = _f(0.9, "SGD momentum (heavy ball)", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "L2 weight decay", min=0.0)


@dataclass
class TrConfig:
    radius: float = _f(0.5, "initial trust-region radius", min=0.0)
    radius_max: float = _f(10.0, "largest radius", min=0.0)
    eta1: float = _f(0.1, "steps with actual/predicted reduction below this are rejected",
                     min=0.0, max=1.0)
    eta2: float = _f(0.75, "at or above this ratio the radius grows", min=0.0, max=1.0)
    gamma1: float = _f(0.5, "radius factor after a rejected step", min=0.0, max=1.0)
    gamma2: float = _f(2.0, "radius factor after a very successful step", min=1.0)
    curvature: str = _f("auto", "curvature model (auto: lsr1 for rmtr, apts and "
                        "layer-parallel runs, hessian otherwise)", choices=("auto", "hessian", "ggn", "lsr1"))
    memory: int = _f(5, "with curvature = lsr1: curvature pairs kept", min=1)
    batch: str = _f("auto", "each step's data: a mini-batch, the whole training set, "
                    "or hybrid (mini-batches grown when steps keep failing); auto: hybrid "
                    "for rmtr and apts, minibatch otherwise", choices=("auto", "minibatch", "full", "hybrid"))
    grow_after: int = _f(3, "with batch = hybrid: double the batch after this many "
                         "failed steps in a row (see grow_on; not with grow_on = work)", min=1)
    grow_on: str = _f("auto", "with batch = hybrid: what doubles the batch: grow_after "
                      "failed steps in a row, a step failing when rejected (rejections) or "
                      "also when accepted but keeping less than eta1 of its decrease on "
                      "the next, unseen mini-batch (holdout: two loss evaluations of a "
                      "mini-batch per step); or the work spent at the current batch "
                      "whatever is rejected (work, see grow_every); auto: holdout for "
                      "apts, rejections otherwise",
                      choices=("auto", "rejections", "holdout", "work"))
    grow_every: float = _f(64.0, "with batch = hybrid and grow_on = work: double the batch "
                           "each time the work spent at it reaches this many gradients of "
                           "the current global batch (priced as run.costs; unit makes the "
                           "schedule reproducible to the bit)", min=0.0)
    ksp_type: str = _f("stcg", "PETSc Krylov method for the subproblem",
                       choices=("stcg", "nash", "gltr"))
    max_it: int = _f(50, "most Krylov iterations per step", min=1)


@dataclass
class MultilevelConfig:
    levels: int = _f(1, "levels of the depth hierarchy (level l has model.depth / cf^l "
                     "residual blocks)", min=1)
    cf: int = _f(2, "coarsening factor in depth", min=2)
    transfer: str = _f("injection", "restriction of block parameters",
                       choices=("injection", "full_weighting"))
    prolongation: str = _f("constant", "prolongation of block parameters",
                           choices=("constant", "linear"))
    nested: bool = _f(False, "nested iteration: train the coarsest network first, prolong "
                      "its weights to the next finer, up to the full depth (the run's steps "
                      "shared equally by the levels, or see nested_steps; any optim.name)")
    nested_steps: int = _f(0, "nested iteration: steps on each coarse level, the rest on the "
                           "full network (0: the run's steps shared equally by the levels)", min=0)
    cycle: str = _f("V", "rmtr: V- or W-cycle (one or two coarse corrections per level)",
                    choices=("V", "W"))
    pre_smooth: int = _f(3, "rmtr, mgopt: smoothing steps before the coarse correction "
                         "(rmtr: at most, see stop_on_success)", min=0)
    post_smooth: int = _f(3, "rmtr, mgopt: smoothing steps after the coarse correction "
                          "(rmtr: at most)", min=0)
    coarse_iters: int = _f(2, "rmtr, mgopt: steps on the coarsest level (rmtr: at most)",
                           min=1)
    kappa: float = _f(1e-3, "rmtr: recurse only when norm(P^T g) >= kappa norm(g)", min=0.0)
    smooth_max_it: int = _f(5, "rmtr: most Krylov iterations of a smoothing step's "
                            "subproblem (0 = tr.max_it)", min=0)
    coarse_max_it: int = _f(0, "rmtr: most Krylov iterations of a coarsest-level step's "
                            "subproblem (0 = tr.max_it)", min=0)
    stop_on_success: bool = _f(True, "rmtr: a smoothing phase and a coarsest-level solve "
                               "end at their first accepted step")
    grow_per: str = _f("step", "rmtr with tr.batch = hybrid: what counts toward "
                       "tr.grow_after: every fine trust-region step and coarse correction "
                       "(step), or each cycle, failed when the finest iterate did not move "
                       "(cycle, as a trust-region step counts for TR)",
                       choices=("step", "cycle"))
    coarse_model: str = _f("additive", "rmtr: the first-order consistent coarse model: "
                           "additive (f_H + linear term), multiplicative ((a0 + a.s) f_H, also "
                           "matching the fine value) or hybrid (their mean; Kopanicakova 2022)",
                           choices=("additive", "multiplicative", "hybrid"))
    init: str = _f("none", "rmtr: nested (FMG-style) initialization: cycles from the coarsest "
                   "level first, init_cycles steps per level, each level starting from the "
                   "prolonged weights of the one below; or none", choices=("none", "nested"))
    init_cycles: int = _f(30, "rmtr with init = nested: training steps cycling from each "
                          "coarse level", min=1)


@dataclass
class MgoptConfig:
    smoother: str = _f("sgd", "every level's smoother (sgd and adam use optim.lr and "
                       "optim.momentum; tr the [tr] keys)", choices=("sgd", "adam", "tr"))


@dataclass
class AptsConfig:
    decomposition: str = _f("data", "subdomains of APTS: data (each varies every weight on its "
                            "share of the batch) or weights (each varies its block of layers "
                            "on its share)", choices=("data", "weights"))
    subdomains: int = _f(0, "number of subdomains, a multiple of the data-parallel ranks; "
                         "0 = one per data-parallel rank", min=0)
    local_iters: int = _f(3, "steps of each subdomain's local solve (trust-region or Adam "
                          "steps, apts.local_solver)", min=1)
    global_iters: int = _f(0, "trust-region steps on the global objective after each APTS "
                           "step (the optional global pass)", min=0)
    window: int = _f(0, "non-monotone acceptance (NAPTS): a step is measured against the worst "
                     "of the last window accepted objectives; 1 = monotone; 0 = auto: 3 with "
                     "tr.batch = minibatch (a fixed mini-batch), 1 with hybrid or full batches",
                     min=0)
    local_solver: str = _f("adam", "each subdomain's local solve: adam (Adam directions of "
                           "the subdomain's own moments, each step of length local radius / "
                           "local_iters: a trust-region Adam, no learning rate, the APTS "
                           "authors' choice) or tr (trust-region steps on tr.curvature)",
                           choices=("adam", "tr"))


@dataclass
class ParallelConfig:
    data: int = _f(0, "data-parallel degree; 0 = all ranks", min=0)
    layer: int = _f(1, "layer-parallel degree: residual blocks split over this many ranks, "
                    "propagated by MGRIT (see mgrit.*)", min=1)
    pipe: int = _f(1, "pipeline stages: the model's layers split into this many contiguous "
                   "stages (see pipeline.*)", min=1)
    trial: int = _f(1, "trial groups of `mltrain search`: the ranks split into this many "
                    "groups, each training one configuration at a time (1 for train)", min=1)
    servers: int = _f(1, "sync.name = ps: the last this many ranks are parameter servers, "
                      "each holding one contiguous shard of the parameters; the other ranks "
                      "are workers", min=1)


@dataclass
class PipelineConfig:
    microbatches: int = _f(4, "micro-batches per step (each stage's batch is split into "
                           "these)", min=1)
    schedule: str = _f("1f1b", "gpipe (all forwards, then all backwards) or 1f1b "
                       "(PipeDream-flush: fewer activations in flight)",
                       choices=("gpipe", "1f1b"))
    balance: str = _f("", "layers per stage, comma-separated (empty: as even as possible)")

    @property
    def balance_list(self) -> list[int] | None:
        """``balance`` as layers per stage, None when empty (ConfigError when malformed)."""
        return parse_balance(self.balance)


@dataclass
class MgritConfig:
    levels: int = _f(2, "MGRIT levels over depth (level l steps with every cf^l-th block)",
                     min=1)
    cf: int = _f(2, "MGRIT coarsening factor", min=2)
    relax: str = _f("F", "relaxation: F or FCF", choices=("F", "FCF"))
    iters: int = _f(2, "forward MGRIT iterations", min=1)
    bwd_iters: int = _f(1, "adjoint (backward) MGRIT iterations", min=1)
    tol: float = _f(0.0, "stop iterating once the C-point residual norm is at most this "
                    "(0: always run the iterations)", min=0.0)
    skip: bool = _f(True, "no relaxation on the first down-cycle (its guess is poor)")
    exact_after: int = _f(0, "from this training step on, exact (serial-equivalent) sweeps "
                          "instead of MGRIT, since truncated iterations bias the gradient "
                          "(0 = never)", min=0)

    def solver(self) -> dict:
        """The solver settings, as ``LayerParallel`` (and the planner) take them."""
        return dict(levels=self.levels, cf=self.cf, relax=self.relax, iters=self.iters,
                    bwd_iters=self.bwd_iters, tol=self.tol, skip=self.skip)


@dataclass
class CommConfig:
    bucket_mb: float = _f(8.0, "gradient bucket size in MiB (reverse parameter order)",
                          min=1e-3, max=65536.0)
    grad_as_bucket_view: bool = _f(True, "let .grad live inside the bucket (no pack/unpack copies)")
    max_inflight: int = _f(1, "gradient allreduces in flight at once (MPI without an async "
                           "progress thread runs concurrent ones slowly)", min=1)


@dataclass
class SyncConfig:
    name: str = _f("allreduce", "data-parallel synchronization scheme",
                   choices=("allreduce", "localsgd", "easgd", "sgp", "dpsgd", "hierarchical",
                            "ps"))
    period: int = _f(4, "steps between synchronizations (localsgd, easgd: tau, hierarchical: "
                     "across nodes)", min=1)
    warmup_steps: int = _f(0, "synchronous steps before local steps begin (localsgd: "
                           "post-local SGD)", min=0)
    alpha: float = _f(0.1, "EASGD moving rate (0 = ranks train independently)", min=0.0,
                      max=1.0)
    compression: str = _f("none", "gradient compression for sync.name = allreduce",
                          choices=("none", "fp16", "bf16", "topk", "powersgd"))
    topk_ratio: float = _f(0.01, "fraction of entries top-k sends", min=0.0, max=1.0)
    rank: int = _f(2, "PowerSGD approximation rank", min=1)
    asynchronous: bool = _f(False, "sgp: never wait for a peer (straggler-tolerant, not "
                            "bitwise reproducible)")
    ranks_per_node: int = _f(0, "hierarchical: ranks per node; 0 = MPI's shared-memory "
                             "split (set it to fake nodes on one machine)", min=0)
    staleness: int = _f(0, "ps: how many steps a worker may run ahead of the slowest one "
                        "(0 = bulk synchronous, k > 0 = stale synchronous, -1 = fully "
                        "asynchronous)", min=-1)
    transport: str = _f("messages", "ps: messages (a server loop: every optimizer and "
                        "staleness) or rma (MPI one-sided Accumulate/Get: asynchronous plain "
                        "SGD only)", choices=("messages", "rma"))


@dataclass
class CheckpointConfig:
    dir: str = _f("", "folder for HDF5 checkpoints; empty = no checkpoints")
    every: int = _f(0, "steps between checkpoints; 0 = only at the end", min=0)
    resume: bool = _f(False, "resume from the newest checkpoint in checkpoint.dir")
    keep: int = _f(0, "keep only the newest N checkpoints; 0 = keep all", min=0)


@dataclass
class StudyConfig:
    grid: str = _f("", "parameter grid of `mltrain study`, e.g. "
                   "\"data.partition=iid,dirichlet;sync.name=allreduce,localsgd\"")
    ranks: str = _f("1,2", "rank counts of `mltrain study`, comma-separated")
    out_dir: str = _f("", "folder for the study's runs, tables and plots (empty = "
                      "study-<time>)")
    eval_every: int = _f(1, "epochs between test evaluations in study runs", min=1)


@dataclass
class SearchConfig:
    algo: str = _f("random", "search algorithm of `mltrain search` (see docs/search.md)",
                   choices=("random", "grid", "asha", "pbt", "thompson", "crowding"))
    budget: int = _f(0, "search budget in search.resource units summed over every trial "
                     "(0 = search.max_resource x 16)", min=0)
    resource: str = _f("auto", "what budgets and rungs count: optimizer steps, epochs "
                       "(fair across batch sizes), or work in fine-gradient equivalents (fair "
                       "across first-order, trust-region and multilevel optimizers; needs "
                       "search.max_resource); auto = steps when run.steps > 0, else epochs",
                       choices=("auto", "steps", "epochs", "work"))
    metric: str = _f("test_accuracy", "what a trial is judged by at the end of each of its "
                     "jobs: accuracies are maximized, the loss over the training set minimized",
                     choices=("test_accuracy", "train_accuracy", "train_loss"))
    max_resource: int = _f(0, "a trial's full length in search.resource units (0 = run.steps, "
                           "or run.epochs when search.resource = epochs)", min=0)
    min_resource: int = _f(0, "asha: the lowest rung (0 = max_resource / eta^3, at least 1)",
                           min=0)
    eta: int = _f(3, "asha: reduction factor (the top 1/eta of a rung is promoted)", min=2)
    population: int = _f(0, "pbt, crowding: members of the population (0 = pbt: budget / "
                         "max_resource, so the population spends the budget; crowding: 8)",
                         min=0)
    interval: int = _f(0, "pbt: resource between exploit/explore steps (0 = max_resource / 5)",
                       min=0)
    truncation: float = _f(0.25, "pbt: the bottom fraction copies the top fraction", min=0.0,
                           max=0.5)
    perturb: float = _f(0.2, "pbt: explore multiplies a number by 1 - perturb or 1 + perturb",
                        min=0.0, max=0.9)
    resample: float = _f(0.25, "pbt: probability that explore redraws a key from the space "
                         "instead of perturbing it (categorical keys: redraw or keep)",
                         min=0.0, max=1.0)
    arms: int = _f(16, "thompson: configurations drawn as arms (a finite space no larger is "
                   "taken whole)", min=1)
    grid_points: int = _f(3, "grid: points per number range (log-spaced for log ranges)",
                          min=1)
    grid_order: str = _f("shuffled", "grid: the order the points are tried in: shuffled "
                         "(a permutation drawn from search.seed, so a budget smaller than the "
                         "grid still spreads over the space) or key (the last key varies "
                         "fastest)", choices=("shuffled", "key"))
    crossover: float = _f(0.9, "crowding: probability that two parents are crossed "
                          "(uniform crossover)", min=0.0, max=1.0)
    mutation: float = _f(0.0, "crowding: probability of mutating each key (0 = 1 / keys)",
                         min=0.0, max=1.0)
    replacement: str = _f("deterministic", "crowding: a child replaces its closest parent "
                          "when better (deterministic) or with probability f_child / (f_child "
                          "+ f_parent) (probabilistic)",
                          choices=("deterministic", "probabilistic"))
    seed: int = _f(0, "seed of the search's own choices (run.seed stays each trial's)", min=0,
                   max=2 ** 32 - 1)
    out_dir: str = _f("", "folder for the search state, results.csv, best.toml and plots "
                      "(empty = search-<time>)")
    fail_timeout: float = _f(60.0, "seconds a rank whose trial raised waits for the rest of "
                             "its group to agree before ending the job", min=1.0)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tr: TrConfig = field(default_factory=TrConfig)
    multilevel: MultilevelConfig = field(default_factory=MultilevelConfig)
    mgopt: MgoptConfig = field(default_factory=MgoptConfig)
    apts: AptsConfig = field(default_factory=AptsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mgrit: MgritConfig = field(default_factory=MgritConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_fields(section_obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(section_obj)}


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Checks one value against its field's type and constraints."""
    typ = f.type
    if typ == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif typ == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    else:  # pragma: no cover - a new field type without a rule is a programming error
        raise AssertionError(f"no coercion rule for {typ}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(map(repr, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
    return value


# Keys that moved out of [optim] into their component's section: named in the error.
MOVED = {**{f"optim.{f.name}": f"tr.{f.name}" for f in dataclasses.fields(TrConfig)},
         **{f"optim.{f.name}": f"multilevel.{f.name}"
            for f in dataclasses.fields(MultilevelConfig)},
         "optim.smoother": "mgopt.smoother"}


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    full = f"{section}.{key}"
    if full in MOVED:
        raise ConfigError(f"{full}: moved to {MOVED[full]} (trust-region, multilevel and "
                          "MG/OPT keys have their own sections)")
    if section not in _SECTIONS:
        raise ConfigError(f"{full}: unknown section {section!r} "
                          f"(known: {', '.join(sorted(_SECTIONS))})")
    sec = getattr(cfg, section)
    fields = _section_fields(sec)
    if key not in fields:
        raise ConfigError(f"{full}: unknown key (known in [{section}]: "
                          f"{', '.join(sorted(fields))})")
    setattr(sec, key, _coerce(full, fields[key], value))


def parse_override(text: str) -> tuple[str, str, Any]:
    """Splits ``section.key=value``; the value is read as a TOML value, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    lhs, raw = text.split("=", 1)
    parts = lhs.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words and paths: --set data.path=/scratch/mnist
    return parts[0], parts[1], value


@dataclass(frozen=True)
class Rule:
    """One compatibility rule between keys: ``broken(cfg)`` is the error message naming
    the key when ``cfg`` breaks it (None otherwise); ``keys`` and ``text`` are its row in
    docs/configuration.md (``rules_table``)."""

    keys: str
    text: str
    broken: Callable[["Config"], str | None]


# Which optimizers each model-parallel axis supports (nested iteration counts as its own).
LAYOUT_SUPPORT = {"parallel.layer": ("sgd", "adam", "tr", "rmtr"),
                  "parallel.pipe": ("sgd", "adam")}
_SELF_AVERAGING = ("tr", "rmtr", "mgopt", "apts")  # they average their own gradients and products
_F32_MAX = 3.4e38


def _kind(c: "Config") -> str:
    return "nested iteration" if c.multilevel.nested else repr(c.optim.name)


def _layout(key: str):
    def broken(c):
        degree = c.parallel.layer if key == "parallel.layer" else c.parallel.pipe
        ok = LAYOUT_SUPPORT[key]
        if degree > 1 and (c.optim.name not in ok or c.multilevel.nested):
            what = "layer-parallel" if key == "parallel.layer" else "pipeline"
            names = ", ".join(repr(n) for n in ok)
            return (f"{key}: {what} training works with optim.name = {names} (not yet "
                    f"{_kind(c)})")
        return None
    return broken


def _uses_tr(c: "Config") -> bool:
    return (c.optim.name in ("tr", "rmtr", "apts")
            or (c.optim.name, c.mgopt.smoother) == ("mgopt", "tr"))


def _first(*checks):
    """The first message of ``checks`` (pairs of condition and message), or None."""
    return next((msg for cond, msg in checks if cond), None)


RULES = [
    Rule("run.steps, run.epochs", "at least one is positive",
         lambda c: _first((c.run.steps == 0 and c.run.epochs == 0,
                           "run.steps and run.epochs are both 0: nothing to train"))),
    Rule("data.alpha", "positive for data.partition = dirichlet, quantity",
         lambda c: _first((c.data.partition in ("dirichlet", "quantity") and c.data.alpha <= 0,
                           "data.alpha: must be positive"))),
    Rule("data.path", "required for data.name = idx, hdf5",
         lambda c: _first((c.data.name in ("idx", "hdf5") and not c.data.path,
                           f"data.path: required when data.name = {c.data.name!r}"))),
    Rule("parallel.pipe, optim.name", "pipelines train with "
         + ", ".join(LAYOUT_SUPPORT["parallel.pipe"]) + " (no nested iteration)",
         _layout("parallel.pipe")),
    Rule("parallel.pipe, sync.*", "pipelines average their own gradients: sync.name = "
         "allreduce, no compression",
         lambda c: _first((c.parallel.pipe > 1 and (c.sync.name != "allreduce"
                                                    or c.sync.compression != "none"),
                           "parallel.pipe: pipeline training averages gradients itself: use "
                           "sync.name = 'allreduce' without compression"))),
    Rule("parallel.layer, optim.name", "layer-parallel training with "
         + ", ".join(LAYOUT_SUPPORT["parallel.layer"]) + " (no nested iteration)",
         _layout("parallel.layer")),
    Rule("parallel.layer, tr.curvature", "layer-parallel trust region and RMTR use lsr1",
         lambda c: _first((c.parallel.layer > 1 and c.optim.name in ("tr", "rmtr")
                           and c.tr.curvature != "lsr1",
                           f"tr.curvature: layer-parallel trust region needs 'lsr1' (no "
                           f"{c.tr.curvature!r} products through MGRIT yet)"))),
    Rule("parallel.layer, sync.name", "layer-parallel training uses sync.name = allreduce",
         lambda c: _first((c.parallel.layer > 1 and c.sync.name != "allreduce",
                           f"parallel.layer: layer-parallel training needs sync.name = "
                           f"'allreduce', not {c.sync.name!r}"))),
    Rule("optim.lr, optim.weight_decay, tr.radius, tr.radius_max, model.depth_penalty",
         "within float32 when run.dtype = float32",
         lambda c: _first(*((c.run.dtype == "float32" and getattr(sec, k) > _F32_MAX,
                             f"{name}.{k}: {getattr(sec, k)} is beyond float32 (run.dtype); "
                             "nothing trains at that scale")
                            for name, sec, keys in (("optim", c.optim, ("lr", "weight_decay")),
                                                    ("tr", c.tr, ("radius", "radius_max")),
                                                    ("model", c.model, ("depth_penalty",)))
                            for k in keys))),
    Rule("model.init, model.stem_pool, model.name", "init = smooth and stem_pool for resnet only",
         lambda c: _first((c.model.init == "smooth" and c.model.name != "resnet",
                           f"model.init: 'smooth' makes residual blocks linear in depth; "
                           f"model.name = {c.model.name!r} has none"),
                          (c.model.stem_pool > 1 and c.model.name != "resnet",
                           f"model.stem_pool: pools the input of a residual network's opening "
                           f"layer; model.name = {c.model.name!r} is not one"))),
    Rule("model.depth_penalty, model.name, parallel.layer, parallel.pipe",
         "a depth penalty needs residual blocks on every rank (resnet, no layer or pipe axis)",
         lambda c: _first((c.model.depth_penalty > 0 and c.model.name != "resnet",
                           f"model.depth_penalty: couples consecutive residual blocks; "
                           f"model.name = {c.model.name!r} has none"),
                          (c.model.depth_penalty > 0 and (c.parallel.layer > 1
                                                          or c.parallel.pipe > 1),
                           "model.depth_penalty: needs every residual block on every rank "
                           f"(parallel.layer = {c.parallel.layer}, parallel.pipe = "
                           f"{c.parallel.pipe}; both must be 1)"))),
    Rule("multilevel.nested, multilevel.levels, multilevel.nested_steps",
         "nested iteration needs 2 levels or more; nested_steps only with nested = true",
         lambda c: _first((c.multilevel.nested and c.multilevel.levels < 2,
                           "multilevel.nested: needs multilevel.levels >= 2"),
                          (c.multilevel.nested_steps > 0 and not c.multilevel.nested,
                           "multilevel.nested_steps: sets the phases of nested iteration; "
                           "needs multilevel.nested = true (RMTR's nested start: "
                           "multilevel.init_cycles)"))),
    Rule("multilevel.init, optim.name, multilevel.levels",
         "init = nested: RMTR with 2 levels or more, not with multilevel.nested",
         lambda c: _first((c.multilevel.init == "nested" and c.optim.name != "rmtr",
                           f"multilevel.init: 'nested' initializes RMTR cycles, not "
                           f"optim.name = {c.optim.name!r} (multilevel.nested trains any "
                           "optimizer level by level)"),
                          (c.multilevel.init == "nested" and c.multilevel.levels < 2,
                           "multilevel.init: 'nested' needs multilevel.levels >= 2"),
                          (c.multilevel.init == "nested" and c.multilevel.nested,
                           "multilevel.init: 'nested' and multilevel.nested = true both train "
                           "the coarse levels first; choose one"))),
    Rule("tr.radius, tr.radius_max, tr.eta1, tr.eta2, tr.gamma1, tr.grow_every",
         "0 < radius <= radius_max, eta1 <= eta2, 0 < gamma1 < 1, grow_every > 0 with "
         "grow_on = work (when a trust region runs)",
         lambda c: _first(
             (_uses_tr(c) and not 0 < c.tr.radius <= c.tr.radius_max,
              f"tr.radius: need 0 < radius <= radius_max, got {c.tr.radius} and "
              f"{c.tr.radius_max}"),
             (_uses_tr(c) and c.tr.eta1 > c.tr.eta2,
              f"tr.eta1: {c.tr.eta1} is above tr.eta2 = {c.tr.eta2}"),
             (_uses_tr(c) and not 0 < c.tr.gamma1 < 1,
              f"tr.gamma1: must lie strictly between 0 and 1, got {c.tr.gamma1}"),
             (_uses_tr(c) and c.tr.grow_on == "work" and not c.tr.grow_every > 0,
              f"tr.grow_every: must be positive with tr.grow_on = 'work', got "
              f"{c.tr.grow_every}"))),
    Rule("optim.name, sync.*", "tr, rmtr, mgopt and apts average their own gradients: "
         "sync.name = allreduce, no compression",
         lambda c: _first((c.optim.name in _SELF_AVERAGING
                           and (c.sync.name != "allreduce" or c.sync.compression != "none"),
                           f"optim.name = {c.optim.name!r} averages its own gradients and "
                           "curvature products: use sync.name = 'allreduce' without "
                           "compression"))),
    Rule("sync.compression", "only with sync.name = allreduce",
         lambda c: _first((c.sync.compression != "none" and c.sync.name != "allreduce",
                           f"sync.compression: applies to sync.name = 'allreduce', not "
                           f"{c.sync.name!r}"))),
    Rule("sync.topk_ratio", "positive with sync.compression = topk",
         lambda c: _first((c.sync.compression == "topk" and c.sync.topk_ratio <= 0,
                           "sync.topk_ratio: must be positive"))),
    Rule("sync.name, optim.name, parallel.*", "ps: optim.name = sgd or adam on the data "
         "axis alone (no pipe or layer axis, no nested iteration)",
         lambda c: _first((c.sync.name == "ps" and (c.optim.name not in ("sgd", "adam")
                                                    or c.multilevel.nested),
                           f"sync.name = 'ps': parameter servers apply optim.name = 'sgd' or "
                           f"'adam' (not {_kind(c)})"),
                          (c.sync.name == "ps" and (c.parallel.pipe > 1 or c.parallel.layer > 1),
                           "sync.name = 'ps': parameter servers hold the whole parameter "
                           "vector: use parallel.pipe = 1 and parallel.layer = 1"))),
    Rule("sync.transport, sync.staleness, optim.*", "rma: sync.name = ps, staleness -1, "
         "optim.name = sgd without momentum or weight decay",
         lambda c: _first((c.sync.transport == "rma" and (
             c.sync.name != "ps" or c.sync.staleness != -1 or c.optim.name != "sgd"
             or c.optim.momentum != 0 or c.optim.weight_decay != 0),
             "sync.transport = 'rma': one-sided Accumulate can only add: it needs "
             "sync.name = 'ps', sync.staleness = -1 and optim.name = 'sgd' with "
             "optim.momentum = 0 and optim.weight_decay = 0 (use sync.transport = "
             "'messages' for anything else)"))),
    Rule("checkpoint.resume, sync.name", "resume only with sync.name = allreduce or ps",
         lambda c: _first((c.checkpoint.resume and c.sync.name not in ("allreduce", "ps"),
                           f"checkpoint.resume: not supported yet with sync.name = "
                           f"{c.sync.name!r} (its checkpoints hold the consensus model, not "
                           "every replica and the scheme's state); start a new run from it"))),
    Rule("checkpoint.resume, checkpoint.every", "need checkpoint.dir",
         lambda c: _first((c.checkpoint.resume and not c.checkpoint.dir,
                           "checkpoint.resume: needs checkpoint.dir"),
                          (c.checkpoint.every and not c.checkpoint.dir,
                           "checkpoint.every: needs checkpoint.dir"))),
    Rule("run.amp", "bf16 needs run.dtype = float32, a first-order optimizer and no layer axis",
         lambda c: _first(
             (c.run.amp != "off" and c.run.dtype != "float32",
              f"run.amp = {c.run.amp}: mixed precision keeps float32 master weights "
              f"(run.dtype = {c.run.dtype}; exactness runs stay in float64 without amp)"),
             (c.run.amp != "off" and (c.optim.name not in ("sgd", "adam")
                                      or c.multilevel.nested),
              f"run.amp = {c.run.amp}: works with optim.name = 'sgd', 'adam' (not "
              f"{_kind(c)}: trust-region ratios and curvature products need full precision)"),
             (c.run.amp != "off" and c.parallel.layer > 1,
              f"run.amp = {c.run.amp}: not with parallel.layer = {c.parallel.layer} "
              "(MGRIT's residual tolerance is below bfloat16's precision)"))),
]


def rules_table() -> str:
    """RULES as the markdown table docs/configuration.md includes (a test keeps them
    equal)."""
    rows = ["| keys | rule |", "|---|---|"]
    rows += [f"| {', '.join(f'`{k}`' for k in r.keys.split(', '))} | {r.text} |"
             for r in RULES]
    return "\n".join(rows) + "\n"


def _validate(cfg: Config) -> None:
    """Cross-key checks that do not depend on the rank count: every rule of RULES, and
    the typed values of run.straggler and pipeline.balance."""
    # run.straggler and pipeline.balance as typed values: parsed here, so a malformed one
    # stops the load (the properties give the same values wherever they are used).
    cfg.run.straggler_spec
    cfg.pipeline.balance_list
    for rule in RULES:
        message = rule.broken(cfg)
        if message:
            raise ConfigError(message)


def parse_balance(text: str) -> list[int] | None:
    """``"3,2,2"`` -> [3, 2, 2] (layers per pipeline stage); empty -> None. Raises
    ConfigError naming pipeline.balance."""
    if not text.strip():
        return None
    try:
        out = [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"pipeline.balance: expected comma-separated layer counts, got "
                          f"{text!r}") from None
    if min(out) < 1:
        raise ConfigError(f"pipeline.balance: every stage needs at least one layer, got {text!r}")
    return out


def parse_straggler(text: str) -> tuple[int, float]:
    """``"RANK:FACTOR"`` -> (rank, factor); raises ConfigError naming run.straggler."""
    try:
        r, f = text.split(":")
        rank, factor = int(r), float(f)
    except ValueError:
        raise ConfigError(f"run.straggler: expected 'RANK:FACTOR', got {text!r}") from None
    if rank < 0 or not math.isfinite(factor) or factor < 1:
        raise ConfigError(f"run.straggler: need RANK >= 0 and FACTOR >= 1, got {text!r}")
    return rank, factor


# Rank counts mltrain accepts wherever a count is given (--ranks): above the largest
# machines' core counts, far below what would make a planner loop or a table hang.
MAX_RANKS = 1 << 24
# A config or hardware file is a few KiB; the cap keeps a wrong path from being read whole.
MAX_TEXT_BYTES = 16 << 20


def check_ranks(n: int, what: str = "--ranks") -> int:
    """Returns ``n`` or raises ConfigError unless 1 <= n <= MAX_RANKS. Not collective."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RANKS:
        raise ConfigError(f"{what}: rank count {n!r} is outside 1..{MAX_RANKS}")
    return n


def read_text(path: str | Path, what: str) -> str:
    """A small UTF-8 text file (config, hardware, saved state), refused with ConfigError naming
    ``what`` when it is not a regular file (a FIFO would block), too large, or not UTF-8
    text. Not collective."""
    import os
    import stat

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if st.st_size > MAX_TEXT_BYTES:
            raise ConfigError(f"{what} {path}: {st.st_size} bytes, more than a config file "
                              f"has (limit {MAX_TEXT_BYTES})")
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    if b"\0" in raw:
        raise ConfigError(f"{what} {path}: a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None


def writable_folder(path: str | Path, what: str) -> Path:
    """Creates the folder ``path`` if needed and proves it writable by creating and removing
    a probe file; ConfigError naming ``what`` otherwise. Not collective."""
    import os
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mltrain-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what}: {path} is not a writable folder ({e.strerror or e})") \
            from None
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Reads a TOML file (or the built-in default when None) and applies overrides.

    Not collective: every rank calls it and gets the same result or the same error.
    """
    return config_from(read_text(path, "--config") if path is not None else None,
                       overrides, what=f"--config {path}")


def config_from(text: str | None, overrides: list[str] | tuple = (),
                values: dict[str, Any] | None = None, *, what: str = "--config") -> Config:
    """The config of TOML ``text`` (None: the built-in default), then ``overrides``
    (``section.key=value`` strings), then ``values`` ({"section.key": value}, typed, as a
    search draws them), resolved and validated. Raises ConfigError. Not collective."""
    cfg = Config()
    if text is not None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{what}: not valid TOML ({e})") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a [{section}] table, got a value")
            for key, value in table.items():
                _apply(cfg, section, key, value)
    for text in overrides:
        section, key, value = parse_override(text)
        sec = getattr(cfg, section, None)
        field_ = _section_fields(sec).get(key) if sec is not None else None
        if field_ is not None and field_.type == "str" and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()  # --set checkpoint.dir=2024 is a string
        _apply(cfg, section, key, value)
    for full, value in (values or {}).items():
        section, _, key = full.partition(".")
        _apply(cfg, section, key, value)
    resolve(cfg)
    _validate(cfg)
    return cfg


def key_field(full: str) -> dataclasses.Field:
    """The field of ``section.key``; ConfigError naming it when there is none (a moved key
    names its new place). Not collective."""
    section, _, key = full.partition(".")
    if full in MOVED:
        raise ConfigError(f"{full}: moved to {MOVED[full]}")
    if section not in _SECTIONS or not key or "." in key:
        raise ConfigError(f"{full}: not a config key (section.key; sections: "
                          f"{', '.join(sorted(_SECTIONS))})")
    fields = _section_fields(getattr(Config(), section))
    if key not in fields:
        raise ConfigError(f"{full}: unknown key (known in [{section}]: "
                          f"{', '.join(sorted(fields))})")
    return fields[key]


def check_value(full: str, value: Any) -> Any:
    """``value`` as the config takes it for the key ``section.key`` (type, choices,
    bounds); ConfigError naming the key otherwise. Not collective."""
    return _coerce(full, key_field(full), value)


def toml_value(v: Any) -> str:
    """``v`` as a TOML literal that reads back to the same value (floats by repr)."""
    return _toml_value(v)


def resolve(cfg: Config) -> Config:
    """Replaces the ``auto`` defaults by what they mean for this run (in place; returns
    ``cfg``): multilevel trust region and APTS run as published, L-SR1 on every level
    and subdomain with hybrid batches; APTS's acceptance is non-monotone (window 3) on a
    fixed mini-batch and monotone otherwise, and its hybrid batch also grows on held-out
    failures; layer-parallel runs need L-SR1 (no curvature products through MGRIT). Not
    collective."""
    published = cfg.optim.name in ("rmtr", "apts")
    if cfg.tr.curvature == "auto":
        cfg.tr.curvature = "lsr1" if published or cfg.parallel.layer > 1 else "hessian"
    if cfg.tr.batch == "auto":
        cfg.tr.batch = "hybrid" if published else "minibatch"
    if cfg.apts.window == 0:
        # Measured (docs/benchmarks.md): a window of 3 helps APTS on a fixed mini-batch
        # (digits, MNIST, Fashion-MNIST) and hurts where rejections must shrink the radius
        # or grow the batch (hybrid and full batches on digits).
        cfg.apts.window = 3 if cfg.tr.batch == "minibatch" else 1
    if cfg.tr.grow_on == "auto":
        # Measured (docs/benchmarks.md): APTS's trust-region Adam is rarely rejected, so
        # rejections alone leave its hybrid batch at the mini-batch (MNIST 0.70 against
        # 0.94 with the held-out test); TR and RMTR reach the digits target with less work
        # on rejections alone (and in more steps).
        cfg.tr.grow_on = "holdout" if cfg.optim.name == "apts" else "rejections"
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # A JSON string is a TOML basic string (same escapes for quotes, backslashes and
    # control characters), except that TOML also wants DEL escaped.
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(cfg: Config) -> str:
    """The configuration as TOML text that load_config reads back to an equal Config."""
    lines = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def describe_keys() -> list[tuple[str, str, Any, str, tuple | None]]:
    """(key, type, default, doc, choices) for every key, in declaration order."""
    out = []
    for sec_field in dataclasses.fields(Config):
        sec = sec_field.default_factory()
        for f in dataclasses.fields(sec):
            out.append((f"{sec_field.name}.{f.name}", f.type, getattr(sec, f.name),
                        f.metadata["doc"], f.metadata["choices"]))
    return out
