"""The optimizer registry: ``optim.name`` -> the builder of its ``Method``
(``mltrain.optim.base``). Adding an optimizer is one line here."""
from __future__ import annotations

from mltrain.multilevel.build import mgopt, rmtr
from mltrain.optim.base import Context, Method, apts, first_order, trust_region

__all__ = ["OPTIMIZERS", "build_method", "layer_alignment"]

OPTIMIZERS = {
    "sgd": first_order,
    "adam": first_order,
    "tr": trust_region,
    "rmtr": rmtr,
    "mgopt": mgopt,
    "apts": apts,
}


def build_method(ctx: Context) -> Method:
    """The optimizer ``ctx.cfg.optim.name`` names. Collective on the data axis."""
    return OPTIMIZERS[ctx.cfg.optim.name](ctx)


def layer_alignment(cfg) -> int:
    """Layer-parallel splits fall on multiples of this: RMTR's coarse levels split where
    the finest does, so the finest aligns to its hierarchy's coarsening."""
    m = cfg.multilevel
    return m.cf ** (m.levels - 1) if cfg.optim.name == "rmtr" else 1
