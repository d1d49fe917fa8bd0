"""APTS (``mltrain.optim.apts``): one subdomain is the trust region step for step; the local
models are first-order consistent; the global step keeps to the radius; N subdomains
compute the same at any rank count that shares them; non-monotone acceptance; resume."""
import math

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.config import ConfigError, load_config
from mltrain.linalg.vector import flat_params
from mltrain.optim.apts import APTS, LocalAdam, split_blocks
from mltrain.optim.tr import Objective, TrustRegion
from mltrain.train import Trainer
from mltrain.utils.decisions import BOUND_RTOL, first_difference

from conftest import against_serial, all_ranks, require, straight_and_resumed

TR_KEYS = dict(radius=0.5, radius_max=10.0, eta1=0.1, eta2=0.75, gamma1=0.5, gamma2=2.0)
SMALL = ["model.name=resnet", "model.depth=8", "model.width=16", "data.batch_size=64",
         "run.threads=1", "run.costs=unit", "run.dtype=float64"]


def _batch(n=96):
    from mltrain.data import open_dataset

    d = open_dataset("digits")
    x, y = d.read_train(torch.arange(n).numpy())
    return torch.from_numpy(x).double(), torch.from_numpy(y)


def _run(extra, comm=MPI.COMM_SELF):
    t = Trainer(load_config(None, SMALL + extra), comm, quiet=True, metrics=False)
    s = t.train()
    p = flat_params(t.model)
    t.close()
    return s, p


@pytest.mark.parametrize("curvature", ["hessian", "lsr1"])
def test_apts_with_one_subdomain_is_the_trust_region(curvature):
    """One subdomain, one local step, no global pass: the local model is the objective, its
    predicted reduction the trust region's, the global rule the same, and the local trial
    evaluation serves the global test (same work)."""
    require("petsc4py")
    common = ["run.steps=12", f"tr.curvature={curvature}", "tr.batch=minibatch"]
    s_tr, p_tr = _run(["optim.name=tr"] + common)
    s_ap, p_ap = _run(["optim.name=apts", "apts.subdomains=1", "apts.local_iters=1",
                       "apts.local_solver=tr", "apts.window=1"] + common)
    assert torch.equal(p_tr, p_ap)
    for key in ("work", "grad_evals", "hvp_evals", "loss_evals", "accepted_steps",
                "rejected_steps", "radius"):
        assert s_tr[key] == s_ap[key], key


def test_blocks_of_layers_are_contiguous_balanced_and_cover_the_network():
    sizes = [100, 10, 10, 500, 20, 20, 300, 5]
    for n in range(1, len(sizes) + 1):
        groups = split_blocks(sizes, n)
        assert len(groups) == n and all(len(g) > 0 for g in groups)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
    # balanced: no group over twice the mean unless one tensor alone is
    g = split_blocks([10] * 12, 4)
    assert [len(r) for r in g] == [3, 3, 3, 3]
    with pytest.raises(ConfigError, match="apts.subdomains: 9 blocks"):
        split_blocks(sizes, 9)


@pytest.mark.parametrize("decomposition", ["data", "weights"])
def test_local_models_are_first_order_consistent(decomposition):
    """At x_k each subdomain's model has the global gradient (its block of it), and the
    global (f, g) assembled from the subdomains is the trust region's on the whole batch."""
    require("petsc4py")
    from mltrain.nn import ResNet

    torch.manual_seed(0)
    model = ResNet(64, 8, 8, 10).double()
    x, y = _batch()
    a = APTS(model, MPI.COMM_SELF, decomposition=decomposition, subdomains=4, **TR_KEYS,
             local_solver="tr", curvature="lsr1")
    obj = Objective(model, F.cross_entropy, x, y)
    pieces = a._pieces(obj)
    assert sorted(torch.cat([p[1] for p in pieces]).tolist()) == sorted(y.tolist())
    f, g, local = a._start(obj, pieces)
    ref = TrustRegion(model.parameters(), MPI.COMM_SELF, **TR_KEYS)
    f_ref, g_ref = ref.objective(obj)
    assert f == pytest.approx(f_ref, rel=1e-13)
    assert torch.allclose(g, g_ref, rtol=1e-11, atol=1e-14)
    x_k = a.glob.iterate.double()
    sizes = []
    for m, (xm, ym) in enumerate(pieces):
        lo, hi = a.blocks[m]
        sizes.append(hi - lo)
        sub = Objective(model, F.cross_entropy, xm, ym, 1.0,
                        shift=((g - local[m][1])[lo:hi], x_k[lo:hi]))
        _, g_local = a.locs[m].objective(sub)
        assert torch.allclose(g_local, g[lo:hi], rtol=0, atol=1e-14)
    if decomposition == "weights":  # the blocks tile the vector
        assert sorted(a.blocks) == a.blocks and sum(sizes) == a.n
        assert [b[0] for b in a.blocks[1:]] == [b[1] for b in a.blocks[:-1]]
    a.close()
    ref.close()


@pytest.mark.parametrize("solver", ["tr", "adam"])
@pytest.mark.parametrize("decomposition", ["data", "weights"])
def test_the_global_step_keeps_to_the_radius(decomposition, solver):
    """||sum_j s_j|| <= D (data: D/N each; weights: D/sqrt(N) each, orthogonal blocks); the
    predicted reduction is the sum of the local ones and positive when a step is taken
    (Adam's moments may turn a path uphill: such a step is rejected)."""
    require("petsc4py")
    from mltrain.nn import ResNet

    torch.manual_seed(0)
    model = ResNet(64, 8, 8, 10).double()
    x, y = _batch()
    a = APTS(model, MPI.COMM_SELF, decomposition=decomposition, subdomains=4, local_iters=3,
             local_solver=solver, **TR_KEYS, curvature="lsr1")
    ratios = []
    for _ in range(10):
        D = a.radius
        a.tr_step(Objective(model, F.cross_entropy, x, y))
        ratios.append(a.last["step_norm"] / D)
        assert a.last["step_norm"] == 0.0 or a.last["predicted"] > 0 or (
            solver == "adam" and not a.last["accepted"])
    assert max(ratios) <= 1 + BOUND_RTOL, ratios
    assert max(ratios) > 0.5  # the bound is reached, not vacuous
    assert a.counts["accepted"] > 0
    assert all(ad.t == 30 for ad in a.adam) and len(a.adam) == (4 if solver == "adam" else 0)
    a.close()


def test_local_adam_direction_is_torch_adams_update():
    """The subdomains' Adam moments follow torch.optim.Adam: with lr 1 its update is minus
    the direction, step after step."""
    torch.manual_seed(0)
    p = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.Adam([p], lr=1.0)
    ad = LocalAdam(7, "cpu")
    for _ in range(5):
        g = torch.randn(7, dtype=torch.float64)
        before = p.detach().clone()
        p.grad = g.clone()
        ref.step()
        d = ad.direction(g)
        assert torch.allclose(p.detach() - before, -d, rtol=1e-13, atol=0)
    assert ad.t == 5


def test_adam_local_solver_takes_no_step_on_a_block_without_gradient():
    """A block whose parameters the loss ignores has a zero gradient and zero moments:
    its local solve stops with a zero step instead of dividing by a zero direction."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.unused = torch.nn.Parameter(torch.zeros(20))

        def forward(self, x):
            return self.a(x) + 0 * self.unused.sum()

    model = Net().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    a = APTS(model, MPI.COMM_SELF, decomposition="weights", subdomains=2, local_iters=2,
             local_solver="adam", **TR_KEYS, curvature="lsr1")
    before = model.unused.detach().clone()
    for _ in range(3):
        a.tr_step(Objective(model, F.cross_entropy, x, y))
    assert torch.equal(model.unused.detach(), before) and a.counts["accepted"] > 0
    a.close()


def test_non_monotone_acceptance_measures_against_the_worst_recent_value():
    tr = TrustRegion([torch.zeros(3, dtype=torch.float64, requires_grad=True)], MPI.COMM_SELF,
                     **TR_KEYS, curvature="lsr1")
    x0 = tr.iterate
    assert not tr.accept(1.0, 1.05, 0.1, x0)  # an increase: rejected by the monotone rule
    assert tr.accept(1.0, 1.05, 0.1, x0, reference=1.2)  # rho = (1.2 - 1.05) / 0.1
    assert not tr.accept(1.0, 1.05, 0.1, x0, reference=0.5)  # a lower reference: f counts
    tr.close()


def test_window_auto_is_non_monotone_on_a_fixed_mini_batch_only():
    """apts.window = 0 (the default) resolves by the batch regime; a value set is kept."""
    def window(*sets):
        return load_config(None, ["optim.name=apts", *sets]).apts.window

    assert window() == 1  # APTS's batch is hybrid by default
    assert window("tr.batch=minibatch") == 3
    assert window("tr.batch=full") == 1
    assert window("tr.batch=hybrid") == 1
    assert window("tr.batch=minibatch", "apts.window=1") == 1
    assert window("tr.batch=full", "apts.window=5") == 5


def test_grow_on_auto_holds_out_for_apts_only():
    """tr.grow_on = auto (the default): the held-out test for APTS, rejections for the
    trust-region methods; a value set is kept."""
    def grow_on(*sets):
        return load_config(None, list(sets)).tr.grow_on

    assert grow_on("optim.name=apts") == "holdout"
    assert grow_on("optim.name=rmtr") == grow_on("optim.name=tr") == "rejections"
    assert grow_on("optim.name=apts", "tr.grow_on=rejections") == "rejections"
    assert grow_on("optim.name=rmtr", "tr.grow_on=holdout") == "holdout"


@pytest.mark.parametrize("extra", [["apts.local_solver=tr"],
                                   ["apts.local_solver=tr", "apts.decomposition=weights"],
                                   ["apts.local_solver=tr", "apts.window=3"],
                                   ["apts.local_solver=tr", "apts.global_iters=1",
                                    "tr.curvature=hessian"],
                                   ["apts.local_solver=adam"],
                                   ["apts.local_solver=adam", "apts.decomposition=weights",
                                    "apts.global_iters=1"]],
                         ids=["data", "weights", "window", "global-pass", "adam",
                              "adam-weights-global"])
def test_apts_descends_and_is_deterministic(extra):
    require("petsc4py")
    cfg = ["optim.name=apts", "apts.subdomains=4", "run.steps=16"] + extra
    t = Trainer(load_config(None, SMALL + cfg), MPI.COMM_SELF, quiet=True, metrics=False)
    before = t.evaluate()["train_loss"]
    t.close()
    s1, p1 = _run(cfg)
    s2, p2 = _run(cfg)
    assert torch.equal(p1, p2)
    assert s1["final_loss"] < 0.8 * before, (s1["final_loss"], before)
    assert s1["accepted_steps"] > 0 and s1["work"] > 0 and s1["subdomains"] == 4


def _local_logs(comm, trainer) -> dict:
    """Every subdomain's local decisions, by subdomain, gathered on every rank."""
    logs = trainer.optimizer.subdomain_decisions()
    out = {}
    for part in comm.allgather({j: list(log.entries) for j, log in logs.items()}):
        out.update(part)
    return out


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("extra", [["apts.decomposition=data", "apts.local_solver=tr"],
                                   ["apts.decomposition=weights", "apts.window=3",
                                    "apts.local_solver=tr"],
                                   ["apts.decomposition=data", "apts.local_solver=adam"],
                                   ["apts.decomposition=data", "apts.local_solver=adam",
                                    "tr.grow_on=holdout", "tr.grow_after=1"],
                                   ["apts.decomposition=data", "apts.local_solver=adam",
                                    "model.depth_penalty=0.05"],
                                   ["apts.decomposition=weights", "apts.local_solver=tr",
                                    "model.depth_penalty=0.05"]],
                         ids=["data", "weights-window", "adam", "adam-holdout",
                              "adam-depth-penalty", "weights-depth-penalty"])
@pytest.mark.exactness
def test_apts_subdomains_compute_alike_at_any_rank_count(comm, extra):
    """Twelve subdomains on 1, 2, 3 or 4 ranks: the same global decisions (checked first,
    none within round-off of its threshold), the same local decisions subdomain by
    subdomain, then the same iterates (the sums over subdomains run in another order:
    round-off)."""
    require("petsc4py")
    cfg = load_config(None, SMALL + ["optim.name=apts", "apts.subdomains=12",
                                     "data.partition=strided", "data.shuffle=false",
                                     "data.batch_size=96", "run.steps=6"] + extra)
    s, before, diff = against_serial(comm, cfg)
    # The penalty's weights-decomposition run takes long steps (radius 4 by step 3), which
    # amplify the round-off of the sums: 1.8e-10 at 2 ranks after 6 steps.
    all_ranks(comm, diff < (1e-8 if "model.depth_penalty=0.05" in extra else 1e-10),
              f"{diff:.2e}")
    all_ranks(comm, s["final_loss"] < before, str(s))
    par = Trainer(cfg, comm, quiet=True, metrics=False)
    par.train()
    ser = Trainer(cfg, MPI.COMM_SELF, quiet=True, metrics=False)
    ser.train()
    a, b = _local_logs(comm, par), _local_logs(MPI.COMM_SELF, ser)
    all_ranks(comm, sorted(a) == sorted(b) == list(range(12)), str(sorted(a)))
    from mltrain.utils.decisions import DecisionLog

    for j in range(12):
        ref, other = DecisionLog(), DecisionLog()
        ref.entries, other.entries = b[j], a[j]
        all_ranks(comm, not ref.near_ties(), f"subdomain {j}: near ties {ref.near_ties()[:3]}")
        all_ranks(comm, first_difference(ref, other) is None,
                  f"subdomain {j}: {first_difference(ref, other)}")
    par.close()
    ser.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("extra", [["apts.local_solver=tr", "tr.curvature=lsr1"],
                                   ["apts.local_solver=tr", "tr.curvature=lsr1",
                                    "apts.decomposition=weights"],
                                   ["apts.local_solver=tr", "tr.curvature=hessian"],
                                   ["apts.local_solver=adam"],
                                   ["apts.local_solver=adam", "apts.decomposition=weights",
                                    "run.dtype=float32"],
                                   ["apts.local_solver=adam", "tr.grow_on=holdout",
                                    "tr.grow_after=1"]],
                         ids=["lsr1", "weights", "hessian", "adam", "adam-weights-float32",
                              "adam-holdout"])
@pytest.mark.exactness
def test_apts_resume_is_bit_exact(comm, shared_tmp, extra):
    """The checkpoint holds the global trust region's state and every subdomain's L-SR1
    memory or Adam moments (gathered from the ranks that compute them; the moments in
    float64 whatever the run's type): resume is exact."""
    require("petsc4py")
    base = SMALL + ["optim.name=apts", "data.batch_size=48",
                    f"apts.subdomains={2 * comm.Get_size()}"] + extra
    ck = shared_tmp / ("apts-" + "-".join(e.split("=")[1] for e in extra))
    straight, second = straight_and_resumed(comm, base, ck)
    all_ranks(comm, torch.equal(flat_params(straight.model), flat_params(second.model)))
    memories = [len(tr.lsr1.pairs) for tr in second.optimizer.locs if tr.lsr1 is not None]
    if second.optimizer.adam:  # the moments went on: as many local steps as straight on
        steps = [ad.t for ad in second.optimizer.adam]
        all_ranks(comm, steps == [ad.t for ad in straight.optimizer.adam] and min(steps) > 0
                  and all(torch.equal(a.v, b.v) for a, b in zip(straight.optimizer.adam,
                                                                second.optimizer.adam)),
                  str(steps))
    else:
        all_ranks(comm, "tr.curvature=hessian" in extra or min(memories) > 0, str(memories))
    straight.close()
    second.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("solver", ["tr", "adam"])
@pytest.mark.exactness
def test_apts_resumes_at_another_rank_count(comm, shared_tmp, solver):
    """Subdomain memories (and Adam moments) are stored by subdomain: a run written at P
    ranks resumes on one rank (or the other way) and follows the uninterrupted serial
    run."""
    require("petsc4py")
    base = SMALL + ["optim.name=apts", "apts.subdomains=12", "data.partition=strided",
                    "data.shuffle=false", "data.batch_size=96", f"apts.local_solver={solver}"]
    ck = shared_tmp / f"apts-ranks-{solver}"

    def run(extra, c):
        t = Trainer(load_config(None, base + extra), c, quiet=True, metrics=False)
        t.train()
        return t

    run(["run.steps=4", f"checkpoint.dir={ck}"], comm).close()
    ref = run(["run.steps=8"], MPI.COMM_SELF)
    res = run(["run.steps=8", f"checkpoint.dir={ck}", "checkpoint.resume=true"],
              MPI.COMM_SELF)
    a, b = flat_params(ref.model), flat_params(res.model)
    diff = float((a - b).norm() / a.norm())
    all_ranks(comm, diff < 1e-10 and res.resumed_from is not None, f"{diff:.2e}")
    ref.close()
    res.close()
