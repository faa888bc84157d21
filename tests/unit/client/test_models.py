"""
Unit tests of the client: statuses, Prediction parsing and outcomes.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2PredictionFailedError,
    Blip2ProtocolError,
)
from airflow_provider_blip2.client.inputs import (
    scrub_urls,
)
from airflow_provider_blip2.client.models import (
    FAILURE_KIND_BY_STATUS,
    RETRY_FAILURES,
    FailureKind,
    PredictionOutcome,
    PredictionStatus,
    create_again_within_try,
    failure_kind,
    normalise_status,
    parse_prediction,
    predict_again_on_new_try,
)
from tests.unit.client.helpers import (
    SECRET,
    SIGNED_IMAGE,
)


# --------------------------------------------------------------------------------------------------
# Statuses
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("created", PredictionStatus.RUNNING),
        ("starting", PredictionStatus.RUNNING),
        ("processing", PredictionStatus.RUNNING),
        ("queued", PredictionStatus.RUNNING),
        ("running", PredictionStatus.RUNNING),
        ("success", PredictionStatus.SUCCEEDED),
        ("succeeded", PredictionStatus.SUCCEEDED),
        ("completed", PredictionStatus.SUCCEEDED),
        ("error", PredictionStatus.FAILED),
        ("failed", PredictionStatus.FAILED),
        ("cancelled", PredictionStatus.CANCELLED),
        ("canceled", PredictionStatus.CANCELLED),
        ("SUCCESS", PredictionStatus.SUCCEEDED),
        ("Succeeded", PredictionStatus.SUCCEEDED),
        ("FAILED", PredictionStatus.FAILED),
        ("CANCELED", PredictionStatus.CANCELLED),
        ("  success\n", PredictionStatus.SUCCEEDED),
        ("PROCESSING", PredictionStatus.RUNNING),
        ("warming_up", PredictionStatus.RUNNING),
        ("", PredictionStatus.RUNNING),
        ("succes", PredictionStatus.RUNNING),
        (None, PredictionStatus.RUNNING),
        (1, PredictionStatus.RUNNING),
        (True, PredictionStatus.RUNNING),
        (["success"], PredictionStatus.RUNNING),
        ({"status": "success"}, PredictionStatus.RUNNING),
    ],
)
def test_normalise_status(raw: Any, expected: PredictionStatus) -> None:
    assert normalise_status(raw) is expected


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (PredictionStatus.RUNNING, False),
        (PredictionStatus.SUCCEEDED, True),
        (PredictionStatus.FAILED, True),
        (PredictionStatus.CANCELLED, True),
    ],
)
def test_status_is_terminal(status: PredictionStatus, terminal: bool) -> None:
    assert status.is_terminal is terminal


# --------------------------------------------------------------------------------------------------
# parse_prediction
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("san francisco bay", "san francisco bay"),
        (["san ", "francisco ", "bay"], "san francisco bay"),
        ([], ""),
        ([1, 2], "[1, 2]"),
        (42, "42"),
        ({"text": "x"}, None),
        (None, None),
    ],
)
def test_parse_prediction_success_output(output: Any, expected: str | None) -> None:
    payload = {
        "id": "p-1",
        "status": "success",
        "output": output,
        "logs": "prediction succeeded",
        "metrics": {"predict_time": 1.75, "cost": 0.0011},
    }
    prediction = parse_prediction(payload, prediction_id="p-1")
    assert prediction.status is PredictionStatus.SUCCEEDED
    assert prediction.raw_status == "success"
    assert prediction.output == expected
    assert prediction.error is None
    assert prediction.error_code is None
    assert prediction.predict_time == 1.75
    assert prediction.raw is payload


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (
            {"get": "https://a/v1/prediction/p", "cancel": "https://a/v1/prediction/p/cancel"},
            {"get": "https://a/v1/prediction/p", "cancel": "https://a/v1/prediction/p/cancel"},
        ),
        (
            {"get": "https://a/v1/prediction/p", "web": "https://console/p", "stream": None},
            {"get": "https://a/v1/prediction/p", "web": "https://console/p"},
        ),
        (None, {}),
        ("https://a/v1/prediction/p", {}),
    ],
)
def test_prediction_urls_keep_the_strings_the_api_gave(urls: Any, expected: dict[str, str]) -> None:
    prediction = parse_prediction({"id": "p", "status": "processing", "urls": urls}, prediction_id="p")
    assert prediction.urls == expected


def test_parse_prediction_uses_requested_id_when_body_has_none() -> None:
    prediction = parse_prediction({"status": "completed", "output": "a cat"}, prediction_id="asked-for")
    assert prediction.id == "asked-for"
    assert prediction.status is PredictionStatus.SUCCEEDED
    assert prediction.output == "a cat"
    assert prediction.predict_time is None


@pytest.mark.parametrize(
    ("payload", "error", "error_code"),
    [
        pytest.param(
            {
                "status": "error",
                "output": {
                    "error": "download failed",
                    "error_code": "INPUT_DOWNLOAD_ERROR",
                    "error_message": "could not download the image",
                    "classification": {"category": "input"},
                    "retryable": False,
                },
                "error": "top-level error",
                "logs": "log line",
            },
            "could not download the image",
            "INPUT_DOWNLOAD_ERROR",
            id="error_message-first",
        ),
        pytest.param(
            {
                "status": "error",
                "output": {"error": "invalid input image", "error_code": "INPUT_VALIDATION_ERROR"},
                "error": "top-level error",
                "logs": "log line",
            },
            "invalid input image",
            "INPUT_VALIDATION_ERROR",
            id="envelope-error-second",
        ),
        pytest.param(
            {
                "status": "error",
                "output": {"error_message": "   ", "error_code": "PROVIDER_FAILED"},
                "error": "the provider crashed",
                "logs": "log line",
            },
            "the provider crashed",
            "PROVIDER_FAILED",
            id="blank-message-skipped-then-top-level-error",
        ),
        pytest.param(
            {"status": "failed", "output": None, "logs": "step 1\nstep 2: out of memory\n"},
            "step 1\nstep 2: out of memory",
            None,
            id="logs-last",
        ),
        pytest.param(
            {"status": "error", "output": {"error_code": "EXECUTION_TIMEOUT"}, "logs": ""},
            "the prediction failed without an error message",
            "EXECUTION_TIMEOUT",
            id="code-without-message",
        ),
        pytest.param(
            {"status": "error", "output": None},
            "the prediction failed without an error message",
            None,
            id="nothing-at-all",
        ),
        pytest.param(
            {"status": "error", "output": {"error_message": "boom", "error_code": 17}},
            "boom",
            None,
            id="non-string-code-dropped",
        ),
        pytest.param(
            {"status": "cancelled", "output": None, "logs": ""},
            None,
            None,
            id="cancelled-without-message",
        ),
    ],
)
def test_parse_prediction_error_details(
    payload: dict[str, Any], error: str | None, error_code: str | None
) -> None:
    prediction = parse_prediction(payload, prediction_id="p-2")
    assert prediction.status.is_terminal
    assert prediction.status is not PredictionStatus.SUCCEEDED
    assert prediction.output is None
    assert prediction.error == error
    assert prediction.error_code == error_code


def test_parse_prediction_error_from_logs_keeps_last_500_chars() -> None:
    logs = "start " + "x" * 1000 + " final line"
    prediction = parse_prediction({"status": "error", "logs": logs}, prediction_id="p")
    assert prediction.error is not None
    assert len(prediction.error) == 500
    assert prediction.error.endswith("x final line")


@pytest.mark.parametrize("status", ["created", "starting", "processing", "queued", "mystery"])
def test_parse_prediction_running_has_no_output_nor_error(status: str) -> None:
    payload = {
        "id": "p-3",
        "status": status,
        "output": None,
        "logs": "downloading image",
        "metrics": {"predict_time": 0, "cost": 0},
    }
    prediction = parse_prediction(payload, prediction_id="p-3")
    assert prediction.status is PredictionStatus.RUNNING
    assert prediction.raw_status == status
    assert prediction.output is None
    assert prediction.error is None
    assert prediction.error_code is None
    assert prediction.predict_time == 0.0


def test_parse_prediction_running_ignores_partial_output() -> None:
    prediction = parse_prediction({"status": "processing", "output": "partial"}, prediction_id="p")
    assert prediction.output is None


@pytest.mark.parametrize("payload", [None, [], "success", 3])
def test_parse_prediction_refuses_non_objects(payload: Any) -> None:
    with pytest.raises(Blip2ProtocolError, match="not a JSON object"):
        parse_prediction(payload, prediction_id="p-4")


@pytest.mark.parametrize(
    "where",
    [
        {"output": {"error_message": "could not download {url}: 403", "error_code": "INPUT_DOWNLOAD_ERROR"}},
        {"output": {"error": "fetch of {url} failed"}},
        {"error": "fetch of '{url}' failed"},
        {"logs": "downloading {url}\nHTTP 403 for {url}"},
    ],
)
def test_parse_prediction_scrubs_signed_urls(where: dict[str, Any]) -> None:
    url = f"https://bucket.s3.amazonaws.com/in/cat.jpg?{SECRET}"
    payload: dict[str, Any] = {"status": "error"}
    for key, value in where.items():
        if isinstance(value, dict):
            payload[key] = {k: v.format(url=url) if isinstance(v, str) else v for k, v in value.items()}
        else:
            payload[key] = value.format(url=url)
    prediction = parse_prediction(payload, prediction_id="p-5")
    assert prediction.error is not None
    assert "https://bucket.s3.amazonaws.com/in/cat.jpg?<redacted>" in prediction.error
    for leak in ("deadbeefcafe", "AKIASECRETKEY", "X-Amz"):
        assert leak not in prediction.error
    with pytest.raises(Blip2PredictionFailedError) as caught:
        prediction.raise_for_status()
    assert "deadbeefcafe" not in str(caught.value)


def test_scrub_urls_removes_credentials_and_queries() -> None:
    text = "tried https://user:hunter2@files.example.com:8443/a.png?token=abc then http://h/b.jpg."
    scrubbed = scrub_urls(text)
    assert "hunter2" not in scrubbed
    assert "token=abc" not in scrubbed
    assert "https://files.example.com:8443/a.png?<redacted>" in scrubbed
    assert "http://h/b.jpg." in scrubbed


def test_outcome_leaves_out_inputs_and_round_trips() -> None:
    payload = {
        "id": "p",
        "status": "success",
        "output": "a dog",
        "input": {"image": SIGNED_IMAGE},
        "metrics": {"predict_time": 1.5, "cost": 0.0011},
    }
    outcome = parse_prediction(payload, prediction_id="p").outcome()
    assert outcome.to_json() == {
        "status": "success",
        "output": "a dog",
        "error": None,
        "error_code": None,
        "prediction_id": "p",
        "predict_time": 1.5,
        "retryable": None,
        "cost": 0.0011,
    }
    assert "deadbeefcafe" not in json.dumps(outcome.to_json())
    assert PredictionOutcome.from_json(json.loads(json.dumps(outcome.to_json()))) == outcome
    assert outcome.succeeded and not outcome.failed


@pytest.mark.parametrize(
    ("status", "error_code", "message"),
    [
        ("error", "INPUT_DOWNLOAD_ERROR", "prediction p ended error [INPUT_DOWNLOAD_ERROR]: boom"),
        ("cancelled", None, "prediction p ended cancelled: boom"),
        ("timeout", None, "prediction p ended timeout: boom"),
    ],
)
def test_outcome_failure_message(status: str, error_code: str | None, message: str) -> None:
    outcome = PredictionOutcome(status, error="boom", error_code=error_code, prediction_id="p")
    assert outcome.failed
    assert outcome.failure_message() == message


def test_outcome_of_a_running_prediction_is_refused() -> None:
    prediction = parse_prediction({"id": "p", "status": "processing"}, prediction_id="p")
    with pytest.raises(ValueError, match="has not finished"):
        prediction.outcome()


# --------------------------------------------------------------------------------------------------
# Prediction.raise_for_status
# --------------------------------------------------------------------------------------------------
def test_raise_for_status_returns_successful_prediction() -> None:
    prediction = parse_prediction({"id": "ok", "status": "succeeded", "output": "x"}, prediction_id="ok")
    assert prediction.raise_for_status() is prediction


@pytest.mark.parametrize(
    ("payload", "fragments", "error_code"),
    [
        (
            {
                "status": "error",
                "output": {"error_message": "bad image", "error_code": "INPUT_VALIDATION_ERROR"},
            },
            ["prediction p-9 ended error", "[INPUT_VALIDATION_ERROR]", "bad image"],
            "INPUT_VALIDATION_ERROR",
        ),
        ({"status": "failed"}, ["ended error", "without an error message"], None),
        ({"status": "canceled"}, ["ended cancelled", "status canceled"], None),
        ({"status": "processing"}, ["has not finished", "status processing"], None),
        ({"status": "weird"}, ["has not finished", "status weird"], None),
    ],
)
def test_raise_for_status_raises_for_anything_but_success(
    payload: dict[str, Any], fragments: list[str], error_code: str | None
) -> None:
    prediction = parse_prediction(payload, prediction_id="p-9")
    with pytest.raises(Blip2PredictionFailedError) as caught:
        prediction.raise_for_status()
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert caught.value.prediction_id == "p-9"
    assert caught.value.error_code == error_code


# --------------------------------------------------------------------------------------------------
# The retry rule


def test_outcomes_of_older_journals_and_events_still_load() -> None:
    old = {"status": "error", "output": None, "error": "boom", "error_code": "X", "prediction_id": "p"}
    outcome = PredictionOutcome.from_json(old)
    assert (outcome.retryable, outcome.cost, outcome.predict_time) == (None, None, None)
    assert PredictionOutcome.from_json(outcome.to_json()) == outcome


def test_error_envelopes_give_retryable_and_cost() -> None:
    payload = {
        "id": "p",
        "status": "error",
        "output": {"error": "provider failed", "error_code": "PROVIDER_FAILED", "retryable": True},
        "metrics": {"predict_time": 0.4, "cost": "0.0003"},
    }
    outcome = parse_prediction(payload, prediction_id="p").outcome()
    assert (outcome.status, outcome.retryable, outcome.cost) == ("error", True, 0.0003)
    running = parse_prediction({"id": "p", "status": "processing", "metrics": {"cost": 0}}, prediction_id="p")
    assert running.cost is None and running.retryable is None
    unreadable = {"id": "p", "status": "error", "output": {"error": "x", "retryable": "yes"}}
    assert parse_prediction(unreadable, prediction_id="p").retryable is None
    as_text = {"id": "p", "status": "failed", "output": {"error": "x", "retryable": "TRUE"}}
    assert parse_prediction(as_text, prediction_id="p").retryable is True
    top_level = {"id": "p", "status": "error", "error": "x", "retryable": False}
    assert parse_prediction(top_level, prediction_id="p").retryable is False


@pytest.mark.parametrize(
    ("outcome", "kind"),
    [
        (PredictionOutcome("success", output="a cat"), FailureKind.NONE),
        (PredictionOutcome("ambiguous", error="create failed after it was sent"), FailureKind.TRANSIENT),
        (PredictionOutcome("timeout", prediction_id="p"), FailureKind.TRANSIENT),
        (PredictionOutcome("cancelled", prediction_id="p"), FailureKind.TRANSIENT),
        (PredictionOutcome("error", error_code="PROVIDER_FAILED"), FailureKind.RETRYABLE),
        (PredictionOutcome("error", error_code="execution_timeout"), FailureKind.RETRYABLE),
        (PredictionOutcome("error", error_code="HTTP_503"), FailureKind.RETRYABLE),
        (PredictionOutcome("error", error_code="500"), FailureKind.RETRYABLE),
        (PredictionOutcome("error", error_code="SOMETHING_NEW", retryable=True), FailureKind.RETRYABLE),
        (
            PredictionOutcome("error", error_code="INPUT_DOWNLOAD_ERROR", retryable=False),
            FailureKind.PERMANENT,
        ),
        (PredictionOutcome("error", error_code="INPUT_VALIDATION_ERROR"), FailureKind.PERMANENT),
        (PredictionOutcome("error", error_code="HTTP_404"), FailureKind.PERMANENT),
        # A refused create (400, 422) or a storage error: no prediction, no code.
        (
            PredictionOutcome("error", error="The API refused the request as invalid (HTTP 400)"),
            FailureKind.PERMANENT,
        ),
    ],
)
def test_failure_kind_tells_transient_from_permanent(outcome: PredictionOutcome, kind: FailureKind) -> None:
    assert failure_kind(outcome) is kind
    assert outcome.failure_kind is kind


def test_the_rule_is_one_table_over_every_status() -> None:
    statuses = {
        PredictionOutcome.SUCCESS,
        PredictionOutcome.ERROR,
        PredictionOutcome.CANCELLED,
        PredictionOutcome.TIMEOUT,
        PredictionOutcome.AMBIGUOUS,
    }
    # Every status but error is judged by the table alone; error by its envelope.
    assert set(FAILURE_KIND_BY_STATUS) == statuses - {PredictionOutcome.ERROR}
    assert PredictionOutcome.AMBIGUOUS == "ambiguous"
    assert PredictionOutcome("ambiguous").failed


def test_within_a_try_only_retryable_service_errors_are_created_again_within_the_bound() -> None:
    provider = PredictionOutcome("error", error_code="PROVIDER_FAILED", retryable=True)
    assert create_again_within_try(provider, attempts_this_try=1, max_attempts=2)
    assert not create_again_within_try(provider, attempts_this_try=2, max_attempts=2)
    assert not create_again_within_try(provider, attempts_this_try=1, max_attempts=1)
    for never in (
        PredictionOutcome("ambiguous"),  # it may exist and be billed: the user's choice, by retries
        PredictionOutcome("timeout"),
        PredictionOutcome("cancelled"),
        PredictionOutcome("error", error_code="INPUT_DOWNLOAD_ERROR"),
        PredictionOutcome("success", output="x"),
    ):
        assert not create_again_within_try(never, attempts_this_try=1, max_attempts=5)


@pytest.mark.parametrize(
    ("retry_failures", "again"),
    [
        ("transient", {"ambiguous", "timeout", "cancelled", "provider"}),
        ("all", {"ambiguous", "timeout", "cancelled", "provider", "download", "refused"}),
        ("none", set()),
    ],
)
def test_a_new_try_predicts_again_what_retry_failures_selects(retry_failures: str, again: set[str]) -> None:
    outcomes = {
        "success": PredictionOutcome("success", output="x"),
        "ambiguous": PredictionOutcome("ambiguous"),
        "timeout": PredictionOutcome("timeout", prediction_id="p"),
        "cancelled": PredictionOutcome("cancelled", prediction_id="p"),
        "provider": PredictionOutcome("error", error_code="PROVIDER_FAILED", retryable=True),
        "download": PredictionOutcome("error", error_code="INPUT_DOWNLOAD_ERROR", retryable=False),
        "refused": PredictionOutcome("error", error="HTTP 400"),
    }
    assert retry_failures in RETRY_FAILURES
    chosen = {name for name, outcome in outcomes.items() if predict_again_on_new_try(outcome, retry_failures)}
    assert chosen == again
