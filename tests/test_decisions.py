"""Decisions that no CPU may take differently: the decision log (margins, near ties, first
difference) and second-order runs that do not hinge on the last bit of a norm."""
import math

import pytest
import torch
from mpi4py import MPI

from mltrain.utils.decisions import BOUND_RTOL, TIE_BAND, DecisionLog, first_difference

from conftest import require, same_decisions


def test_margins_near_ties_and_first_difference():
    a, b = DecisionLog(), DecisionLog()
    # f - trial >= eta predicted, on the scale of the operands
    a.record("accept", True, 2.0 - 1.5, 0.1 * 1.0, 2.0 + 1.5 + 0.1)
    a.record("boundary", False, 1.0, 1.0 * (1 + BOUND_RTOL), 1.0, level=1)
    a.record("kappa", False, 1.0, 1.0 + 1e-12, 1.0)  # within round-off: a near tie
    assert [round(d.margin, 9) for d in list(a.entries)[:2]] == [round(0.4 / 3.6, 9),
                                                                 round(-BOUND_RTOL, 9)]
    ties = a.near_ties()
    assert [i for i, _ in ties] == [2] and abs(ties[0][1].margin) < TIE_BAND
    assert a.summary() == {"decisions": 3, "closest_decision": {
        "kind": "kappa", "level": 0, "margin": pytest.approx(1e-12)}}
    for d in list(a.entries)[:2]:
        b.record(d.kind, d.taken, 1.0 if d.taken else 0.0, 0.5, 1.0, d.level)
    assert first_difference(a, b) == "the reference took 3 decisions, the other 2"
    b.record("kappa", True, 1.0, 0.0, 1.0)
    assert "decision 2 differs" in first_difference(a, b)
    assert first_difference(a, a) is None
    # A margin that contradicts the branch taken is a bug of the call site.
    with pytest.raises(ValueError, match="taken=True"):
        DecisionLog().record("accept", True, 0.0, 1.0, 1.0)
    # Non-finite values decide by themselves, far from any tie.
    c = DecisionLog()
    c.record("accept", False, -math.inf, 0.1, math.inf)
    assert c.near_ties() == [] and c.entries[0].margin == -math.inf


# A configuration where the tie is structural: injection and constant prolongation keep
# ||P s|| = ||s|| exactly, and the first coarse step of an excursion lands on a ball whose
# radius is the excursion's bound.
TIED = ["model.name=resnet", "model.depth=16", "model.width=16", "run.dtype=float64",
        "data.partition=strided", "data.shuffle=false", "data.batch_size=48", "run.steps=6",
        "run.threads=1", "optim.name=rmtr", "tr.curvature=lsr1", "multilevel.cf=2",
        "multilevel.levels=2", "multilevel.transfer=injection", "multilevel.prolongation=constant"]


@pytest.mark.parametrize("ulps", [-2, 2])
def test_rmtr_does_not_hinge_on_the_last_bit_of_a_norm(monkeypatch, ulps):
    """Another CPU or BLAS sums a norm in another order and lands a few ulp away. Emulated
    here by scaling every fine-measured norm by (1 + ulps 2^-52): the run must take the same
    decisions, none of them within round-off, and end at the same point."""
    require("petsc4py")
    from mltrain.multilevel.transfers import Transfers

    from test_mgrit import _train

    _, ref, ref_log = _train(TIED, MPI.COMM_SELF, decisions=True)
    boundary = [d for d in ref_log.entries if d.kind == "boundary"]
    # The tie is really there: steps land on the bound to round-off (margin ~ -BOUND_RTOL).
    assert any(abs(d.margin + BOUND_RTOL) < 1e-12 for d in boundary), boundary
    norm = Transfers.norm
    monkeypatch.setattr(Transfers, "norm", lambda self, v: norm(self, v) * (1 + ulps * 2.0**-52))
    _, other, log = _train(TIED, MPI.COMM_SELF, decisions=True)
    same_decisions(MPI.COMM_SELF, ref_log, log, f"norms off by {ulps} ulp")
    assert float((other - ref).norm() / ref.norm()) < 1e-12
