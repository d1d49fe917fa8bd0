"""Layer 2: datasets, partitions, per-rank loaders."""
from mltrain.data.datasets import DataError, Dataset, IdxFile, open_dataset
from mltrain.data.loader import ShardLoader, steps_per_epoch
from mltrain.data.partition import (LABEL_PARTITIONS, PARTITIONS, partition, partition_all,
                                   partition_options, partition_stats)

__all__ = ["DataError", "Dataset", "IdxFile", "open_dataset", "ShardLoader", "steps_per_epoch",
           "PARTITIONS", "LABEL_PARTITIONS", "partition", "partition_all", "partition_options",
           "partition_stats"]
