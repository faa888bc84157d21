"""
Unit tests of the client: the rate limit's shape (the bucket's arithmetic, the lessons, the local
budget past a full window).

Starts: nothing: no server, no Airflow process (the emulator's limiter is used in memory; the
shared budget's scripts are tested against Redis in ``tests/integration/test_shared_budget.py``).
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.budget import RequestBudget
from airflow_provider_blip2.client.rate_shape import BUCKET_GRANTED, PROBE_GRANTED, Answer
from airflow_provider_blip2.emulator.state import RateLimiter
from tests.unit.client.helpers import FakeClock


def _fill(budget: RequestBudget, count: int) -> None:
    """``count`` requests within the window, each answered at once."""
    for _ in range(count):
        assert budget.reserve_request() == 0.0
        budget.request_done()


def test_the_bucket_admits_one_request_an_interval_after_a_burst_with_one_of_margin() -> None:
    # 60 a minute: one token a second. 60 requests answered at t=0 push the arrival time to 60.
    tat = 0.0
    for _ in range(60):
        tat = rate_shape.after_answer(tat, 0.0, 60, 60.0)
    assert tat == pytest.approx(60.0)
    assert rate_shape.bucket_wait(tat, 0.0, 0, 60, 60.0) == pytest.approx(2.0)  # the margin's token
    assert rate_shape.bucket_wait(tat, 2.0, 0, 60, 60.0) == pytest.approx(0.0)
    assert rate_shape.bucket_wait(tat, 2.0, 1, 60, 60.0) == pytest.approx(1.0)  # an open one counts


@pytest.mark.parametrize(
    ("answer", "mode", "lesson"),
    [
        (Answer(PROBE_GRANTED), "auto", "bucket"),
        (Answer(PROBE_GRANTED, rate_limited=True), "auto", "window"),
        (Answer(PROBE_GRANTED, conclusive=False), "auto", None),
        (Answer(BUCKET_GRANTED, rate_limited=True), "auto", "window"),
        (Answer(BUCKET_GRANTED), "auto", None),
        (Answer(0.0, rate_limited=True), "auto", None),
        (Answer(PROBE_GRANTED), "window", None),
        (Answer(BUCKET_GRANTED, rate_limited=True), "bucket", None),
    ],
)
def test_what_an_answer_teaches(answer: Answer, mode: str, lesson: str | None) -> None:
    assert answer.lesson(mode) == lesson


def test_answers_from_http_statuses() -> None:
    assert Answer.of(PROBE_GRANTED, 429) == Answer(PROBE_GRANTED, True, True)
    assert Answer.of(0.0, 200) == Answer(0.0, False, True)
    assert Answer.of(0.0, 503) == Answer(0.0, False, False)
    assert Answer.of(0.0, None) == Answer(0.0, False, False)


def _probing(clock: FakeClock) -> RequestBudget:
    """A budget at 10 a minute whose full window has just granted the probe."""
    budget = RequestBudget(10, 10, window=60.0, clock=clock)
    _fill(budget, 10)
    clock.advance(12.0)  # the bucket has won a token back, and one of margin
    assert budget.reserve_request() == PROBE_GRANTED
    return budget


def test_auto_probes_once_then_paces_by_the_bucket_it_found() -> None:
    clock = FakeClock()
    budget = _probing(clock)
    assert budget.reserve_request() > 0  # one probe at a time
    assert budget.request_done(Answer(PROBE_GRANTED)) == "bucket"
    assert budget.notes.recall(rate_shape.NOTE) == "bucket"
    clock.advance(6.0)
    assert budget.reserve_request() == BUCKET_GRANTED
    assert budget.request_done(Answer(BUCKET_GRANTED)) is None
    assert budget.reserve_request() == pytest.approx(6.0)  # the next token
    assert budget.pace.share == 1.0


def test_a_probe_answered_429_keeps_the_window_for_an_hour_without_slowing_the_pace() -> None:
    clock = FakeClock()
    budget = _probing(clock)
    assert budget.request_done(Answer(PROBE_GRANTED, rate_limited=True)) == "window"
    assert budget.pace.share == 1.0
    clock.advance(6.0)
    assert budget.reserve_request() == pytest.approx(42.0)  # the window's wait, and no other probe
    clock.advance(rate_shape.REMEMBER_SECONDS)
    assert budget.notes.recall(rate_shape.NOTE) is None


def test_an_inconclusive_probe_lets_another_request_probe() -> None:
    clock = FakeClock()
    budget = _probing(clock)
    assert budget.request_done(Answer(PROBE_GRANTED, conclusive=False)) is None
    clock.advance(6.0)
    assert budget.reserve_request() == PROBE_GRANTED


@pytest.mark.parametrize("shape", ["window", "bucket"])
def test_a_named_shape_never_probes_and_never_learns(shape: str) -> None:
    clock = FakeClock()
    budget = RequestBudget(10, 10, window=60.0, clock=clock, rate_limit_shape=shape)
    _fill(budget, 10)
    clock.advance(12.0)
    granted = budget.reserve_request()
    assert granted == (BUCKET_GRANTED if shape == "bucket" else pytest.approx(48.0))
    if shape == "bucket":
        assert budget.request_done(Answer(BUCKET_GRANTED, rate_limited=True)) is None
        assert budget.notes.recall(rate_shape.NOTE) is None


def test_the_bucket_counts_requests_handed_over_by_another_process() -> None:
    clock = FakeClock()
    worker = RequestBudget(10, 10, window=60.0, clock=clock, rate_limit_shape="bucket")
    _fill(worker, 10)
    triggerer = RequestBudget(10, 10, window=60.0, clock=clock, rate_limit_shape="bucket")
    triggerer.note_requests(worker.recent_requests())
    assert triggerer.reserve_request() == pytest.approx(12.0, abs=0.01)


def test_the_bucket_the_budget_keeps_is_never_ahead_of_the_emulators() -> None:
    # The budget's grants in bucket mode, each answered 0.3 s after it was sent, are all admitted
    # by the emulator's token bucket at the moment they are sent.
    clock = FakeClock()
    budget = RequestBudget(20, 20, window=60.0, clock=clock, rate_limit_shape="bucket")
    server = RateLimiter()
    admitted = 0
    while clock() < 1000 + 200:
        wait = budget.reserve_request()
        if wait > 0:
            clock.advance(wait)
            continue
        assert server.acquire("k", clock(), 20, 60.0, "bucket") is None
        admitted += 1
        clock.advance(0.3)
        budget.request_done()
    assert 20 + 200 / 3 - 3 <= admitted <= 20 + 200 / 3


def test_no_probe_while_the_apis_window_may_have_room() -> None:
    # Ten requests sent one a second, each answered 5 s later: from t=60.5 the API, which counts
    # them from their arrival, may already have room where the budget still counts ten. A probe
    # admitted then would prove nothing, so none goes out; a bucket would admit it.
    clock = FakeClock(0.0)
    budget = RequestBudget(10, 10, window=60.0, clock=clock)
    for _ in range(10):
        assert budget.reserve_request() == 0.0
        clock.advance(1.0)
    clock.advance(4.0)
    for _ in range(10):
        budget.request_done()
    clock.now = 60.5
    assert budget.reserve_request() == pytest.approx(min(rate_shape.PROBE_WAIT, 14.0 - 0.5))
    clock.now = 62.0
    assert 0 < budget.reserve_request() <= rate_shape.PROBE_WAIT
