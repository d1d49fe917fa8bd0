"""Start-up checks of a run that depend on the dataset (the config's own are in
``mltrain.config``, the rank count's in ``Grid.for_config``). Not collective: the Trainer
runs each inside ``agree``."""
from __future__ import annotations

import torch

from mltrain.config import ConfigError
from mltrain.data import LABEL_PARTITIONS, partition, partition_options, steps_per_epoch
from mltrain.multilevel.hierarchy import coarse_first, steps_per_level
from mltrain.nn import build_model, stem_error
from mltrain.utils import check_memory
from mltrain.utils.device import select_device

__all__ = ["model_memory", "epoch_steps", "my_partition", "stem", "coarse_phases",
           "has_coarse_phases"]


def stem(cfg, dataset) -> None:
    """ConfigError when ``model.stem_pool`` does not suit the dataset's images. Not
    collective."""
    if cfg.model.name == "resnet":
        why = stem_error(dataset.input_shape, cfg.model.stem_pool)
        if why:
            raise ConfigError(f"{why} of data.name = {cfg.data.name!r}")


def model_memory(cfg, dataset, dtype: torch.dtype, share: int,
                 device: torch.device = torch.device("cpu")) -> None:
    """ConfigError when ``model.stem_pool`` does not suit the dataset's images, or when the
    configured model, its gradients and optimizer state would not
    fit in this rank's ``share`` of the node's available memory, or of its GPU's free memory
    (its ranks share it) when ``device`` is a GPU (sized on the meta device: nothing is
    allocated)."""
    c = cfg
    stem(c, dataset)
    with torch.device("meta"):
        m = build_model(c.model.name, dataset.input_shape, dataset.num_classes,
                        width=c.model.width, depth=c.model.depth, dtype=dtype,
                        stem_pool=c.model.stem_pool)
    nbytes = sum(p.numel() for p in m.parameters()) * dtype.itemsize
    # Parameters and gradients, plus what the optimizer keeps per parameter.
    copies = {"sgd": 1, "adam": 2}.get(c.optim.name, 2 * c.tr.memory + 2)
    what = (f"model.width = {c.model.width}, model.depth = {c.model.depth} "
            f"({nbytes / 2 ** 20:.0f} MiB of parameters)")
    # Built on the host first (the same initial weights on every device), then moved.
    check_memory(nbytes * (1 if device.type == "cuda" else 2 + copies), what, share=share,
                 error=ConfigError)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        sharing = -(-share // torch.cuda.device_count())  # ranks per visible GPU
        need = nbytes * (2 + copies)
        if need > free / sharing:
            raise ConfigError(
                f"model.width = {c.model.width}, model.depth = {c.model.depth}: needs "
                f"{need / 2 ** 30:.2f} GiB on {device} ({nbytes / 2 ** 20:.0f} MiB of "
                f"parameters), {free / sharing / 2 ** 30:.2f} GiB free per rank on it")


def device(cfg, local_rank: int) -> torch.device:
    """``run.device`` for the rank that is ``local_rank`` on its node; ConfigError naming it
    when no GPU is visible for cuda."""
    try:
        return select_device(cfg.run.device, local_rank)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def epoch_steps(cfg, dataset) -> int:
    """Steps per epoch; ConfigError when the global batch exceeds the training set."""
    b = cfg.data.batch_size
    spe = steps_per_epoch(dataset.num_train, b)
    if spe < 1:
        raise ConfigError(f"data.batch_size: {b} is larger than the training set "
                          f"({dataset.num_train} samples)")
    return spe


def has_coarse_phases(cfg) -> bool:
    """Whether the run starts on coarse levels (nested iteration or RMTR's nested start),
    the runs ``coarse_phases`` checks."""
    o = cfg.multilevel
    return bool(o.nested or (cfg.optim.name == "rmtr" and o.init == "nested"))


def coarse_phases(cfg, total_steps: int) -> None:
    """ConfigError when nested iteration (``multilevel.nested``) or RMTR's nested start
    (``multilevel.init_cycles``) spends every step of the run on the coarse levels: the
    full-depth network would end it untrained. A run that writes checkpoints
    (``checkpoint.dir``) may be the first leg of a longer one, resumed later, and is not
    refused. Not collective."""
    o = cfg.multilevel
    if cfg.checkpoint.dir or not has_coarse_phases(cfg):
        return
    last = total_steps - 1  # the full network trains only if the last step is on level 0
    length = "run.steps" if cfg.run.steps else "run.epochs"  # the key that set the length
    if o.nested and not o.nested_steps:  # the run's steps shared equally by the levels
        if coarse_first(last, steps_per_level(0, total_steps, o.levels), o.levels):
            raise ConfigError(f"{length}: the run's {total_steps} steps shared by {o.levels} "
                              "levels of nested iteration leave none for the full-depth "
                              f"network (raise {length})")
        return
    per, key = (o.nested_steps, "nested_steps") if o.nested else (o.init_cycles, "init_cycles")
    if coarse_first(last, per, o.levels):
        raise ConfigError(
            f"multilevel.{key}: {o.levels - 1} coarse levels x {per} steps = "
            f"{per * (o.levels - 1)} covers all {total_steps} steps of the run; the "
            f"full-depth network would never train (raise {length} or lower "
            f"multilevel.{key})")


def my_partition(cfg, dataset, dp_size: int, dp_rank: int):
    """The training-sample indices of data-parallel rank ``dp_rank`` of ``dp_size``."""
    d = cfg.data
    labels = dataset.train_labels() if d.partition in LABEL_PARTITIONS else None
    return partition(dataset.num_train, dp_size, dp_rank, d.partition, cfg.run.seed, labels,
                     **partition_options(d))
