"""
Tests of Blip2Hook over real HTTP against the API emulator on loopback (no mocked HTTP).

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2InputError,
    Blip2NotFoundError,
    Blip2PredictionFailedError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
)
from airflow_provider_blip2.client.inputs import DEFAULT_QUESTION
from airflow_provider_blip2.client.models import Prediction, PredictionStatus
from airflow_provider_blip2.client.retry import RetryPolicy
from airflow_provider_blip2.client.wire import ApiRequest
from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.hooks import event_loop
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from tests.conftest import API_KEY, FAST_RETRIES, connection_json, requires_airflow_3_3

pytestmark = pytest.mark.usefixtures("fresh_budgets")

POLL = 0.02
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# A time scale for the rate-limit tests: the emulator's 60 s window lasts 0.6 s.
RATE_TIME_SCALE = 0.01
RATE_WINDOW = 60 * RATE_TIME_SCALE

StartEmulator = Callable[..., EmulatorServer]
ImageUrl = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """FAST_RETRIES that records every retry decision and may run a callback on each failure."""

    failures: list[BaseException] = dataclasses.field(default_factory=list, compare=False)
    on_failure: Callable[[BaseException], None] | None = dataclasses.field(default=None, compare=False)

    def should_retry(self, error: BaseException, request: ApiRequest) -> bool:
        self.failures.append(error)
        if self.on_failure is not None:
            self.on_failure(error)
        return super().should_retry(error, request)


def recording_policy(**overrides: Any) -> RecordingPolicy:
    """A RecordingPolicy with FAST_RETRIES' settings, optionally overridden."""
    settings = {**dataclasses.asdict(FAST_RETRIES), **overrides}
    return RecordingPolicy(**settings)


@pytest.fixture
def make_hook() -> Iterator[Callable[..., Blip2Hook]]:
    """``make_hook(conn_id, policy)`` -> a Blip2Hook whose HTTP session is closed after the test."""
    hooks: list[Blip2Hook] = []

    def make(conn_id: str = "blip2_default", policy: RetryPolicy = FAST_RETRIES) -> Blip2Hook:
        hook = Blip2Hook(conn_id, retry_policy=policy)
        hooks.append(hook)
        return hook

    yield make
    for hook in hooks:
        hook.close()


def add_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, url: str, **kwargs: Any) -> str:
    """Define connection ``conn_id`` through ``AIRFLOW_CONN_<ID>``; returns the conn id."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection_json(url, **kwargs))
    return conn_id


def closed_port_url() -> str:
    """A loopback URL where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def total_requests(server: EmulatorServer) -> int:
    return sum(server.ledger()["requests"].values())


# --------------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------------
def test_caption_create_and_wait(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"), caption=True)
    assert re.fullmatch(UUID_PATTERN, prediction_id)
    prediction = hook.wait_for_prediction(prediction_id, poll_interval=POLL, timeout=10)
    assert prediction.prediction_id == prediction_id
    assert prediction.succeeded
    assert prediction.output is not None and prediction.output.startswith("[emulated] a ")
    assert "question" not in prediction.output
    ledger = emulator.ledger()
    assert ledger["creates"] == 1
    assert ledger["creates_by_input"] == {"chelsea.jpg|caption": 1}
    assert ledger["statuses"]["success"] == 1


def test_question_create_and_wait(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    prediction_id = hook.create_prediction(
        image_url("astronaut.jpg"),
        question="Where is the flag?",
        context="Question: Who is this? Answer: an astronaut.",
        temperature="0.7",
        use_nucleus_sampling=True,
    )
    prediction = hook.wait_for_prediction(prediction_id, poll_interval=POLL, timeout=10)
    assert prediction.succeeded
    assert prediction.output is not None
    assert prediction.output.startswith("[emulated]")
    assert "(question: Where is the flag?)" in prediction.output
    sent = hook.get_prediction(prediction_id).raw["input"]
    assert sent["question"] == "Where is the flag?"
    assert sent["context"] == "Question: Who is this? Answer: an astronaut."
    assert sent["temperature"] == 0.7
    assert sent["use_nucleus_sampling"] is True
    assert emulator.ledger()["creates_by_input"] == {"astronaut.jpg|Where is the flag?": 1}


@pytest.mark.parametrize(
    ("image", "inputs", "label"),
    [
        ("coffee.png", {}, DEFAULT_QUESTION),
        ("rocket.webp", {"question": ""}, "caption"),
        ("chelsea.jpg", {"question": "What color is the cat?"}, "What color is the cat?"),
    ],
)
def test_run_returns_the_successful_prediction(
    emulator: EmulatorServer,
    blip2_connection: str,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
    image: str,
    inputs: dict[str, Any],
    label: str,
) -> None:
    prediction = make_hook(blip2_connection).run(image_url(image), poll_interval=POLL, timeout=10, **inputs)
    assert prediction.succeeded
    assert prediction.output is not None and prediction.output.startswith("[emulated]")
    assert emulator.ledger()["creates_by_input"] == {f"{image}|{label}": 1}


def test_get_prediction_fields(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(latency=10)  # 0.5 s
    hook = make_hook(add_connection(monkeypatch, "blip2_fields", server.url))
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    running = hook.get_prediction(prediction_id)
    assert running.status is PredictionStatus.RUNNING
    assert running.raw_status in {"created", "processing"}
    assert running.output is None and running.error is None
    assert running.predict_time == 0.0
    assert hook.budget().in_flight == 1
    outcome = hook.wait_for_prediction(prediction_id, poll_interval=POLL, timeout=10)
    done = hook.get_prediction(prediction_id)
    assert done.status is PredictionStatus.SUCCEEDED
    assert done.raw_status == "success"
    assert done.predict_time is not None and 0.3 < done.predict_time < 2.0
    assert done.raw["metrics"]["cost"] > 0
    assert done.error is None and done.error_code is None
    assert outcome == done.outcome()
    assert outcome.status == "success"
    assert hook.budget().in_flight == 0  # seen finished: the slot is free


def test_cancel_a_running_prediction(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(latency=100)  # 5 s: still running when cancelled
    hook = make_hook(add_connection(monkeypatch, "blip2_cancel", server.url))
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    assert hook.get_prediction(prediction_id).status is PredictionStatus.RUNNING
    hook.cancel_prediction(prediction_id)
    assert hook.budget().in_flight == 0
    prediction = hook.get_prediction(prediction_id)
    assert prediction.status is PredictionStatus.CANCELLED
    assert prediction.raw_status == "cancelled"
    assert prediction.output is None
    ledger = server.ledger()
    assert ledger["statuses"]["cancelled"] == 1
    assert ledger["in_flight"] == 0
    with pytest.raises(Blip2PredictionFailedError, match="ended cancelled"):
        prediction.raise_for_status()
    hook.cancel_prediction(prediction_id)  # cancelling a finished prediction is a harmless no-op
    assert hook.get_prediction(prediction_id).status is PredictionStatus.CANCELLED


def test_wait_for_prediction_timeout(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(latency=100)
    hook = make_hook(add_connection(monkeypatch, "blip2_slow", server.url))
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    started = time.monotonic()
    outcome = hook.wait_for_prediction(prediction_id, poll_interval=0.05, timeout=0.3)
    elapsed = time.monotonic() - started
    # The deadline is on the wall clock, measured here on the monotonic one: they may differ by ms.
    assert 0.25 <= elapsed < 10.0
    assert outcome.status == "timeout"
    assert outcome.prediction_id == prediction_id
    assert outcome.error == "the prediction did not finish before the deadline"
    assert prediction_id in outcome.failure_message()
    assert server.ledger()["requests"]["get"] >= 3


# --------------------------------------------------------------------------------------------------
# Failed predictions and refused requests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "error_code"),
    [
        ("missing.jpg?X-Amz-Signature=deadbeefcafe", "INPUT_DOWNLOAD_ERROR"),
        ("not-an-image.jpg", "INPUT_VALIDATION_ERROR"),
    ],
)
def test_failed_prediction(
    emulator: EmulatorServer,
    blip2_connection: str,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
    image: str,
    error_code: str,
) -> None:
    hook = make_hook(blip2_connection)
    prediction_id = hook.create_prediction(image_url(image), caption=True)
    prediction = hook.wait_for_prediction(prediction_id, poll_interval=POLL, timeout=10)
    assert prediction.status == "error"
    assert prediction.error_code == error_code
    assert prediction.error
    assert prediction.output is None
    assert hook.budget().in_flight == 0

    with pytest.raises(Blip2PredictionFailedError) as caught:
        hook.run(image_url(image), caption=True, poll_interval=POLL, timeout=10)
    assert caught.value.error_code == error_code
    assert f"[{error_code}]" in str(caught.value)
    assert "deadbeefcafe" not in str(caught.value)
    assert emulator.ledger()["statuses"]["error"] == 2


@pytest.mark.parametrize(
    "inputs",
    [
        {"temperature": 2},
        {"temperature": "hot"},
        {"caption": True, "question": "What is it?"},
        {"caption": True, "context": "Question: a? Answer: b."},
        {"image": "s3://bucket/chelsea.jpg"},
        {"image": "chelsea.jpg"},
        {"image": ""},
    ],
)
def test_invalid_input_is_refused_before_any_request(
    emulator: EmulatorServer,
    blip2_connection: str,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
    inputs: dict[str, Any],
) -> None:
    hook = make_hook(blip2_connection)
    arguments = {"image": image_url("chelsea.jpg"), **inputs}
    with pytest.raises(Blip2InputError):
        hook.create_prediction(**arguments)
    with pytest.raises(Blip2InputError):
        hook.run(**arguments, poll_interval=POLL)
    assert total_requests(emulator) == 0
    assert emulator.ledger()["creates"] == 0


def test_wrong_api_key_is_not_retried(
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    hook = make_hook(add_connection(monkeypatch, "blip2_bad_key", emulator.url, api_key="not-the-key"))
    with pytest.raises(Blip2AuthenticationError) as caught:
        hook.create_prediction(image_url("chelsea.jpg"))
    assert caught.value.status_code == 401
    assert "API Key" in str(caught.value)
    assert re.search(rf"request id {UUID_PATTERN}", str(caught.value))
    ledger = emulator.ledger()
    assert ledger["requests"] == {"create": 1}
    assert ledger["responses_401"] == 1
    assert ledger["creates"] == 0
    assert hook.budget().in_flight == 0  # the failed create freed its slot


def test_unknown_prediction_is_not_retried(
    emulator: EmulatorServer, blip2_connection: str, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    with pytest.raises(Blip2NotFoundError) as caught:
        hook.get_prediction("00000000-0000-4000-8000-000000000001")
    error = caught.value
    assert error.status_code == 404
    assert error.request_id is not None and re.fullmatch(UUID_PATTERN, error.request_id)
    assert f"request id {error.request_id}" in str(error)  # X-Request-Id is quoted in the message
    assert "prediction not found" in str(error)
    assert emulator.ledger()["requests"] == {"get": 1}


def test_prediction_id_is_validated_before_any_request(
    emulator: EmulatorServer, blip2_connection: str, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    with pytest.raises(Blip2InputError, match="prediction_id"):
        hook.get_prediction("../model")
    assert total_requests(emulator) == 0


# --------------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------------
def test_gets_retry_5xx_until_max_attempts(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    policy = recording_policy()
    hook = make_hook(blip2_connection, policy)
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    emulator.config.fault_5xx = 1.0
    with pytest.raises(Blip2ServerError) as caught:
        hook.get_prediction(prediction_id)
    assert caught.value.status_code in {500, 502, 503}
    assert caught.value.request_id is not None
    ledger = emulator.ledger()
    assert ledger["requests"]["get"] == FAST_RETRIES.max_attempts
    assert ledger["responses_5xx_injected"] == FAST_RETRIES.max_attempts
    assert len(policy.failures) == FAST_RETRIES.max_attempts
    emulator.config.fault_5xx = 0.0
    assert hook.wait_for_prediction(prediction_id, poll_interval=POLL).succeeded


def test_create_with_5xx_is_ambiguous_and_not_retried(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    emulator.config.fault_5xx = 1.0
    with pytest.raises(Blip2AmbiguousCreateError) as caught:
        hook.create_prediction(image_url("chelsea.jpg"))
    assert caught.value.status_code in {500, 502, 503}
    assert isinstance(caught.value.__cause__, Blip2ServerError)
    assert "not resent" in str(caught.value)
    assert re.search(rf"request id {UUID_PATTERN}", str(caught.value))
    ledger = emulator.ledger()
    assert ledger["requests"] == {"create": 1}
    assert ledger["creates"] == 0
    assert hook.budget().in_flight == 0


def test_dropped_create_is_ambiguous_and_never_resent(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    emulator.config.fault_drop = 1.0
    with pytest.raises(Blip2AmbiguousCreateError) as caught:
        hook.create_prediction(image_url("chelsea.jpg"))
    assert isinstance(caught.value.__cause__, Blip2TransportError)
    assert caught.value.__cause__.sent is True
    assert caught.value.status_code is None
    ledger = emulator.ledger()
    assert ledger["requests"] == {"create": 1}
    assert ledger["drops_injected"] == 1
    assert ledger["creates"] == 1  # the prediction exists (and is billed): resending would duplicate it


def test_dropped_gets_are_retried(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(blip2_connection)
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    emulator.config.fault_drop = 1.0
    with pytest.raises(Blip2TransportError) as caught:
        hook.get_prediction(prediction_id)
    assert caught.value.sent is True
    assert emulator.ledger()["requests"]["get"] == FAST_RETRIES.max_attempts
    assert emulator.ledger()["drops_injected"] == FAST_RETRIES.max_attempts


def test_create_retried_after_429_succeeds(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    # Phase 1: every create answered 429: retried until the caller's deadline (however many
    # attempts that takes), nothing created, not ambiguous.
    emulator.config.fault_429 = 1.0
    hook = make_hook(blip2_connection)
    started = time.monotonic()
    with pytest.raises(Blip2RateLimitError) as caught:
        hook.submit_prediction(
            hook.prediction_input(image_url("chelsea.jpg")), patient_until=time.time() + 2.0
        )
    assert 2.0 <= time.monotonic() - started < 6.0
    assert caught.value.retry_after == pytest.approx(0.05)  # the emulator's scaled Retry-After
    ledger = emulator.ledger()
    attempts = ledger["requests"]["create"]
    assert attempts > FAST_RETRIES.max_attempts
    assert ledger["responses_429"] == attempts
    assert ledger["creates"] == 0

    # Phase 2: the server recovers after the first 429; the retried create succeeds, once.
    def recover(error: BaseException) -> None:
        assert isinstance(error, Blip2RateLimitError)
        emulator.config.fault_429 = 0.0

    policy = recording_policy(on_failure=recover)
    hook = make_hook(blip2_connection, policy)
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"))
    assert len(policy.failures) == 1
    ledger = emulator.ledger()
    assert ledger["requests"]["create"] == attempts + 2
    assert ledger["creates"] == 1
    assert hook.wait_for_prediction(prediction_id, poll_interval=POLL).succeeded


def test_a_429_storm_on_create_is_waited_out_beyond_max_attempts(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    """A 429 creates nothing: it is back-pressure, waited out while the caller's deadline lasts."""
    emulator.config.fault_429 = 1.0
    timer = threading.Timer(1.5, lambda: setattr(emulator.config, "fault_429", 0.0))
    timer.start()
    try:
        prediction_id = make_hook(blip2_connection).create_prediction(image_url("chelsea.jpg"))
    finally:
        timer.cancel()
    ledger = emulator.ledger()
    assert ledger["responses_429"] > FAST_RETRIES.max_attempts
    assert ledger["creates"] == 1
    assert prediction_id


def test_create_to_closed_port_is_retried_then_raises_unsent_transport_error(
    monkeypatch: pytest.MonkeyPatch, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    policy = recording_policy()
    hook = make_hook(add_connection(monkeypatch, "blip2_closed", closed_port_url()), policy)
    with pytest.raises(Blip2TransportError) as caught:
        hook.create_prediction(image_url("chelsea.jpg"))
    assert caught.value.sent is False  # refused: the server cannot have created anything
    assert "before the request was sent" in str(caught.value)
    assert len(policy.failures) == FAST_RETRIES.max_attempts
    assert all(isinstance(error, Blip2TransportError) and not error.sent for error in policy.failures)
    assert hook.budget().in_flight == 0


def test_batch_succeeds_under_seeded_partial_faults(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(seed=1234)
    hook = make_hook(
        add_connection(monkeypatch, "blip2_faulty", server.url),
        dataclasses.replace(FAST_RETRIES, max_attempts=12),
    )
    images = ["astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp", "chelsea.jpg", "coffee.png"]
    prediction_ids = [hook.create_prediction(image_url(name), caption=True) for name in images]
    server.config.fault_5xx = 0.2
    server.config.fault_429 = 0.2
    results = [hook.wait_for_prediction(pid, poll_interval=POLL, timeout=20) for pid in prediction_ids]
    assert [result.status for result in results] == ["success"] * len(images)
    assert all(result.output and result.output.startswith("[emulated]") for result in results)
    ledger = server.ledger()
    assert ledger["responses_5xx_injected"] + ledger["responses_429_injected"] > 0
    assert ledger["creates"] == len(images)


# --------------------------------------------------------------------------------------------------
# Request budget
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("client_limit", [6, 4], ids=["equal-to-server", "tighter-than-server"])
def test_client_budget_keeps_the_server_from_answering_429(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
    client_limit: int,
) -> None:
    server = start_emulator(time_scale=RATE_TIME_SCALE, requests_per_minute=6)
    conn_id = add_connection(
        monkeypatch,
        "blip2_tight",
        server.url,
        requests_per_minute=client_limit,
        rate_window=RATE_WINDOW,
        rate_limit_shape="window",  # the shape's probe: tests/integration/test_rate_limit_shape.py
    )
    hook = make_hook(conn_id)
    started = time.monotonic()
    prediction = hook.run(image_url("chelsea.jpg"), caption=True, poll_interval=POLL, timeout=10)
    for _ in range(12):
        assert hook.get_model()["slug"] == "blip-2"
    elapsed = time.monotonic() - started
    assert prediction.succeeded
    budget = hook.budget()
    assert (budget.requests_per_minute, budget.window) == (client_limit, RATE_WINDOW)
    ledger = server.ledger()
    sent = sum(ledger["requests"].values())
    assert sent >= 14
    assert ledger["responses_429"] == 0
    # client_limit requests per window: the last one cannot start before that many windows passed.
    assert elapsed >= (sent - 1) // client_limit * RATE_WINDOW - 0.05


def test_budget_above_the_server_limit_gets_429s_that_are_retried(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(time_scale=RATE_TIME_SCALE, requests_per_minute=6)
    conn_id = add_connection(
        monkeypatch, "blip2_loose", server.url, requests_per_minute=100, rate_window=RATE_WINDOW
    )
    policy = recording_policy(max_wait=1.0)  # honour the emulator's Retry-After in full
    hook = make_hook(conn_id, policy)
    records = [hook.get_model() for _ in range(15)]
    assert all(record == records[0] for record in records)
    ledger = server.ledger()
    assert ledger["responses_429"] > 0
    assert ledger["responses_429_injected"] == 0  # real rate limiting, not injected faults
    assert ledger["requests"]["model"] == 15 + ledger["responses_429"]
    assert len(policy.failures) == ledger["responses_429"]
    assert all(isinstance(error, Blip2RateLimitError) and error.retry_after for error in policy.failures)


def test_budget_is_shared_by_hooks_of_the_same_connection(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(time_scale=RATE_TIME_SCALE, requests_per_minute=5)
    conn_id = add_connection(
        monkeypatch,
        "blip2_shared",
        server.url,
        requests_per_minute=5,
        rate_window=RATE_WINDOW,
        rate_limit_shape="window",
    )
    first, second = make_hook(conn_id), make_hook(conn_id)
    assert first.budget() is second.budget()
    errors: list[BaseException] = []

    def work(hook: Blip2Hook) -> None:
        try:
            for _ in range(6):
                hook.get_model()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(hook,)) for hook in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    elapsed = time.monotonic() - started
    assert errors == []
    ledger = server.ledger()
    assert ledger["requests"]["model"] == 12
    # Two separate budgets of 5 would send 10 requests at once, past the emulator's 5: 429s.
    assert ledger["responses_429"] == 0
    assert elapsed >= 2 * RATE_WINDOW - 0.05  # 12 requests at 5 per window span three windows


def test_max_concurrency_one_makes_a_second_create_wait(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(latency=10)  # 0.5 s
    conn_id = add_connection(monkeypatch, "blip2_serial", server.url, max_concurrency=1)
    first, second = make_hook(conn_id), make_hook(conn_id)
    first_id = first.create_prediction(image_url("chelsea.jpg"))
    created: list[str] = []
    errors: list[BaseException] = []

    def create_second() -> None:
        try:
            created.append(second.create_prediction(image_url("coffee.png")))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=create_second)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # waiting for the slot of the first prediction
    assert server.ledger()["creates"] == 1
    assert first.wait_for_prediction(first_id, poll_interval=POLL).succeeded
    thread.join(5)
    assert not thread.is_alive()
    assert errors == []
    assert len(created) == 1 and created[0] != first_id
    ledger = server.ledger()
    assert ledger["creates"] == 2
    assert ledger["peak_in_flight"] == 1
    assert second.budget().in_flight == 1
    assert second.wait_for_prediction(created[0], poll_interval=POLL).succeeded
    assert second.budget().in_flight == 0


# --------------------------------------------------------------------------------------------------
# test_connection
# --------------------------------------------------------------------------------------------------
def test_test_connection_ok(
    emulator: EmulatorServer, blip2_connection: str, make_hook: Callable[..., Blip2Hook]
) -> None:
    ok, message = make_hook(blip2_connection).test_connection()
    assert ok is True
    assert emulator.url in message
    assert "API key is valid" in message
    assert emulator.ledger()["requests"] == {"model": 1, "get": 1}


def test_test_connection_bad_key(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, make_hook: Callable[..., Blip2Hook]
) -> None:
    hook = make_hook(add_connection(monkeypatch, "blip2_bad", emulator.url, api_key="wrong-key"))
    ok, message = hook.test_connection()
    assert ok is False
    assert "API key was refused" in message
    assert "wrong-key" not in message
    assert emulator.ledger()["responses_401"] == 1


def test_test_connection_closed_port(
    monkeypatch: pytest.MonkeyPatch, make_hook: Callable[..., Blip2Hook]
) -> None:
    url = closed_port_url()
    ok, message = make_hook(add_connection(monkeypatch, "blip2_nowhere", url)).test_connection()
    assert ok is False
    assert message.startswith(f"Cannot reach the API at {url}")


def test_test_connection_wrong_host(
    image_server: str, monkeypatch: pytest.MonkeyPatch, make_hook: Callable[..., Blip2Hook]
) -> None:
    # The image file server answers 404 (with an HTML body) to /v1/model.
    ok, message = make_hook(add_connection(monkeypatch, "blip2_files", image_server)).test_connection()
    assert ok is False
    assert f"No Eachlabs API, or no model 'blip-2', at {image_server}" in message
    assert "check the host" in message


def test_test_connection_misconfigured(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, make_hook: Callable[..., Blip2Hook]
) -> None:
    conn_id = add_connection(monkeypatch, "blip2_misconfigured", emulator.url, requests_per_minute="abc")
    ok, message = make_hook(conn_id).test_connection()
    assert ok is False
    assert "misconfigured" in message
    assert "requests_per_minute" in message
    assert total_requests(emulator) == 0


# --------------------------------------------------------------------------------------------------
# Async path
# --------------------------------------------------------------------------------------------------
async def apoll(hook: Blip2Hook, prediction_id: str, timeout: float = 10.0) -> Prediction:
    """Poll with the async API until the prediction is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        prediction = await hook.aget_prediction(prediction_id)
        if prediction.status.is_terminal:
            return prediction
        assert time.monotonic() < deadline, f"{prediction_id} still {prediction.raw_status}"
        await asyncio.sleep(POLL)


@requires_airflow_3_3
async def test_async_settings_are_resolved_without_the_sync_lookup(
    emulator: EmulatorServer, blip2_connection: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = Blip2Hook(blip2_connection, retry_policy=FAST_RETRIES)

    def no_sync_lookup(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the async path must not use the blocking get_connection")

    monkeypatch.setattr(Blip2Hook, "get_connection", no_sync_lookup)
    settings = await hook.aget_settings()
    assert settings.base_url == emulator.url
    assert settings.api_key == API_KEY
    assert settings.requests_per_minute == 1200
    assert await hook.aget_settings() is settings  # resolved once


async def test_async_get_and_cancel(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(latency=100)
    conn_id = add_connection(monkeypatch, "blip2_async", server.url)
    prediction_id = make_hook(conn_id).create_prediction(image_url("chelsea.jpg"))
    hook = Blip2Hook(conn_id, retry_policy=FAST_RETRIES)
    try:
        running = await hook.aget_prediction(prediction_id)
        assert running.status is PredictionStatus.RUNNING
        assert running.id == prediction_id
        await hook.acancel_prediction(prediction_id)
        cancelled = await hook.aget_prediction(prediction_id)
        assert cancelled.status is PredictionStatus.CANCELLED
        assert (await hook.abudget()).in_flight == 0
    finally:
        await hook.aclose()
    ledger = server.ledger()
    assert ledger["requests"] == {"create": 1, "get": 2, "cancel": 1}
    assert ledger["statuses"]["cancelled"] == 1


async def test_async_get_until_success(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    prediction_id = make_hook(blip2_connection).create_prediction(image_url("rocket.webp"), caption=True)
    hook = Blip2Hook(blip2_connection, retry_policy=FAST_RETRIES)
    try:
        prediction = await apoll(hook, prediction_id)
    finally:
        await hook.aclose()
    assert prediction.status is PredictionStatus.SUCCEEDED
    assert prediction.output is not None and prediction.output.startswith("[emulated]")
    assert prediction.predict_time is not None and prediction.predict_time > 0


async def test_async_retries_5xx_then_raises(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    prediction_id = make_hook(blip2_connection).create_prediction(image_url("chelsea.jpg"))
    emulator.config.fault_5xx = 1.0
    hook = Blip2Hook(blip2_connection, retry_policy=FAST_RETRIES)
    try:
        with pytest.raises(Blip2ServerError) as caught:
            await hook.aget_prediction(prediction_id)
        assert re.search(rf"request id {UUID_PATTERN}", str(caught.value))
        assert emulator.ledger()["requests"]["get"] == FAST_RETRIES.max_attempts
        with pytest.raises(Blip2ServerError):
            await hook.acancel_prediction(prediction_id)  # cancel is idempotent: retried too
        assert emulator.ledger()["requests"]["cancel"] == FAST_RETRIES.max_attempts
    finally:
        await hook.aclose()


async def test_async_recovers_from_partial_faults(
    start_emulator: StartEmulator,
    monkeypatch: pytest.MonkeyPatch,
    image_url: ImageUrl,
    make_hook: Callable[..., Blip2Hook],
) -> None:
    server = start_emulator(seed=99)
    conn_id = add_connection(monkeypatch, "blip2_async_faulty", server.url)
    creator = make_hook(conn_id)
    prediction_ids = [creator.create_prediction(image_url(name)) for name in ("chelsea.jpg", "coffee.png")]
    server.config.fault_5xx = 0.25
    server.config.fault_429 = 0.25
    server.config.fault_drop = 0.1
    hook = Blip2Hook(conn_id, retry_policy=dataclasses.replace(FAST_RETRIES, max_attempts=12))
    try:
        results = await asyncio.gather(*(apoll(hook, pid) for pid in prediction_ids))
    finally:
        await hook.aclose()
    assert [result.status for result in results] == [PredictionStatus.SUCCEEDED] * 2
    ledger = server.ledger()
    injected = ledger["responses_5xx_injected"] + ledger["responses_429_injected"] + ledger["drops_injected"]
    assert injected > 0


async def test_async_errors_are_mapped_and_not_retried(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = Blip2Hook(add_connection(monkeypatch, "blip2_async_good", emulator.url), retry_policy=FAST_RETRIES)
    bad = Blip2Hook(
        add_connection(monkeypatch, "blip2_async_bad", emulator.url, api_key="wrong"),
        retry_policy=FAST_RETRIES,
    )
    try:
        with pytest.raises(Blip2NotFoundError) as not_found:
            await good.aget_prediction("00000000-0000-4000-8000-000000000002")
        with pytest.raises(Blip2AuthenticationError):
            await bad.aget_prediction("00000000-0000-4000-8000-000000000002")
    finally:
        await good.aclose()
        await bad.aclose()
    assert not_found.value.request_id is not None
    assert f"request id {not_found.value.request_id}" in str(not_found.value)
    assert emulator.ledger()["requests"] == {"get": 2}
    assert emulator.ledger()["responses_401"] == 1


async def test_async_closed_port_raises_unsent_transport_error(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = recording_policy()
    hook = Blip2Hook(
        add_connection(monkeypatch, "blip2_async_closed", closed_port_url()), retry_policy=policy
    )
    try:
        with pytest.raises(Blip2TransportError) as caught:
            await hook.aget_prediction("00000000-0000-4000-8000-000000000003")
    finally:
        await hook.aclose()
    assert caught.value.sent is False
    assert len(policy.failures) == FAST_RETRIES.max_attempts


class CountingServer:
    """
    A loopback HTTP/1.1 server answering every request "processing" after ``delay`` seconds.

    It counts the requests it is answering at once (``peak``) and the TCP connections opened.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answering = 0
        self.peak = 0
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> CountingServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        body = b'{"id": "p", "status": "processing"}'
        try:
            while (await reader.readuntil(b"\r\n\r\n")).strip():
                self.requests += 1
                self.answering += 1
                self.peak = max(self.peak, self.answering)
                await asyncio.sleep(self.delay)
                self.answering -= 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_loop_sends_at_most_max_connections_requests_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "MAX_CONNECTIONS", 3)
    async with CountingServer(delay=0.05) as server:
        conn_id = add_connection(monkeypatch, "blip2_counted", server.url)
        hooks = [Blip2Hook(conn_id, retry_policy=FAST_RETRIES) for _ in range(12)]
        ids = [f"00000000-0000-4000-8000-0000000000{n:02d}" for n in range(12)]
        for _ in range(2):
            predictions = await asyncio.gather(
                *(h.aget_prediction(i) for h, i in zip(hooks, ids, strict=True))
            )
            assert [p.raw_status for p in predictions] == ["processing"] * 12
    assert server.requests == 24
    assert server.peak == 3  # the others waited their turn in the loop, not in a pool's queue
    assert server.connections == 3  # and the connections were kept and reused


async def test_reads_cut_short_leave_every_connection_of_the_loop_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A trigger torn down mid-read cancels its request wherever it is. A cancellation landing while
    # httpcore hands the connection back leaves it counted as busy for good (encode/httpcore#1093):
    # a client that kept it would answer every later request with PoolTimeout.
    monkeypatch.setattr(event_loop, "MAX_CONNECTIONS", 4)
    rng = random.Random(7)
    prediction_id = "00000000-0000-4000-8000-000000000001"
    async with CountingServer(delay=0.002) as server:
        conn_id = add_connection(
            monkeypatch, "blip2_cut_short", server.url, request_timeout=2, requests_per_minute=100_000
        )
        hook = Blip2Hook(conn_id, retry_policy=RetryPolicy(max_attempts=1))
        for _ in range(300):
            reads = [asyncio.ensure_future(hook.aget_prediction(prediction_id)) for _ in range(4)]
            await asyncio.sleep(rng.random() * 0.01)
            for read in reads:
                read.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
        answered_before = server.requests
        # Each of the loop's clients is lent in turn: none waits for a connection it never gets.
        for _ in range(3):
            predictions = await asyncio.gather(*(hook.aget_prediction(prediction_id) for _ in range(8)))
            assert [p.raw_status for p in predictions] == ["processing"] * 8
    assert server.requests - answered_before == 24


async def test_reads_leave_no_cyclic_garbage(
    emulator: EmulatorServer, blip2_connection: str, image_url: ImageUrl, make_hook: Callable[..., Blip2Hook]
) -> None:
    # Cyclic garbage waits for the collector, whose full passes stall a loop of many triggers. An
    # httpx response and its stream refer to each other unless the hook parts them, and a tenacity
    # retrying object to its pending actions unless the hook resets them.

    prediction_id = make_hook(blip2_connection).create_prediction(image_url("chelsea.jpg"))
    hook = Blip2Hook(blip2_connection, retry_policy=FAST_RETRIES)
    await hook.aget_prediction(prediction_id)  # the loop's client and connection are made
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            await hook.aget_prediction(prediction_id)
        gc.collect()
        ours = [
            item
            for item in gc.garbage
            if type(item).__module__.split(".")[0]
            in {"httpx", "httpcore", "tenacity", "airflow_provider_blip2"}
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []
