"""RMTR and MG/OPT as training optimizers: consistency, the radius bound, one level equal
to its single-level method, descent, determinism, rank-count invariance, exact resume."""
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.config import load_config
from mltrain.linalg.vector import flat_params, set_flat_params
from mltrain.multilevel import RMTR, Hierarchy, MGOpt, restrict_grad, restrict_vec
from mltrain.nn import ResNet
from mltrain.optim.tr import TrustRegion
from mltrain.train import Trainer

from conftest import against_serial, all_ranks, require, straight_and_resumed

TR_KEYS = dict(radius=0.5, radius_max=10.0, eta1=0.1, eta2=0.75, gamma1=0.5, gamma2=2.0)
SMALL = ["model.name=resnet", "model.depth=8", "model.width=16", "data.batch_size=64",
         "run.threads=1"]


def _batch(n=96):
    from mltrain.data import open_dataset

    d = open_dataset("digits")
    x, y = d.read_train(torch.arange(n).numpy())
    return torch.from_numpy(x).double(), torch.from_numpy(y)


def _run(cfg_list, comm=MPI.COMM_SELF):
    t = Trainer(load_config(None, cfg_list), comm, quiet=True, metrics=False)
    before = t.evaluate()["train_loss"]
    s = t.train()
    params = flat_params(t.model)
    t.close()
    return s, before, params


@pytest.mark.parametrize("transfer, prolongation", [("injection", "constant"),
                                                    ("full_weighting", "linear")])
def test_tau_corrected_coarse_gradient_is_the_restricted_fine_gradient(transfer, prolongation):
    require("petsc4py")
    torch.manual_seed(0)
    h = Hierarchy(ResNet(64, 8, 8, 10).double(), 2, 2, transfer, prolongation)
    fine, coarse = (TrustRegion(m.parameters(), MPI.COMM_SELF, **TR_KEYS) for m in h.models)
    x, y = _batch()
    _, g = fine.objective(h.models[0], F.cross_entropy, x, y)
    xc0 = restrict_vec(h, 0, flat_params(h.models[0]))
    set_flat_params(h.models[1], xc0)
    _, gc = coarse.objective(h.models[1], F.cross_entropy, x, y)
    rg = restrict_grad(h, 0, g)
    value, g_tau = coarse.objective(h.models[1], F.cross_entropy, x, y, shift=(rg - gc, xc0))
    assert torch.allclose(g_tau, rg, rtol=0, atol=1e-15)
    # P^T is the adjoint of P: first-order models agree on prolonged steps.
    from mltrain.multilevel import prolong_vec

    s = torch.randn_like(xc0)
    assert float(rg @ s) == pytest.approx(float(g @ prolong_vec(h, 0, s)), rel=1e-12)
    fine.close()
    coarse.close()


@pytest.mark.parametrize("cycle", ["V", "W"])
def test_prolonged_coarse_steps_stay_inside_the_fine_radius(cycle):
    require("petsc4py")
    torch.manual_seed(0)
    model = ResNet(64, 8, 8, 10).double()
    r = RMTR(Hierarchy(model, 3, 2, "injection", "linear"), MPI.COMM_SELF, cycle=cycle,
             kappa=0.0, **TR_KEYS)
    x, y = _batch()
    checks = []
    for _ in range(12):
        r.tr_step(model, F.cross_entropy, x, y)
        checks += r.bound_checks
    # (level corrected, ||prolonged step|| on the finest level, the radius it had to keep)
    assert any(c[0] == 0 for c in checks) and any(c[0] == 1 for c in checks), checks
    assert all(n <= b * (1 + 1e-12) for _, n, b in checks), checks
    assert max(n / b for _, n, b in checks) > 0.5  # the bound is reached, not vacuous
    assert sum(r.corrections["accepted"]) > 0
    r.close()


def test_rmtr_kappa_skips_the_coarse_levels():
    require("petsc4py")
    torch.manual_seed(0)
    model = ResNet(64, 8, 8, 10).double()
    r = RMTR(Hierarchy(model, 2, 2), MPI.COMM_SELF, kappa=1e9, **TR_KEYS)
    x, y = _batch()
    before = flat_params(model)
    r.tr_step(model, F.cross_entropy, x, y)
    assert r.corrections["skipped"] == r.corrections["tried"] == [1]
    assert r.parts[1].counts["gradients"] == 0 and not torch.equal(before, flat_params(model))
    r.close()


@pytest.mark.parametrize("curvature", ["hessian", "lsr1"])
def test_rmtr_with_one_level_is_the_trust_region_trainer(curvature):
    require("petsc4py")
    common = SMALL + ["run.steps=12", f"optim.curvature={curvature}"]
    s_tr, _, p_tr = _run(common + ["optim.name=tr"])
    s_ml, _, p_ml = _run(common + ["optim.name=rmtr", "optim.levels=1"])
    assert torch.equal(p_tr, p_ml)
    for key in ("grad_evals", "hvp_evals", "accepted_steps", "rejected_steps", "radius"):
        assert s_tr[key] == s_ml[key], key


@pytest.mark.parametrize("smoother", ["sgd", "adam"])
def test_mgopt_with_one_level_is_its_smoother(smoother):
    common = SMALL + ["run.steps=10", "optim.lr=0.01", "optim.coarse_iters=1"]
    _, _, p_ref = _run(common + [f"optim.name={smoother}", "optim.momentum=0"])
    _, _, p_mg = _run(common + ["optim.name=mgopt", f"optim.smoother={smoother}",
                                "optim.momentum=0", "optim.levels=1"])
    assert torch.allclose(p_ref, p_mg, rtol=1e-5, atol=1e-6)


ML = [["optim.name=rmtr", "optim.levels=3"], ["optim.name=rmtr", "optim.levels=2", "optim.cycle=W"],
      ["optim.name=rmtr", "optim.levels=2", "optim.batch=hybrid", "optim.curvature=ggn"],
      ["optim.name=mgopt", "optim.levels=3", "optim.lr=0.05"],
      ["optim.name=mgopt", "optim.levels=2", "optim.smoother=adam"],
      ["optim.name=mgopt", "optim.levels=2", "optim.smoother=tr"],
      ["optim.name=rmtr", "optim.levels=2", "optim.nested=true"]]


@pytest.mark.parametrize("extra", ML, ids=lambda e: "-".join(x.split("=")[1] for x in e))
def test_multilevel_optimizers_descend_and_are_deterministic(extra):
    require("petsc4py")
    cfg = SMALL + ["run.steps=16"] + extra
    s1, before, p1 = _run(cfg)
    s2, _, p2 = _run(cfg)
    assert torch.equal(p1, p2)
    assert s1["final_loss"] < 0.8 * before, (s1["final_loss"], before)
    # Work is counted on every level, coarse levels at their cost.
    assert s1["fine_grad_evals"] > 0 and len(s1.get("level_grad_evals", [0, 0])) >= 1
    if "level_grad_evals" in s1 and len(s1["level_grad_evals"]) > 1:
        assert s1["grad_evals"] < sum(s1["level_grad_evals"])


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("extra", [["optim.name=rmtr", "optim.levels=3"],
                                   ["optim.name=mgopt", "optim.levels=2",
                                    "optim.smoother=adam"]], ids=["rmtr", "mgopt"])
def test_multilevel_rank_count_invariant(comm, extra):
    require("petsc4py")
    exact = ["run.dtype=float64", "data.partition=strided", "data.shuffle=false",
             "data.batch_size=48", "run.steps=6"]
    s, before, diff = against_serial(comm, load_config(None, SMALL + exact + extra))
    all_ranks(comm, diff < 1e-10, f"{diff:.2e}")
    all_ranks(comm, s["final_loss"] < before, str(s))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("extra", [["optim.name=rmtr", "optim.levels=2"],
                                   ["optim.name=mgopt", "optim.levels=2",
                                    "optim.smoother=adam"]], ids=["rmtr", "mgopt"])
def test_multilevel_resume_is_bit_exact(comm, shared_tmp, extra):
    require("petsc4py")
    base = SMALL + extra + ["data.batch_size=48"]
    ck = shared_tmp / ("ml-" + extra[0].split("=")[1])
    straight, second = straight_and_resumed(comm, base, ck)
    all_ranks(comm, torch.equal(flat_params(straight.model), flat_params(second.model)))
    straight.close()
    second.close()


def test_multilevel_needs_a_residual_network():
    from mltrain.comm import CollectiveError

    with pytest.raises(CollectiveError, match="opening, blocks"):
        Trainer(load_config(None, ["optim.name=rmtr", "optim.levels=2", "model.name=mlp"]),
                MPI.COMM_SELF, quiet=True, metrics=False)
