"""Builders of the multilevel optimizers for the Trainer (``mltrain.optim.base``'s
protocol): the hierarchy of the network trained, one level optimizer per level."""
from __future__ import annotations

from mltrain.multilevel.hierarchy import Hierarchy
from mltrain.multilevel.mgopt import MGOpt
from mltrain.multilevel.rmtr import RMTR
from mltrain.optim.base import Context, Method, SecondOrder, tr_settings
from mltrain.sync import SyncStrategy

__all__ = ["rmtr", "mgopt"]


def _hierarchy(ctx: Context) -> Hierarchy:
    o = ctx.cfg.multilevel
    net = ctx.layout.lp.model if ctx.layered else ctx.model
    return Hierarchy(net, ctx.levels or o.levels, o.cf, o.transfer, o.prolongation)


def _common(o) -> dict:
    return dict(pre_smooth=o.pre_smooth, post_smooth=o.post_smooth,
                coarse_iters=o.coarse_iters)


def rmtr(ctx: Context) -> Method:
    """RMTR over ``multilevel.levels`` levels; layer-parallel when the network is, every coarse
    level split where the finest is (and switched to exact sweeps with it). Collective on
    the data axis."""
    o, layout = ctx.cfg.multilevel, ctx.layout
    h = _hierarchy(ctx)
    layered = None
    if ctx.layered:
        layered = [layout.lp] + [layout.lp.sibling(h.models[lv], h.cf ** lv)
                                 for lv in range(1, h.levels)]
        layout.chains.extend(layered[1:])
    opt = RMTR(h, layout.data, cycle=o.cycle, kappa=o.kappa, layered=layered,
               smooth_max_it=o.smooth_max_it or None, coarse_max_it=o.coarse_max_it or None,
               stop_on_success=o.stop_on_success, coarse_model=o.coarse_model,
               grow_per=o.grow_per,
               init_cycles=o.init_cycles if o.init == "nested" else 0,
               **_common(o), **tr_settings(ctx.cfg.tr))
    return SecondOrder(opt, SyncStrategy(ctx.model, layout.data), ctx.straggler, ctx.model,
                       ctx.cfg)


def mgopt(ctx: Context) -> Method:
    """MG/OPT over ``multilevel.levels`` levels with ``mgopt.smoother`` on each. Collective on
    the data axis."""
    o, layout = ctx.cfg.optim, ctx.layout
    opt = MGOpt(_hierarchy(ctx), layout.data, lr=o.lr, smoother=ctx.cfg.mgopt.smoother,
                momentum=o.momentum, tr=tr_settings(ctx.cfg.tr), **_common(ctx.cfg.multilevel))
    return SecondOrder(opt, SyncStrategy(ctx.model, layout.data), ctx.straggler, ctx.model,
                       ctx.cfg)
