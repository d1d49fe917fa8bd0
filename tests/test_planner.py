"""The planner's pieces: the partition search against brute force."""
import random

import pytest

from mltrain.planner import best_partition, brute_force_partition, stage_costs


@pytest.mark.parametrize("seed", range(40))
def test_partition_search_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    S = rng.randint(1, n)
    t = [rng.uniform(0.1, 5.0) for _ in range(n)]
    m = [rng.uniform(0.5, 3.0) for _ in range(n)]
    boundary = [rng.uniform(0.0, 1.0) for _ in range(n)]  # sending a stage's output

    def cost(i, j):
        return sum(t[i:j]) + (boundary[j - 1] if j < n else 0.0)

    def memory(i, j):
        return sum(m[i:j])
    limit = rng.choice([float("inf"), sum(m) / S * rng.uniform(0.9, 2.0)])
    fast = best_partition(n, S, cost, memory, limit)
    slow = brute_force_partition(n, S, cost, memory, limit)
    if slow is None:
        assert fast is None
        return
    assert fast is not None and fast[0] == pytest.approx(slow[0], rel=1e-12)
    assert sum(fast[1]) == n and len(fast[1]) == S and min(fast[1]) >= 1
    assert max(stage_costs(fast[1], cost)) == pytest.approx(fast[0], rel=1e-12)
    lo = 0
    for k in fast[1]:  # the partition it returns fits
        assert memory(lo, lo + k) <= limit
        lo += k


def test_partition_edge_cases():
    def cost(i, j):
        return float(j - i)
    assert best_partition(4, 5, cost) is None  # more stages than layers
    assert best_partition(4, 1, cost) == (4.0, [4])
    assert best_partition(6, 3, cost) == (2.0, [2, 2, 2])
    assert best_partition(6, 2, cost, memory=cost, limit=2.0) is None  # nothing fits


HW = dict(ranks_per_node=4, nodes=2, memory_per_rank=8e9, compute_speed=1.0,
          intra_bandwidth=1e10, intra_latency=1e-6, inter_bandwidth=1e9, inter_latency=1e-5)


def test_cost_terms_match_hand_computed_values():
    from mltrain.planner.cost import (Hardware, allreduce_time, bubble_fraction,
                                      p2p_time, pipeline_time, stage_memory)

    hw = Hardware(**HW)
    assert hw.ranks == 8
    assert p2p_time(1e6, hw) == pytest.approx(1e-6 + 1e-4)
    assert p2p_time(1e6, hw, inter_node=True) == pytest.approx(1e-5 + 1e-3)
    # ring at 4 ranks: 2 * 3/4 * 1e8/1e10 + 6 * 1e-6; tree: 2 * 2 * (1e-6 + 1e-2)
    assert allreduce_time(1e8, 4, hw) == pytest.approx(0.015 + 6e-6)
    # tiny message: the tree's fewer latencies win (ring 2*7/8*1/1e9 + 14e-5)
    assert allreduce_time(1.0, 8, hw, inter_node=True) == pytest.approx(6 * (1e-5 + 1e-9))
    assert allreduce_time(1e8, 1, hw) == 0.0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 8) == 0.0
    assert pipeline_time([1.0, 3.0, 2.0], 4) == pytest.approx(6 * 3.0)
    assert stage_memory(100.0, 200.0, 10.0, 3) == 430.0
    # 4 ranks a node on 2 cores: a step at 4 ranks (or more) takes twice as long, at 2 not.
    two = Hardware(**{**HW, "cores_per_node": 2})
    assert [two.oversubscription(r) for r in (1, 2, 3, 4, 8)] == [1.0, 1.0, 1.5, 2.0, 2.0]
    assert hw.oversubscription(8) == 1.0  # cores_per_node absent: a core per rank


def test_handover_terms_match_hand_computed_values():
    from mltrain.planner.cost import Hardware, extra_waits, handover_time

    shared = Hardware(**{**HW, "cores_per_node": 2, "handover_s": 1e-4})
    # 1F1B, 8 micro-batches, 4 ranks on a node of 2 cores: 2 * 7 waits of 0.1 ms
    assert handover_time("1f1b", 2, 8, shared, 4) == pytest.approx(14e-4)
    assert handover_time("1f1b", 3, 1, shared, 4) == 0.0  # one micro-batch: no alternation
    assert handover_time("gpipe", 2, 8, shared, 4) == 0.0
    assert [extra_waits(*a) for a in (("1f1b", 4, 3), ("gpipe", 4, 3), ("1f1b", 1, 3))] == [
        4, 0, 0]
    assert handover_time("1f1b", 2, 8, shared, 2) == 0.0  # a core per rank
    assert handover_time("1f1b", 2, 8, Hardware(**HW), 8) == 0.0  # handover_s absent: 0
    # MGRIT on 2 layer ranks, 2 levels, 2 forward and 1 adjoint iteration: 3 messages per
    # V-cycle, 6 + 3, and 2 broadcasts; in each of a pipeline's M + S - 1 stage passes.
    from mltrain.mgrit.model import messages, waits

    assert waits(2, 2, 2, 1) == 11 and waits(1, 2, 2, 1) == 0 and messages(4, 1, 5) == 1
    assert handover_time("gpipe", 1, 1, shared, 4, 11) == pytest.approx(11e-4)
    assert handover_time("1f1b", 2, 4, shared, 4, 11) == pytest.approx((6 + 5 * 11) * 1e-4)
    assert handover_time("1f1b", 2, 4, shared, 2, 11) == 0.0
    # The gradient allreduce over 4 ranks on 2 cores: 2 log2(4) = 4 exchange steps, each
    # with its partner descheduled with probability (4 - 2) / (4 - 1); 2 ranks fit.
    from mltrain.planner.cost import reduce_waits

    assert reduce_waits(4, shared) == pytest.approx(8 / 3)
    assert reduce_waits(2, shared) == 0.0 and reduce_waits(4, Hardware(**HW)) == 0.0
    eight = Hardware(**{**HW, "ranks_per_node": 8, "cores_per_node": 2, "handover_s": 1e-4})
    assert reduce_waits(8, eight) == pytest.approx(6 * 6 / 7)
    assert reduce_waits(16, eight) == pytest.approx(8 * 6 / 7)  # 8 of them on a node
    assert handover_time("gpipe", 1, 1, shared, 4, data=4) == pytest.approx(8 / 3 * 1e-4)
    assert handover_time("1f1b", 2, 4, shared, 4, data=2) == pytest.approx(6e-4)


def test_planner_prices_oversubscription():
    from mltrain.planner.cost import Hardware
    from mltrain.planner.search import plan

    prof = _profile(6)
    full = plan(prof, Hardware(**HW), 4, 64)
    half = plan(prof, Hardware(**{**HW, "cores_per_node": 2}), 4, 64)
    key = lambda c: (c["data"], c["pipe"], c["layer"], c["microbatches"], c["schedule"])  # noqa: E731
    assert {key(c): 2 * c["predicted_step_s"] for c in full} == pytest.approx(
        {key(c): c["predicted_step_s"] for c in half})
    # with a hand-over cost, 1F1B pays 2 (M - 1) of them beyond GPipe, and the allreduce
    # over 4 ranks on 2 cores its 8/3 (above)
    woken = plan(prof, Hardware(**{**HW, "cores_per_node": 2, "handover_s": 1e-3}), 4, 64)
    by = {key(c): c for c in woken}
    for (D, S, L, M, sched), c in by.items():
        if sched == "1f1b" and S > 1:
            other = by[(D, S, L, M, "gpipe")]
            if c["balance"] == other["balance"]:
                assert c["predicted_step_s"] - other["predicted_step_s"] == pytest.approx(
                    2 * (M - 1) * 1e-3)
        assert c["handover_s"] == pytest.approx(
            (2 * (M - 1) if sched == "1f1b" else 0.0) * 1e-3 + (8 / 3e3 if D == 4 else 0.0))


def test_hardware_files(tmp_path):
    from mltrain.config import ConfigError
    from mltrain.planner.cost import load_hardware

    def write(table):
        f = tmp_path / "hw.toml"
        f.write_text("[hardware]\n" + "".join(f"{k} = {v!r}\n" for k, v in table.items()))
        return f
    assert load_hardware(write(HW)).ranks == 8
    assert load_hardware(write({**HW, "handover_s": 2e-4})).handover_s == 2e-4
    for bad, match in [({k: v for k, v in HW.items() if k != "nodes"}, "hardware.nodes: missing"),
                       ({**HW, "speed_of_light": 1.0}, "hardware.speed_of_light: unknown"),
                       ({**HW, "intra_bandwidth": 0.0}, "hardware.intra_bandwidth: impossible"),
                       ({**HW, "nodes": 1.5}, "hardware.nodes: must be a whole"),
                       ({**HW, "cores_per_node": -2}, "hardware.cores_per_node: impossible"),
                       ({**HW, "cores_per_node": 2.5}, "hardware.cores_per_node: must be"),
                       ({**HW, "handover_s": -1e-4}, "hardware.handover_s: impossible"),
                       ({**HW, "inter_latency": "fast"}, "hardware.inter_latency: expected")]:
        with pytest.raises(ConfigError, match=match):
            load_hardware(write(bad))
    with pytest.raises(ConfigError, match="no \\[hardware\\] table"):
        (tmp_path / "empty.toml").write_text("x = 1\n")
        load_hardware(tmp_path / "empty.toml")


def _profile(n=8, seed=0):
    from mltrain.planner.cost import Profile

    rng = random.Random(seed)
    par = [rng.uniform(1e5, 1e6) for _ in range(n)]
    return Profile(forward_s=[rng.uniform(1e-5, 1e-4) for _ in range(n)],
                   backward_s=[rng.uniform(2e-5, 2e-4) for _ in range(n)],
                   activation_bytes=[rng.uniform(1e3, 1e4) for _ in range(n)],
                   parameter_bytes=par, optimizer_bytes=[2 * p for p in par])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("residual", [False, True], ids=["chain", "residual"])
def test_plans_are_feasible_and_never_slower_than_data_parallelism(seed, ranks, residual):
    from mltrain.planner.cost import Hardware
    from mltrain.planner.search import plan

    prof = _profile(n=10, seed=seed)
    # Even seeds: too little memory for the whole model on one rank (parameters,
    # gradients and Adam state take 4 times the parameter bytes).
    tight = seed % 2 == 0
    hw = Hardware(**{**HW, "memory_per_rank": 2.5 * sum(prof.parameter_bytes) if tight
                     else 8e9})
    mg = {"levels": 2, "cf": 2, "iters": 2, "bwd_iters": 1}
    configs = plan(prof, hw, ranks, 64, residual=(1, 9) if residual else None, mgrit=mg)
    if tight and ranks == 1:
        assert configs == []
        return
    assert configs and all(c["data"] * c["pipe"] * c["layer"] == ranks for c in configs)
    if not tight and ranks > 1:  # a layer axis exactly for residual networks
        assert residual == any(c["layer"] > 1 for c in configs)
    for c in configs:
        assert c["memory_bytes"] <= hw.memory_per_rank and sum(c["balance"]) == prof.layers
    best = configs[0]
    pure = [c for c in configs if c["pipe"] == 1 and c["layer"] == 1]
    assert bool(pure) != tight  # pure data parallelism fits exactly when memory allows
    assert not pure or best["predicted_step_s"] <= pure[0]["predicted_step_s"]
    times = [c["predicted_step_s"] for c in configs]
    assert times == sorted(times)


def test_planner_pipelines_what_does_not_fit_and_says_when_nothing_does():
    from mltrain.planner.cost import Hardware
    from mltrain.planner.search import plan

    prof = _profile(n=8, seed=1)
    whole = 4 * sum(prof.parameter_bytes)  # parameters, gradients, Adam state
    hw = Hardware(**{**HW, "memory_per_rank": whole * 0.6})
    configs = plan(prof, hw, 4, 64)
    assert configs and all(c["pipe"] > 1 for c in configs)
    assert all(c["memory_bytes"] <= hw.memory_per_rank for c in configs)
    tiny = Hardware(**{**HW, "memory_per_rank": 1.0})
    assert plan(prof, tiny, 4, 64) == []


def test_profile_of_real_layers():
    import torch

    from mltrain.nn import ResNet
    from mltrain.pipeline import sequential_layers
    from mltrain.planner.search import profile_layers

    layers = sequential_layers(ResNet(16, 8, 3, 4))
    prof = profile_layers(layers, torch.randn(32, 16), reps=2)
    assert prof.layers == 5
    # Per-sample slopes of these tiny layers may be below timer noise (then 0); what the
    # planner relies on is non-negative terms and a positive time for the measured batch.
    assert all(t >= 0 for t in prof.forward_s + prof.backward_s + prof.fixed_s)
    assert all((f + b) * 32 + c > 0
               for f, b, c in zip(prof.forward_s, prof.backward_s, prof.fixed_s))
    assert prof.activation_bytes[0] == 8 * 4 and prof.activation_bytes[-1] == 4 * 4
    assert prof.parameter_bytes[1] == (8 * 8 + 8) * 4
    assert prof.optimizer_bytes == [2 * p for p in prof.parameter_bytes]


def test_profile_of_a_residual_network_measures_mgrit_through_the_solver():
    import torch

    from mltrain.mgrit.model import Costs, predict
    from mltrain.mgrit.profile import SOLVER_COSTS
    from mltrain.nn import ResNet
    from mltrain.planner.cost import Hardware
    from mltrain.planner.search import _chain_costs, profile_model

    mgrit = dict(levels=2, cf=2, iters=2, bwd_iters=1)
    prof, span = profile_model(ResNet(16, 8, 8, 4), torch.randn(32, 16), mgrit=mgrit, reps=2)
    assert span == (1, 9) and prof.layers == 10
    assert len(prof.mgrit_slope) == len(prof.mgrit_fixed) == len(SOLVER_COSTS)
    costs = prof.mgrit_costs(16)
    assert all(v >= 0 for v in costs.values()) and costs["step"] > 0
    assert costs["chain_backward"] + costs["record"] > 0
    # The planner's MGRIT costs are these (at half speed, twice as long); the links its own.
    hw = Hardware(**{**HW, "compute_speed": 0.5})
    c = _chain_costs(prof, hw, 1, 9, 16, False)
    assert all(getattr(c, k) == pytest.approx(2 * v) for k, v in costs.items())
    assert c.message == pytest.approx(1e-6 + 8 * 4 * 16 / 1e10)
    # A pass's overhead: the fixed part once, the per-step part for each local step.
    base = dict(step=1.0, step_coarse=1.0, vjp=1.0, vjp_coarse=1.0, record=1.0,
                chain_backward=1.0, serial_forward=1.0, serial_backward=1.0, message=0.5,
                broadcast=0.5)
    plain = predict(16, 2, 2, 2, 2, 1, Costs(**base))["parallel_s"]
    over = predict(16, 2, 2, 2, 2, 1, Costs(**base, overhead=3.0, overhead_step=0.25))
    assert over["parallel_s"] == pytest.approx(plain + 3.0 + 8 * 0.25)
    # Other models: no MGRIT costs, and none derived.
    prof, span = profile_model(torch.nn.Sequential(torch.nn.Linear(16, 4)),
                               torch.randn(8, 16), reps=1)
    assert span is None and prof.mgrit_costs(8) is None


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mltrain", *args], capture_output=True,
                          text=True, timeout=300)


def test_plan_and_simulate_commands(tmp_path):
    from conftest import ROOT

    from mltrain.config import load_config

    hw = ROOT / "examples" / "hardware" / "dev-2core.toml"
    out, cfg = tmp_path / "plan.json", tmp_path / "best.toml"
    r = _cli("plan", "--hardware", str(hw), "--ranks", "2", "--top", "3", "--json", str(out),
             "--write", str(cfg), "--set", "model.depth=6")
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    configs = json.loads(out.read_text())["configs"]
    keys = {"data", "pipe", "layer", "microbatches", "predicted_step_s", "memory_bytes"}
    assert len(configs) == 3 and keys <= set(configs[0])
    assert [c["predicted_step_s"] for c in configs] == sorted(c["predicted_step_s"] for c in configs)
    best = load_config(cfg)
    assert (best.parallel.data, best.parallel.pipe) == (configs[0]["data"], configs[0]["pipe"])
    png = tmp_path / "sim.png"
    r = _cli("simulate", "--hardware", str(ROOT / "examples" / "hardware" / "gpu-node-a100x4.toml"),
             "--ranks", "1,2,4,1024", "--json", str(tmp_path / "sim.json"), "--plot", str(png))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "sim.json").read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 2, 4, 1024]
    assert rows[0]["efficiency"] == pytest.approx(1.0) and png.read_bytes()[:4] == b"\x89PNG"


def test_plan_errors(tmp_path):
    from conftest import ROOT

    hw = (ROOT / "examples" / "hardware" / "dev-2core.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(hw.replace("nodes = 1\n", ""))
    r = _cli("plan", "--hardware", str(bad), "--ranks", "2")
    assert r.returncode == 2 and "hardware.nodes: missing" in r.stderr
    small = tmp_path / "small.toml"
    small.write_text(hw.replace("memory_per_rank = 12884901888.0", "memory_per_rank = 1000.0"))
    r = _cli("plan", "--hardware", str(small), "--ranks", "2")
    assert r.returncode == 2 and "no configuration fits" in r.stderr and "smallest needs" in r.stderr
    r = _cli("simulate", "--hardware", str(bad.with_name("missing.toml")))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_bench_hardware_and_pipeline(tmp_path):
    import json

    from conftest import mpiexec

    from mltrain.planner.cost import load_hardware

    hw = tmp_path / "hw.toml"
    r = mpiexec(2, ["-m", "mltrain", "bench", "hardware", "--out", str(hw)])
    assert r.returncode == 0, r.stderr[-2000:]
    measured = load_hardware(hw)  # a valid hardware file
    assert measured.ranks == 2 and measured.intra_bandwidth > 0
    if measured.cores_per_node >= 2:  # a core per rank: waits cost only the latency
        assert measured.handover_s == 0.0
    out = tmp_path / "pipe.json"
    r = mpiexec(2, ["-m", "mltrain", "bench", "pipeline", "--steps", "3", "--json", str(out),
                    "--set", "model.depth=4", "--set", "model.width=16"], timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    kinds = {(row["pipe"], row["schedule"]) for row in res["rows"]}
    assert {(1, "none"), (2, "gpipe"), (2, "1f1b"), (1, "mgrit")} <= kinds
    assert all(row["layer"] == 2 for row in res["rows"] if row["schedule"] == "mgrit")
    assert {row["microbatches"] for row in res["rows"] if row["pipe"] == 2} == {1, 2, 4, 8}
    assert res["model_error"] == max(row["model_error"] for row in res["rows"])
    assert res["top_choice_vs_fastest"] >= 1.0


@pytest.mark.mpi(min_size=1)
def test_handover_measurement_is_collective_and_agrees(comm):
    """Pairs of ranks run the synthetic pipeline (an odd last rank alone); every rank
    returns the same figure."""
    from mpi4py import MPI

    from mltrain.cli.bench_pipeline import _handover

    h = _handover(comm, M=2, steps=2, rounds=1)
    assert h >= 0.0 and comm.allreduce(h, op=MPI.MAX) == comm.allreduce(h, op=MPI.MIN)


def test_planner_prices_layer_parallel_mgrit_for_residual_networks():
    from mltrain.planner.cost import Hardware
    from mltrain.planner.search import plan

    prof = _profile(n=18, seed=2)  # opening, 16 residual blocks, closing
    hw = Hardware(**HW)
    mg = {"levels": 2, "cf": 4, "iters": 2, "bwd_iters": 1}
    configs = plan(prof, hw, 4, 64, residual=(1, 17), mgrit=mg)
    layered = [c for c in configs if c["layer"] > 1 and c["pipe"] == 1]
    assert {(c["data"], c["layer"]) for c in layered} == {(2, 2), (1, 4)}
    assert all(c["schedule"] == "mgrit" and c["balance"] == [18] for c in layered)
    # more MGRIT iterations cost more
    slow = plan(prof, hw, 4, 64, residual=(1, 17), mgrit={**mg, "iters": 4})
    t = {(c["data"], c["layer"]): c["predicted_step_s"] for c in layered}
    for c in slow:
        if c["layer"] > 1 and c["pipe"] == 1:
            assert c["predicted_step_s"] > t[(c["data"], c["layer"])]
    assert not [c for c in plan(prof, hw, 4, 64) if c["layer"] > 1]  # not a residual net


def test_planner_prices_pipeline_stages_that_are_layer_parallel():
    # 4 ranks, 16 blocks in units of cf = 2: the only grid with both axes is 1 x 2 x 2. Its
    # stage times are the MGRIT work model of the stage's blocks on 2 layer ranks, plus the
    # opening or closing, plus the transfers; the cut is the best on the units' grid, with
    # at least a unit per layer rank.
    from mltrain.mgrit.model import predict
    from mltrain.planner.cost import Hardware, p2p_time
    from mltrain.planner.search import _chain_costs, plan

    prof = _profile(n=18, seed=2)
    prof.forward_s[17] *= 200  # an expensive closing: the last stage takes fewer blocks
    hw = Hardware(**HW)
    mg = {"levels": 2, "cf": 2, "iters": 2, "bwd_iters": 1}
    configs = plan(prof, hw, 4, 64, residual=(1, 17), mgrit=mg)
    grid = [c for c in configs if c["pipe"] > 1 and c["layer"] > 1]
    assert {(c["data"], c["pipe"], c["layer"]) for c in grid} == {(1, 2, 2)}
    assert {(c["microbatches"], c["schedule"]) for c in grid} == {
        (m, s) for m in (1, 2, 4, 8, 16, 32) for s in ("1f1b", "gpipe")}
    c = next(c for c in grid if c["microbatches"] == 2 and c["schedule"] == "gpipe")
    b = 32

    def stages(k):  # k blocks on the first stage
        first = (predict(k, 2, 2, 2, 2, 1, _chain_costs(prof, hw, 1, 1 + k, b, False))
                 ["parallel_s"]
                 + prof.compute_s(0, 1, b) + 2 * p2p_time(prof.activation_bytes[k] * b, hw)
                 + p2p_time(0, hw))
        last = (predict(16 - k, 2, 2, 2, 2, 1, _chain_costs(prof, hw, 1 + k, 17, b, False))
                ["parallel_s"] + prof.compute_s(17, 18, b))
        return [first, last]
    k = c["balance"][0] - 1
    cuts = (4, 6, 8, 10, 12)  # whole units, two a stage at least
    assert c["balance"] == [k + 1, 17 - k] and k in cuts and k > 8
    assert c["predicted_step_s"] == pytest.approx(3 * max(stages(k)), rel=1e-12)
    assert max(stages(k)) == min(max(stages(j)) for j in cuts)
    assert c["memory_bytes"] <= hw.memory_per_rank
