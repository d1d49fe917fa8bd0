"""APTS: the additively preconditioned trust-region strategy (Trotti, Cruz Alegria,
Kopanicakova, Krause; arXiv 2312.13677, 2502.05133, 2512.14286), the ExaTrain method.

The training problem is split into N subdomains, which solve local problems in parallel;
their steps are added into one global step, accepted or rejected by the global trust-region
rule. A subdomain j of a step's global batch is every N-th sample of it (positions = j mod N:
with the strided partition, subdomain j lives on data-parallel rank j mod P, so N = 6
subdomains compute the same on 1, 2, 3 or 6 ranks). ``decomposition``:

- ``data``: subdomain j varies every parameter on its own samples;
- ``weights``: subdomain j varies only its block of layers (the parameter tensors split into
  N contiguous groups of about equal size; every rank holds the whole network), on its
  samples, the other blocks frozen at the step's point.

One step from the point x_k, with radius D:

1. every subdomain evaluates its loss f_j and gradient g_j at x_k (on its samples; block
   j's part for ``weights``); the global f and g are their average (no extra pass);
2. local model, first-order consistent: h_j(y) = f_j(y) + (g - g_j) . (y - x_k) (restricted
   to block j for ``weights``), so grad h_j(x_k) = g (block j of it);
3. ``local_iters`` steps on h_j inside the ball ||y - x_k|| <= D/N (``data``: the N steps
   then add up to at most D, triangle inequality) or D/sqrt(N) (``weights``: the blocks
   are orthogonal): with ``local_solver = "adam"`` (the default, the authors' TRAdam) Adam
   steps of the subdomain's own moments, each of length bound / local_iters (a
   trust-region Adam, ``_local_adam``); with ``"tr"`` trust-region steps (``tr.curvature``:
   L-SR1 with its own memory per subdomain, or Hessian / Gauss-Newton products on its
   samples), ending early at that bound;
4. the global step s = sum_j s_j, its predicted reduction the sum of the local models'
   predicted reductions of the local steps they accepted;
5. rho = (f(x_k) - f(x_k + s)) / predicted on the global batch: the trust-region rule of
   ``tr.*`` accepts or rejects s and updates D (a step with every local step rejected is a
   rejection); with ``window`` = M > 1 the reference is the worst objective of the last M
   accepted iterates instead of f(x_k) (non-monotone acceptance, as NAPTS: some increase
   is allowed, fewer steps are rejected; the recent values were computed on their own
   steps' batches, as in non-monotone stochastic methods, and are forgotten when the hybrid
   batch grows; ``apts.window = 0``, the default, resolves to 3 on a fixed mini-batch and
   1 with hybrid or full batches);
6. ``global_iters`` ordinary trust-region steps on the global objective (the optional global
   pass), with the same radius;
7. the hybrid batch grows after ``tr.grow_after`` rejected steps in a row (``tr.batch``).

With the trust-region local solver, one subdomain, one local iteration and no global pass, a
step is a trust-region step: APTS then equals ``optim.name = "tr"`` iterate for iterate
(the local model is the objective, its predicted reduction the trust region's, and the
global rule the same).

Every rank computes its subdomains one after the other (K = N / P of them; N must be a
multiple of the data-parallel ranks P); sums over subdomains are one allreduce per step.
The vectors live on the parameters' device.

Collective on the data-axis communicator.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import allreduce_
from mltrain.config import ConfigError
from mltrain.linalg.curvature import Curvature
from mltrain.linalg.vector import FlatParams
from mltrain.nn import depth_penalty
from mltrain.optim.costs import KINDS, Prices, price
from mltrain.optim.tr import NonFiniteError, Objective, TrustRegion, ball_fraction
from mltrain.utils.decisions import BOUND_RTOL, DecisionLog

__all__ = ["APTS", "split_blocks"]


def split_blocks(sizes: list[int], n: int) -> list[range]:
    """Splits parameter tensors of ``sizes`` elements, in order, into ``n`` contiguous
    non-empty groups of about equal total size (each cut where the running total first
    reaches the next multiple of total / n). Not collective."""
    if n > len(sizes):
        raise ConfigError(f"apts.subdomains: {n} blocks of layers, but the network has only "
                          f"{len(sizes)} parameter tensors to share among them")
    total, cuts, run = sum(sizes), [0], 0
    for i, k in enumerate(sizes):
        run += k
        left = len(sizes) - (i + 1)  # tensors after this one
        need = n - len(cuts)  # groups still to open after this cut
        if need > 0 and (run * n >= len(cuts) * total or left == need):
            cuts.append(i + 1)
    cuts.append(len(sizes))
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


class LocalAdam:
    """The Adam moments of one subdomain's local solves (``local_solver = "adam"``), kept
    across APTS steps as the subdomain's own state: ``direction(g)`` takes the local model's
    gradient, updates the moments (betas 0.9, 0.999, eps 1e-8, bias-corrected as
    ``torch.optim.Adam``) and returns m_hat / (sqrt(v_hat) + eps). Float64, on the
    parameters' device. Not collective."""

    def __init__(self, n: int, device, betas=(0.9, 0.999), eps: float = 1e-8):
        self.m = torch.zeros(n, dtype=torch.float64, device=device)
        self.v = torch.zeros_like(self.m)
        self.t = 0
        self.betas, self.eps = betas, eps

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        return (self.m / (1 - b1 ** self.t)).div_(denom)


class APTS:
    """See the module docstring. ``tr``: the TrustRegion keywords (radius, eta1, ...,
    curvature), for the global rule and for every local solve."""

    def __init__(self, model: torch.nn.Module, comm: MPI.Comm, *, decomposition: str = "data",
                 subdomains: int = 0, local_iters: int = 3, global_iters: int = 0,
                 window: int = 1, boundary: float = 0.05, local_solver: str = "adam",
                 **tr):
        if decomposition not in ("data", "weights"):
            raise ValueError(f"decomposition must be data or weights, not {decomposition!r}")
        if local_solver not in ("adam", "tr"):
            raise ValueError(f"local_solver must be adam or tr, not {local_solver!r}")
        P = comm.Get_size()
        N = subdomains or P
        if N % P:
            raise ConfigError(f"apts.subdomains: {N} subdomains cannot be shared equally by "
                              f"{P} data-parallel ranks (need a multiple of {P})")
        self.comm, self.model = comm, model
        self.decomposition, self.N, self.K = decomposition, N, N // P
        self.local_iters, self.global_iters = local_iters, global_iters
        self.window, self.boundary = window, boundary
        rank = comm.Get_rank()
        self.ids = [rank + P * m for m in range(self.K)]  # global subdomain of local piece m
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.glob = TrustRegion(params, comm, decisions=DecisionLog(), **tr)
        self.decisions = self.glob.decisions
        self.n = FlatParams(params).numel
        # Each local piece's parameters and where they sit in the flat vector.
        self.groups = None
        if decomposition == "weights":
            groups = self.groups = split_blocks([p.numel() for p in params], N)
            offsets = np.cumsum([0] + [p.numel() for p in params])
            self.blocks = [(int(offsets[groups[j].start]), int(offsets[groups[j].stop]))
                           for j in self.ids]
            local = [[params[i] for i in groups[j]] for j in self.ids]
        else:
            self.blocks = [(0, self.n)] * self.K
            local = [params] * self.K
        # With one subdomain the local problem is the global one: one cache for both, so the
        # global test reuses the local trial evaluation as a trust-region step would.
        shared = self.glob.cache if N == 1 else None
        self.locs = [TrustRegion(ps, MPI.COMM_SELF, decisions=DecisionLog(),
                                 options_prefix="mltrain_apts_local_",
                                 shared_prefix="mltrain_tr_", cache=shared, **tr)
                     for ps in local]
        self.adam = [LocalAdam(hi - lo, params[0].device) for lo, hi in self.blocks] \
            if local_solver == "adam" else []
        self.prices = Prices.unit()  # until measure_costs
        # Global samples of the subdomains' evaluations (summed over ranks every step), and
        # of the subdomain gradients at x_k that APTS evaluates itself.
        self.local_samples = {k: 0.0 for k in KINDS}
        self._reported = dict(self.local_samples)  # this rank's, as last summed
        self._gathered: dict = {}  # subdomain -> L-SR1 memory, on rank 0 (gather_state)
        self.counts = {"accepted": 0, "rejected": 0, "local_steps": 0, "local_accepted": 0,
                       "local_at_bound": 0}
        self._own = 0.0  # this rank's samples of its own evaluations, not yet summed
        self._history: deque[float] = deque(maxlen=max(window - 1, 1))
        self._factor = self.glob.batch_factor
        self.last: dict | None = None

    # The run's trust-region state is the global one.
    @property
    def radius(self) -> float:
        return self.glob.radius

    @property
    def batch_factor(self) -> int:
        return self.glob.batch_factor

    @property
    def grower(self) -> TrustRegion:
        """The trust region whose failed steps grow the hybrid batch: the global one."""
        return self.glob

    @property
    def param_groups(self):
        return self.glob.param_groups

    @property
    def parts(self) -> list:
        """The optimizers whose kinds of state a checkpoint holds: the global trust
        region's (radius, batch, its L-SR1 memory) and, under ``level<j+1>.``, subdomain
        j's L-SR1 memory."""
        return [self.glob]

    @property
    def state_names(self) -> set[str]:
        """Kinds of state a checkpoint may hold besides the trust regions': each
        subdomain's Adam moments and step count (``local_solver = "adam"``)."""
        return {"exp_avg", "exp_avg_sq", "step"} if self.adam else set()

    @property
    def float64_state(self) -> set[str]:
        """State kept in float64 whatever the parameters' type (exact resume of float32
        runs)."""
        return {"exp_avg", "exp_avg_sq"} if self.adam else set()

    @property
    def state_levels(self) -> int:
        """The ``level<l>.`` prefixes a checkpoint may use: 1 .. N (the subdomains)."""
        return self.N + 1

    def _group(self, j: int) -> range:
        """The parameter indices subdomain j varies."""
        return self.groups[j] if self.groups is not None else range(len(self.params))

    def gather_state(self) -> None:
        """Collects every subdomain's L-SR1 memory (or Adam moments) on rank 0 of the data
        axis, for the checkpoint (each lives on the rank that computes the subdomain).
        Collective on the data axis."""
        mine = {}
        for m, (j, tr) in enumerate(zip(self.ids, self.locs)):
            # Host copies: pickled to rank 0, whose device may not be this rank's.
            if self.adam:
                ad = self.adam[m]
                mine[j] = {"adam": (ad.m.to("cpu", copy=True), ad.v.to("cpu", copy=True),
                                    ad.t)}
            elif tr.lsr1 is not None and tr.lsr1.pairs:
                mine[j] = {"lsr1": ([(s.to("cpu", copy=True), y.to("cpu", copy=True))
                                     for s, y in tr.lsr1.pairs], tr.lsr1.gamma)}
        parts = self.comm.gather(mine, root=0) if self.comm.Get_size() > 1 else [mine]
        self._gathered = {j: m for part in (parts or []) for j, m in part.items()}

    def state_dict(self) -> dict:
        """The global trust region's state dict, with every subdomain's L-SR1 memory
        (gathered by ``gather_state``; on rank 0) under ``level<j+1>.lsr1_*`` keys, or its
        Adam moments under ``level<j+1>.exp_avg``, ``exp_avg_sq`` and ``step``, split over
        the parameters of the subdomain as the trust region splits its own."""
        sd = self.glob.state_dict()
        state = {i: dict(st) for i, st in sd["state"].items()}  # not the optimizer's own

        def put(j: int, name: str, flat: torch.Tensor) -> None:
            off = 0
            for i in self._group(j):
                p = self.params[i]
                n = p.numel()
                state.setdefault(i, {})[f"level{j + 1}.{name}"] = \
                    flat[off:off + n].reshape(p.shape).clone()
                off += n

        for j, kept in sorted(self._gathered.items()):
            first = state.setdefault(self._group(j)[0], {})
            if "adam" in kept:
                m, v, t = kept["adam"]
                put(j, "exp_avg", m)
                put(j, "exp_avg_sq", v)
                first[f"level{j + 1}.step"] = torch.tensor(
                    float(t), dtype=torch.float64)  # host: a Python scalar, checkpointed
                continue
            pairs, gamma = kept["lsr1"]
            for k, (s, y) in enumerate(pairs):
                put(j, f"lsr1_s{k}", s)
                put(j, f"lsr1_y{k}", y)
            first[f"level{j + 1}.lsr1_gamma"] = torch.tensor(
                gamma, dtype=torch.float64)  # host: a Python scalar, checkpointed
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the global trust region and this rank's subdomains' memories (by
        subdomain, so a checkpoint resumes at any rank count that shares the
        subdomains)."""
        state = state_dict["state"]
        glob = {i: {k: v for k, v in st.items() if not k.startswith("level")}
                for i, st in state.items()}
        self.glob.load_state_dict({"state": {i: st for i, st in glob.items() if st},
                                   "param_groups": state_dict["param_groups"]})
        self._factor = self.glob.batch_factor
        for j, tr in zip(self.ids, self.locs):
            prefix = f"level{j + 1}."
            own = {}
            for li, i in enumerate(self._group(j)):
                keys = {k[len(prefix):]: v for k, v in state.get(i, {}).items()
                        if k.startswith(prefix)}
                if keys:
                    own[li] = keys
            if self.adam and "step" in own.get(0, {}):
                # Values checked with the file (io.checkpoint); a part missing: KeyError or
                # a size mismatch, refused.
                ad = self.adam[self.ids.index(j)]
                for name, into in (("exp_avg", ad.m), ("exp_avg_sq", ad.v)):
                    into.copy_(torch.cat([own[li][name].reshape(-1) for li in range(len(own))]))
                ad.t = int(own[0]["step"])
            if tr.lsr1 is not None and "lsr1_gamma" in own.get(0, {}):
                sd = tr.state_dict()  # its own radius and counters, the memory replaced
                merged = {i: {k: v for k, v in st.items() if not k.startswith("lsr1_")}
                          for i, st in sd["state"].items()}
                for i, keys in own.items():
                    merged.setdefault(i, {}).update(keys)
                tr.load_state_dict({"state": merged, "param_groups": sd["param_groups"]})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.glob.zero_grad(set_to_none)

    # -- one step ------------------------------------------------------------------------
    def _pieces(self, obj: Objective) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's subdomains of its batch: every K-th sample from m (contiguous copies,
        so each is laid out alike at any rank count)."""
        if self.K == 1:
            return [(obj.x, obj.y)]
        return [(obj.x[m::self.K].contiguous(), obj.y[m::self.K].contiguous())
                for m in range(self.K)]

    def _start(self, obj: Objective, pieces) -> tuple[float, torch.Tensor, list]:
        """Every local subdomain's (loss, gradient) at x_k, stored in its solver's cache,
        and the global (f, g) from them. Collective on the data axis."""
        n_r = len(obj.x)
        packed = torch.zeros(self.n + 1, dtype=torch.float64, device=self.params[0].device)
        local = []
        for m, (x, y) in enumerate(pieces):
            loss, g = Curvature(obj.model, obj.loss_fn, x, y, "lsr1", self.params,
                                penalty=depth_penalty).loss_and_grad()
            g = g.to(torch.float64)
            self._own += len(x)
            lo, hi = self.blocks[m]
            tr = self.locs[m]
            tr.cache.store(obj.model, x, y, 1.0, tr.iterate, float(loss), g[lo:hi].clone())
            local.append((float(loss), g))
            share = len(x) / n_r
            packed[:-1].add_(g, alpha=share)
            packed[-1] += float(loss) * share
        self.glob._mean(packed.mul_(obj.weight))
        f, g = float(packed[-1]), packed[:-1]
        self.glob.cache.store(obj.model, obj.x, obj.y, obj.weight, self.glob.iterate, f, g)
        return f, g, local

    def _local(self, m: int, obj: Objective, bound: float) -> tuple[torch.Tensor, float, float]:
        """``local_iters`` trust-region steps of local piece m on ``obj`` (its local model)
        within ||y - x_k|| <= bound; returns its step (in its block), the predicted
        reductions of the steps it accepted, and the local model at x_k. Leaves the
        parameters at x_k. Not collective."""
        tr = self.locs[m]
        x0 = tr.iterate
        anchor = x0.to(torch.float64)
        tr.radius = min(bound, tr.radius_max)
        log = tr.decisions
        slack = bound * (1 + BOUND_RTOL)  # a step on the boundary is inside it (no tie)

        def limit(s: torch.Tensor) -> float:
            d = tr.iterate.to(torch.float64) - anchor
            norm = float((d + s).norm())
            if not log.record("boundary", not norm <= slack, norm, slack, bound):
                return 1.0
            return ball_fraction(float(d @ d), float(d @ s), float(s @ s), bound)

        predicted, start = 0.0, None
        for _ in range(self.local_iters):
            room = bound - float((tr.iterate.to(torch.float64) - anchor).norm())
            value = tr.tr_step(obj, radius=room, limit=limit)
            start = value if start is None else start
            self.counts["local_steps"] += 1
            if tr.last["accepted"]:
                self.counts["local_accepted"] += 1
                predicted += tr.last["predicted"]
            left = bound - float((tr.iterate.to(torch.float64) - anchor).norm())
            if log.record("room", left <= self.boundary * bound, self.boundary * bound, left,
                          bound):
                self.counts["local_at_bound"] += 1
                break
        s = tr.iterate.to(torch.float64) - anchor
        tr.set_iterate(x0)
        return s, predicted, start

    def _local_adam(self, m: int, obj: Objective, bound: float
                    ) -> tuple[torch.Tensor, float, float]:
        """``local_iters`` Adam steps of local piece m on ``obj`` (its local model), each
        the direction d = m_hat / (sqrt(v_hat) + eps) of the subdomain's own moments scaled
        to the length bound / local_iters (a trust-region Adam: the radius sets the step
        length, as the APTS authors' TRAdam local optimizer does in the max norm; measured
        on MNIST the Euclidean length trains better), so the path stays within ``bound``.
        Returns its step, the reduction the linear models predict along the path (sum of
        -grad h_j . step: the first-order trust-region model), and the local model at
        x_k. Leaves the parameters at x_k. Not collective."""
        tr, ad = self.locs[m], self.adam[m]
        x0 = tr.iterate
        anchor = x0.to(torch.float64)
        length = bound / self.local_iters
        predicted, start = 0.0, None
        for _ in range(self.local_iters):
            value, g = tr.objective(obj)
            if not (math.isfinite(value) and bool(torch.isfinite(g).all())):
                raise NonFiniteError("loss or gradient is not finite at a subdomain's "
                                     "local iterate")
            start = value if start is None else start
            d = ad.direction(g)
            norm = float(d.norm())
            if norm == 0.0:  # a zero gradient from the start (an unused block): no step
                break
            s = d.mul_(-length / norm)
            predicted -= float(g @ s)
            tr.set_iterate(tr.iterate + s.to(x0.dtype))
            self.counts["local_steps"] += 1
        s = tr.iterate.to(torch.float64) - anchor
        tr.set_iterate(x0)
        return s, predicted, start

    def tr_step(self, obj: Objective) -> float:
        """One APTS step on this rank's batch; returns the global objective at x_k.
        Collective on the data axis."""
        glob = self.glob
        if glob.batch_factor != self._factor:  # a new objective: old values do not compare
            self._factor = glob.batch_factor
            self._history.clear()
        if self.decomposition == "weights":
            for tr in self.locs:  # keyed by the block alone: the other blocks have moved
                tr.cache.clear()
        x_k = glob.iterate
        D = glob.radius
        bound = D / self.N if self.decomposition == "data" else D / math.sqrt(self.N)
        solve = self._local_adam if self.adam else self._local
        pieces = self._pieces(obj)
        if self.N == 1:  # the local model is the objective: no correction, nothing to add
            s, predicted, f = solve(0, obj, bound)
            total = self._reduce(s, predicted)
        else:
            f, g, local = self._start(obj, pieces)
            packed_s = torch.zeros(self.n, dtype=torch.float64, device=x_k.device)
            predicted = 0.0
            for m, (x, y) in enumerate(pieces):
                lo, hi = self.blocks[m]
                gm = local[m][1]
                sub = Objective(obj.model, obj.loss_fn, x, y, 1.0,
                                shift=((g - gm)[lo:hi], x_k[lo:hi].to(torch.float64)))
                sm, pm, _ = solve(m, sub, bound)
                packed_s[lo:hi].add_(sm)
                predicted += pm
            total = self._reduce(packed_s, predicted)
        s, predicted = total
        accepted = False
        if not bool(torch.any(s != 0)):
            # Every local step rejected (s == 0 bit for bit): structural, the radius shrinks.
            glob.accept(f, f, 0.0, x_k)
        else:
            glob.set_iterate(x_k + s.to(x_k.dtype))
            f_trial = glob.value(obj)
            reference = max(self._history) if self.window > 1 and self._history else None
            accepted = glob.accept(f, f_trial, predicted, x_k, reference=reference)
            if accepted:
                self._history.append(f)
        self.counts["accepted" if accepted else "rejected"] += 1
        glob.after_step(accepted)
        self.last = {"accepted": accepted, "start": f, "predicted": predicted,
                     "value": f_trial if accepted else f, "step_norm": float(s.norm())}
        for _ in range(self.global_iters):
            glob.tr_step(obj)
            self.last["accepted"] |= glob.last["accepted"]
            self.last["value"] = glob.last["value"]
        return f

    def _reduce(self, s: torch.Tensor, predicted: float) -> tuple[torch.Tensor, float]:
        """(sum of the subdomains' steps, sum of their predicted reductions), and the
        subdomains' work summed over ranks. Collective on the data axis."""
        kinds = list(self.local_samples)
        own = {k: sum(tr.samples()[k] for tr in self.locs) for k in kinds}
        own["gradient"] += self._own
        base, self._reported = self._reported, dict(own)
        scalars = [predicted] + [own[k] - base[k] for k in kinds]
        buf = torch.cat([s.reshape(-1),
                         torch.tensor(scalars, dtype=torch.float64, device=s.device)])
        allreduce_(buf, self.comm)  # staged through host memory from a GPU
        for i, k in enumerate(kinds):
            self.local_samples[k] += float(buf[self.n + 1 + i])
        return buf[:self.n], float(buf[self.n])

    # -- reporting -----------------------------------------------------------------------
    def samples(self) -> dict[str, float]:
        """Global samples of each kind of evaluation: every subdomain's and the global
        trust region's. Not collective."""
        g = self.glob.samples()
        return {k: g[k] + self.local_samples[k] for k in g}

    def price_levels(self, model) -> list[tuple]:
        """What ``measure_costs`` times: ``model`` with the global rule's curvature (the
        subdomains run the same network). Not collective."""
        return [(model, self.glob.curvature, self.params)]

    def measure_costs(self, obj: Objective, rounds: int = 15) -> None:
        """Prices the evaluations by timing them on ``obj``'s batch (the subdomains run the
        same network; ``mltrain.optim.costs``). Collective on the data axis."""
        self.prices = price(self.price_levels(obj.model), obj, (self.comm,), rounds)

    def work(self, num_train: int) -> float:
        return self.prices.work([self.samples()], num_train)

    @property
    def host_copies(self) -> dict[str, int]:
        """This rank's host<->device copies of its subproblem solves, global and local (0
        when the parameters are on the CPU). Not collective."""
        parts = [self.glob.host_copies] + [tr.host_copies for tr in self.locs]
        return {k: sum(c[k] for c in parts) for k in parts[0]}

    def report(self, num_train: int) -> dict:
        """The summary's work (priced, fine-gradient equivalents), counts and the
        subproblem solves' host<->device copies. Not collective."""
        s, c = self.samples(), self.counts
        return {"work": self.work(num_train),
                "grad_evals": (s["gradient"] + s["graph_gradient"]) / num_train,
                "hvp_evals": s["product"] / num_train, "loss_evals": s["loss"] / num_train,
                "accepted_steps": c["accepted"], "rejected_steps": c["rejected"],
                "subdomains": self.N, "decomposition": self.decomposition,
                "local_solver": "adam" if self.adam else "tr",
                "local_steps_per_subdomain": c["local_steps"] / max(self.K, 1),
                "local_accepted": c["local_accepted"], "local_at_bound": c["local_at_bound"],
                "radius": self.radius, "batch_factor": self.batch_factor,
                "cache_hits": dict(self.glob.cache.hits), "prices": self.prices.as_dict(),
                **self.host_copies, **self.decisions.summary()}

    def subdomain_decisions(self) -> dict[int, DecisionLog]:
        """Each local subdomain's decision log, by its global index. Not collective."""
        return {j: tr.decisions for j, tr in zip(self.ids, self.locs)}

    def close(self) -> None:
        self.glob.close()
        for tr in self.locs:
            tr.close()
