"""
Unit tests of the client: the pace of a budget, slower after an unexpected 429.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.client.pace import Pace
from tests.unit.client.helpers import FakeClock


def test_pace_halves_once_per_cooldown_and_recovers_gradually() -> None:
    clock = FakeClock()
    pace = Pace(floor=0.1, step=0.1, cooldown=2.0, clock=clock)
    assert pace.limit(60) == 60
    pace.answered(rate_limited=True)
    pace.answered(rate_limited=True)  # the same burst: counted once
    assert pace.limit(60) == 30
    clock.advance(2.0)
    pace.answered(rate_limited=True)
    assert pace.limit(60) == 15
    for _ in range(3):
        pace.answered(rate_limited=False)
    assert pace.share == pytest.approx(0.55)
    for _ in range(20):
        pace.answered(rate_limited=False)
    assert pace.limit(60) == 60


def test_pace_keeps_a_floor_and_at_least_one_request() -> None:
    clock = FakeClock()
    pace = Pace(floor=0.1, cooldown=0.0, clock=clock)
    for _ in range(20):
        pace.answered(rate_limited=True)
    assert pace.share == 0.1
    assert pace.limit(60) == 6
    assert pace.limit(5) == 1
