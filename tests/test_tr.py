"""Trust-region training: the PETSc subproblem solver, curvature products, the optimizer."""
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from mltrain.config import ConfigError, load_config
from mltrain.linalg.curvature import Curvature
from mltrain.linalg.vector import flat_params, set_flat_params
from mltrain.linalg.petsc import NonFiniteError, TRSubproblem
from mltrain.train import Trainer

from conftest import against_serial, all_ranks, require, straight_and_resumed


def _problem(n, definite, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = rng.uniform(0.5, 3.0, n) if definite else rng.uniform(-2.0, 3.0, n)
    return torch.tensor(q @ np.diag(eig) @ q.T), torch.tensor(rng.standard_normal(n))


def _model_value(H, g, s):
    return float(g @ s + 0.5 * s @ H @ s)


def _cauchy_value(H, g, radius):
    """The model at the Cauchy point: the minimiser along -g inside the ball."""
    gn = float(g.norm())
    gHg = float(g @ H @ g)
    t = radius / gn if gHg <= 0 else min(gn**2 / gHg, radius / gn)
    return _model_value(H, g, -t * g)


@pytest.mark.parametrize("ksp_type", ["stcg", "nash", "gltr"])
@pytest.mark.parametrize("definite", [True, False])
@pytest.mark.parametrize("radius", [0.05, 0.5, 100.0])
def test_subproblem_against_dense_solution(ksp_type, definite, radius):
    require("petsc4py")
    H, g = _problem(8, definite, seed=int(radius * 100) + definite)
    sol = TRSubproblem(8, ksp_type=ksp_type, max_it=200, rtol=1e-12,
                       options_prefix=f"t_{ksp_type}_")
    s, predicted, _ = sol.solve(g, radius, lambda v: H @ v)
    assert float(s.norm()) <= radius * (1 + 1e-6)  # GLTR solves its boundary equation iteratively
    m = _model_value(H, g, s)
    assert predicted == pytest.approx(-m, rel=1e-8, abs=1e-12)
    assert m <= _cauchy_value(H, g, radius) + 1e-12  # at least the Cauchy decrease
    newton = -torch.linalg.solve(H, g)
    if definite and float(newton.norm()) < radius:  # interior: the Newton step
        assert torch.allclose(s, newton, rtol=1e-8, atol=1e-10)
    sol.destroy()


def test_subproblem_reports_non_finite_products():
    require("petsc4py")
    sol = TRSubproblem(4, options_prefix="t_nan_")
    with pytest.raises(NonFiniteError, match="curvature product"):
        sol.solve(torch.ones(4, dtype=torch.float64), 1.0, lambda v: v * float("nan"))
    sol.destroy()


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    return model, x, y


def _as_params(model, flat):
    """A flat vector as the model's named parameters (for torch.func.functional_call)."""
    ps, off = {}, 0
    for n, p in model.named_parameters():
        ps[n] = flat[off:off + p.numel()].view(p.shape)
        off += p.numel()
    return ps


def test_hessian_products_against_autograd_and_differences():
    model, x, y = _tiny()
    curv = Curvature(model, nn.functional.cross_entropy, x, y, "hessian")
    _, g0 = curv.loss_and_grad()
    v = torch.randn(curv.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hv = curv.mv(v)

    def loss_of(flat):
        out = torch.func.functional_call(model, _as_params(model, flat), (x,))
        return nn.functional.cross_entropy(out, y)

    x0 = flat_params(model)
    _, ref = torch.autograd.functional.hvp(loss_of, x0, v)
    assert torch.allclose(hv, ref, rtol=1e-10, atol=1e-12)
    eps = 1e-6  # central differences of the gradient
    set_flat_params(model, x0 + eps * v)
    _, gp = Curvature(model, nn.functional.cross_entropy, x, y).loss_and_grad()
    set_flat_params(model, x0 - eps * v)
    _, gm = Curvature(model, nn.functional.cross_entropy, x, y).loss_and_grad()
    set_flat_params(model, x0)
    assert torch.allclose(hv, (gp - gm) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_ggn_against_explicit_jacobian():
    model, x, y = _tiny()
    curv = Curvature(model, nn.functional.cross_entropy, x, y, "ggn")
    curv.loss_and_grad()

    def logits_of(flat):
        return torch.func.functional_call(model, _as_params(model, flat), (x,)).reshape(-1)

    x0 = flat_params(model)
    J = torch.autograd.functional.jacobian(logits_of, x0)  # (B*K, n)
    p = torch.softmax(logits_of(x0).view(5, 3), -1)
    HL = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / 5 for pi in p])
    G = J.T @ HL @ J
    v = torch.randn(curv.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(curv.mv(v), G @ v, rtol=1e-10, atol=1e-13)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12  # positive semi-definite


def test_depth_penalty_is_in_the_objective_its_gradient_and_every_product():
    """model.depth_penalty: the loss, the gradient and the Hessian and Gauss-Newton products
    each gain exactly the penalty's share, checked against the penalty written out by hand
    (its Hessian is (alpha / h) times the second difference over depth, free ends); a
    coarse level (injection, twice the step) discretizes the same integral: for weights
    linear in depth its penalty is (N - 2) / (N - 1) of the fine one."""
    from mltrain.multilevel import Hierarchy
    from mltrain.nn import build_model, depth_penalty, set_depth_penalty

    torch.manual_seed(0)
    N, alpha = 6, 0.3
    model = build_model("resnet", (1, 2, 2), 3, width=3, depth=N, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    h = model.blocks[0].h
    blocks = [torch.cat([p.detach().reshape(-1) for p in b.parameters()]) for b in model.blocks]
    by_hand = alpha / (2 * h) * sum(float((b - a) @ (b - a)) for a, b in zip(blocks, blocks[1:]))
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen,
                    dtype=torch.float64)
    # The penalty's Hessian times v by hand: (alpha / h) (2 v_k - v_{k-1} - v_{k+1}), one
    # neighbour at each end; zero on the opening and closing layers.
    n_open = sum(p.numel() for p in model.opening.parameters())
    per = blocks[0].numel()
    vb = v[n_open:n_open + N * per].view(N, per)
    lap = torch.zeros_like(vb)
    lap[:-1] += vb[:-1] - vb[1:]
    lap[1:] += vb[1:] - vb[:-1]
    pen_hv = torch.zeros_like(v)
    pen_hv[n_open:n_open + N * per] = (alpha / h) * lap.reshape(-1)

    plain = {k: Curvature(model, nn.functional.cross_entropy, x, y, k) for k in ("hessian", "ggn")}
    f0, g0 = plain["hessian"].loss_and_grad()
    plain["ggn"].loss_and_grad()
    hv0 = {k: c.mv(v) for k, c in plain.items()}
    set_depth_penalty(model, alpha)
    assert float(depth_penalty(model).detach()) == pytest.approx(by_hand, rel=1e-12)
    for kind in ("hessian", "ggn"):
        curv = Curvature(model, nn.functional.cross_entropy, x, y, kind, penalty=depth_penalty)
        f, g = curv.loss_and_grad()
        assert f == pytest.approx(f0 + by_hand, rel=1e-12)
        gp = torch.autograd.grad(depth_penalty(model), list(model.parameters()),
                                 allow_unused=True)
        gp = torch.cat([t.reshape(-1) if t is not None else torch.zeros(p.numel(), dtype=p.dtype)
                        for t, p in zip(gp, model.parameters())])
        assert torch.allclose(g, g0 + gp, rtol=1e-12, atol=1e-14)
        assert torch.allclose(curv.mv(v), hv0[kind] + pen_hv, rtol=1e-10, atol=1e-12), kind
    with pytest.raises(ConfigError, match="model.depth_penalty"):
        set_depth_penalty(nn.Sequential(nn.Linear(2, 2)), 0.1)

    smooth = build_model("resnet", (1, 2, 2), 3, width=3, depth=8, dtype=torch.float64,
                         init="smooth")
    set_depth_penalty(smooth, alpha)
    coarse = Hierarchy(smooth, 2, 2).models[1]
    assert coarse.depth_alpha == alpha and coarse.blocks[0].h == 2 * smooth.blocks[0].h
    assert float(depth_penalty(coarse).detach()) == pytest.approx(
        6 / 7 * float(depth_penalty(smooth).detach()), rel=1e-10)


TR = ["optim.name=tr", "run.dtype=float64", "data.partition=strided", "data.shuffle=false",
      "data.batch_size=24", "model.width=16", "model.depth=2", "run.threads=1",
      "run.steps=15"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.exactness
def test_tr_is_rank_count_invariant_and_descends(comm, curvature):
    require("petsc4py")
    s, before, diff = against_serial(comm, load_config(None, TR + [f"tr.curvature={curvature}"]))
    all_ranks(comm, diff < 1e-10, f"{curvature}: {diff:.2e}")
    all_ranks(comm, s["final_loss"] < before and s["accepted_steps"] > 0, str(s))
    all_ranks(comm, s["accepted_steps"] + s["rejected_steps"] == 15 and s["hvp_evals"] > 0)


@pytest.mark.mpi(min_size=1)
def test_tr_rejected_step_restores_bits(comm):
    require("petsc4py")
    cfg = load_config(None, TR + ["tr.eta1=1.0", "tr.eta2=1.0", "run.steps=1"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    x0 = flat_params(t.model)
    r0 = t.optimizer.radius
    s = t.train()
    all_ranks(comm, s["rejected_steps"] == 1 and torch.equal(flat_params(t.model), x0)
              and t.optimizer.radius == r0 * 0.5)
    t.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("curvature", ["hessian", "lsr1"])
@pytest.mark.exactness
def test_tr_resume_is_bit_exact(comm, shared_tmp, dtype, curvature):
    require("petsc4py")
    base = [x for x in TR if not x.startswith(("run.steps", "run.dtype"))] + [
        f"run.dtype={dtype}", f"tr.curvature={curvature}"]
    straight, second = straight_and_resumed(comm, base, shared_tmp / f"tr-{dtype}-{curvature}")
    all_ranks(comm, torch.equal(flat_params(straight.model), flat_params(second.model))
              and straight.optimizer.radius == second.optimizer.radius)
    for t in (straight, second):
        t.close()


def test_tr_non_finite_loss_is_a_clear_error():
    require("petsc4py")
    t = Trainer(load_config(None, TR + ["run.steps=1"]), MPI.COMM_SELF, quiet=True, metrics=False)
    with torch.no_grad():
        next(t.model.parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteError, match="not finite"):
        t.train()
    t.close()


@pytest.mark.parametrize("extra, match", [
    (["tr.radius=0"], "tr.radius"), (["tr.radius=20"], "tr.radius"),
    (["tr.eta1=0.9", "tr.eta2=0.5"], "tr.eta1"), (["tr.gamma1=1.0"], "tr.gamma1"),
    (["sync.name=localsgd"], "sync.name"), (["tr.curvature=exact"], "tr.curvature"),
    (["tr.ksp_type=gmres"], "tr.ksp_type"),
    (["tr.grow_on=work", "tr.grow_every=0"], "tr.grow_every"),
])
def test_tr_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["optim.name=tr"] + extra)


@pytest.mark.mpi(min_size=1)
def test_distributed_vec_norms_and_dots(comm):
    require("petsc4py")
    from mltrain.linalg.petsc import touched, wrap

    r = comm.Get_rank()
    a = torch.arange(r + 3, dtype=torch.float64) * (r + 1) - 2.0
    b = torch.linspace(-1, 1, r + 3, dtype=torch.float64) ** 3
    va, vb = wrap(a, comm), wrap(b, comm)
    A = np.concatenate(comm.allgather(a.numpy()))
    B = np.concatenate(comm.allgather(b.numpy()))
    all_ranks(comm, math.isclose(va.norm(), np.linalg.norm(A), rel_tol=1e-14)
              and math.isclose(va.dot(vb), float(A @ B), rel_tol=1e-13, abs_tol=1e-14)
              and va.getSize() == len(A))
    a.mul_(2.0)  # no copy: the Vec sees the tensor's memory ...
    touched(va)  # ... once PETSc knows its cached norm is stale
    all_ranks(comm, math.isclose(va.norm(), 2 * np.linalg.norm(A), rel_tol=1e-14))
    seq = wrap(a)
    all_ranks(comm, math.isclose(seq.norm(), float(a.norm()), rel_tol=1e-14))
    for v in (va, vb, seq):
        v.destroy()
    with pytest.raises(ValueError, match="float64"):
        wrap(torch.ones(3))


@pytest.mark.parametrize("definite", [True, False])
@pytest.mark.parametrize("radius", [0.05, 0.5, 100.0])
def test_torch_steihaug_matches_petsc_stcg(definite, radius):
    require("petsc4py")
    from mltrain.linalg.reference import steihaug_cg

    H, g = _problem(10, definite, seed=7 + definite)
    sol = TRSubproblem(10, ksp_type="stcg", max_it=200, rtol=1e-10, options_prefix="t_ref_")
    s_p, pred_p, _ = sol.solve(g, radius, lambda v: H @ v)
    s_t, pred_t, _ = steihaug_cg(lambda v: H @ v, g, radius, max_it=200, rtol=1e-10)
    assert torch.allclose(s_t, s_p, rtol=1e-8, atol=1e-10)
    assert pred_t == pytest.approx(pred_p, rel=1e-8)
    sol.destroy()


def test_non_finite_trial_point_is_rejected():
    require("petsc4py")
    from mltrain.optim.tr import Objective, TrustRegion

    model, x, y = _tiny()
    opt = TrustRegion(model.parameters(), MPI.COMM_SELF, radius=1.0, radius_max=10.0,
                      eta1=0.1, eta2=0.75, gamma1=0.25, gamma2=2.0,
                      options_prefix="t_trial_")
    calls = {"n": 0}

    def loss_fn(out, target):  # finite at the current point, NaN at the trial point
        calls["n"] += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss if calls["n"] == 1 else loss * float("nan")

    x0 = flat_params(model)
    opt.tr_step(Objective(model, loss_fn, x, y))
    assert opt.counts["rejected"] == 1 and opt.radius == 0.25
    assert torch.equal(flat_params(model), x0)
    opt.close()


def test_param_buffer_is_the_petsc_vector():
    require("petsc4py")
    from mltrain.linalg.petsc import touched, wrap
    from mltrain.linalg.vector import ParamBuffer

    model, x, y = _tiny()
    before = model(x).detach()
    buf = ParamBuffer(model)
    assert buf.views_intact() and torch.equal(model(x).detach(), before)
    vec = wrap(buf.flat)
    vec.scale(0.0)  # PETSc writes ...
    assert all(bool((p == 0).all()) for p in model.parameters())  # ... the model sees it
    with torch.no_grad():
        next(model.parameters()).fill_(1.0)  # torch writes ...
    touched(vec)
    assert vec.sum() == pytest.approx(next(model.parameters()).numel())  # ... PETSc sees it
    gvec = wrap(buf.grad)
    for _ in range(2):  # backward accumulates straight into the buffer PETSc reads
        buf.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        touched(gvec)
        expect = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert gvec.norm() == pytest.approx(float(expect.norm()), rel=1e-14)
        assert float(buf.grad.norm()) > 0
    vec.destroy()
    gvec.destroy()


def test_lsr1_recovers_a_quadratic():
    from mltrain.linalg.lsr1 import LSR1

    H, _ = _problem(6, definite=False, seed=3)
    B = LSR1(memory=6)
    rng = torch.Generator().manual_seed(4)
    for _ in range(6):  # SR1 on a quadratic: exact after n independent steps
        s = torch.randn(6, generator=rng, dtype=torch.float64)
        B.update(s, H @ s)
    v = torch.randn(6, generator=rng, dtype=torch.float64)
    assert torch.allclose(B.mv(v), H @ v, rtol=1e-8, atol=1e-10)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("extra", [["tr.curvature=lsr1"], ["tr.batch=full"],
                                   ["tr.batch=hybrid", "tr.grow_on=holdout",
                                    "tr.grow_after=1"],
                                   ["tr.curvature=ggn", "model.depth_penalty=0.05"],
                                   ["tr.batch=hybrid", "tr.grow_on=work", "tr.grow_every=3",
                                    "run.costs=unit"]],
                         ids=["lsr1", "full", "holdout", "ggn-depth-penalty", "grow-on-work"])
@pytest.mark.exactness
def test_tr_modes_rank_count_invariant(comm, extra):
    require("petsc4py")
    s, before, diff = against_serial(comm, load_config(None, TR + ["run.steps=8"] + extra))
    all_ranks(comm, diff < 1e-10 and s["final_loss"] < before, f"{extra}: {diff:.2e}")
    if "tr.batch=full" in extra:
        all_ranks(comm, s["grad_evals"] == pytest.approx(8.0), str(s["grad_evals"]))


@pytest.mark.mpi(min_size=1)
def test_tr_hybrid_batch_grows_when_steps_fail(comm):
    require("petsc4py")
    cfg = load_config(None, TR + ["tr.batch=hybrid", "tr.grow_after=2", "run.steps=4",
                                  "tr.eta1=1.0", "tr.eta2=1.0"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    s = t.train()
    # 4 rejected steps, 2 in a row double the batch: 1 -> 2 -> 4 mini-batches per step
    all_ranks(comm, s["rejected_steps"] == 4 and s["batch_factor"] == 4, str(s))
    all_ranks(comm, s["grad_evals"] == pytest.approx((1 + 1 + 2 + 2) * 24 / 1438))
    t.close()


@pytest.mark.mpi(min_size=1)
def test_tr_hybrid_batch_grows_on_work_alone(comm):
    """tr.grow_on = work: steps are rejected here (each would double the batch on
    rejections with grow_after = 1), yet the batch doubles only when the work spent at it
    reaches grow_every gradients of the current global batch (priced at 1 per sample,
    run.costs = unit), and each step trains on the factor it grew to."""
    require("petsc4py")
    from mltrain.optim.base import STAGE_SLACK

    every, batch = 10.0, 24
    cfg = load_config(None, TR + ["tr.batch=hybrid", "tr.grow_on=work", "tr.grow_after=1",
                                  f"tr.grow_every={every}", "run.costs=unit",
                                  "run.steps=12"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    n = t.dataset.num_train

    def gradients():
        c = t.optimizer.samples()
        return c["gradient"] + c["graph_gradient"]

    seen = []  # (the step's work, its gradient samples, the factor after it)
    for _ in range(12):
        w, g = t.work(), gradients()
        t.advance()
        seen.append((t.work() - w, gradients() - g, t.optimizer.batch_factor))
    s = t.method.report(n)
    t.close()
    factor, spent = 1, 0.0
    for w, g, f in seen:
        all_ranks(comm, g == factor * batch, f"{seen}")  # the factor it grew to before
        spent += w
        if spent >= (1 - STAGE_SLACK) * every * factor * batch / n:
            factor, spent = factor * 2, 0.0
        all_ranks(comm, f == factor, f"{seen}")
    all_ranks(comm, s["rejected_steps"] >= 2 and factor >= 4, f"{s}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.exactness
def test_tr_resume_keeps_the_work_schedule(comm, shared_tmp):
    """The work at the last growth is checkpointed in float64: a float32 run resumed half
    way grows its batch at the same steps as the straight run."""
    require("petsc4py")
    base = [x for x in TR if not x.startswith(("run.steps", "run.dtype"))] + [
        "run.dtype=float32", "tr.curvature=lsr1", "tr.batch=hybrid", "tr.grow_on=work",
        "tr.grow_every=2", "run.costs=unit"]
    straight, second = straight_and_resumed(comm, base, shared_tmp / "tr-grow-on-work")
    a, b = straight.optimizer, second.optimizer
    all_ranks(comm, torch.equal(flat_params(straight.model), flat_params(second.model))
              and a.batch_factor == b.batch_factor > 1 and a.stage_work == b.stage_work,
              f"{a.batch_factor} {b.batch_factor} {a.stage_work} {b.stage_work}")
    for t in (straight, second):
        t.close()


def test_holdout_verdicts_count_as_the_steps_they_judge():
    from mltrain.optim.tr import TrustRegion

    tr = TrustRegion(nn.Linear(2, 1).parameters(), MPI.COMM_SELF, radius=1.0, radius_max=2.0,
                     eta1=0.1, eta2=0.75, gamma1=0.5, gamma2=2.0, grow_after=2)
    tr.holdout = True
    tr.after_step(True)  # waits for its verdict: neither a success nor a failure yet
    tr.verdict(False)
    tr.after_step(True)
    tr.verdict(False)  # two failed steps in a row
    assert tr.batch_factor == 2
    tr.after_step(False)  # a rejection counts at once
    tr.after_step(True)
    tr.verdict(True)  # a step that carried over ends the streak
    tr.after_step(False)
    assert tr.batch_factor == 2
    tr.after_step(False)
    assert tr.batch_factor == 4


@pytest.mark.mpi(min_size=1)
def test_tr_holdout_grows_on_steps_that_do_not_carry_over(comm):
    """tr.grow_on = holdout: an accepted step that keeps less than eta1 of its decrease on
    the next mini-batch fails. Replaying the run's decisions gives its batch factor, and its
    loss evaluations are the trial points' plus one mini-batch before each step and one
    after each accepted step (the held-out check is charged)."""
    require("petsc4py")
    cfg = load_config(None, TR + ["tr.batch=hybrid", "tr.grow_on=holdout", "tr.grow_after=1",
                                  "run.steps=10"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    s = t.train()
    factor, batches, verdicts = 1, 0, []
    for d in t.optimizer.decisions.entries:
        if d.kind == "accept":
            batches += factor + 1  # the trial point on the step's batch; held-out before
            if not d.taken:
                factor *= 2
        elif d.kind == "holdout":
            batches += 1  # held-out after the accepted step
            verdicts.append(d.taken)
            if not d.taken:
                factor *= 2
    all_ranks(comm, s["accepted_steps"] == len(verdicts) and False in verdicts
              and True in verdicts, f"{s['accepted_steps']} accepted, verdicts {verdicts}")
    all_ranks(comm, s["batch_factor"] == factor > 1, f"{s['batch_factor']} vs {factor}")
    all_ranks(comm, s["loss_evals"] == pytest.approx(batches * 24 / 1438),
              f"{s['loss_evals']} vs {batches * 24 / 1438}")
    t.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("cf", [2, 3])
@pytest.mark.parametrize("kind, mode", [("R", "injection"), ("R", "full_weighting"),
                                        ("P", "constant"), ("P", "linear")])
def test_transfer_matrices_match_kernels(comm, kind, mode, cf):
    """R and P as distributed AIJ matrices give what the kernels give."""
    require("petsc4py")
    from mltrain import ops
    from mltrain.linalg.petsc import transfer_matrix

    n_fine, width = 4 * cf, 5
    A = transfer_matrix(kind, n_fine, cf, mode, width, comm)
    layers = (n_fine if kind == "R" else n_fine // cf)
    g = torch.Generator().manual_seed(9)
    src = torch.randn(layers, width, generator=g, dtype=torch.float64)  # same on every rank
    expect = (ops.restrict(src, cf, mode) if kind == "R" else ops.prolong(src, cf, mode))
    x, y = A.createVecs()
    lo, hi = x.getOwnershipRange()
    x.getArray()[:] = src.reshape(-1)[lo:hi].numpy()
    A.mult(x, y)
    lo, hi = y.getOwnershipRange()
    got = torch.from_numpy(y.getArray(readonly=True).copy())
    all_ranks(comm, torch.allclose(got, expect.reshape(-1)[lo:hi], rtol=1e-14, atol=1e-15)
              and y.getSize() == expect.numel())
    for obj in (A, x, y):
        obj.destroy()
