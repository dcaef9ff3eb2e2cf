"""screening.py: the norm screen holds, judges by the median, and bounds what it keeps."""
from __future__ import annotations

import math

import pytest

from fl.server.screening import NormScreen


def test_holds_until_three_norms_then_judges_all_by_the_median():
    s = NormScreen(ratio=4.0, hold=3)
    assert s.offer("evil", 1000.0).accepted == [] and s.held  # no median yet
    assert s.offer("a", 1.0).accepted == []
    out = s.offer("b", 1.2)  # median of (1000, 1, 1.2) = 1.2: bound 4.8
    assert sorted(out.accepted) == ["a", "b"]
    assert [item for item, _ in out.rejected] == ["evil"] and "exceeds 4 x" in out.rejected[0][1]
    assert s.held == []
    assert s.offer("c", 4.7).accepted == ["c"]  # median of (1000, 1, 1.2, 4.7) = 2.95: bound 11.8
    assert [i for i, _ in s.offer("d", 20.0).rejected] == ["d"]  # median of the five = 4.7: bound 18.8


def test_bound_follows_the_median_of_everything_seen():
    s = NormScreen(ratio=2.0, hold=1)
    s.offer("a", 1.0)
    s.offer("b", 2.0)
    assert s.bound() == math.inf  # fewer than three norms: no majority to judge by
    s.offer("c", 3.0)
    assert s.bound() == 4.0  # 2 x median(1, 2, 3)


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


def test_non_finite_norm_is_rejected_at_once_and_not_counted():
    s = NormScreen(ratio=4.0)
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


@pytest.mark.parametrize("ratio, hold", [(1.0, 3), (0.5, 3), (4.0, 0)])
def test_bad_parameters(ratio, hold):
    with pytest.raises(ValueError):
        NormScreen(ratio, hold)
