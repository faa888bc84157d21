"""
Unit tests of the client: the synchronous run's wire format, the notes, the choice between run and
poll, and the learned timing of first reads. Starts nothing (no server, no Airflow).
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_blip2.client.errors import Blip2BadRequestError, Blip2SyncRunUnavailableError
from airflow_provider_blip2.client.inputs import build_prediction_input
from airflow_provider_blip2.client.models import PredictionStatus
from airflow_provider_blip2.client.notes import LocalNotes
from airflow_provider_blip2.client.sync_run import (
    OFFERED,
    PROBING,
    REFUSED,
    SyncRunChoice,
    next_step,
)
from airflow_provider_blip2.client.timing import MIN_DELAY, STEP_UP, FirstReadTiming
from airflow_provider_blip2.client.wire import (
    RUN_PATH,
    build_create_body,
    check_response,
    is_sync_run_refusal,
    parse_run_response,
    run_prediction_request,
)
from tests.unit.client.helpers import IMAGE, FakeClock, response


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: Any) -> None:
        self.warnings.append(message % args)


def _run_request() -> Any:
    body = build_create_body(build_prediction_input(IMAGE, caption=True), model="blip-2", version="0.0.1")
    return run_prediction_request(body, wait=42.0)


def test_a_run_request_is_a_create_with_the_create_body_and_its_own_wait() -> None:
    request = _run_request()
    assert (request.method, request.path, request.creates, request.timeout) == ("POST", RUN_PATH, True, 42.0)
    assert request.json_body is not None and request.json_body["input"]["image"] == IMAGE


def test_a_run_answer_that_ended_is_a_finished_prediction() -> None:
    answer = response(
        200,
        {
            "status": "success",
            "message": "Prediction completed successfully",
            "predictionID": "p-1",
            "output": "a cat on a sofa",
            "error": "",
        },
    )
    prediction = parse_run_response(answer)
    assert (prediction.id, prediction.status, prediction.output) == (
        "p-1",
        PredictionStatus.SUCCEEDED,
        "a cat on a sofa",
    )
    assert prediction.outcome().error is None


def test_a_failed_run_carries_its_user_facing_error() -> None:
    answer = response(
        200, {"status": "error", "predictionID": "p-2", "output": None, "error": "image unreadable"}
    )
    outcome = parse_run_response(answer).outcome()
    assert (outcome.status, outcome.error, outcome.prediction_id) == ("error", "image unreadable", "p-2")


def test_a_run_answer_still_running_is_a_prediction_to_poll() -> None:
    prediction = parse_run_response(response(200, {"status": "processing", "predictionID": "p-3"}))
    assert prediction.status is PredictionStatus.RUNNING and prediction.id == "p-3"


@pytest.mark.parametrize(
    ("status", "body", "refusal"),
    [
        (400, {"error": "Synchronous execution is not enabled for model blip-2"}, True),
        (400, {"error": "model does not support sync run"}, True),
        (400, {"error": "This model is unsupported by this endpoint"}, True),
        (400, {}, True),
        (400, b"", True),
        (404, {"error": "not found"}, True),
        (405, b"", True),
        (400, {"error": "invalid input: image must be a URL"}, False),
        (400, {"error": "field 'temperature' must be between 0.5 and 1.0"}, False),
        (400, {"error": "image format not supported"}, False),
        (401, {"error": "invalid API key"}, False),
        (500, {}, False),
    ],
)
def test_a_refusal_of_the_synchronous_run_is_told_apart_from_an_input_error(
    status: int, body: Any, refusal: bool
) -> None:
    assert is_sync_run_refusal(response(status, body)) is refusal


def test_check_response_raises_the_refusal_only_for_the_run_endpoint() -> None:
    refused = response(400, {"error": "Synchronous execution is not enabled for model blip-2"})
    with pytest.raises(Blip2SyncRunUnavailableError, match="no synchronous run"):
        check_response(_run_request(), refused)
    with pytest.raises(Blip2BadRequestError) as raised:
        check_response(_run_request(), response(400, {"error": "invalid input: image is required"}))
    assert not isinstance(raised.value, Blip2SyncRunUnavailableError)


def test_local_notes_expire_and_only_if_absent_writes_once() -> None:
    clock = FakeClock()
    notes = LocalNotes(clock)
    assert notes.remember("n", "a", 10, only_if_absent=True)
    assert not notes.remember("n", "b", 10, only_if_absent=True)
    assert notes.recall("n") == "a"
    clock.now += 11
    assert notes.recall("n") is None
    assert notes.remember("n", "c", 10, only_if_absent=True)
    notes.forget("n")
    assert notes.recall("n") is None


@pytest.mark.parametrize(
    ("mode", "note", "step"),
    [
        ("poll", None, "poll"),
        ("poll", OFFERED, "poll"),
        ("run", REFUSED, "run"),
        ("auto", None, "probe"),
        ("auto", PROBING, "wait"),
        ("auto", OFFERED, "run"),
        ("auto", REFUSED, "poll"),
    ],
)
def test_the_next_step_follows_the_mode_then_what_is_known(mode: str, note: str | None, step: str) -> None:
    assert next_step(mode, note) == step


def test_auto_probes_once_remembers_a_refusal_and_logs_it_once() -> None:
    notes, log = LocalNotes(), _Log()
    choice = SyncRunChoice("auto", notes, "blip-2", log)
    assert choice.decide() is True  # the probe
    assert notes.recall("sync_run:blip-2") == PROBING
    choice.answered(offered=False)
    assert choice.decide() is False and choice.worth_trying() is False
    assert len(log.warnings) == 1 and "no synchronous run for model 'blip-2'" in log.warnings[0]


def test_a_probe_that_got_no_answer_lets_the_next_prediction_probe_again() -> None:
    notes = LocalNotes()
    choice = SyncRunChoice("auto", notes, "blip-2", _Log())
    assert choice.decide() is True
    choice.answered(offered=None)
    assert notes.recall("sync_run:blip-2") is None
    assert choice.decide() is True


async def test_the_async_choice_shares_the_notes_of_the_sync_one() -> None:
    notes = LocalNotes()
    choice = SyncRunChoice("auto", notes, "blip-2", _Log())
    assert await choice.adecide() is True
    await choice.aanswered(offered=True)
    assert notes.recall("sync_run:blip-2") == OFFERED
    assert choice.decide() is True


def test_a_forced_mode_remembers_nothing() -> None:
    notes = LocalNotes()
    SyncRunChoice("run", notes, "blip-2", _Log()).answered(offered=False)
    assert notes.recall("sync_run:blip-2") is None


def test_first_reads_start_at_the_poll_interval_and_learn_from_early_and_late_reads() -> None:
    notes = LocalNotes()
    timing = FirstReadTiming(notes, "blip-2", poll_interval=2.0)
    assert timing.delay() == 2.0
    assert timing.learn(2.0, ended_at_first_read=False, predict_time=None) == 2.0 + STEP_UP
    assert timing.delay() == 2.0 + STEP_UP
    shorter = timing.learn(2.5, ended_at_first_read=True, predict_time=1.0)
    assert 2.0 < shorter < 2.5
    # Never below what the model itself ran, nor below the floor.
    assert timing.learn(2.0, ended_at_first_read=True, predict_time=2.4) == 2.4
    assert FirstReadTiming(notes, "blip-2", 0.01).learn(
        0.0, ended_at_first_read=True, predict_time=None
    ) == pytest.approx(min(MIN_DELAY, 0.1))


def test_learned_first_reads_settle_near_the_service_latency() -> None:
    """Against a service that always takes 3 s, the delay ends near 3 s with few early reads."""
    timing = FirstReadTiming(LocalNotes(), "blip-2", poll_interval=2.0)
    early = 0
    for _ in range(500):
        delay = timing.delay()
        ended = delay >= 3.0
        early += not ended
        timing.learn(delay, ended_at_first_read=ended, predict_time=2.7)
    assert 3.0 <= timing.delay() < 3.5
    assert early / 500 < 0.1


def test_a_url_with_a_query_is_sealed_with_the_api_key_and_only_that_key_opens_it() -> None:
    from airflow_provider_blip2.client.errors import Blip2InputError
    from airflow_provider_blip2.client.sealing import SEALED_PREFIX, seal, unseal
    from tests.unit.client.helpers import SECRET, SIGNED_IMAGE

    sealed = seal(SIGNED_IMAGE, "key-1")
    assert sealed.startswith(SEALED_PREFIX) and SECRET not in sealed and "images.example.com" not in sealed
    assert unseal(sealed, "key-1") == SIGNED_IMAGE
    with pytest.raises(Blip2InputError, match="sealed image URL could not be opened"):
        unseal(sealed, "key-2")
    for plain in (IMAGE, "s3://bucket/a.jpg", "gs://bucket/b.png"):
        assert seal(plain, "key-1") == plain == unseal(plain, "key-1")
