"""What the multilevel optimizers share: one optimizer per level, seen from outside as one
(parameter groups, a state dict for checkpoints) and the work accounting across levels."""
from __future__ import annotations

from mltrain.multilevel.hierarchy import Hierarchy

__all__ = ["LevelOptimizers"]


def _count(opt) -> int:
    return sum(len(g["params"]) for g in opt.param_groups)


class LevelOptimizers:
    """``parts[l]`` optimizes ``hierarchy.models[l]``. The state dict numbers the parameters
    of all levels in order (finest first), the way a checkpoint stores one optimizer.
    Not collective."""

    def __init__(self, hierarchy: Hierarchy, parts: list):
        self.h, self.parts = hierarchy, parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for p in self.parts for g in p.param_groups]

    def state_dict(self) -> dict:
        state, groups, off = {}, [], 0
        for opt in self.parts:
            sd = opt.state_dict()
            state.update({k + off: v for k, v in sd["state"].items()})
            groups += [{**g, "params": [i + off for i in g["params"]]}
                       for g in sd["param_groups"]]
            off += _count(opt)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        off = 0
        for opt in self.parts:
            n = _count(opt)
            own = {k - off: v for k, v in state_dict["state"].items() if off <= k < off + n}
            opt.load_state_dict({"state": own, "param_groups": opt.state_dict()["param_groups"]})
            off += n

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.h.models:
            m.zero_grad(set_to_none=set_to_none)
