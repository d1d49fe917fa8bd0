"""What the multilevel optimizers share: one optimizer per level, seen from outside as one
(parameter groups, a state dict for checkpoints) and the work accounting across levels."""
from __future__ import annotations

from mltrain.multilevel.hierarchy import Hierarchy

__all__ = ["LevelOptimizers"]


class LevelOptimizers:
    """``parts[l]`` optimizes ``hierarchy.models[l]``. The state dict numbers the parameters
    of all levels in order (finest first), the way a checkpoint stores one optimizer.
    Not collective."""

    def __init__(self, hierarchy: Hierarchy, parts: list, flat_state: bool = False):
        """``flat_state``: each level's state lives on its first parameter only, and the
        state dict keeps all of it on parameter 0 (keys ``level<l>.<key>``). Layer-parallel
        levels need this: their parameter lists differ from rank to rank, parameter 0
        exists on every one."""
        self.hierarchy, self.parts, self.flat_state = hierarchy, parts, flat_state

    @property
    def param_groups(self) -> list[dict]:
        return [g for p in self.parts for g in p.param_groups]

    def _sizes(self) -> list[int]:
        """Parameters per level in the serial layout (each level's whole network)."""
        return [len(list(m.parameters())) for m in self.hierarchy.models]

    def state_params(self) -> list:
        """The parameters the state dict's indices number (in the serial layout): every
        level's network, finest first."""
        return [p for m in self.hierarchy.models for p in m.parameters()]

    def state_dict(self) -> dict:
        sds = [opt.state_dict() for opt in self.parts]
        if self.flat_state:
            merged = {}
            for lv, sd in enumerate(sds):
                if set(sd["state"]) - {0}:
                    raise ValueError("flat_state: level state beyond the first parameter")
                merged.update({f"level{lv}.{k}": v for k, v in sd["state"].get(0, {}).items()})
            return {"state": {0: merged},
                    "param_groups": [g for sd in sds for g in sd["param_groups"]]}
        state, groups, off = {}, [], 0
        for sd, n in zip(sds, self._sizes()):
            state.update({k + off: v for k, v in sd["state"].items()})
            groups += [{**g, "params": [i + off for i in g["params"]]}
                       for g in sd["param_groups"]]
            off += n
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Either layout loads into either kind of optimizer, so a layer-parallel run
        resumes serially and the other way round (what only one holds, such as the L-SR1
        memory of a serial checkpoint, is left out)."""
        state = state_dict["state"]
        levels = []
        if any(str(k).startswith("level") for k in state.get(0, {})):  # flat layout
            for lv in range(len(self.parts)):
                own = {k.split(".", 1)[1]: v for k, v in state[0].items()
                       if k.startswith(f"level{lv}.")}
                levels.append({0: own} if own else {})
        else:
            off = 0
            for n in self._sizes():
                levels.append({k - off: v for k, v in state.items() if off <= k < off + n})
                off += n
        for opt, own in zip(self.parts, levels):
            if self.flat_state:
                own = {0: {k: v for k, v in own[0].items() if not k.startswith("lsr1_")}} \
                    if 0 in own else {}
            opt.load_state_dict({"state": own, "param_groups": opt.state_dict()["param_groups"]})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for m in self.hierarchy.models:
            m.zero_grad(set_to_none=set_to_none)
