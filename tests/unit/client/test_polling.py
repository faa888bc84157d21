"""
Unit tests of the client: the one polling rule (PredictionWatch).

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
)
from airflow_provider_blip2.client.models import Prediction, PredictionOutcome, parse_prediction
from airflow_provider_blip2.client.polling import DEADLINE_PASSED, PERSISTENT_ERROR_LIMIT, PredictionWatch
from tests.unit.client.helpers import FakeClock

LOG = logging.getLogger(__name__)


def watch(clock: FakeClock, **kwargs: Any) -> PredictionWatch:
    settings: dict[str, Any] = {"poll_interval": 2.0, "end_time": clock.now + 60, "log": LOG, "clock": clock}
    settings.update(kwargs)
    return PredictionWatch("p", **settings)


def prediction(status: str, **fields: Any) -> Prediction:
    return parse_prediction({"id": "p", "status": status, **fields}, prediction_id="p")


def test_first_read_is_a_poll_interval_away_unless_given() -> None:
    clock = FakeClock()
    assert watch(clock).seconds_until_due() == 2.0
    assert watch(clock, first_read_at=clock.now + 0.5).seconds_until_due() == 0.5
    assert watch(clock, first_read_at=clock.now - 5).seconds_until_due() == 0.0


def test_reads_are_a_poll_interval_apart_and_never_past_the_deadline() -> None:
    clock = FakeClock()
    w = watch(clock, end_time=clock.now + 3)
    clock.advance(2)
    assert w.observe(prediction("processing")) is None
    assert w.last_read_at == clock.now
    assert w.seconds_until_due() == 1.0  # the deadline comes before the next read


def test_watches_due_together_spread_out_as_their_reads_end() -> None:
    clock = FakeClock()
    watches = [watch(clock) for _ in range(3)]
    clock.advance(2)  # all three due at once; the loop answers them one after another
    for w in watches:
        clock.advance(0.1)
        w.observe(prediction("processing"))
    due = [w.next_read_at - clock.now for w in watches]
    assert due == pytest.approx([1.8, 1.9, 2.0])  # a poll interval after each read ended


def test_terminal_prediction_ends_the_wait_with_its_outcome() -> None:
    clock = FakeClock()
    w = watch(clock)
    outcome = w.observe(prediction("success", output="a cat", metrics={"predict_time": 1.2}))
    assert outcome == PredictionOutcome("success", output="a cat", prediction_id="p", predict_time=1.2)
    assert w.outcome == outcome


@pytest.mark.parametrize("status", ["error", "failed", "cancelled", "canceled", "succeeded", "completed"])
def test_every_terminal_spelling_ends_the_wait(status: str) -> None:
    assert watch(FakeClock()).observe(prediction(status)) is not None


@pytest.mark.parametrize("status", ["created", "starting", "processing", "queued", "warming_up", None])
def test_running_and_unknown_statuses_keep_waiting(status: str | None) -> None:
    assert watch(FakeClock()).observe(prediction(status)) is None  # type: ignore[arg-type]


def test_deadline_gives_a_timeout_outcome() -> None:
    clock = FakeClock()
    w = watch(clock, end_time=clock.now + 10)
    assert w.expire() is None
    clock.advance(10)
    assert w.expire() == PredictionOutcome("timeout", error=DEADLINE_PASSED, prediction_id="p")


@pytest.mark.parametrize(
    "error",
    [
        Blip2ServerError("boom", status_code=503),
        Blip2RateLimitError("slow down", status_code=429),
        Blip2TransportError("reset", sent=True),
        Blip2Error("odd", status_code=418),
    ],
)
def test_transient_errors_never_end_the_wait(error: Blip2Error) -> None:
    w = watch(FakeClock())
    for _ in range(PERSISTENT_ERROR_LIMIT * 3):
        assert w.observe(error) is None


@pytest.mark.parametrize(
    "error", [Blip2NotFoundError("gone", status_code=404), Blip2AuthenticationError("no", status_code=401)]
)
def test_persistent_errors_end_the_wait_after_the_limit_in_a_row(error: Blip2Error) -> None:
    w = watch(FakeClock())
    for _ in range(PERSISTENT_ERROR_LIMIT - 1):
        assert w.observe(error) is None
    outcome = w.observe(error)
    assert outcome is not None
    assert outcome.status == "error"
    assert outcome.prediction_id == "p"
    assert str(error) in (outcome.error or "")


def test_a_good_read_or_a_transient_error_resets_the_count() -> None:
    w = watch(FakeClock())
    missing = Blip2NotFoundError("gone", status_code=404)
    for interruption in (prediction("processing"), Blip2ServerError("boom", status_code=500)):
        for _ in range(PERSISTENT_ERROR_LIMIT - 1):
            assert w.observe(missing) is None
        assert w.observe(interruption) is None
    assert w.observe(missing) is None


def test_invalid_input_ends_the_wait_at_once() -> None:
    outcome = watch(FakeClock()).observe(Blip2InputError("prediction_id must be ..."))
    assert outcome is not None and outcome.status == "error"


def test_read_passes_results_and_errors_to_the_rule() -> None:
    w = watch(FakeClock())

    def missing(prediction_id: str) -> Prediction:
        raise Blip2NotFoundError(f"{prediction_id} gone", status_code=404)

    outcomes = [w.read(missing) for _ in range(PERSISTENT_ERROR_LIMIT)]
    assert outcomes[:-1] == [None] * (PERSISTENT_ERROR_LIMIT - 1)
    assert outcomes[-1] is not None and "p gone" in (outcomes[-1].error or "")


async def test_aread_is_the_same_rule() -> None:
    w = watch(FakeClock())

    async def done(prediction_id: str) -> Prediction:
        return prediction("success", output="ok")

    outcome = await w.aread(done)
    assert outcome is not None and outcome.output == "ok"
