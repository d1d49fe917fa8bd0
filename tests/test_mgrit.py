"""Layer-parallel MGRIT against the serial network: exact with one level or enough
iterations, close with few, the exactness property, the adjoint's dot-product test."""
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.config import ConfigError
from mltrain.mgrit import LayerParallel, MGRITSolver, split_layers
from mltrain.nn import ResNet

from conftest import all_ranks, require


def test_split_layers_is_balanced_and_aligned():
    assert split_layers(16, 3, 2, 2) == [(0, 6), (6, 12), (12, 16)]
    assert split_layers(17, 3, 1, 2) == [(0, 6), (6, 12), (12, 17)]
    for n, p, lv, cf in [(64, 3, 3, 2), (24, 4, 2, 3), (10, 10, 1, 2)]:
        r = split_layers(n, p, lv, cf)
        sizes = [hi - lo for lo, hi in r]
        assert r[0][0] == 0 and r[-1][1] == n and all(s % cf ** (lv - 1) == 0 for s in sizes)
        assert max(sizes) - min(sizes) <= cf ** (lv - 1)
    for args, match in [((3, 4, 1, 2), "cannot be shared"), ((12, 2, 3, 5), "not divisible"),
                        ((8, 3, 3, 2), "coarsest intervals")]:
        with pytest.raises(ConfigError, match=match):
            split_layers(*args)
    with pytest.raises(ConfigError, match="opening, blocks"):
        from mltrain.nn import MLP

        LayerParallel(MLP(8, 4, 2, 3), MPI.COMM_SELF)


def _pair(depth, seed=0):
    torch.manual_seed(seed)
    model = ResNet(12, 6, depth, 4).double()
    ref = ResNet(12, 6, depth, 4).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(5, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    return model, ref, x, y


def _compare(comm, depth, fast=True, **kw):
    """Largest relative errors (loss, input gradient, parameter gradients) of the
    layer-parallel network against the serial one, over all ranks. ``fast = False``:
    relaxation and adjoint products through autograd (what blocks without the fast path
    get)."""
    model, ref, x, y = _pair(depth)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(ref(xr), y).backward()
    lp = LayerParallel(model, comm, **kw)
    lp._fast = lp._fast and fast
    xp = x.clone().requires_grad_(True)
    loss = F.cross_entropy(lp(xp), y)
    loss.backward()
    lref = float(F.cross_entropy(ref(x), y))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    errs = [abs(float(loss) - lref) / lref, rel(xp.grad, xr.grad)]
    mine = [(p, q) for b, br in zip(model.blocks[lp.lo:lp.hi], ref.blocks[lp.lo:lp.hi])
            for p, q in zip(b.parameters(), br.parameters())]
    mine += list(zip(list(model.opening.parameters()) + list(model.closing.parameters()),
                     list(ref.opening.parameters()) + list(ref.closing.parameters())))
    errs.append(max(rel(p.grad, q.grad) for p, q in mine))
    others = [p for i, b in enumerate(model.blocks) if not lp.lo <= i < lp.hi
              for p in b.parameters()]
    assert all(p.grad is None for p in others)  # only the owned blocks get gradients
    every = comm.allgather(errs)
    return [max(e[i] for e in every) for i in range(3)], lp


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("levels, iters, skip", [(1, 1, True), (2, 8, False), (2, 9, True)])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "autograd"])
def test_exact_configurations_equal_serial(comm, levels, iters, skip, fast):
    # depth 16, cf 2: two-level F-relaxation is exact after N/cf = 8 iterations (one more
    # when the first down-cycle skips relaxation).
    errs, _ = _compare(comm, 16, fast=fast, levels=levels, cf=2, iters=iters,
                       bwd_iters=iters, skip=skip)
    all_ranks(comm, max(errs) < 1e-12, str(errs))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("relax", ["F", "FCF"])
def test_three_levels_eight_iterations_within_1e_6(comm, relax):
    errs, lp = _compare(comm, 32, levels=3, cf=2, iters=8, bwd_iters=8, relax=relax)
    all_ranks(comm, max(errs) < 1e-6, str(errs))
    f = lp.residuals["forward"]
    all_ranks(comm, len(f) == 8 and f[-1] < 1e-3 * f[0], str(f))  # residuals logged, falling


@pytest.mark.mpi(min_size=1)
def test_few_iterations_are_inexact_but_close(comm):
    errs, _ = _compare(comm, 32, levels=3, cf=2, iters=2, bwd_iters=1)
    all_ranks(comm, 1e-8 < errs[2] < 0.5, str(errs))


def _serial_states(model, z):
    states = [z]
    with torch.no_grad():
        for b in model.blocks:
            states.append(b(states[-1]))
    return states


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactness_property(comm, k):
    model, _, x, _ = _pair(16)
    lp = LayerParallel(model, comm, levels=2, cf=2, iters=k, skip=False)
    with torch.no_grad():
        z = model.opening(x)
    exact = _serial_states(model, z)
    _, (u, _) = lp._forward(z)
    # After k iterations of two-level F-relaxation the first k coarse intervals (fine
    # points 0 .. k cf) are exact; later ones are not yet.
    ok, wrong = True, False
    for j, t in enumerate(u[1:], start=lp.lo + 1):
        d = float((t - exact[j]).norm() / exact[j].norm())
        if j <= k * 2:
            ok &= d < 1e-14
        elif j == 16:
            wrong = d > 1e-12
    done = comm.allreduce(int(ok), op=MPI.MIN)
    all_ranks(comm, done == 1)
    last = comm.bcast(wrong, root=comm.Get_size() - 1)
    all_ranks(comm, last, "the last point should not be exact yet")


@pytest.mark.mpi(min_size=1)
def test_the_serial_solution_has_zero_residual(comm):
    # Without skip: a skipped first cycle replaces the guess by the coarse solution.
    model, _, x, _ = _pair(16)
    lp = LayerParallel(model, comm, levels=3, cf=2, iters=1, skip=False)
    with torch.no_grad():
        z = model.opening(x)
    exact = _serial_states(model, z)
    u = [exact[j].clone() for j in range(lp.lo, lp.hi + 1)]
    solver = lp._solver(lp._step, reverse=False, iters=1)
    with torch.no_grad():
        r0 = solver.norm(u)
        solver.solve(u)
    all_ranks(comm, r0 < 1e-14 and solver.residuals[0] < 1e-14, f"{r0}, {solver.residuals}")
    same = all(float((a - exact[j]).norm()) < 1e-14 for j, a in enumerate(u, start=lp.lo))
    all_ranks(comm, same)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "autograd"])
def test_adjoint_dot_product(comm, fast):
    """<J v, w> = <v, J^T w> for the chain of blocks: J v by forward-mode autodiff of the
    serial network, J^T w by the layer-parallel adjoint MGRIT (converged)."""
    model, ref, x, _ = _pair(16, seed=3)
    with torch.no_grad():
        z = ref.opening(x)
    torch.manual_seed(7)
    v, w = torch.randn_like(z), torch.randn_like(z)

    def chain(t):
        for b in ref.blocks:
            t = b(t)
        return t
    _, jv = torch.func.jvp(chain, (z,), (v,))
    lp = LayerParallel(model, comm, levels=3, cf=2, iters=12, bwd_iters=12)
    lp._fast = fast
    _, states = lp._forward(z)
    jtw, _ = lp._backward(states, w.clone())
    lhs, rhs = float((jv * w).sum()), float((v * jtw).sum())
    all_ranks(comm, abs(lhs - rhs) < 1e-12 * abs(lhs), f"{lhs} vs {rhs}")


def test_solver_rejects_bad_settings():
    with pytest.raises(ValueError, match="relax"):
        MGRITSolver(MPI.COMM_SELF, 4, None, prev=MPI.PROC_NULL, next=MPI.PROC_NULL,
                    levels=2, cf=2, relax="C")
    with pytest.raises(ValueError, match="multiple"):
        MGRITSolver(MPI.COMM_SELF, 6, None, prev=MPI.PROC_NULL, next=MPI.PROC_NULL,
                    levels=3, cf=2)


LP = ["model.name=resnet", "model.depth=8", "model.width=16", "run.dtype=float64",
      "data.partition=strided", "data.shuffle=false", "data.batch_size=48", "run.steps=6",
      "optim.name=sgd", "optim.lr=0.1", "run.threads=1", "mgrit.levels=2", "mgrit.iters=5",
      "mgrit.bwd_iters=5"]


def _train(cfg_list, comm, decisions: bool = False):
    """(summary, final parameters) and, with ``decisions``, the optimizer's decision log."""
    from mltrain.config import load_config
    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    from conftest import decisions_of

    t = Trainer(load_config(None, cfg_list), comm, quiet=True, metrics=False)
    s = t.train()
    if t.lp is not None:
        t.lp.gather()
    params = flat_params(t.net)
    log = decisions_of(t)
    t.close()
    return (s, params, log) if decisions else (s, params)


@pytest.mark.mpi(min_size=1)
def test_layer_parallel_training_equals_serial(comm):
    # Every layer-parallel degree the rank count allows, with data parallelism on the rest
    # (4 ranks: 4 x 1, 2 x 2); MGRIT exact (depth 8, cf 2: 4 + 1 iterations).
    P = comm.Get_size()
    _, ref = _train(LP, MPI.COMM_SELF)
    for layer in [d for d in range(1, P + 1) if P % d == 0]:
        s, par = _train(LP + [f"parallel.layer={layer}"], comm)
        diff = float((par - ref).norm() / ref.norm())
        all_ranks(comm, diff < 1e-10, f"layer={layer}: {diff:.2e}")
        all_ranks(comm, s["steps"] == 6 and s["final_loss"] < 2.4, str(s["final_loss"]))


@pytest.mark.mpi(min_size=3)
def test_checkpoint_from_three_layer_ranks_resumes_at_two_and_one(comm, shared_tmp):
    from mltrain.config import load_config
    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    rank = comm.Get_rank()
    three = comm.Split(0 if rank < 3 else MPI.UNDEFINED, rank)
    ck = shared_tmp / "lp-ck"
    base = LP[:-3] + ["model.depth=12", "optim.name=adam", "optim.lr=0.01",
                      f"checkpoint.dir={ck}"]
    if three != MPI.COMM_NULL:
        s, written = _train(base + ["parallel.layer=3"], three)
        three.Free()
    comm.Barrier()
    written = comm.bcast(written if rank == 0 else None)
    for degree in (2, 1):
        sub = comm.Split(0 if rank < degree else MPI.UNDEFINED, rank)
        if sub != MPI.COMM_NULL:
            t = Trainer(load_config(None, base + [f"parallel.layer={degree}",
                                                  "checkpoint.resume=true"]), sub,
                        quiet=True, metrics=False)
            same = torch.equal(flat_params(t.net), written) and t.step == 6
            moments = [p for p in t.net.parameters() if "exp_avg" in t.optimizer.state[p]]
            same &= len(moments) == len(list(t.net.parameters()))  # every block's Adam state
            t.close()
            sub.Free()
        else:
            same = True
        all_ranks(comm, comm.allreduce(int(same), op=MPI.MIN) == 1, f"degree {degree}")


def test_layer_parallel_rank_count_errors():
    from conftest import cli_error

    cli_error(["parallel.layer=2", "model.depth=1", "run.steps=1"], "cannot be shared")
    cli_error(["parallel.layer=2", "model.depth=4", "mgrit.levels=3", "run.steps=1"],
              "coarsest intervals")
    # RMTR's hierarchy splits with the MGRIT levels: 8 blocks in units of 2 x 4.
    cli_error(["parallel.layer=2", "model.depth=8", "mgrit.levels=2", "optim.name=rmtr",
               "tr.curvature=lsr1", "multilevel.levels=3", "run.steps=1"],
              "x multilevel.cf^(multilevel.levels-1) = 2 x 4 = 8 leave 1 coarsest intervals")


@pytest.mark.parametrize("n, levels, iters, relax, skip", [
    (16, 1, 1, "F", True), (16, 2, 3, "F", True), (32, 3, 2, "FCF", False),
    (24, 2, 1, "F", False), (64, 4, 3, "FCF", True)])
def test_work_model_counts_what_the_solver_does(n, levels, iters, relax, skip):
    from mltrain.mgrit.model import counts

    model, _, x, _ = _pair(n)
    lp = LayerParallel(model, MPI.COMM_SELF, levels=levels, cf=2, iters=iters, relax=relax,
                       skip=skip)
    with torch.no_grad():
        z = model.opening(x)
    solver = lp._solver(lp._step, reverse=False, iters=iters)
    with torch.no_grad():
        solver.solve([z.clone() for _ in range(n + 1)])
    assert solver.evaluations == counts(n, levels, 2, iters, relax, skip)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("levels", [1, 2])
def test_layer_parallel_trust_region_equals_serial(comm, levels):
    """Trust region (L-SR1) over a parameter vector distributed over the layer axis (PETSc
    Vec on the layer communicator) takes the serial trust region's steps."""
    require("petsc4py")
    tr = [x for x in LP if not x.startswith(("optim.", "mgrit."))] + [
        "optim.name=tr", "tr.curvature=lsr1", "run.steps=8", f"mgrit.levels={levels}",
        "mgrit.iters=5", "mgrit.bwd_iters=5"]
    _, ref = _train(tr, MPI.COMM_SELF)
    P = comm.Get_size()
    s, par = _train(tr + [f"parallel.layer={P}"], comm)
    diff = float((par - ref).norm() / ref.norm())
    all_ranks(comm, diff < 1e-9, f"{diff:.2e}")
    all_ranks(comm, s["accepted_steps"] + s["rejected_steps"] == 8)


@pytest.mark.mpi(min_size=2)
def test_layer_parallel_trust_region_resumes(comm, shared_tmp):
    from mltrain.config import load_config
    from mltrain.train import Trainer

    require("petsc4py")
    ck = shared_tmp / "lp-tr"
    tr = [x for x in LP if not x.startswith(("optim.", "mgrit."))] + [
        "optim.name=tr", "tr.curvature=lsr1", "mgrit.levels=1",
        f"parallel.layer={comm.Get_size()}", f"checkpoint.dir={ck}"]
    _, first = _train(tr + ["run.steps=4"], comm)
    t = Trainer(load_config(None, tr + ["run.steps=8", "checkpoint.resume=true"]), comm,
                quiet=True, metrics=False)
    from mltrain.linalg.vector import flat_params

    t.lp.gather()
    same = torch.equal(flat_params(t.net), first) and t.step == 4 and t.optimizer.radius > 0
    s = t.train()
    t.close()
    all_ranks(comm, same and s["steps"] == 8, str(s["steps"]))


@pytest.mark.mpi(min_size=2)
def test_mgrit_messages_are_counted(comm):
    from mltrain.comm import STATS

    model, _, x, y = _pair(16)
    lp = LayerParallel(model, comm, levels=2, cf=2, iters=2)
    before = STATS.bytes
    F.cross_entropy(lp(x), y).backward()
    # at least one neighbour message of a state (5 x 6 float64) per relaxation
    all_ranks(comm, comm.allreduce(STATS.bytes - before) >= 2 * 5 * 6 * 8)


@pytest.mark.parametrize("scale", [1, 2, 8])
def test_fast_path_is_the_block_step_and_its_adjoint(scale):
    """ResidualBlock's fast path: the step equals x + s (block(x) - x) bit for bit, the
    hand-written vector-Jacobian product equals autograd's."""
    block = ResNet(12, 6, 4, 4).double().blocks[1]
    x, lam = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x) if scale == 1 else x + scale * (block(x) - x)
        assert torch.equal(block.mgrit_step(x, scale), ref)
    xin = x.clone().requires_grad_(True)
    out = block(xin) if scale == 1 else xin + scale * (block(xin) - xin)
    (g,) = torch.autograd.grad(out, xin, lam)
    with torch.no_grad():
        mine = block.mgrit_vjp(block.mgrit_linearize(x), lam, scale)
    assert float((mine - g).abs().max()) < 1e-14
