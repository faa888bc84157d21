"""Unit tests of the spending cap's rule: what was spent, the estimate, how many may start. Starts nothing."""

from __future__ import annotations

import pytest

from airflow_provider_blip2.batch import BatchItem, BatchState
from airflow_provider_blip2.batch.spending import affordable, capped, needs_unit_cost, spent, unit_cost
from airflow_provider_blip2.client.models import PredictionOutcome


def _state(n: int = 20) -> BatchState:
    return BatchState(items=[BatchItem(f"/i/{i}.jpg", "caption", "") for i in range(n)], started_at=0.0)


def test_without_a_cap_nothing_is_limited() -> None:
    assert affordable(_state(), None) is None and not capped(_state(), None)


def test_with_no_estimate_one_prediction_at_a_time() -> None:
    state = _state()
    assert affordable(state, 0.0055) == 1
    state.created[0] = ("p0", 1e12)
    assert affordable(state, 0.0055) == 0 and not capped(state, 0.0055)  # one in flight: wait for it


def test_the_cached_estimate_reserves_what_is_in_flight() -> None:
    state = _state()
    state.unit_cost = 0.0011
    assert affordable(state, 0.0055) == 5  # 5 x 0.0011 fits exactly
    state.created.update({0: ("p0", 1e12), 1: ("p1", 1e12)})
    assert affordable(state, 0.0055) == 3


def test_reported_costs_win_over_the_estimate_and_cached_items_cost_nothing() -> None:
    state = _state()
    state.unit_cost = 0.01
    state.finished[0] = PredictionOutcome("success", output="a", prediction_id="p0", cost=0.002)
    state.finished[1] = PredictionOutcome("success", output="b", prediction_id="p1", cost=0.002)
    state.finished[2] = PredictionOutcome("success", output="c", prediction_id="old")
    state.cached[2] = 0.5
    assert unit_cost(state) == pytest.approx(0.002)
    assert spent(state, unit_cost(state)) == pytest.approx(0.004)
    assert affordable(state, 0.01) == 3


def test_unreported_costs_and_ambiguous_creates_count_the_estimate() -> None:
    state = _state()
    state.finished[0] = PredictionOutcome("success", output="a", prediction_id="p0")  # a synchronous run
    assert needs_unit_cost(state)
    state.unit_cost = 0.001
    state.finished[1] = PredictionOutcome(PredictionOutcome.AMBIGUOUS, error="sent, no answer")
    state.finished[2] = PredictionOutcome("error", error="upload failed")  # never created: free
    assert not needs_unit_cost(state)
    assert spent(state, 0.001) == pytest.approx(0.002)


def test_a_batch_stops_when_nothing_is_in_flight_and_nothing_fits() -> None:
    state = _state(3)
    state.unit_cost = 0.001
    state.finished[0] = PredictionOutcome("success", output="a", prediction_id="p0", cost=0.001)
    assert not capped(state, 0.002)
    assert capped(state, 0.0015)
    state.finished[1] = PredictionOutcome("success", output="b", prediction_id="p1", cost=0.001)
    state.finished[2] = PredictionOutcome("success", output="c", prediction_id="p2", cost=0.001)
    assert not capped(state, 0.0015)  # done: nothing pending
