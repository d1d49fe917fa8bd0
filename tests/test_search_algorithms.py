"""The search space and the search algorithms as pure state machines: hand-computed ASHA
promotions, a scripted PBT population, crowding's closest parent, Thompson sampling's
posterior against its closed form, determinism from the seed and resumable state."""
import json
import math
import random
from types import SimpleNamespace

import pytest

from mltrain.config import ConfigError, SearchConfig
from mltrain.search import algorithms as A
from mltrain.search.space import parse_space

SPACE = """
["optim.lr"]
log = [1e-4, 1e-1]
["optim.momentum"]
range = [0.5, 0.99]
["data.batch_size"]
choice = [32, 64, 128]
["sync.name"]
choice = ["allreduce", "localsgd"]
["sync.period"]
int = [2, 16]
when = { "sync.name" = "localsgd" }
"""


def opts(**kw):
    o = SearchConfig()
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@pytest.fixture
def space():
    return parse_space(SPACE)


# -- the space -------------------------------------------------------------------------

@pytest.mark.parametrize("text, match", [
    ('["optim.lrr"]\nlog = [1e-4, 1e-1]', "optim.lrr: unknown key"),
    ('["optimm.lr"]\nlog = [1e-4, 1e-1]', "not a config key"),
    ('["optim.lr"]\nrange = [0.1, 0.1]', "empty range"),
    ('["optim.lr"]\nrange = [0.2, 0.1]', "empty range"),
    ('["data.batch_size"]\nint = [64, 32]', "empty range"),
    ('["optim.lr"]\nlog = [0, 0.1]', "low > 0"),
    ('["optim.name"]\nchoice = ["sgd", "lamb"]', "'lamb' is not a value the config takes"),
    ('["data.batch_size"]\nchoice = [32, "big"]', "'big' is not a value the config takes"),
    ('["optim.momentum"]\nrange = [0.5, 1.5]', "the end 1.5 is not a value"),
    ('["optim.lr"]\nchoice = []', "at least one value"),
    ('["optim.lr"]\nlog = [1e-4, 1e-1]\nrange = [0.1, 0.2]', "exactly one of"),
    ('["optim.lr"]\nlog = [1e-4, 1e-1]\nstep = 2', "unknown entry 'step'"),
    ('["data.batch_size"]\nrange = [32, 64]', "int ranges are for integer keys|use int"),
    ('["optim.lr"]\nint = [1, 2]', "int ranges are for integer keys"),
    ('["sync.period"]\nint = [2, 8]\nwhen = { "sync.name" = "localsgd" }', "does not search"),
    ('["sync.name"]\nchoice = ["allreduce"]\n["sync.period"]\nint = [2, 8]\n'
     'when = { "sync.name" = "localsgd" }', "never takes"),
    ('["sync.name"]\nchoice = ["allreduce"]\nwhen = { "sync.period" = 2 }\n'
     '["sync.period"]\nint = [2, 8]\nwhen = { "sync.name" = "allreduce" }', "cycle"),
    ('["parallel.trial"]\nint = [1, 2]', "cannot be searched"),
    ('["checkpoint.dir"]\nchoice = ["a"]', "cannot be searched"),
    ('["run.steps"]\nint = [1, 2]', "cannot be searched"),
    ('lr = 3', "must be a table"),
    ('', "no keys to search"),
    ('["optim.lr"\nlog = [1e-4, 1e-1]', "not valid TOML"),
])
def test_bad_spaces_are_refused_naming_the_key(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(text)


NESTED_BASE = ["data.name=digits", "model.name=resnet", "model.depth=8", "model.width=8"]
SPACE_RMTR = """
["optim.name"]
choice = ["sgd", "rmtr"]
["multilevel.init"]
choice = ["nested"]
when = { "optim.name" = "rmtr" }
["multilevel.levels"]
choice = [2, 3]
["multilevel.init_cycles"]
int = [5, 20]
when = { "multilevel.init" = "nested" }
"""


@pytest.mark.parametrize("sets, space, match, fits", [
    # one key at its high end: 2 coarse levels x 40 steps cover a 60-step trial
    (["multilevel.nested=true", "multilevel.levels=3", "run.steps=60"],
     '["multilevel.nested_steps"]\nint = [5, 40]',
     r"a trial with multilevel.nested_steps = 40 spends all its 60 steps .*covers all 60", 81),
    # the keys together: each end alone fits 50 steps, levels 3 with 25 steps each does not
    (["multilevel.nested=true", "multilevel.levels=2", "run.steps=50"],
     '["multilevel.levels"]\nchoice = [2, 3]\n["multilevel.nested_steps"]\nint = [5, 25]',
     "multilevel.levels = 3, multilevel.nested_steps = 25 spends all", 51),
    # a condition on a level count inside the range: levels 3 is the worst the space draws
    (["multilevel.nested=true", "multilevel.levels=2", "run.steps=40"],
     '["multilevel.levels"]\nint = [2, 4]\n["multilevel.nested_steps"]\nint = [5, 20]\n'
     'when = { "multilevel.levels" = [2, 3] }',
     "multilevel.levels = 3, multilevel.nested_steps = 20 spends all", 41),
    # a trial counted in epochs: one epoch of digits is 22 steps at batch 64
    (["optim.name=rmtr", "multilevel.init=nested", "multilevel.levels=3",
      "multilevel.init_cycles=2", "run.steps=0", "run.epochs=1"],
     '["multilevel.init_cycles"]\nint = [2, 11]',
     "multilevel.init_cycles = 11 spends all its 22 steps", 23),
    # ... and the searched batch size sets the epoch's steps: 44 at batch 32, 22 at 64
    (["multilevel.nested=true", "multilevel.levels=3", "run.steps=0", "run.epochs=1"],
     '["data.batch_size"]\nchoice = [32, 64]\n["multilevel.nested_steps"]\nint = [5, 11]',
     "data.batch_size = 64, multilevel.nested_steps = 11 spends all its 22 steps", 23),
    # RMTR's nested start where the space turns it on, its cycles at the top, 3 levels
    (["multilevel.levels=2", "multilevel.init_cycles=5", "run.steps=40"], SPACE_RMTR,
     "optim.name = 'rmtr', multilevel.init = 'nested', multilevel.levels = 3, "
     "multilevel.init_cycles = 20 spends all", 41),
])
def test_spaces_whose_coarse_phases_fill_a_trial_are_refused(tmp_path, sets, space, match,
                                                             fits):
    """A trial that would spend all its steps on coarse levels is refused when the space
    is checked, before any trial runs, not as a failed trial; one step more and it is
    accepted."""
    from mltrain.search.driver import make_plan

    path = tmp_path / "space.toml"
    path.write_text(space)
    with pytest.raises(ConfigError, match=match):
        make_plan(None, NESTED_BASE + sets, str(path), 1, out=str(tmp_path / "o"))
    longer = [s for s in sets if not s.startswith("run.")] + [f"run.steps={fits}"]
    make_plan(None, NESTED_BASE + longer, str(path), 1, out=str(tmp_path / "o"))


@pytest.mark.parametrize("sets, space", [
    # the base's 4 levels would fail with 20 steps each, but the space never draws them
    (["multilevel.nested=true", "multilevel.levels=4", "run.steps=50"],
     '["multilevel.levels"]\nint = [2, 3]\n["multilevel.nested_steps"]\nint = [5, 20]'),
    # nesting switched on by a choice, with its phases only then: 2 x 20 of 50 steps
    (["multilevel.levels=3", "run.steps=50"],
     '["multilevel.nested"]\nchoice = [false, true]\n["multilevel.nested_steps"]\n'
     'int = [5, 20]\nwhen = { "multilevel.nested" = [true] }'),
    # a combination the config refuses (Adam with RMTR's nested start) fails as a trial
    (["optim.name=rmtr", "multilevel.levels=2", "multilevel.init_cycles=5", "run.steps=40"],
     '["optim.name"]\nchoice = ["adam", "rmtr"]\n["multilevel.init"]\n'
     'choice = ["none", "nested"]'),
])
def test_spaces_whose_drawn_trials_leave_the_full_network_steps_are_accepted(tmp_path, sets,
                                                                            space):
    from mltrain.search.driver import make_plan

    path = tmp_path / "space.toml"
    path.write_text(space)
    make_plan(None, NESTED_BASE + sets, str(path), 1, out=str(tmp_path / "o"))


def test_coarse_trials_follow_the_conditions(tmp_path):
    """Only combinations the space draws are checked together: the nested start's cycles
    count with RMTR only (sgd with them is never drawn, nor checked), and a condition two
    keys up holds when one key's ends are checked."""
    from mltrain.search.driver import _coarse_trials, make_plan

    path = tmp_path / "space.toml"
    path.write_text(SPACE_RMTR.replace("[5, 20]", "[5, 19]"))
    plan = make_plan(None, NESTED_BASE + ["multilevel.levels=2", "multilevel.init_cycles=5",
                                          "run.steps=40"], str(path), 1,
                     out=str(tmp_path / "o"))
    rmtr = {"optim.name": "rmtr", "multilevel.init": "nested"}
    assert _coarse_trials(plan.space) == [
        {"optim.name": "sgd", "multilevel.levels": 2},
        {"optim.name": "sgd", "multilevel.levels": 3},
        {**rmtr, "multilevel.levels": 2, "multilevel.init_cycles": 5},
        {**rmtr, "multilevel.levels": 2, "multilevel.init_cycles": 19},
        {**rmtr, "multilevel.levels": 3, "multilevel.init_cycles": 5},
        {**rmtr, "multilevel.levels": 3, "multilevel.init_cycles": 19}]
    assert _coarse_trials(parse_space('["optim.lr"]\nlog = [1e-3, 1e-1]')) == [{}]


def test_draws_respect_bounds_conditions_and_the_seed(space):
    rng = random.Random(3)
    draws = [space.draw(rng) for _ in range(300)]
    assert draws == [space.draw(r) for r in [random.Random(3)] for _ in range(300)]
    for d in draws:
        assert 1e-4 <= d["optim.lr"] <= 1e-1 and 0.5 <= d["optim.momentum"] <= 0.99
        assert d["data.batch_size"] in (32, 64, 128)
        assert ("sync.period" in d) == (d["sync.name"] == "localsgd")
        if "sync.period" in d:
            assert isinstance(d["sync.period"], int) and 2 <= d["sync.period"] <= 16
    # log-uniform: about a third of the draws in each decade
    decades = [sum(10 ** (k - 4) <= d["optim.lr"] < 10 ** (k - 3) for d in draws) for k in range(3)]
    assert min(decades) > 60, decades
    assert {d["sync.period"] for d in draws if "sync.period" in d} == set(range(2, 17))


def test_grid_expands_conditions_and_spaces_points(space):
    g = space.grid(3)
    # lr 3 x momentum 3 x batch 3 x (allreduce + localsgd x period 3)
    assert len(g) == 3 * 3 * 3 * (1 + 3)
    lrs = sorted({c["optim.lr"] for c in g})
    assert lrs == pytest.approx([1e-4, math.sqrt(1e-4 * 1e-1), 1e-1])
    assert sorted({c["sync.period"] for c in g if "sync.period" in c}) == [2, 9, 16]
    assert all(("sync.period" in c) == (c["sync.name"] == "localsgd") for c in g)
    assert len({json.dumps(c, sort_keys=True) for c in g}) == len(g)
    small = parse_space('["data.batch_size"]\nchoice = [32, 64]\n["sync.period"]\nint = [2, 4]')
    assert small.finite and small.size() == 6


def _grid_jobs(space, **kw):
    algo = A.make("grid", space, opts(**kw), 9, 10 ** 6)
    jobs = []
    while (job := algo.ask(10 ** 6)) is not None:
        jobs.append(json.dumps(job["values"], sort_keys=True))
    return jobs


def test_grid_order_is_a_seeded_permutation_or_key_order(space):
    key = _grid_jobs(space, grid_order="key")
    assert key == [json.dumps(c, sort_keys=True) for c in space.grid(3)]
    shuffled = _grid_jobs(space, seed=1)
    # Every point once, in another order, the same from the same seed, another from another.
    assert sorted(shuffled) == sorted(key) and shuffled != key
    assert _grid_jobs(space, seed=1) == shuffled and _grid_jobs(space, seed=2) != shuffled
    # A budget of a tenth of the grid covers more than the first corner: several rates.
    head = [json.loads(j) for j in shuffled[:len(shuffled) // 10]]
    assert len({c["optim.lr"] for c in head}) > 1
    assert len({json.loads(j)["optim.lr"] for j in key[:len(key) // 10]}) == 1


def test_distance_crossover_mutation_perturbation(space):
    a = {"optim.lr": 1e-4, "optim.momentum": 0.5, "data.batch_size": 32, "sync.name": "allreduce"}
    b = {"optim.lr": 1e-1, "optim.momentum": 0.99, "data.batch_size": 64,
         "sync.name": "localsgd", "sync.period": 16}
    # lr 1 + momentum 1 + batch 1 + sync.name 1 + period active in b only 1, over 5 keys
    assert space.distance(a, b) == pytest.approx(1.0)
    assert space.distance(a, a) == 0.0
    rng = random.Random(0)
    for _ in range(200):
        c1, c2 = space.crossover(a, b, rng)
        for k in ("optim.lr", "optim.momentum", "data.batch_size", "sync.name"):
            assert {c1[k], c2[k]} == {a[k], b[k]}  # each key from one parent, the other's twin
        for c in (c1, c2, space.mutate(c1, rng, 1.0), space.perturb(c2, rng, 0.2, 0.25)):
            assert ("sync.period" in c) == (c["sync.name"] == "localsgd")
            assert 1e-4 <= c["optim.lr"] <= 1e-1 and 0.5 <= c["optim.momentum"] <= 0.99
    p = space.perturb(b, random.Random(1), 0.2, 0.0)
    assert p["sync.name"] == "localsgd" and p["data.batch_size"] == 64  # choices kept
    assert p["optim.lr"] in (pytest.approx(1e-1 * 0.8), pytest.approx(1e-1))  # clipped at 0.1
    assert p["sync.period"] in (13, 16) and p["sync.period"] != 16 or p["sync.period"] == 16
    fixed = space.perturb(b, random.Random(1), 0.2, 1.0, fixed=("optim.lr",))
    assert fixed["optim.lr"] == b["optim.lr"]


# -- ASHA --------------------------------------------------------------------------------

def asha(R=27, eta=3, r_min=1, **kw):
    return A.ASHA(parse_space('["optim.lr"]\nlog = [1e-3, 1e-1]'),
                  opts(eta=eta, min_resource=r_min, **kw), R, 10_000)


def test_asha_rungs():
    assert A.asha_rungs(27, 1, 3) == [1, 3, 9, 27]
    assert A.asha_rungs(30, 1, 3) == [1, 3, 10, 30]
    assert A.asha_rungs(100, 3, 3) == [4, 11, 33, 100]
    assert A.asha_rungs(8, 8, 2) == [8]
    assert asha(R=81, r_min=0).rungs == [3, 9, 27, 81]  # default: R / eta^3


def test_asha_promotions_by_hand():
    """eta = 3, rungs 1, 3, 9, 27. Scores are scripted per trial; a promotion happens as
    soon as a trial is in the top floor(n / 3) of its rung."""
    a = asha()
    score = {0: 0.5, 1: 0.9, 2: 0.7, 3: 0.2, 4: 0.95, 5: 0.1}
    jobs = []

    def run(job, s=None):
        jobs.append((job["trial"], job["start"], job["stop"]))
        a.tell(job, {"status": "ok", "score": score[job["trial"]] if s is None else s,
                     "snapshot": f"t{job['trial']}@{job['stop']}" if job["keep"] else None})

    for _ in range(2):  # two trials at rung 0: floor(2/3) = 0, nothing to promote
        run(a.ask(10_000))
    assert jobs == [(0, 0, 1), (1, 0, 1)]
    run(a.ask(10_000))  # trial 2; rung 0 = {0: .5, 1: .9, 2: .7}: top 1 is trial 1
    j = a.ask(10_000)
    assert (j["trial"], j["start"], j["stop"], j["snapshot"], j["info"]["rung"]) == \
        (1, 1, 3, "t1@1", 1)
    run(j)
    j = a.ask(10_000)  # rung 0 still has 3 trials, its top one promoted: a new trial
    assert (j["trial"], j["start"], j["stop"]) == (3, 0, 1)
    run(j)
    run(a.ask(10_000))  # trial 4 (0.95): rung 0 has 5, top 1 = trial 4
    j = a.ask(10_000)
    assert (j["trial"], j["start"], j["stop"]) == (4, 1, 3)
    run(j)
    run(a.ask(10_000))  # trial 5; rung 0 has 6: top 2 = trials 4, 1, both promoted
    j = a.ask(10_000)  # rung 1 = {1: .9, 4: .95}: floor(2/3) = 0; new trial
    assert (j["trial"], j["start"]) == (6, 0)
    score[6] = 0.8
    run(j)  # rung 0 has 7: top 2 are 4 and 1 (0.95, 0.9): promoted; trial 6 is third
    j = a.ask(10_000)
    assert j["trial"] == 7
    score[7] = 0.0
    run(j)
    # the highest rung with a promotable trial wins: rung 1 = {1, 4} + trial 2 promoted
    # next? rung 0 has 8 -> top 2 (4, 1) promoted already: new trial 8
    j = a.ask(10_000)
    assert j["trial"] == 8
    score[8] = 0.85
    run(j)  # rung 0 has 9: top 3 = 4, 1, 8 -> trial 8 promoted to rung 1
    j = a.ask(10_000)
    assert (j["trial"], j["start"], j["stop"]) == (8, 1, 3)
    run(j)  # rung 1 = {1: .9, 4: .95, 8: .85}: top 1 = trial 4 -> rung 2 (3 -> 9)
    j = a.ask(10_000)
    assert (j["trial"], j["start"], j["stop"], j["snapshot"], j["keep"]) == \
        (4, 3, 9, "t4@3", True)
    run(j)
    assert a.live_snapshots() >= {"t4@9", "t1@3", "t8@3", "t0@1"}


def test_asha_budget_failed_trials_and_ties():
    a = asha()
    j = a.ask(0)
    assert j is None  # nothing fits
    for t in range(3):
        j = a.ask(100)
        a.tell(j, {"status": "failed", "score": None, "snapshot": None})
    assert a.candidates(0) == []  # failed trials are never promoted
    b = asha()
    for t in range(3):
        j = b.ask(100)
        b.tell(j, {"status": "ok", "score": 0.5, "snapshot": f"s{t}"})
    assert b.candidates(0) == [0]  # a tie goes to the lowest trial id
    j = b.ask(1)  # a promotion costs 2, only a new rung-0 trial (cost 1) fits
    assert (j["trial"], j["stop"]) == (3, 1)


# -- PBT ---------------------------------------------------------------------------------

def test_pbt_scripted_population():
    space = parse_space('["optim.lr"]\nlog = [1e-3, 1e-1]\n["optim.name"]\nchoice = ["sgd", "adam"]')
    p = A.PBT(space, opts(population=4, interval=5, truncation=0.25, perturb=0.2, resample=0.0,
                          seed=7), 20, 80)
    assert (p.P, p.interval, p.horizon) == (4, 5, 20)
    gen0 = [p.ask(100) for _ in range(4)]
    assert [j["trial"] for j in gen0] == [0, 1, 2, 3]
    assert all((j["start"], j["stop"], j["snapshot"], j["keep"]) == (0, 5, None, True)
               for j in gen0)
    assert p.ask(100) == A.WAIT  # the generation is not back yet
    scores = [0.3, 0.9, None, 0.5]  # member 2 diverged
    for j, s in zip(gen0, scores):
        p.tell(j, {"status": "ok" if s is not None else "failed", "score": s,
                   "snapshot": f"m{j['info']['member']}@5" if s is not None else None})
    # truncation: ceil(0.25 * 4) = 1; top = member 1; bottom = member 2 (failed, last)
    # and member 0 (lowest score) is not bottom-1... only the last one and every failed
    gen1 = [p.ask(100) for _ in range(4)]
    by_member = {j["info"]["member"]: j for j in gen1}
    assert by_member[1]["snapshot"] == "m1@5" and by_member[1]["trial"] == 1
    assert by_member[0]["snapshot"] == "m0@5" and by_member[0]["trial"] == 0
    assert by_member[3]["snapshot"] == "m3@5" and by_member[3]["trial"] == 3
    ex = by_member[2]
    assert ex["snapshot"] == "m1@5" and ex["info"]["parent"] == 1 and ex["trial"] == 4
    src = gen0[1]["values"]
    assert ex["values"]["optim.name"] == src["optim.name"]  # PBT_FIXED: never changed
    assert ex["values"]["optim.lr"] in (pytest.approx(src["optim.lr"] * 0.8),
                                        pytest.approx(min(src["optim.lr"] * 1.2, 0.1)))
    assert all((j["start"], j["stop"]) == (5, 10) for j in gen1)
    assert p.history == [{"generation": 1, "member": 2, "replaced": 2, "copied": 1, "trial": 4}]
    for g in range(2, 4):  # two more generations, member 0 always the worst
        for j in gen1:
            p.tell(j, {"status": "ok", "score": 0.1 if j["info"]["member"] == 0 else 0.6,
                       "snapshot": f"x{j['trial']}"})
        gen1 = [p.ask(100) for _ in range(4)]
        assert [j["start"] for j in gen1] == [5 * g] * 4
        assert gen1[0]["info"]["parent"] is not None  # member 0 copied someone
        assert gen1[0]["snapshot"] != f"x{gen1[0]['trial']}"
    assert all(j["keep"] is False for j in gen1)  # the last interval keeps nothing
    for j in gen1:
        p.tell(j, {"status": "ok", "score": 0.5, "snapshot": None})
    assert p.ask(100) is None


def test_pbt_horizon_and_population_fill_the_budget():
    space = parse_space('["optim.lr"]\nlog = [1e-3, 1e-1]')
    assert A.pbt_population(0, 30, 300) == 10
    p = A.PBT(space, opts(population=0, interval=10), 30, 300)
    assert (p.P, p.horizon) == (10, 30)
    q = A.PBT(space, opts(population=4, interval=10), 30, 100)
    assert q.horizon == 20  # 100 // (4 x 10) = 2 whole intervals


# -- Thompson sampling --------------------------------------------------------------------

def test_thompson_posterior_is_the_closed_form():
    space = parse_space('["data.batch_size"]\nchoice = [16, 32, 64]')
    t = A.Thompson(space, opts(arms=16, seed=1), 10, 10_000, base_seed=100)
    assert t.arms == [{"data.batch_size": v} for v in (16, 32, 64)]  # finite: taken whole
    pulls = {0: [], 1: [], 2: []}
    rewards = {0: [1, 0, 0, 1], 1: [1, 1, 1, 1, 0], 2: [0, 0]}
    for _ in range(60):
        j = t.ask(10_000)
        a = j["info"]["arm"]
        assert j["seed"] == 100 + len(pulls[a])  # each pull of an arm a new run.seed
        r = rewards[a][len(pulls[a]) % len(rewards[a])]
        pulls[a].append(r)
        t.tell(j, {"status": "ok", "score": float(r)})
    for a in range(3):  # Beta(1 + successes, 1 + failures), rewards 0/1 are exact
        assert t.alpha[a] == 1 + sum(pulls[a])
        assert t.beta[a] == 1 + len(pulls[a]) - sum(pulls[a])
        assert t.pulls[a] == len(pulls[a])
    assert max(range(3), key=lambda a: len(pulls[a])) == 1  # the best arm is pulled most
    # a fractional reward r is a Bernoulli(r) success: its mean converges to r
    u = A.Thompson(space, opts(arms=1, seed=2), 10, 10 ** 9)
    u.arms, u.alpha, u.beta, u.pulls = u.arms[:1], [1.0], [1.0], [0]
    for _ in range(4000):
        u.tell(u.ask(10 ** 9), {"status": "ok", "score": 0.3})
    assert u.posterior_mean()[0] == pytest.approx(0.3, abs=0.03)
    # a loss (minimized, score = -loss) is rewarded 1 / (1 + loss); failure 0
    assert A.fitness(-1.0, False) == 0.5 and A.fitness(None, True) == 0.0
    assert A.fitness(1.3, True) == 1.0


def test_thompson_draws_arms_from_a_continuous_space(space):
    t = A.Thompson(space, opts(arms=5, seed=3), 10, 100)
    assert len(t.arms) == 5 and all("optim.lr" in a for a in t.arms)
    assert [t.ask(100 - 10 * i) is not None for i in range(10)] == [True] * 10
    assert t.ask(9) is None


# -- crowding ----------------------------------------------------------------------------

def test_crowding_child_competes_with_its_closest_parent():
    space = parse_space('["optim.lr"]\nrange = [0.0001, 1.0]\n["sync.name"]\n'
                        'choice = ["allreduce", "localsgd"]')
    c = A.Crowding(space, opts(population=4, replacement="deterministic"), 10, 10 ** 6)
    parents = [{"trial": 0, "values": {"optim.lr": 0.1, "sync.name": "allreduce"}, "score": 0.5},
               {"trial": 1, "values": {"optim.lr": 0.9, "sync.name": "localsgd"}, "score": 0.6}]
    near0 = {"trial": 2, "values": {"optim.lr": 0.15, "sync.name": "allreduce"}, "score": 0.55}
    near1 = {"trial": 3, "values": {"optim.lr": 0.85, "sync.name": "localsgd"}, "score": 0.1}
    assert c.closest(parents, [near0, near1]) == [(0, 0), (1, 1)]
    assert c.closest(parents, [near1, near0]) == [(0, 1), (1, 0)]
    # deterministic: the better of child and closest parent stays
    c.slots = [parents[0], parents[1], dict(parents[0], trial=8), dict(parents[1], trial=9)]
    c.started = 4
    c._compete({"id": 0, "parents": [0, 1], "children": [dict(near1, done=True),
                                                         dict(near0, done=True)]})
    assert c.slots[0]["trial"] == 2 and c.slots[1]["trial"] == 1  # near0 beat 0; near1 lost to 1
    assert [e["replaced"] for e in c.events] == [True, False]
    assert {e["slot"]: e["child"] for e in c.events} == {0: 2, 1: 3}


def test_probabilistic_crowding_replaces_in_proportion_to_fitness():
    space = parse_space('["optim.lr"]\nrange = [0.0001, 1.0]')
    c = A.Crowding(space, opts(population=2, replacement="probabilistic", seed=5), 10, 10 ** 6)
    child, parent = {"score": 0.75}, {"score": 0.25}
    wins = sum(c.wins(child, parent) for _ in range(4000))
    assert wins / 4000 == pytest.approx(0.75, abs=0.03)
    d = A.Crowding(space, opts(population=2), 10, 10 ** 6)
    assert d.wins({"score": 0.5}, {"score": 0.5}) is False  # a tie keeps the parent
    assert d.wins({"score": None}, {"score": 0.1}) is False


def test_crowding_keeps_niches():
    """Two equally good niches (sync schemes, peaks at different rates): the population
    keeps both while it climbs them."""
    space = parse_space('["optim.lr"]\nrange = [0.0, 1.0]\n["sync.name"]\n'
                        'choice = ["allreduce", "localsgd"]')

    def score(v):  # a peak per scheme, at lr 0.2 for allreduce and 0.8 for localsgd
        centre = 0.2 if v["sync.name"] == "allreduce" else 0.8
        return 1.0 - abs(v["optim.lr"] - centre)

    c = A.Crowding(space, opts(population=8, seed=11, crossover=0.9), 1, 10 ** 6)
    for _ in range(400):
        j = c.ask(10 ** 6)
        assert j != A.WAIT
        c.tell(j, {"status": "ok", "score": score(j["values"])})
    schemes = [s["values"]["sync.name"] for s in c.slots]
    assert 2 <= schemes.count("allreduce") <= 6, schemes
    scores = sorted(s["score"] for s in c.slots)
    assert scores[len(scores) // 2] > 0.95, scores  # the niches climbed to their peaks


# -- every algorithm -------------------------------------------------------------------------

def _drive(algo, n, split_at=None):
    """Runs ``n`` asks and tells with scripted scores; ``split_at`` saves the state there,
    rebuilds the algorithm from JSON and goes on."""
    jobs, pending = [], []
    rng = random.Random(42)
    for i in range(n):
        if split_at == i:
            state = json.loads(json.dumps(algo.state_dict()))
            fresh = type(algo)(algo.space, algo.opts, algo.R, algo.budget, algo.base_seed)
            fresh.load_state_dict(state)
            algo = fresh
        j = algo.ask(10 ** 6)
        if j == A.WAIT or j is None:
            if not pending:
                break
            done = pending.pop(0)
        else:
            jobs.append(json.dumps(j, sort_keys=True))
            pending.append(j)
            if len(pending) < 2:  # two jobs in flight, as with two trial groups
                continue
            done = pending.pop(0)
        algo.tell(done, {"status": "ok", "score": round(rng.random(), 3),
                         "snapshot": f"s{done['trial']}@{done['stop']}" if done["keep"] else None})
    return jobs


@pytest.mark.parametrize("name", sorted(A.ALGORITHMS))
def test_every_algorithm_is_deterministic_from_its_seed_and_resumable(space, name):
    o = opts(seed=5, population=4, interval=3, min_resource=1)
    make = lambda: A.make(name, space, o, 9, 400)  # noqa: E731
    first, second = _drive(make(), 80), _drive(make(), 80)
    assert first == second and len(first) > 10
    assert _drive(make(), 80, split_at=17) == first
    other = A.make(name, space, opts(seed=6, population=4, interval=3, min_resource=1), 9, 400)
    assert _drive(other, 80) != first  # the grid's order is drawn from the seed too
    with pytest.raises(ConfigError, match="--resume"):
        wrong = A.make("random" if name != "random" else "grid", space, o, 9, 400)
        wrong.load_state_dict(make().state_dict())
