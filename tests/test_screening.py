"""screening.py: the norm screen holds, judges by the median of accepted norms, bounds what
it keeps, and holds its documented bound against colluders wherever they report."""
from __future__ import annotations

import math
import random

import pytest

from fl.server.screening import NormScreen


def test_holds_until_hold_reports_then_judges_them_by_their_median():
    s = NormScreen(ratio=4.0, hold=3)
    assert s.offer("evil", 1000.0).accepted == [] and s.held  # no median yet
    assert s.offer("a", 1.0).accepted == []
    out = s.offer("b", 1.2)  # median of (1000, 1, 1.2) = 1.2: bound 4.8
    assert sorted(out.accepted) == ["a", "b"]
    assert [item for item, _ in out.rejected] == ["evil"] and "exceeds 4 x" in out.rejected[0][1]
    assert s.held == [] and s.norms == [1.0, 1.2]  # the refused norm is not kept
    assert s.bound() == math.inf  # two accepted norms: no majority to judge by
    assert s.offer("c", 4.7).accepted == ["c"]  # two accepted norms: no median yet, anything finite passes
    assert s.bound() == 4 * 1.2  # the accepted (1, 1.2, 4.7)
    assert [i for i, _ in s.offer("d", 5.0).rejected] == ["d"]  # 5.0 > 4.8


def test_refused_norms_never_move_the_median():
    """The old screen recorded a refused norm before judging: two refused attackers then
    made the third's median (1 + 1e4) / 2."""
    s = NormScreen(ratio=4.0, hold=3)
    for name in "abc":
        s.offer(name, 1.0)
    for name in ("x", "y", "z"):
        assert [i for i, _ in s.offer(name, 1e4).rejected] == [name]
    assert s.norms == [1.0, 1.0, 1.0] and s.bound() == 4.0


def test_two_updates_are_both_accepted_at_flush():
    s = NormScreen(ratio=4.0, hold=3)
    s.offer("a", 1.0)
    s.offer("b", 1e9)
    out = s.flush()
    assert sorted(out.accepted) == ["a", "b"] and not s.held


def test_flush_judges_held_items_by_the_whole_round():
    s = NormScreen(ratio=3.0, hold=5)
    for name, norm in (("a", 1.0), ("b", 1.1), ("c", 0.9), ("evil", 50.0)):
        assert s.offer(name, norm).accepted == []
    out = s.flush()
    assert sorted(out.accepted) == ["a", "b", "c"] and [i for i, _ in out.rejected] == ["evil"]


def screen_round(order: list[tuple[str, float]], hold: int) -> tuple[set[str], set[str]]:
    """(accepted, refused) names of one round offered in ``order``."""
    s: NormScreen[str] = NormScreen(ratio=4.0, hold=hold)
    verdicts = [s.offer(name, norm) for name, norm in order] + [s.flush()]
    accepted = {i for v in verdicts for i in v.accepted}
    refused = {i for v in verdicts for i, _ in v.rejected}
    assert accepted | refused == {name for name, _ in order} and not accepted & refused
    return accepted, refused


def test_three_attackers_reporting_fourth_to_sixth_among_97_honest_are_refused():
    """The issue's case: with the old screen the third attacker's 1e4 x update was accepted."""
    rng = random.Random(0)
    honest = [(f"h{i}", rng.uniform(1.0, 2.0)) for i in range(97)]
    order = honest[:3] + [(f"a{i}", 1e4 * 1.5) for i in range(3)] + honest[3:]
    accepted, refused = screen_round(order, hold=11)
    assert refused == {"a0", "a1", "a2"} and len(accepted) == 97
    accepted, refused = screen_round(order, hold=3)  # the old default hold: refused too now
    assert refused == {"a0", "a1", "a2"}


@pytest.mark.parametrize("hold", [3, 5, 11])
@pytest.mark.parametrize("size", [5, 12, 40, 200])
def test_the_documented_bound_fewer_than_half_of_hold_attackers_anywhere(hold, size):
    """Module docstring: honest norms within [lo, hi], hi <= ratio x lo, and a < min(hold, n) / 2
    attackers among the round's n reports, at any positions and with any norms (huge, tiny,
    zero, or just under the bound): every honest update is accepted, nothing above ratio x hi is."""
    rng = random.Random(hold * 1000 + size)
    lo, hi = 1.0, 3.9
    attackers = min((hold - 1) // 2, size - 1)  # a < hold / 2 and a < n / 2
    for trial in range(200):
        honest = [(f"h{i}", rng.uniform(lo, hi)) for i in range(size)]
        bad = [(f"a{i}", rng.choice([1e6, 1e4, 4 * hi - 1e-9, 4 * hi * 1.01, 0.0, 1e-9, 15.0]))
               for i in range(attackers)]
        order = honest + bad
        rng.shuffle(order)
        if trial % 4 == 0:  # the attackers first
            order = bad + honest
        norms = dict(order)
        accepted, _ = screen_round(order, hold)
        assert {h for h, _ in honest} <= accepted
        assert max(norms[name] for name in accepted) <= 4 * hi


def test_half_of_the_held_reports_can_set_the_median():
    """The other side of the bound: attackers that are half of the first hold reports decide."""
    order = [("a0", 1e4), ("a1", 1e4), ("h0", 1.0), ("a2", 1e4), ("h1", 1.0)] + [(f"h{i}", 1.0) for i in range(2, 50)]
    accepted, _ = screen_round(order, hold=5)
    assert {"a0", "a1", "a2"} <= accepted  # 3 of the first 5: their median


def test_non_finite_norm_is_rejected_at_once_and_not_counted():
    s = NormScreen(ratio=4.0, hold=3)
    out = s.offer("nan", float("nan"))
    assert out.rejected and s.norms == [] and s.held == []


def test_never_holds_more_than_hold_items():
    s = NormScreen(ratio=4.0, hold=3)
    for i in range(100):
        s.offer(i, 1.0 + (i % 7) / 10)
        assert len(s.held) < 3


def test_zero_median_accepts_everything():
    s = NormScreen(ratio=4.0, hold=3)
    for name in "abc":
        s.offer(name, 0.0)
    assert s.offer("d", 5.0).accepted == ["d"]


@pytest.mark.parametrize("ratio, hold", [(1.0, 3), (0.5, 3), (4.0, 0), (4.0, 2)])
def test_bad_parameters(ratio, hold):
    with pytest.raises(ValueError):
        NormScreen(ratio, hold)
