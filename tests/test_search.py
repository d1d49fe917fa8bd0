"""``mltrain search`` end to end on the job's ranks: a trial computes exactly what the same
configuration computes as a standalone run with the same group layout (float64, bit for
bit), ASHA's promoted trials and PBT's exploited members continue from snapshots moved
by MPI between groups exactly, failed trials are recorded and the search goes on."""
import json

import pytest

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)

BASE = """
[run]
steps = 6
dtype = "float64"
threads = 1
log_every = 2
costs = "unit"
[data]
name = "digits"
batch_size = 24
[model]
name = "mlp"
width = 12
depth = 2
"""

SPACE = """
["optim.lr"]
log = [0.01, 0.3]
["optim.momentum"]
range = [0.0, 0.9]
["sync.name"]
choice = ["allreduce", "localsgd"]
["sync.period"]
int = [2, 3]
when = { "sync.name" = "localsgd" }
"""


def _files(comm, tmp, space=SPACE, base=BASE):
    if comm.Get_rank() == 0:
        (tmp / "base.toml").write_text(base)
        (tmp / "space.toml").write_text(space)
    comm.Barrier()
    return str(tmp / "base.toml"), str(tmp / "space.toml")


def _search(comm, tmp, name, *, trials, algo="random", budget=18, sets=(), space=SPACE):
    from mltrain.comm import agree
    from mltrain.search.driver import STATE, make_plan, run_search

    base, space_path = _files(comm, tmp, space)
    overrides = [f"parallel.trial={trials}", *sets]
    plan = agree(comm, lambda: make_plan(base, overrides, space_path, comm.Get_size(),
                                         algo=algo, budget=budget, out=str(tmp / name)),
                 what="config")
    summary = run_search(plan, comm, quiet=True)
    state = json.loads((tmp / name / STATE).read_text()) if comm.Get_rank() == 0 else None
    return plan, comm.bcast(summary), comm.bcast(state)


def _standalone(group, base, sets, values, steps, seed=None, snapshot=None):
    """The configuration as `mltrain train --config base --set ...` builds it, trained on
    ``group`` to ``steps``; returns (trainer, digest on the group's rank 0)."""
    from mltrain.config import load_config, toml_value
    from mltrain.search.driver import _digest
    from mltrain.train import Trainer

    extra = [f"{k}={toml_value(v)}" for k, v in values.items()]
    if seed is not None:
        extra.append(f"run.seed={seed}")
    cfg = load_config(base, [*sets, *extra, f"run.steps={steps}"])
    t = Trainer(cfg, group, quiet=True, metrics=False, snapshot=snapshot)
    summary = t.train()
    return t, summary, _digest(t)


def _trials(comm) -> int:
    """Trial groups for a test on the job's ranks: one rank each up to 3 ranks, two
    groups of two on 4."""
    size = comm.Get_size()
    return size if size <= 3 else 2


def _groups(comm, trials):
    G = comm.Get_size() // trials
    return comm.Split(comm.Get_rank() // G, comm.Get_rank()), comm.Get_rank() // G


def _check_jobs(comm, group, gidx, base, sets, state, R):
    """Every group re-trains the jobs it ran as standalone runs and compares the digest of
    the parameters and the training loss bit for bit."""
    bad = []
    for rec in state["records"]:
        job, res = rec["job"], rec["result"]
        if res["group"] != gidx or res["status"] != "ok" or job["start"] != 0:
            continue
        t, summary, digest = _standalone(group, base, [f"run.steps={R}", *sets],
                                         job["values"], job["stop"], job.get("seed"))
        t.close()
        if group.Get_rank() == 0 and (digest != res["digest"] or
                                      summary["final_loss"] != res["metrics"]["train_loss"]):
            bad.append(f"job {job['id']}: {summary['final_loss']!r} vs "
                       f"{res['metrics']['train_loss']!r}")
    all_ranks(comm, not bad, "; ".join(bad))


@pytest.mark.parametrize("trials", [1, 2, 3])
def test_a_trial_is_the_standalone_run_bit_for_bit(comm, shared_tmp, trials):
    if comm.Get_size() % trials:
        pytest.skip(f"{comm.Get_size()} ranks do not split into {trials} groups")
    base, _ = _files(comm, shared_tmp)
    plan, summary, state = _search(comm, shared_tmp, f"t{trials}", trials=trials, budget=24)
    assert summary["jobs"] == 4 and summary["spent"] == 24 and summary["failed"] == 0
    groups = {r["result"]["group"] for r in state["records"]}
    assert groups <= set(range(trials))
    group, gidx = _groups(comm, trials)
    _check_jobs(comm, group, gidx, base, [], state, plan.R)
    group.Free()


@pytest.mark.mpi(min_size=4)
def test_groups_train_with_their_own_layout(comm, shared_tmp):
    """Two groups of two ranks, each a two-stage pipeline: the grid's other axes inside
    the group, and the same bits as a standalone pipelined run."""
    if comm.Get_size() != 4:
        pytest.skip("four ranks")
    base, _ = _files(comm, shared_tmp)
    sets = ["parallel.pipe=2", "pipeline.microbatches=2"]
    space = '["optim.lr"]\nlog = [0.01, 0.3]\n'
    plan, summary, state = _search(comm, shared_tmp, "pipe", trials=2, budget=18, sets=sets,
                                   space=space)
    assert summary["jobs"] == 3
    group, gidx = _groups(comm, 2)
    _check_jobs(comm, group, gidx, base, sets, state, plan.R)
    group.Free()


def _chain(group, base, values, stops):
    """A standalone run stopped at each of ``stops`` and resumed from its own snapshot,
    as `mltrain train` with checkpoint.resume does; returns the last digest."""
    from mltrain.io import Snapshot

    snap, digest = None, None
    for stop in stops:
        t, _, digest = _standalone(group, base, ["run.steps=9"], values, stop,
                                   snapshot=snap)
        data = t.snapshot_bytes()
        t.close()
        snap = Snapshot(f"at {stop}", data) if group.Get_rank() == 0 else None
    return digest


def test_asha_promotions_continue_exactly(comm, shared_tmp):
    """Rungs 1, 3, 9: a promoted trial continues from the snapshot another group may have
    written, and ends with the parameters of a standalone run paused and resumed at the
    same rungs; with allreduce (replicas that never drift) also of a straight run. (A
    drifting scheme's pause keeps the replicas' consensus and rank 0's optimizer state,
    as a checkpoint does.)"""
    trials = _trials(comm)
    base, _ = _files(comm, shared_tmp)
    sets = ["search.eta=3", "search.min_resource=1", "search.max_resource=9"]
    plan, summary, state = _search(comm, shared_tmp, "asha", trials=trials, algo="asha",
                                   budget=30, sets=sets)
    promoted = [r for r in state["records"] if r["job"]["start"] > 0]
    assert promoted and max(r["job"]["stop"] for r in promoted) >= 3
    rungs = [1, 3, 9]
    group, gidx = _groups(comm, trials)
    bad = []
    for rec in promoted:
        job, res = rec["job"], rec["result"]
        if res["group"] != gidx:
            continue
        stops = [r for r in rungs if r <= job["stop"]]
        digest = _chain(group, base, job["values"], stops)
        where = f"trial {job['trial']} at {job['stop']} ({job['values'].get('sync.name')})"
        if group.Get_rank() == 0 and digest != res["digest"]:
            bad.append(where + " vs paused standalone")
        if job["values"]["sync.name"] == "allreduce":
            t, _, straight = _standalone(group, base, ["run.steps=9"], job["values"],
                                         job["stop"])
            t.close()
            if group.Get_rank() == 0 and straight != res["digest"]:
                bad.append(where + " vs straight run")
    all_ranks(comm, not bad, "promoted trials differ: " + ", ".join(bad))
    # every snapshot a finished search left is one it may still promote
    live = set(state["snapshots"])
    top = {str(r["job"]["trial"]) for r in state["records"] if r["job"]["stop"] == 9}
    assert not any(n.startswith(f"trial{t}-") for n in live for t in top)
    group.Free()


def test_pbt_exploit_copies_the_better_members_state(comm, shared_tmp):
    """Population 4, two intervals of 3 steps: after the first, the worst member copies
    the best one's weights and optimizer state (sent by MPI through rank 0) and explores;
    its second interval equals training the best member's configuration for 3 steps,
    then the explored one from that state for 3 more."""
    from mltrain.io import Snapshot

    trials = _trials(comm)
    base, _ = _files(comm, shared_tmp)
    sets = ["search.population=4", "search.interval=3", "search.max_resource=6"]
    plan, summary, state = _search(comm, shared_tmp, "pbt", trials=trials, algo="pbt",
                                   budget=24, sets=sets)
    recs = {r["job"]["trial"]: r for r in state["records"] if r["job"]["start"] == 0}
    exploited = [r for r in state["records"] if r["job"]["start"] == 3
                 and r["job"]["info"]["parent"] is not None]
    assert len(exploited) == 1 and summary["jobs"] == 8
    child = exploited[0]
    parent = recs[child["job"]["info"]["parent"]]
    scores = sorted(r["result"]["score"] for r in recs.values())
    assert parent["result"]["score"] == scores[-1]
    group, gidx = _groups(comm, trials)
    t, _, _ = _standalone(group, base, ["run.steps=6"], parent["job"]["values"], 3)
    data = t.snapshot_bytes()
    t.close()
    snap = Snapshot("parent", data) if group.Get_rank() == 0 else None
    t, _, digest = _standalone(group, base, ["run.steps=6"], child["job"]["values"], 6,
                               snapshot=snap)
    t.close()
    all_ranks(comm, group.Get_rank() != 0 or digest == child["result"]["digest"],
              "the exploited member differs from its reconstruction")
    group.Free()


def test_failed_trials_are_recorded_and_the_search_goes_on(comm, shared_tmp):
    """A grid over two keys whose combination the config refuses (trust region with
    Local SGD) and a rate that must overflow (1e300 in float64: the second step's logits
    are beyond the largest double): those trials fail with their message, the others
    train."""
    trials = _trials(comm)
    space = ('["optim.name"]\nchoice = ["sgd", "tr"]\n["sync.name"]\n'
             'choice = ["allreduce", "localsgd"]\n["optim.lr"]\nchoice = [0.1, 1e300]\n')
    plan, summary, state = _search(comm, shared_tmp, "fail", trials=trials, algo="grid",
                                   budget=48, space=space)
    res = {(r["job"]["values"]["optim.name"], r["job"]["values"]["sync.name"],
            r["job"]["values"]["optim.lr"]): r["result"] for r in state["records"]}
    assert len(res) == 8
    for (name, sync, lr), r in res.items():
        if name == "tr" and sync == "localsgd":
            assert r["status"] == "failed" and "sync.name" in r["message"] and r["used"] == 0
        elif name == "sgd" and lr > 1:
            assert r["status"] == "failed" and "training loss is" in r["message"]
        else:
            assert r["status"] == "ok" and r["score"] is not None, r
    assert summary["failed"] == 4
    if comm.Get_rank() == 0:
        rows = (shared_tmp / "fail" / "results.csv").read_text().splitlines()
        assert len(rows) == 9 and sum(",failed," in r for r in rows) == 4
        best = (shared_tmp / "fail" / "best.toml").read_text()
        from mltrain.config import load_config

        cfg = load_config(shared_tmp / "fail" / "best.toml")  # ready to train
        assert cfg.optim.lr == 0.1 and "trial" in best
    comm.Barrier()


def test_a_budget_in_work_stops_each_trial_at_its_work(comm, shared_tmp):
    """search.resource = work with trust region (work in fine-gradient equivalents, not
    steps): each trial stops at the first step whose work reaches its allocation, as a
    hand-written loop stops, with the same parameters."""
    from mpi4py import MPI

    from mltrain.config import load_config, toml_value
    from mltrain.search.driver import _digest
    from mltrain.train import Trainer

    trials = _trials(comm)
    base, _ = _files(comm, shared_tmp)
    sets = ["optim.name=tr", "search.resource=work", "search.max_resource=2",
            "run.steps=1000"]
    space = '["tr.radius"]\nlog = [0.1, 2.0]\n'
    plan, summary, state = _search(comm, shared_tmp, "work", trials=trials, budget=6,
                                   sets=sets, space=space)
    assert summary["jobs"] == 3 and summary["spent"] == 6 and summary["failed"] == 0
    group, gidx = _groups(comm, trials)
    bad = []
    for rec in state["records"]:
        job, res = rec["job"], rec["result"]
        if res["group"] != gidx:
            continue
        extra = [f"{k}={toml_value(v)}" for k, v in job["values"].items()]
        t = Trainer(load_config(base, [*sets, *extra]), group, quiet=True, metrics=False)
        while group.allreduce(t.work(), op=MPI.MAX) < 2:
            t.advance()
        digest = _digest(t)
        if group.Get_rank() == 0 and (digest != res["digest"] or t.step != res["steps"]):
            bad.append(f"job {job['id']}: {t.step} steps vs {res['steps']}")
        assert res["work"] >= 2 and res["steps"] > 1
        t.close()
    all_ranks(comm, not bad, "; ".join(bad))
    group.Free()
