"""Layer 3: single-level optimizers. First-order ones wrap torch.optim; the trust-region
method (PETSc-backed) arrives with the linear-algebra issue. Nothing here communicates:
gradients arrive already averaged by the reducer."""
from __future__ import annotations

import torch

__all__ = ["build_optimizer"]


def build_optimizer(name: str, params, *, lr: float, momentum: float = 0.0,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.name``. Not collective."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {name!r}")
