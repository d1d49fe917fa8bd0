import pytest

from mltrain.comm.grid import AXES, Grid
from mltrain.config import ConfigError


@pytest.mark.parametrize("world, kw, shape", [
    (1, {}, (1, 1, 1, 1)),
    (12, {}, (1, 12, 1, 1)),
    (12, {"layer": 3}, (1, 4, 1, 3)),
    (24, {"pipe": 2, "layer": 3}, (1, 4, 2, 3)),
    (1024, {"trial": 2, "pipe": 4}, (2, 128, 4, 1)),
])
def test_for_world(world, kw, shape):
    g = Grid.for_world(world, **kw)
    assert g.shape == shape and g.size == world


@pytest.mark.parametrize("world, kw, match", [
    (10, {"layer": 3}, "cannot be split"),
    (8, {"data": 3}, "but the job has 8"),
    (8, {"layer": 0}, "positive"),
])
def test_for_world_errors(world, kw, match):
    with pytest.raises(ConfigError, match=match):
        Grid.for_world(world, **kw)


def test_coords_round_trip_and_layer_fastest():
    g = Grid(trial=2, data=3, pipe=2, layer=5)
    seen = set()
    for r in range(g.size):
        c = g.coords(r)
        assert g.rank_of(**c) == r
        seen.add(tuple(c[a] for a in AXES))
    assert len(seen) == g.size
    assert g.coords(1) == {"trial": 0, "data": 0, "pipe": 0, "layer": 1}
    assert g.coords(5) == {"trial": 0, "data": 0, "pipe": 1, "layer": 0}


def test_axis_ranks_partition_the_world():
    g = Grid(trial=1, data=3, pipe=2, layer=2)
    for ax in AXES:
        groups = {tuple(g.axis_ranks(ax, r)) for r in range(g.size)}
        members = sorted(r for grp in groups for r in grp)
        assert members == list(range(g.size))  # disjoint and complete
        for grp in groups:
            assert len(grp) == getattr(g, ax)
            for i, r in enumerate(grp):
                assert g.coords(r)[ax] == i


def test_bad_coords():
    g = Grid(data=2)
    with pytest.raises(ValueError):
        g.coords(2)
    with pytest.raises(ValueError):
        g.rank_of(data=2)
