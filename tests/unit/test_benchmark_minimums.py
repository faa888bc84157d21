"""
The least times the benchmarks measure their runs against.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from benchmarks.scale import admitted_window_floor, minimum_seconds, window_minimum_seconds


@pytest.mark.parametrize(
    ("predictions", "minimum", "window_minimum"),
    [
        (100, 140.0, 180.0),  # 200 requests: 60 at once, then 1 a second; or 3 full windows
        (200, 340.0, 360.0),
        (30, 6.0, 6.0),  # 60 requests fit in one window: the 10 in flight set the pace
        (1, 2.0, 2.0),  # one prediction takes its latency
    ],
)
def test_the_minimums_of_the_rate_and_of_the_sliding_window(
    predictions: int, minimum: float, window_minimum: float
) -> None:
    assert minimum_seconds(predictions) == minimum
    assert window_minimum_seconds(predictions) == window_minimum


def test_a_sliding_window_never_allows_less_than_one_request_a_second() -> None:
    for predictions in range(1, 400):
        assert window_minimum_seconds(predictions) >= minimum_seconds(predictions)


@pytest.mark.parametrize(
    ("predictions", "requests", "minimum", "window_minimum"),
    [
        (200, 200, 140.0, 180.0),  # synchronous runs: one request each
        (200, 300, 240.0, 240.0),  # 100 mapped (2 each) beside a 100-image batch of runs
        (60, 60, 12.0, 12.0),  # one window's requests: the 10 in flight set the pace
    ],
)
def test_the_minimums_of_synchronous_runs(
    predictions: int, requests: int, minimum: float, window_minimum: float
) -> None:
    assert minimum_seconds(predictions, requests=requests) == minimum
    assert window_minimum_seconds(predictions, requests=requests) == window_minimum


@pytest.mark.parametrize(
    ("admitted", "floor"), [(0, 0.0), (1, 0.0), (60, 0.0), (61, 60.0), (300, 240.0), (302, 300.0)]
)
def test_one_request_past_a_multiple_of_the_rate_costs_a_window(admitted: int, floor: float) -> None:
    assert admitted_window_floor(admitted) == floor
