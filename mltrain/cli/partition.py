"""``mltrain partition``: compute a partition without MPI and report its label skew."""
from __future__ import annotations

import json

import numpy as np

from mltrain.data import LABEL_PARTITIONS, open_dataset, partition_all, partition_options, partition_stats


def compute(cfg, ranks: int) -> dict:
    """Sizes, label histograms and skew of ``cfg``'s partition over ``ranks`` ranks.

    Not collective (no MPI).
    """
    from mltrain.config import ConfigError, check_ranks

    check_ranks(ranks)
    d = cfg.data
    ds = open_dataset(d.name, d.path, d.num_samples)
    if ranks > ds.num_train:
        raise ConfigError(f"--ranks: {ranks} ranks for {ds.num_train} training samples; "
                          "every rank needs at least one")
    labels = ds.train_labels()
    groups = partition_all(ds.num_train, ranks, d.partition, cfg.run.seed,
                           labels if d.partition in LABEL_PARTITIONS else None,
                           **partition_options(d))
    out = {"dataset": d.name, "partition": d.partition, "ranks": ranks,
           "num_train": ds.num_train, "num_classes": ds.num_classes}
    out.update(partition_stats(groups, labels, ds.num_classes))
    return out


def plot(stats: dict, path: str) -> None:
    """Stacked bar chart of label counts per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = np.array(stats["label_histograms"])
    ranks, k = hists.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * ranks + 2), 3.6))
    bottom = np.zeros(ranks)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for c in range(k):
        ax.bar(np.arange(ranks), hists[:, c], bottom=bottom, color=cmap(c % cmap.N),
               label=str(c), width=0.85)
        bottom += hists[:, c]
    ax.set_xlabel("rank")
    ax.set_ylabel("samples")
    ax.set_title(f"{stats['dataset']}: partition={stats['partition']}, {ranks} ranks, "
                 f"skew {stats['skew']:.3f}")
    ax.legend(title="label", fontsize=7, ncol=1 if k <= 10 else 2, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_partition(cfg, args) -> int:
    stats = compute(cfg, args.ranks)
    width = len(str(max(stats["sizes"])))
    print(f"{stats['dataset']}: {stats['num_train']} training samples, partition "
          f"{stats['partition']!r} over {stats['ranks']} ranks, skew {stats['skew']:.4f}")
    for r, (n, h) in enumerate(zip(stats["sizes"], stats["label_histograms"])):
        print(f"  rank {r:>3}: {n:>{width}} samples  labels {h}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=2)
    if args.plot:
        plot(stats, args.plot)
    return 0
