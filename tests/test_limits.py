"""limits.raise_open_files: a thousand connections fit under a low soft limit."""
from __future__ import annotations

import resource

import pytest

from fl.common.limits import raise_open_files


@pytest.fixture
def low_soft_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_what_is_needed(low_soft_limit):
    hard = low_soft_limit
    want = 1200 if hard == resource.RLIM_INFINITY else min(1200, hard)
    assert raise_open_files(1200) == want
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want


def test_a_limit_already_high_enough_is_left_alone(low_soft_limit):
    assert raise_open_files(100) == 256
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256


def test_beyond_the_hard_limit_it_stops_there_and_warns(low_soft_limit, caplog):
    hard = low_soft_limit
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    assert raise_open_files(hard + 1) == hard
    assert "below the" in caplog.text
