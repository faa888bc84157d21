"""
Unit tests of the client: the client-side request budget.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import threading

import pytest

from airflow_provider_blip2.client import budget as budget_module
from airflow_provider_blip2.client.budget import (
    RequestBudget,
    budget_for,
)
from airflow_provider_blip2.client.pace import Pace
from airflow_provider_blip2.client.rate_shape import Answer
from tests.unit.client.helpers import (
    FakeClock,
)


# --------------------------------------------------------------------------------------------------
# RequestBudget
# --------------------------------------------------------------------------------------------------
def test_budget_sliding_window() -> None:
    clock = FakeClock()
    budget = RequestBudget(3, 10, window=60.0, clock=clock, rate_limit_shape="window")
    for _ in range(3):  # requests answered 0.5 s after they were reserved, one a second
        assert budget.reserve_request() == 0.0
        clock.advance(0.5)
        budget.request_done()
        clock.advance(0.5)
    # t=1003: requests finished at 1000.5, 1001.5 and 1002.5 fill the window; the first leaves at 1060.5.
    assert budget.reserve_request() == pytest.approx(57.5)
    assert budget.reserve_request() == pytest.approx(57.5)  # a refused request takes no slot
    clock.advance(57.0)
    assert budget.reserve_request() == pytest.approx(0.5)
    clock.advance(0.5)  # t=1060.5: the request finished at 1000.5 no longer counts
    assert budget.reserve_request() == 0.0
    assert budget.reserve_request() == pytest.approx(1.0)  # next to leave: finished at 1001.5
    clock.advance(1.0)
    assert budget.reserve_request() == 0.0
    assert budget.reserve_request() > 0  # two requests still open, one finished at 1002.5


def test_budget_counts_a_request_from_reservation_until_a_window_after_it_finished() -> None:
    clock = FakeClock()
    budget = RequestBudget(1, 10, window=60.0, clock=clock)
    assert budget.reserve_request() == 0.0
    clock.advance(500.0)  # an open request counts however long it takes
    assert budget.reserve_request() > 0
    budget.request_done()  # finished at 1500: counts until 1560
    clock.advance(59.0)
    assert budget.reserve_request() == pytest.approx(1.0)
    clock.advance(1.0)
    assert budget.reserve_request() == 0.0


def test_budget_open_requests_without_finished_ones_ask_again_soon() -> None:
    budget = RequestBudget(2, 10, window=60.0, clock=FakeClock())
    assert budget.reserve_request() == 0.0
    assert budget.reserve_request() == 0.0
    wait = budget.reserve_request()
    assert 0 < wait < 1  # nothing finished yet, so no expiry to wait for: poll again shortly
    budget.request_done()
    assert budget.reserve_request() == pytest.approx(60.0)


def test_budget_request_done_never_goes_below_zero_open() -> None:
    clock = FakeClock()
    budget = RequestBudget(2, 10, window=10.0, clock=clock)
    budget.request_done()  # unmatched: counts as a finished request, frees nothing
    assert budget.reserve_request() == 0.0
    assert budget.reserve_request() > 0
    clock.advance(10.0)
    assert budget.reserve_request() == 0.0


def test_budget_wait_is_never_zero_when_refused() -> None:
    clock = FakeClock()
    budget = RequestBudget(1, 1, window=10.0, clock=clock)
    assert budget.reserve_request() == 0.0
    budget.request_done()
    clock.advance(9.99999999)
    assert budget.reserve_request() > 0


def test_budget_is_thread_safe() -> None:
    clock = FakeClock()
    budget = RequestBudget(25, 10, window=60.0, clock=clock)
    granted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            wait = budget.reserve_request()
            with lock:
                granted.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 80
    assert granted.count(0.0) == 25


def test_budget_in_flight_slots() -> None:
    budget = RequestBudget(100, 2, clock=FakeClock())
    assert budget.reserve_prediction() == 0.0
    assert budget.reserve_prediction() == 0.0
    assert budget.in_flight == 2
    assert budget.reserve_prediction() > 0  # both slots reserved, creates still pending
    budget.prediction_created("a")
    budget.prediction_created("b")
    assert budget.in_flight == 2
    assert budget.reserve_prediction() > 0
    budget.prediction_finished("a")
    assert budget.in_flight == 1
    assert budget.reserve_prediction() == 0.0
    assert budget.in_flight == 2
    budget.prediction_created("c")
    budget.prediction_finished("b")
    budget.prediction_finished("b")  # seeing it finished twice frees one slot only
    budget.prediction_finished("unknown")
    assert budget.in_flight == 1


def test_budget_failed_create_frees_the_slot() -> None:
    budget = RequestBudget(100, 1, clock=FakeClock())
    assert budget.reserve_prediction() == 0.0
    assert budget.reserve_prediction() > 0
    budget.prediction_created(None)
    assert budget.in_flight == 0
    assert budget.reserve_prediction() == 0.0
    budget.prediction_created(None)
    budget.prediction_created(None)  # never goes negative
    assert budget.in_flight == 0


def test_budget_in_flight_ttl() -> None:
    clock = FakeClock()
    budget = RequestBudget(100, 1, in_flight_ttl=10.0, clock=clock)
    assert budget.reserve_prediction() == 0.0
    budget.prediction_created("lost")
    clock.advance(9.0)
    assert budget.reserve_prediction() > 0
    clock.advance(1.0)  # the prediction stops counting after the TTL
    assert budget.reserve_prediction() == 0.0
    assert budget.in_flight == 1


def test_budget_for_is_per_connection_and_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "_BUDGETS", {})
    first = budget_for("conn_a", "https://api.eachlabs.ai", 60, 10)
    assert first.window == 60.0
    assert budget_for("conn_a", "https://api.eachlabs.ai", 60, 10) is first
    assert budget_for("conn_b", "https://api.eachlabs.ai", 60, 10) is not first
    assert budget_for("conn_a", "http://127.0.0.1:1", 60, 10) is not first
    # Changed limits apply to the existing budget (and its state).
    assert first.reserve_request() == 0.0
    updated = budget_for("conn_a", "https://api.eachlabs.ai", 1, 3, 3.0)
    assert updated is first
    assert (first.requests_per_minute, first.max_concurrency, first.window) == (1, 3, 3.0)
    assert first.reserve_request() > 0


def test_budget_slows_down_after_a_429_it_let_through() -> None:
    clock = FakeClock()
    budget = RequestBudget(
        10, 10, window=60.0, clock=clock, pace=Pace(step=0.1, clock=clock), rate_limit_shape="window"
    )
    assert budget.reserve_request() == 0
    budget.request_done(Answer(rate_limited=True))  # the pace halves: 5 requests per window
    for _ in range(4):
        assert budget.reserve_request() == 0
        clock.advance(1.0)
    assert budget.reserve_request() == pytest.approx(56.0)  # until the 429 answer leaves the window
    for _ in range(4):
        budget.request_done()  # answered without a 429: 0.5 -> 0.9
    assert budget.pace.limit(10) == 9
    assert budget.reserve_request() == 0
