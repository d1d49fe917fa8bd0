"""Trust-region training (second order): each step minimises the quadratic model of the
loss on the current batch inside a ball of radius Delta with a PETSc Krylov method
(Steihaug-Toint CG by default), then accepts or rejects the step by the ratio of actual
to predicted reduction and updates Delta:

    rho = (f(x) - f(x + s)) / (-m(s))
    rho <  eta1:  rejected, parameters restored bit for bit, Delta *= gamma1
    rho >= eta2:  accepted, Delta = min(gamma2 * Delta, radius_max)
    otherwise:    accepted, Delta kept

Gradients and curvature products are averaged over the data axis (one allreduce each),
so every rank solves the same subproblem and takes the same step.

On a GPU the vectors (parameters, gradients, steps) and the curvature products live on the
parameters' device; PETSc's Krylov solve works in host memory, and its copies to and from
the device are counted in the report (``host_copies``, ``host_copy_bytes``). The radius
and the batch counters are host scalars, read by Python every step.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from mpi4py import MPI

from mltrain.comm import mean_
from mltrain.linalg import has_petsc
from mltrain.linalg.curvature import Curvature
from mltrain.linalg.vector import FlatParams
from mltrain.nn import add_depth_penalty, depth_penalty
from mltrain.linalg.lsr1 import LSR1
from mltrain.linalg.petsc import NonFiniteError, TRSubproblem, check_options_used, log_event
from mltrain.linalg.reference import steihaug_cg
from mltrain.optim.costs import Prices, price
from mltrain.optim.evals import EvalCache
from mltrain.utils.decisions import DecisionLog

__all__ = ["TrustRegion", "Objective", "NonFiniteError", "check_level_options", "ball_fraction",
           "MAX_BATCH_FACTOR"]

# The hybrid batch stops doubling here: far past any dataset's mini-batches per epoch (a
# larger factor is the full batch already), and exact in float32 and as an int.
MAX_BATCH_FACTOR = 2.0 ** 40


class _TorchSolver:
    """The pure-torch Steihaug-Toint CG, for machines without PETSc (on the vectors' device:
    no host copies)."""

    host_copies = {"host_copies": 0, "host_copy_bytes": 0}

    def __init__(self, max_it: int, rtol: float = 1e-6):
        self.max_it, self.rtol = max_it, rtol

    def solve(self, g, radius, op, max_it: int | None = None):
        cap = self.max_it if max_it is None else min(max_it, self.max_it)
        s, predicted, reason = steihaug_cg(op, g, radius, cap, self.rtol)
        if not (bool(torch.isfinite(s).all()) and math.isfinite(predicted)):
            raise NonFiniteError("curvature product is not finite (NaN or Inf)")
        return s, predicted, reason

    def destroy(self) -> None:
        pass


def check_level_options(prefix: str) -> None:
    """ConfigError naming every PETSc option under ``prefix`` (a multilevel optimizer's,
    such as ``-mltrain_rmtr_l9_ksp_type`` for a level that does not exist) that no level
    read. Call after every level's solver is built. Not collective."""
    if has_petsc:
        check_options_used(prefix)


def _event(name: str):
    return log_event(name) if has_petsc else nullcontext()


@dataclass(frozen=True)
class Objective:
    """What a trust-region step minimizes: the mean over the data axis of ``weight`` x
    (``loss_fn(model(x), y)`` + the model's ``depth_penalty``) (``weight`` = local samples
    x ranks / global samples, 1 for equal shares, so the weights average to 1 and the
    penalty counts once), f, corrected as a multilevel method's coarse model asks:

        (a0 + a . (theta - anchor)) f(theta) + delta . (theta - anchor)

    with ``shift = (delta, anchor)`` (the additive first-order correction) and ``factor =
    (a0, a, anchor)`` (the multiplicative one, Kopanicakova 2022; None: a0 = 1, a = 0).
    The optimizer evaluates it: ``value``, ``objective`` (value and gradient), and
    curvature products inside ``tr_step``."""

    model: torch.nn.Module
    loss_fn: Callable
    x: torch.Tensor
    y: torch.Tensor
    weight: float = 1.0
    shift: tuple | None = None
    factor: tuple | None = None

    def on(self, model: torch.nn.Module, shift: tuple | None = None) -> "Objective":
        """The same batch on another network (a coarse level), with ``shift`` and no
        factor."""
        return replace(self, model=model, shift=shift, factor=None)

    def shifted(self, shift: tuple | None, factor: tuple | None = None) -> "Objective":
        return replace(self, shift=shift, factor=factor)


def ball_fraction(dd: float, ds: float, ss: float, bound: float) -> float:
    """The largest t in [0, 1] with ||d + t s|| <= ``bound``, from d.d, d.s and s.s (d in
    the ball): where a step from inside a ball cut back to its boundary ends."""
    a, b, c = ss, 2.0 * ds, dd - bound * bound
    return max(0.0, min(1.0, (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)))


class TrustRegion(torch.optim.Optimizer):
    """A torch Optimizer for the bookkeeping (parameter groups, checkpointable state:
    the radius lives in ``state[first parameter]["radius"]``); ``tr_step`` does the work.
    """

    def __init__(self, params, comm: MPI.Comm, *, radius: float, radius_max: float,
                 eta1: float, eta2: float, gamma1: float, gamma2: float,
                 curvature: str = "hessian", ksp_type: str = "stcg", max_it: int = 50,
                 memory: int = 5, grow_after: int = 0, options_prefix: str = "mltrain_tr_",
                 shared_prefix: str | None = None, layer_comm: MPI.Comm | None = None,
                 after_set=None,
                 decisions: DecisionLog | None = None, level: int = 0,
                 cache: EvalCache | None = None):
        """``layer_comm``: layer-parallel training, where ``params`` are this rank's part
        of a parameter vector distributed over that communicator (PETSc solves on it,
        dot products are global); ``after_set()`` runs after every change of the
        parameters (to refresh replicated layers from their owners). ``decisions``: where
        accept/grow decisions (and L-SR1 pair skips) are recorded with their margins, as
        level ``level`` (a multilevel optimizer shares one log between its levels).
        ``options_prefix``: the PETSc options of this solver (a multilevel optimizer gives
        each level its own); ``shared_prefix``: options read first, that every level shares
        (the level's own win). ``cache``: the evaluations this optimizer looks up before it
        evaluates (``mltrain.optim.evals``; a multilevel method may share one per level)."""
        super().__init__(list(params), {"lr": 0.0})
        self.comm = comm
        self.ranks = comm.Get_size()
        self.layer_comm = layer_comm if layer_comm is not None and layer_comm.Get_size() > 1 \
            else None
        self.after_set = after_set
        self._params = self.param_groups[0]["params"]
        self._flat = FlatParams(self._params)  # the vector this optimizer steps
        self.eta1, self.eta2, self.gamma1, self.gamma2 = eta1, eta2, gamma1, gamma2
        self.radius_max = radius_max
        self.curvature = curvature
        first = self.param_groups[0]["params"][0]
        st = self.state[first]  # host scalars, read by Python every step
        st["radius"] = torch.tensor(float(radius), dtype=torch.float64)  # host: the radius
        # Hybrid batches: the batch is this many mini-batches; it doubles after
        # ``grow_after`` rejected steps in a row (0 = never).
        st["batch_factor"] = torch.tensor(1.0)  # host: a counter
        st["rejected_streak"] = torch.tensor(0.0)  # host: a counter
        self.grow_after = grow_after
        # Set by the caller for one step: an accepted step then counts as failed or not by
        # its held-out verdict (``verdict``), not as a success by itself.
        self.holdout = False
        # Set by a multilevel caller for one cycle: the steps inside it do not count toward
        # the batch growth; the caller counts the cycle as one step (``after_step``).
        self.defer_growth = False
        self._first = first
        if self.layer_comm is not None and curvature != "lsr1":
            from mltrain.config import ConfigError

            raise ConfigError(f"tr.curvature: layer-parallel trust region needs lsr1 (no "
                              f"{curvature} products through MGRIT yet)")
        self.decisions = decisions if decisions is not None else DecisionLog()
        self.level = level
        self.lsr1 = LSR1(memory, dot=self._dot, decisions=self.decisions, level=level) \
            if curvature == "lsr1" else None
        n = sum(p.numel() for g in self.param_groups for p in g["params"])
        if self.layer_comm is not None and not has_petsc:
            from mltrain.config import ConfigError

            raise ConfigError("parallel.layer: layer-parallel trust region needs PETSc")
        if has_petsc:
            self.solver = TRSubproblem(n, ksp_type=ksp_type, max_it=max_it,
                                       options_prefix=options_prefix,
                                       shared_prefix=shared_prefix, comm=self.layer_comm)
            for prefix in filter(None, (shared_prefix, options_prefix)):
                check_options_used(prefix)  # a misspelt -mltrain_tr_... is an error
        else:
            self.solver = _TorchSolver(max_it)
        # Evaluations, and the global samples behind them (for full-gradient equivalents).
        self.counts = {"gradients": 0, "products": 0, "losses": 0, "accepted": 0,
                       "rejected": 0, "gradient_samples": 0.0, "graph_gradient_samples": 0.0,
                       "product_samples": 0.0, "loss_samples": 0.0}
        self.prices = Prices.unit()  # until measure_costs
        self._samples = 0.0
        self.last: dict | None = None
        self.cache = cache if cache is not None else EvalCache()

    @property
    def radius(self) -> float:
        return float(self.state[self._first]["radius"])

    @radius.setter
    def radius(self, value: float) -> None:
        self.state[self._first]["radius"].fill_(value)

    @property
    def batch_factor(self) -> int:
        return int(self.state[self._first]["batch_factor"])

    @property
    def stage_work(self) -> float:
        """``tr.grow_on = work``: the work spent since the hybrid batch last grew, in
        fine-gradient equivalents. Checkpointed with the radius."""
        t = self.state[self._first].get("stage_work")
        return 0.0 if t is None else float(t)

    @stage_work.setter
    def stage_work(self, value: float) -> None:
        st = self.state[self._first]
        st["stage_work"] = torch.tensor(value, dtype=torch.float64)  # host: a counter

    def grow(self) -> None:
        """Doubles the hybrid batch. Capped, since a float32 counter doubled 128 times is
        inf (any factor past the epoch is the full batch). Not collective."""
        st = self.state[self._first]
        st["batch_factor"].fill_(min(float(st["batch_factor"]) * 2, MAX_BATCH_FACTOR))

    @property
    def grower(self) -> "TrustRegion":
        """The trust region whose failed steps grow the hybrid batch: this one."""
        return self

    @property
    def iterate(self) -> torch.Tensor:
        """This rank's part of the parameter vector, flat (a copy)."""
        return self._flat.get()

    def set_iterate(self, flat: torch.Tensor) -> None:
        """Sets the parameter vector (and, layer-parallel, the replicated parts).
        Collective on the layer axis when there is one."""
        self._set(flat)

    def accept(self, f: float, f_trial: float, predicted: float, x0: torch.Tensor,
               reference: float | None = None) -> bool:
        """The acceptance and radius rule of a step that moved the iterate from ``x0``:
        rho = (f - f_trial) / predicted; below eta1 the step is undone (bit for bit) and the
        radius shrinks by gamma1, at or above eta2 it grows by gamma2 (up to radius_max).
        Both tests are recorded as decisions. Used for this optimizer's own steps and for a
        multilevel method's prolonged coarse corrections. A non-monotone method passes a
        ``reference`` value (above f: the worst of recent iterates) that replaces f in
        rho. Returns whether it was accepted. Collective on the layer axis (the
        restore)."""
        if reference is not None:
            f = max(f, reference)
        rho = (f - f_trial) / predicted if predicted > 0 else -math.inf
        accepted = self._decide("accept", math.isfinite(f_trial) and rho >= self.eta1, f,
                                f_trial, predicted, self.eta1)
        if accepted:
            if self._decide("grow", rho >= self.eta2, f, f_trial, predicted, self.eta2):
                self.radius = min(self.radius * self.gamma2, self.radius_max)
        else:
            self._set(x0)  # bit-for-bit restore
            self.radius = self.radius * self.gamma1
        return accepted

    def after_step(self, accepted: bool) -> None:
        """Counts a step of the run (accepted or not) for the hybrid batch: after
        ``grow_after`` failed steps in a row the batch doubles. With ``holdout`` set, an
        accepted step waits for ``verdict``; with ``defer_growth`` set nothing counts. Not
        collective."""
        if self.defer_growth or (accepted and self.holdout):
            return
        self._after(accepted)

    def verdict(self, ok: bool) -> None:
        """Counts the held-out test of an accepted step (``holdout``): a step whose decrease
        did not carry over to unseen samples counts as failed. Not collective."""
        self._after(ok)

    def _after(self, accepted: bool) -> None:
        st = self.state[self._first]
        st["rejected_streak"].fill_(0 if accepted else float(st["rejected_streak"]) + 1)
        if self.grow_after and int(st["rejected_streak"]) >= self.grow_after:
            self.grow()  # progress stalls: a larger, less noisy batch
            st["rejected_streak"].fill_(0)

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_(t, self.comm)

    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """a . b of parameter vectors, summed over the layer axis when distributed."""
        d = float(a @ b)
        return self.layer_comm.allreduce(d) if self.layer_comm is not None else d

    def _finite(self, *ts: torch.Tensor) -> bool:
        ok = all(bool(torch.isfinite(t).all()) for t in ts)
        if self.layer_comm is not None:
            from mpi4py import MPI as _MPI

            ok = self.layer_comm.allreduce(ok, op=_MPI.LAND)
        return ok

    def _decide(self, kind: str, taken: bool, f: float, f_trial: float, predicted: float,
                eta: float, level: int | None = None) -> bool:
        """Records the reduction-ratio test rho = (f - f_trial) / predicted >= eta as
        f - f_trial >= eta predicted, on the scale of its operands; returns ``taken``. A
        model that predicts no decrease rejects by itself (margin -inf)."""
        level = self.level if level is None else level
        if not predicted > 0:
            return self.decisions.record(kind, taken, -math.inf, 0.0, 1.0, level)
        return self.decisions.record(kind, taken, f - f_trial, eta * predicted,
                                     abs(f) + abs(f_trial) + abs(eta * predicted), level)

    def _set(self, flat: torch.Tensor) -> None:
        self._flat.set(flat)
        if self.after_set is not None:
            self.after_set()

    def _multiplier(self, obj: Objective) -> float:
        """a0 + a . (x - anchor), the factor of f in a corrected objective (1 without)."""
        if obj.factor is None:
            return 1.0
        a0, a, anchor = obj.factor
        return a0 + self._dot(a, self._flat.get().to(torch.float64) - anchor)

    def _corrected(self, obj: Objective, loss: float, g: torch.Tensor | None = None):
        """(value, gradient) of the corrected objective from f's (``loss``, ``g``); the
        gradient is None when ``g`` is. Collective on the layer axis (dot products)."""
        if obj.factor is not None:
            m = self._multiplier(obj)
            if g is not None:  # grad (m f) = m grad f + f a
                g = g * m + obj.factor[1] * loss
            loss = m * loss
        if obj.shift is not None:
            delta, anchor = obj.shift
            loss += self._dot(delta, self._flat.get().to(torch.float64) - anchor)
            g = None if g is None else g + delta
        return loss, g

    def value(self, obj: Objective) -> float:
        """``obj`` at the model's current parameters (from the cache when this point and
        batch were evaluated). Collective on the data axis (and the layer axis for a
        shift's dot product and the cache's agreement)."""
        self._samples = len(obj.x) * self.ranks / obj.weight
        it = self._flat.get()
        hit = self.cache.find(obj.model, obj.x, obj.y, obj.weight, it, False, self.layer_comm)
        if hit is not None:
            return self._corrected(obj, hit[0])[0]
        with torch.no_grad():
            loss = add_depth_penalty(obj.loss_fn(obj.model(obj.x), obj.y), obj.model)
            value = torch.tensor([float(loss) * obj.weight],
                                 dtype=torch.float64)  # host: a scalar averaged over MPI
        self.counts["losses"] += 1
        self.counts["loss_samples"] += self._samples
        loss = float(self._mean(value)[0])
        self.cache.store(obj.model, obj.x, obj.y, obj.weight, it, loss, None)
        return self._corrected(obj, loss)[0]

    def _gradient(self, obj: Objective, curv: Curvature | None = None, raw: bool = False):
        """(value, float64 gradient) of ``obj`` at the current parameters (of f alone,
        without the corrections, when ``raw``): from the cache, or computed by ``curv``
        (which then holds the point for its products; a Hessian's ``curv`` is always
        computed, its products need the graph)."""
        it = self._flat.get()
        hit = None
        if curv is None or curv.kind != "hessian":
            hit = self.cache.find(obj.model, obj.x, obj.y, obj.weight, it, True,
                                  self.layer_comm)
        if hit is not None:
            loss, g = hit
        else:
            if curv is None:
                curv = Curvature(obj.model, obj.loss_fn, obj.x, obj.y, "lsr1", self._params,
                                 penalty=depth_penalty)
            with _event("mltrain_gradient"):
                loss, g = curv.loss_and_grad()
            packed = torch.cat([g.to(torch.float64),
                                torch.tensor([loss], dtype=torch.float64, device=g.device)])
            with _event("mltrain_reduce"):
                self._mean(packed.mul_(obj.weight))
            self.counts["gradients"] += 1
            graph = curv.kind == "hessian"
            self.counts["graph_gradient_samples" if graph else "gradient_samples"] += \
                self._samples
            loss, g = float(packed[-1]), packed[:-1]
            self.cache.store(obj.model, obj.x, obj.y, obj.weight, it, loss, g)
        return (loss, g) if raw else self._corrected(obj, loss, g)

    def _product(self, obj: Objective, curv: Curvature, g_raw: torch.Tensor):
        """The float64 curvature product of the corrected ``obj`` at the current point,
        where f's averaged gradient is ``g_raw`` (L-SR1: the memory's). Collective on the
        data axis (and the layer axis) per product."""
        dtype = next(obj.model.parameters()).dtype
        m = self._multiplier(obj)

        def product(v64: torch.Tensor) -> torch.Tensor:
            self.counts["products"] += 1
            if self.lsr1 is not None:  # built from averaged gradients: same on every rank
                return self.lsr1.mv(v64)
            self.counts["product_samples"] += self._samples
            with _event("mltrain_curvature"):
                hv = curv.mv(v64.to(dtype)).to(torch.float64)
            with _event("mltrain_reduce"):
                hv = self._mean(hv.mul_(obj.weight))
            if obj.factor is None:
                return hv
            # Hessian of (a0 + a.(x - anchor)) f: m H + a grad f^T + grad f a^T
            a = obj.factor[1]
            return hv.mul_(m) + a * self._dot(g_raw, v64) + g_raw * self._dot(a, v64)
        return product

    def objective(self, obj: Objective):
        """(value, float64 gradient) of ``obj`` at the current parameters (from the cache
        when this point and batch were evaluated). Collective on the data axis (and the
        layer axis when the vector is distributed)."""
        self._samples = len(obj.x) * self.ranks / obj.weight
        return self._gradient(obj)

    def samples(self) -> dict[str, float]:
        """Global samples evaluated so far by each kind of evaluation
        (``mltrain.optim.costs.KINDS``), cache hits not included."""
        c = self.counts
        return {"gradient": c["gradient_samples"], "graph_gradient": c["graph_gradient_samples"],
                "product": c["product_samples"], "loss": c["loss_samples"]}

    def price_levels(self, model) -> list[tuple]:
        """What ``measure_costs`` times: (network, curvature, parameters) per level, here
        ``model`` alone (``mltrain.optim.costs.time_levels``). Not collective."""
        return [(model, self.curvature, self._params)]

    def measure_costs(self, obj: Objective, rounds: int = 15) -> None:
        """Prices this optimizer's evaluations by timing them on ``obj``'s batch
        (``mltrain.optim.costs``). Collective on the data axis (and the layer axis)."""
        self.prices = price(self.price_levels(obj.model), obj, (self.comm, self.layer_comm),
                            rounds)

    def work(self, num_train: int) -> float:
        """Work so far in fine-gradient equivalents: the samples of each kind of evaluation
        at its price (``self.prices``), over the training-set size."""
        return self.prices.work([self.samples()], num_train)

    @property
    def host_copies(self) -> dict[str, int]:
        """The subproblem solver's copies between host and device so far (PETSc works in
        host memory; 0 when the parameters are on the CPU)."""
        return dict(self.solver.host_copies)

    def report(self, num_train: int) -> dict:
        """The summary's work and step counts, in full-gradient equivalents (samples
        evaluated / training-set size; ``work`` priced, the others counted), and the
        subproblem solver's host<->device copies. Not collective."""
        c = self.counts
        return {"work": self.work(num_train),
                "grad_evals": (c["gradient_samples"] + c["graph_gradient_samples"]) / num_train,
                "hvp_evals": c["product_samples"] / num_train,
                "loss_evals": c["loss_samples"] / num_train,
                "cache_hits": dict(self.cache.hits),
                "accepted_steps": c["accepted"], "rejected_steps": c["rejected"],
                "radius": self.radius, "batch_factor": self.batch_factor,
                "prices": self.prices.as_dict(), **self.host_copies,
                **self.decisions.summary()}

    def state_dict(self):
        """As torch's, with the L-SR1 memory: pair k as ``lsr1_s<k>``/``lsr1_y<k>`` split
        over the parameters (shaped like each, float64), gamma on the first. (Not in
        layer-parallel runs, whose checkpoints hold one rank's part of the vector: there a
        resumed run starts with an empty memory.)"""
        if self.lsr1 is not None and self.layer_comm is None:
            for p in self._params:
                for key in [k for k in self.state[p] if k.startswith("lsr1_")]:
                    del self.state[p][key]
            for k, (s, y) in enumerate(self.lsr1.pairs):
                off = 0
                for p in self._params:
                    n = p.numel()
                    self.state[p][f"lsr1_s{k}"] = s[off:off + n].reshape(p.shape).clone()
                    self.state[p][f"lsr1_y{k}"] = y[off:off + n].reshape(p.shape).clone()
                    off += n
            self.state[self._first]["lsr1_gamma"] = torch.tensor(
                self.lsr1.gamma, dtype=torch.float64)  # host: a Python scalar, checkpointed
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:
        """As torch's, but the radius, the work spent since the batch last grew and the
        L-SR1 memory keep float64 (torch casts state to the parameters' dtype, which would
        change the bits of a float32 run's radius on resume), and the scalars stay in
        host memory (torch moves state to the parameters' device); the memory goes to the
        parameters' device."""
        raw = state_dict["state"]
        saved = {key: raw.get(0, {}).get(key) for key in ("radius", "stage_work")}
        super().load_state_dict(state_dict)
        for key, value in saved.items():
            if value is not None:
                self.state[self._first][key] = torch.as_tensor(
                    value, dtype=torch.float64, device="cpu").clone()
        for key in ("batch_factor", "rejected_streak"):
            if key in self.state.get(self._first, {}):
                self.state[self._first][key] = self.state[self._first][key].cpu()
        for p in self._params:  # the memory lives in self.lsr1, not in the state
            # (`in` first: indexing the state's defaultdict would add empty entries, which
            # a flat multilevel state dict refuses when it is saved again.)
            for key in [k for k in self.state[p] if k.startswith("lsr1_")] if p in self.state \
                    else []:
                del self.state[p][key]
        first = raw.get(0, {})
        if self.lsr1 is not None and self.layer_comm is None and "lsr1_gamma" in first:
            pairs = []
            for k in range(sum(1 for key in first if key.startswith("lsr1_s"))):
                s, y = ([torch.as_tensor(raw[i][f"{name}{k}"], dtype=torch.float64,
                                         device=self._flat.device).reshape(-1)
                         for i in range(len(self._params))] for name in ("lsr1_s", "lsr1_y"))
                pairs.append((torch.cat(s), torch.cat(y)))
            self.lsr1.restore(pairs, float(first["lsr1_gamma"]))

    def step(self, closure=None):  # noqa: D102 - torch API; use tr_step
        raise RuntimeError("TrustRegion needs the batch: call tr_step(Objective(model, "
                           "loss_fn, x, y))")

    def tr_step(self, obj: Objective, *, radius: float | None = None, limit=None,
                scale: torch.Tensor | None = None, max_it: int | None = None) -> float:
        """One trust-region iteration on ``obj`` (this rank's batch); returns the averaged
        objective at the point it started from.

        For multilevel use: ``radius`` solves in a smaller ball than the optimizer's own;
        ``limit(s)`` returns the fraction t in (0, 1] of the step s that may be taken (a
        bound in another norm); ``scale`` (positive, float64) measures the trust region in
        the norm ||scale * s||; ``max_it`` caps the Krylov iterations of this step's
        subproblem (a smoothing step's budget). ``self.last`` says what happened.

        Collective on the data-axis communicator."""
        self._samples = len(obj.x) * self.ranks / obj.weight  # the global batch behind it
        curv = Curvature(obj.model, obj.loss_fn, obj.x, obj.y, self.curvature, self._params,
                         penalty=depth_penalty)
        f_raw, g_raw = self._gradient(obj, curv, raw=True)
        loss, g = self._corrected(obj, f_raw, g_raw)
        if not (math.isfinite(loss) and self._finite(g)):
            raise NonFiniteError("loss or gradient is not finite at the current parameters")

        product = self._product(obj, curv, g_raw)

        r = self.radius if radius is None else min(radius, self.radius)
        if scale is None:
            s, predicted, _ = self.solver.solve(g, r, product, max_it)
        else:  # z = scale * s: a Euclidean ball in z (the model value is the same)
            z, predicted, _ = self.solver.solve(g / scale, r,
                                                lambda v: product(v / scale) / scale, max_it)
            s = z / scale
        t = 1.0 if limit is None else limit(s)
        if t < 1.0:  # cut back to the boundary; m(ts) = t g.s + t^2 (m(s) - g.s)
            gs = self._dot(g, s)
            predicted = -(t * gs + t * t * (-predicted - gs))
            s = s * t
        x0 = self._flat.get()
        self._set(x0 + s.to(x0.dtype))
        if self.lsr1 is not None:  # the trial gradient also feeds the SR1 memory
            f_trial, g_trial = self._gradient(obj)
            if math.isfinite(f_trial) and self._finite(g_trial):
                self.lsr1.update(s, g_trial - g)
        else:
            f_trial = self.value(obj)
        accepted = self.accept(loss, f_trial, predicted, x0)
        self.counts["accepted" if accepted else "rejected"] += 1
        self.after_step(accepted)
        self.last = {"accepted": accepted, "boundary": t < 1.0, "start": loss,
                     "value": f_trial if accepted else loss, "predicted": predicted}
        return loss

    def close(self) -> None:
        self.solver.destroy()


def sum_host_copies(parts) -> dict[str, int]:
    """Host<->device copies of the subproblem solves of ``parts`` (optimizers; those that do
    not solve one count nothing), summed: what a multilevel report shows. Not collective."""
    total = {"host_copies": 0, "host_copy_bytes": 0}
    for p in parts:
        for k, v in getattr(p, "host_copies", {}).items():
            total[k] += v
    return total
