"""Depth hierarchies, nested iteration and run.target_loss."""
import pytest
import torch
from mpi4py import MPI

from mltrain.comm import CollectiveError
from mltrain.config import ConfigError, load_config
from mltrain.linalg.vector import flat_params
from mltrain.multilevel import Hierarchy, coarsen
from mltrain.nn import MLP, ResNet
from mltrain.train import Trainer

from conftest import against_serial, all_ranks


def _blocks(model):
    return torch.stack([torch.cat([p.detach().reshape(-1) for p in b.parameters()])
                        for b in model.blocks])


def test_hierarchy_structure_and_steps():
    h = Hierarchy(ResNet(64, 8, 12, 10).double(), levels=3, cf=2)
    assert [len(m.blocks) for m in h.models] == [12, 6, 3]
    assert [m.blocks[0].h for m in h.models] == pytest.approx([1 / 12, 1 / 6, 1 / 3])
    coarse = coarsen(h.models[0], 3, "injection")  # other factors too
    assert len(coarse.blocks) == 4 and torch.equal(_blocks(coarse), _blocks(h.models[0])[::3])


@pytest.mark.parametrize("prolongation", ["constant", "linear"])
def test_restrict_after_prolong_is_identity(prolongation):
    torch.manual_seed(0)
    h = Hierarchy(ResNet(64, 8, 8, 10).double(), 2, 2, "injection", prolongation)
    before = _blocks(h.models[1]).clone()
    h.prolong_to(0)
    h.restrict_to(0)
    assert torch.equal(_blocks(h.models[1]), before)
    shared = [p for m in (h.models[0].opening, h.models[0].closing) for p in m.parameters()]
    coarse_shared = [p for m in (h.models[1].opening, h.models[1].closing) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(shared, coarse_shared))


@pytest.mark.parametrize("restriction", ["injection", "full_weighting"])
@pytest.mark.parametrize("prolongation", ["constant", "linear"])
def test_constant_in_depth_weights_survive(restriction, prolongation):
    model = ResNet(64, 8, 8, 10).double()
    with torch.no_grad():
        for b in model.blocks[1:]:  # every block equal to the first
            for p, q in zip(b.parameters(), model.blocks[0].parameters()):
                p.copy_(q)
    h = Hierarchy(model, 2, 2, restriction, prolongation)
    before = _blocks(model).clone()
    h.restrict_to(0)
    h.prolong_to(0)
    assert torch.allclose(_blocks(model), before, rtol=1e-15, atol=1e-15)


def test_linear_in_depth_weights_survive_linear_prolongation():
    model = ResNet(64, 8, 8, 10).double()
    with torch.no_grad():
        for i, b in enumerate(model.blocks):
            b.linear.weight.fill_(0.1 + 0.05 * i)
            b.linear.bias.fill_(-0.2 * i)
    h = Hierarchy(model, 2, 2, "injection", "linear")
    before = _blocks(model).clone()
    h.restrict_to(0)
    h.prolong_to(0)
    assert torch.allclose(_blocks(model), before, rtol=1e-14, atol=1e-14)


def test_stem_pool_is_average_pooling_shared_by_every_level():
    """model.stem_pool = 2: the network sees the images average-pooled 2x2 (the same logits
    as the plain network on pooled images, with the same weights), and every level of the
    hierarchy has that stem."""
    from mltrain.nn import build_model

    torch.manual_seed(0)
    pooled = build_model("resnet", (1, 8, 8), 10, width=8, depth=4, dtype=torch.float64,
                         stem_pool=2)
    plain = build_model("resnet", (1, 4, 4), 10, width=8, depth=4, dtype=torch.float64)
    plain.load_state_dict({
        k.replace("opening.2.", "opening.1."): v for k, v in pooled.state_dict().items()})
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    by_hand = x.reshape(5, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    assert torch.allclose(pooled(x), plain(by_hand), rtol=0, atol=1e-14)
    assert pooled.opening[2].in_features == 16
    h = Hierarchy(pooled, 3, 2)
    assert all(m.opening[2].in_features == 16 for m in h.models)
    assert h.models[2](x).shape == (5, 10)


def test_hierarchy_errors_and_user_models():
    with pytest.raises(ConfigError, match="cannot be coarsened"):
        Hierarchy(ResNet(64, 8, 6, 10), levels=3, cf=2)
    with pytest.raises(ConfigError, match="lacks opening, blocks"):
        Hierarchy(MLP(64, 8, 2, 10), levels=2, cf=2)
    with pytest.raises(ConfigError, match="multilevel.nested"):
        load_config(None, ["multilevel.nested=true"])
    with pytest.raises(CollectiveError, match="lacks opening"):
        Trainer(load_config(None, ["multilevel.nested=true", "multilevel.levels=2", "model.name=mlp"]),
                MPI.COMM_SELF, quiet=True, metrics=False)
    # The example's convolutional ODE network follows the protocol.
    h = Hierarchy(_conv_ode_net(4), levels=2, cf=2)
    assert len(h.models[1].blocks) == 2
    assert h.models[1](torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def _conv_ode_net(depth):
    from conftest import ROOT

    src = (ROOT / "examples" / "custom_model.py").read_text().split("\nap = argparse")[0]
    ns = {}
    exec(compile(src, "custom_model.py", "exec"), ns)  # the model classes only
    return ns["ConvODENet"](depth=depth)


@pytest.mark.parametrize("restriction, prolongation", [("injection", "constant"),
                                                       ("full_weighting", "linear")])
def test_sliced_transfers_equal_the_per_parameter_ones(restriction, prolongation):
    """R, P and P^T of flat vectors slice the blocks' range as a (blocks x per-block)
    matrix (the layout read once per model); they equal the per-parameter path bit for
    bit, with the pooled stem and with the example's convolutional blocks too."""
    import mltrain.multilevel.hierarchy as H
    from mltrain.nn import build_model

    torch.manual_seed(0)
    nets = [build_model("resnet", (1, 28, 28), 10, width=8, depth=16),
            build_model("resnet", (1, 28, 28), 10, width=8, depth=16, stem_pool=4),
            _conv_ode_net(8)]
    for net in nets:
        h = Hierarchy(net, levels=3, cf=2, restriction=restriction, prolongation=prolongation)
        for lv in range(2):
            sizes = [sum(p.numel() for p in h.models[k].parameters()) for k in (lv, lv + 1)]
            v, w = (torch.randn(n, dtype=torch.float64) for n in sizes)
            assert H._fast_transfer(h.models[lv], h.models[lv + 1], v,
                                    lambda t: t[::2]) is not None  # the sliced path ran
            sliced = [H.restrict_vec(h, lv, v), H.prolong_vec(h, lv, w),
                      H.restrict_grad(h, lv, v)]
            try:
                H._fast_transfer, fast = (lambda *a: None), H._fast_transfer
                general = [H.restrict_vec(h, lv, v), H.prolong_vec(h, lv, w),
                           H.restrict_grad(h, lv, v)]
            finally:
                H._fast_transfer = fast
            assert all(torch.equal(a, b) for a, b in zip(sliced, general)), (net, lv)


NESTED = ["multilevel.nested=true", "multilevel.levels=3", "model.depth=8", "model.width=16",
          "run.steps=30", "data.batch_size=24", "run.threads=1"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("per_level, level_steps", [(0, [10, 10, 10]), (7, [16, 7, 7])])
@pytest.mark.exactness
def test_nested_iteration_is_rank_count_invariant_and_descends(comm, per_level, level_steps):
    """run.steps shared equally by the levels, or multilevel.nested_steps on each coarse
    level and the rest on the full network."""
    exact = ["run.dtype=float64", "data.partition=strided", "data.shuffle=false",
             "optim.name=sgd", "optim.lr=0.05", f"multilevel.nested_steps={per_level}"]
    s, before, diff = against_serial(comm, load_config(None, NESTED + exact
                                                        + ["run.costs=unit"]))
    all_ranks(comm, diff < 1e-10, f"{diff:.2e}")
    all_ranks(comm, s["level_steps"] == level_steps and s["final_loss"] < before, str(s))
    # unit prices: every step one mini-batch gradient, whatever its level
    all_ranks(comm, s["fine_grad_evals"] == pytest.approx(30 * 24 / 1438), str(s))


@pytest.mark.parametrize("optim", ["adam", "tr"])
def test_nested_works_with_any_optimizer_and_is_deterministic(optim):
    cfg = load_config(None, NESTED + [f"optim.name={optim}"])
    runs = []
    for _ in range(2):
        t = Trainer(cfg, MPI.COMM_SELF, quiet=True, metrics=False)
        before = t.evaluate()["train_loss"]
        s = t.train()
        assert s["final_loss"] < before
        runs.append(flat_params(t.model))
        t.close()
    assert torch.equal(runs[0], runs[1])


def test_nested_target_is_seen_in_a_coarse_phase(tmp_path):
    """While a coarse level trains, evaluation and run.target_loss see the full-depth network
    with that level's weights prolonged (what a stop there gives), not the untouched initial
    weights: this run reaches its target on the coarsest level and ends there, on the
    network it was evaluated as. Its checkpoint resumes on the coarsest level from the
    weights it stopped with, restricted back bit for bit."""
    from mltrain.io import MetricsWriter

    stop = NESTED[:-2] + ["optim.name=adam", "run.steps=300", "run.threads=1",
                          "multilevel.nested_steps=100", "run.log_every=10",
                          f"checkpoint.dir={tmp_path}"]
    t = Trainer(load_config(None, stop + ["run.target_loss=0.8"]), MPI.COMM_SELF, quiet=True,
                metrics=False)
    t.metrics = MetricsWriter(None, 0, keep=True)
    start = t.evaluate()["train_loss"]
    s = t.train()
    at = s["target_reached_at_step"]
    assert s["target_reached"] and at < 100 and t.level_steps == [0, 0, at], (s, t.level_steps)
    seen = [r["train_loss"] for r in t.metrics.records if r.get("step") == at
            and "train_loss" in r and r.get("event") is None]
    assert seen == [s["final_loss"]] and s["final_loss"] <= 0.8 < start, (seen, s)
    coarse = flat_params(t.hierarchy.models[2])
    t.close()
    resumed = Trainer(load_config(None, stop + ["checkpoint.resume=true"]), MPI.COMM_SELF,
                      quiet=True, metrics=False)
    assert resumed.step == at and resumed.phase == 2
    assert torch.equal(flat_params(resumed.hierarchy.models[2]), coarse)
    assert resumed.evaluate()["train_loss"] == s["final_loss"]
    resumed.close()


def test_nested_evaluation_does_not_change_training():
    """Evaluating every step (run.target_loss, never reached) prolongs each coarse phase's
    weights into the finer networks again and again; training is bit for bit the same."""
    cfg = NESTED[:-2] + ["optim.name=adam", "run.steps=30", "run.threads=1",
                         "multilevel.nested_steps=8"]
    runs = []
    for extra in ([], ["run.target_loss=1e-9", "run.log_every=1"]):
        t = Trainer(load_config(None, cfg + extra), MPI.COMM_SELF, quiet=True, metrics=False)
        t.train()
        runs.append(flat_params(t.model))
        t.close()
    assert torch.equal(runs[0], runs[1])


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("optim", ["adam", "rmtr"])
@pytest.mark.exactness
def test_nested_resume_is_bit_exact(comm, shared_tmp, optim):
    from mltrain.io import list_checkpoints

    ck = shared_tmp / f"nested-{optim}"
    base = NESTED[:-2] + ["data.batch_size=48", f"optim.name={optim}", "run.steps=24",
                          f"checkpoint.dir={ck}"]
    straight = Trainer(load_config(None, base + ["checkpoint.every=20"]), comm, quiet=True,
                       metrics=False)
    straight.train()  # checkpoints at 20 (finest phase: steps 16-23) and 24
    comm.Barrier()
    if comm.Get_rank() == 0:
        list_checkpoints(ck)[-1].unlink()  # as if the job had died after step 20
    comm.Barrier()
    resumed = Trainer(load_config(None, base + ["checkpoint.resume=true"]), comm, quiet=True,
                      metrics=False)
    all_ranks(comm, resumed.step == 20)
    resumed.train()
    all_ranks(comm, torch.equal(flat_params(straight.model), flat_params(resumed.model)))
    straight.close()
    resumed.close()


@pytest.mark.mpi(min_size=1)
def test_nested_drifting_replicas_are_evaluated_at_their_average(comm):
    """Local SGD in a nested run's coarsest phase: the replicas drift between averagings;
    evaluation shows the full-depth network prolonged from the ranks' average coarse
    weights, then gives every rank its own weights back, and evaluating every step
    leaves training bit for bit the same (across the level switches)."""
    from mltrain.comm import mean_

    cfg = NESTED[:-2] + ["optim.name=sgd", "optim.lr=0.05", "sync.name=localsgd",
                         "sync.period=4", "data.batch_size=48", "run.threads=1"]
    t = Trainer(load_config(None, cfg), comm, quiet=True, metrics=False)
    for _ in range(3):  # mid-period, on the coarsest level (10 steps per level)
        t.advance()
    mine = flat_params(t.model).clone()
    all_ranks(comm, t.phase == 2 and (comm.Get_size() == 1 or t.sync.distance() > 0))
    t.evaluate()
    all_ranks(comm, torch.equal(flat_params(t.model), mine), "own weights not restored")
    h = t.hierarchy
    with torch.no_grad():  # the average by hand, prolonged: blocks equal in groups of 4
        for b in h.models[2].blocks:
            for p in b.parameters():
                mean_(p.data, comm)
        average = _blocks(h.models[2])
    full = _blocks(h.models[0])
    all_ranks(comm, torch.allclose(full, average.repeat_interleave(4, 0), rtol=1e-6,
                                   atol=1e-7), "the full network is not the prolonged average")
    t.close()

    runs = []
    for extra in ([], ["run.target_loss=1e-9", "run.log_every=1"]):
        t = Trainer(load_config(None, cfg + extra), comm, quiet=True, metrics=False)
        t.train()
        runs.append(flat_params(t.model))
        t.close()
    all_ranks(comm, torch.equal(runs[0], runs[1]))


def test_target_loss():
    hit = Trainer(load_config(None, ["run.target_loss=0.5", "run.log_every=5"]),
                  MPI.COMM_SELF, quiet=True, metrics=False)
    s = hit.train()
    assert s["target_reached"] and s["target_reached_at_step"] == s["steps"] < hit.total_steps
    assert s["final_loss"] <= 0.5
    hit.close()
    miss = Trainer(load_config(None, ["run.target_loss=1e-9", "run.steps=5"]), MPI.COMM_SELF,
                   quiet=True, metrics=False)
    s = miss.train()
    assert s["target_reached"] is False and s["target_reached_at_step"] is None
    miss.close()


def _digits_batch(n=48):
    from mltrain.data import open_dataset

    d = open_dataset("digits")
    x, y = d.read_train(torch.arange(n).numpy())
    return torch.from_numpy(x).double(), torch.from_numpy(y)


def test_mgopt_linear_correction_is_first_order_consistent():
    from mltrain.multilevel import MGOpt, restrict_grad, restrict_vec

    torch.manual_seed(0)
    h = Hierarchy(ResNet(64, 8, 8, 10).double(), 3, 2, "full_weighting", "linear")
    mg = MGOpt(h, MPI.COMM_SELF, lr=0.1)
    x, y = _digits_batch()
    loss = torch.nn.functional.cross_entropy
    _, g = mg._f_and_grad(0, loss, x, y, None)
    x_h0 = restrict_vec(h, 0, flat_params(h.models[0]))
    from mltrain.linalg.vector import set_flat_params
    set_flat_params(h.models[1], x_h0)
    _, g_h = mg._f_and_grad(1, loss, x, y, None)
    v_h = g_h - restrict_grad(h, 0, g)
    _, g_tau = mg._f_and_grad(1, loss, x, y, v_h)
    assert torch.allclose(g_tau, restrict_grad(h, 0, g), rtol=0, atol=1e-15)


def test_mgopt_one_level_is_its_smoother_and_step_0_is_identity():
    from mltrain.linalg.vector import set_flat_params
    from mltrain.multilevel import MGOpt

    x, y = _digits_batch()
    loss = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    model = ResNet(64, 8, 4, 10).double()
    ref = ResNet(64, 8, 4, 10).double()
    ref.load_state_dict(model.state_dict())
    MGOpt(Hierarchy(model, 1, 2), MPI.COMM_SELF, lr=0.1, coarse_iters=3).cycle(0, loss, x, y)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        loss(ref(x), y).backward()
        sgd.step()
    assert torch.allclose(flat_params(model), flat_params(ref), rtol=1e-14, atol=1e-15)

    h = Hierarchy(model, 3, 2)
    before = flat_params(model).clone()
    mg = MGOpt(h, MPI.COMM_SELF, lr=0.0)
    mg.cycle(0, loss, x, y)
    assert torch.equal(flat_params(model), before) and mg.last_alpha == 0.0

    mg = MGOpt(h, MPI.COMM_SELF, lr=0.5, pre_smooth=0, post_smooth=0)
    for opt in mg.parts[1:]:
        opt.param_groups[0]["lr"] = -0.5  # coarse ascent: the correction is not descent
    mg.cycle(0, loss, x, y)
    assert mg.last_alpha == 0.0 and torch.equal(flat_params(model), before)
    set_flat_params(model, before)


@pytest.mark.mpi(min_size=1)
@pytest.mark.exactness
def test_mgopt_descends_and_is_rank_count_invariant(comm):
    from mltrain.multilevel import MGOpt

    loss = torch.nn.functional.cross_entropy
    x_all, y_all = _digits_batch(48)
    P, r = comm.Get_size(), comm.Get_rank()
    if 48 % P:
        pytest.skip("48 samples do not split evenly")
    xs, ys = x_all[r::P], y_all[r::P]  # strided shards: their average is the full batch

    def run(c, xb, yb):
        torch.manual_seed(0)
        h = Hierarchy(ResNet(64, 8, 8, 10).double(), 3, 2, "injection", "linear")
        mg = MGOpt(h, c, lr=0.2, coarse_iters=3)
        def full_loss():
            with torch.no_grad():
                return float(loss(h.models[0](x_all), y_all))

        f0 = full_loss()
        for _ in range(5):
            mg.cycle(0, loss, xb, yb)
        return flat_params(h.models[0]), f0, full_loss()

    par, f0, f1 = run(comm, xs, ys)
    ser, _, _ = run(MPI.COMM_SELF, x_all, y_all)
    diff = float((par - ser).norm() / ser.norm())
    all_ranks(comm, diff < 1e-10 and f1 < f0, f"{diff:.2e}, loss {f0:.3f} -> {f1:.3f}")
