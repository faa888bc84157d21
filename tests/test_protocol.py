"""Unit tests of the Airflow-free protocol module: validation, parsing, error mapping, retries, budget."""

from __future__ import annotations

import json
import math
import random
import threading
from email.utils import formatdate
from typing import Any

import pytest

from airflow_provider_blip2 import protocol
from airflow_provider_blip2.protocol import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MODEL,
    DEFAULT_MODEL_VERSION,
    DEFAULT_QUESTION,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_REQUESTS_PER_MINUTE,
    ApiResponse,
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InputError,
    Blip2InsufficientBalanceError,
    Blip2NotFoundError,
    Blip2PredictionFailedError,
    Blip2ProtocolError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
    Blip2UnprocessableError,
    ClientSettings,
    PredictionInput,
    PredictionStatus,
    RequestBudget,
    RetryPolicy,
    ambiguous_create_error,
    auth_headers,
    budget_for,
    build_create_body,
    build_prediction_input,
    cancel_prediction_request,
    create_prediction_request,
    error_for_response,
    get_model_request,
    get_prediction_request,
    normalise_status,
    parse_create_response,
    parse_prediction,
    parse_retry_after,
    redact_url,
    scrub_urls,
)

IMAGE = "https://images.example.com/cats/chelsea.jpg"
SECRET = "X-Amz-Signature=deadbeefcafe&X-Amz-Credential=AKIASECRETKEY"
SIGNED_IMAGE = f"{IMAGE}?{SECRET}"
REQUEST_ID = "7f1c2d3e-0000-4000-8000-1234567890ab"


def response(
    status_code: int, body: bytes | dict[str, Any] | list[Any] = b"", headers: dict[str, str] | None = None
) -> ApiResponse:
    """An ApiResponse; dict and list bodies are JSON-encoded."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ApiResponse(status_code, headers or {}, raw)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class UpperRng(random.Random):
    """A random source whose ``uniform`` always returns the upper bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


class LowerRng(random.Random):
    """A random source whose ``uniform`` always returns the lower bound."""

    def uniform(self, a: float, b: float) -> float:
        return a


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


def test_prediction_summary_leaves_out_inputs() -> None:
    payload = {"id": "p", "status": "success", "output": "a dog", "input": {"image": SIGNED_IMAGE}}
    summary = parse_prediction(payload, prediction_id="p").summary()
    assert summary == {
        "id": "p",
        "status": "success",
        "output": "a dog",
        "error": None,
        "error_code": None,
        "predict_time": None,
    }
    assert "deadbeefcafe" not in json.dumps(summary)


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
# error_for_response
# --------------------------------------------------------------------------------------------------
ERROR_CLASSES: list[tuple[int, type[Blip2Error]]] = [
    (400, Blip2BadRequestError),
    (401, Blip2AuthenticationError),
    (402, Blip2InsufficientBalanceError),
    (404, Blip2NotFoundError),
    (422, Blip2UnprocessableError),
    (429, Blip2RateLimitError),
    (500, Blip2ServerError),
    (502, Blip2ServerError),
    (503, Blip2ServerError),
    (504, Blip2ServerError),
    (599, Blip2ServerError),
    (301, Blip2Error),
    (403, Blip2Error),
    (405, Blip2Error),
    (418, Blip2Error),
    (499, Blip2Error),
]

BODIES: list[tuple[str, bytes, str | None]] = [
    (
        "json-error",
        b'{"error": "invalid input: image is required", "status": "error"}',
        "invalid input: image is required",
    ),
    ("json-message", b'{"message": "slow down"}', "slow down"),
    ("json-detail", b'{"detail": "prediction not found"}', "prediction not found"),
    ("empty-object", b"{}", None),
    ("empty-bytes", b"", None),
    ("whitespace", b"  \n", None),
    ("json-list", b'["error"]', None),
    ("html", b"<html><body><h1>502 Bad Gateway</h1></body></html>", None),
    ("truncated-json", b'{"error": "cut', None),
]


@pytest.mark.parametrize(("code", "error_class"), ERROR_CLASSES)
@pytest.mark.parametrize(("body", "detail"), [(b, d) for _, b, d in BODIES], ids=[n for n, _, _ in BODIES])
def test_error_for_response_branches_on_status_code(
    code: int, error_class: type[Blip2Error], body: bytes, detail: str | None
) -> None:
    error = error_for_response(
        response(code, body, {"x-request-id": REQUEST_ID}), context="BLIP-2 get prediction p-1"
    )
    assert error is not None
    assert type(error) is error_class
    assert error.status_code == code
    assert error.request_id == REQUEST_ID
    text = str(error)
    assert text.startswith("BLIP-2 get prediction p-1: ")
    assert f"HTTP {code}" in text
    assert f"request id {REQUEST_ID}" in text
    baseline = error_for_response(response(code, b""), context="BLIP-2 get prediction p-1")
    assert baseline is not None
    assert not baseline.message.endswith(":")
    if detail is None:  # nothing readable in the body: the default message for the code, alone
        assert error.message == baseline.message
        assert "<html>" not in text
    else:
        assert error.message == f"{baseline.message}: {detail}"
    assert error.retryable is (error_class in (Blip2RateLimitError, Blip2ServerError))


@pytest.mark.parametrize("code", [200, 201, 202, 204, 299])
def test_error_for_response_is_none_for_2xx(code: int) -> None:
    assert error_for_response(response(code, b"{}"), context="x") is None


def test_error_for_response_without_request_id() -> None:
    error = error_for_response(response(404, b"{}"), context="BLIP-2 get prediction")
    assert error is not None
    assert error.request_id is None
    assert str(error) == "BLIP-2 get prediction: Not found (HTTP 404)"


def test_error_for_response_messages_say_what_to_do() -> None:
    auth = error_for_response(response(401, b'{"error": "invalid API key"}'), context="c")
    balance = error_for_response(response(402, b"{}"), context="c")
    assert auth is not None and balance is not None
    assert "password (API Key)" in str(auth)
    assert "invalid API key" in str(auth)
    assert "top up" in str(balance)


def test_error_for_response_scrubs_and_truncates_body_detail() -> None:
    body = {"error": f"cannot fetch {SIGNED_IMAGE} " + "y" * 1000}
    error = error_for_response(response(400, body), context="c")
    assert error is not None
    assert "deadbeefcafe" not in str(error)
    assert f"{IMAGE}?<redacted>" in str(error)
    assert error.message.count("y") <= 500


def test_error_for_response_429_carries_retry_after() -> None:
    error = error_for_response(
        response(429, {"error": "too many requests", "retry_after": 9}, {"Retry-After": "2.5"}), context="c"
    )
    assert isinstance(error, Blip2RateLimitError)
    assert error.retry_after == 2.5


def test_error_for_response_429_without_hint() -> None:
    error = error_for_response(response(429, b"{}"), context="c")
    assert isinstance(error, Blip2RateLimitError)
    assert error.retry_after is None


def test_api_response_helpers() -> None:
    answer = response(200, b'{"a": 1}', {"X-REQUEST-ID": "rid", "Content-Type": "application/json"})
    assert answer.header("x-request-id") == "rid"
    assert answer.header("content-type") == "application/json"
    assert answer.header("missing") is None
    assert answer.request_id == "rid"
    assert answer.json() == {"a": 1}
    assert response(200, b"<html>").json() is None
    assert response(200, b"").json() is None


def test_error_render_formats() -> None:
    assert str(Blip2Error("plain")) == "plain"
    assert str(Blip2Error("m", status_code=500)) == "m (HTTP 500)"
    assert str(Blip2Error("m", request_id="r")) == "m (request id r)"
    assert str(Blip2Error("m", status_code=404, request_id="r")) == "m (HTTP 404, request id r)"


def test_ambiguous_create_error_keeps_status_and_request_id() -> None:
    cause = Blip2ServerError("BLIP-2 create prediction: The API failed", status_code=502, request_id="rid")
    error = ambiguous_create_error(cause)
    assert isinstance(error, Blip2AmbiguousCreateError)
    assert error.status_code == 502
    assert error.request_id == "rid"
    assert "may have been created" in str(error)
    assert "not resent" in str(error)
    assert "request id rid" in str(error)
    assert error.retryable is False


# --------------------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------------------
NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        pytest.param({"Retry-After": "3"}, b"", 3.0, id="integer-header"),
        pytest.param({"retry-after": "1.5"}, b"", 1.5, id="decimal-header-lowercase"),
        pytest.param({"Retry-After": " 2 "}, b"", 2.0, id="padded-header"),
        pytest.param({"Retry-After": "0"}, b"", 0.0, id="zero-header"),
        pytest.param({"Retry-After": formatdate(NOW + 30, usegmt=True)}, b"", 30.0, id="http-date"),
        pytest.param({"Retry-After": formatdate(NOW - 30, usegmt=True)}, b"", 0.0, id="http-date-in-past"),
        pytest.param({}, {"retry_after": 4}, 4.0, id="body-number"),
        pytest.param({}, {"retry_after": 0.25}, 0.25, id="body-decimal"),
        pytest.param({}, {"retry_after": "2.5"}, 2.5, id="body-numeric-string"),
        pytest.param({"Retry-After": "1"}, {"retry_after": 9}, 1.0, id="header-wins"),
        pytest.param({"Retry-After": "soon"}, {"retry_after": 7}, 7.0, id="garbage-header-falls-to-body"),
        pytest.param({"Retry-After": "soon"}, b"", None, id="garbage-header"),
        pytest.param({}, {"retry_after": "later"}, None, id="garbage-body"),
        pytest.param({}, {"retry_after": True}, None, id="bool-body"),
        pytest.param({}, {"retry_after": None}, None, id="null-body"),
        pytest.param({}, {"retry_after": [1]}, None, id="list-body"),
        pytest.param({"Retry-After": "nan"}, b"", None, id="nan-header"),
        pytest.param({"Retry-After": "inf"}, b"", None, id="inf-header"),
        pytest.param({"Retry-After": "-5"}, b"", 0.0, id="negative-header"),
        pytest.param({}, {"retry_after": -2}, 0.0, id="negative-body"),
        pytest.param({}, b"", None, id="nothing"),
        pytest.param({}, b"<html>slow down</html>", None, id="html-body"),
        pytest.param({}, b"[1, 2]", None, id="list-json-body"),
    ],
)
def test_parse_retry_after(headers: dict[str, str], body: Any, expected: float | None) -> None:
    assert parse_retry_after(response(429, body, headers), now=NOW) == expected


# --------------------------------------------------------------------------------------------------
# parse_create_response
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [200, 201])
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "success", "message": "Prediction created", "predictionID": "uuid-1"}, "uuid-1"),
        ({"predictionId": "uuid-2"}, "uuid-2"),
        ({"prediction_id": "uuid-3"}, "uuid-3"),
        ({"id": "uuid-4"}, "uuid-4"),
        ({"predictionID": "first", "id": "second"}, "first"),
        ({"predictionID": "", "id": "fallback"}, "fallback"),
    ],
)
def test_parse_create_response(code: int, body: dict[str, Any], expected: str) -> None:
    assert parse_create_response(response(code, body)) == expected


@pytest.mark.parametrize("code", [200, 201])
@pytest.mark.parametrize(
    "body",
    [
        {"status": "success", "message": "Prediction created"},
        {"predictionID": None},
        {"predictionID": 12345},
        {"id": ""},
        b"",
        b"{}",
        b"<html>ok</html>",
        ["uuid"],
    ],
)
def test_parse_create_response_without_id(code: int, body: Any) -> None:
    with pytest.raises(Blip2ProtocolError, match="no prediction id") as caught:
        parse_create_response(response(code, body, {"X-Request-Id": REQUEST_ID}))
    assert caught.value.status_code == code
    assert caught.value.request_id == REQUEST_ID


# --------------------------------------------------------------------------------------------------
# build_prediction_input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "caption", "question", "context"),
    [
        ({}, False, DEFAULT_QUESTION, None),
        ({"question": None}, False, DEFAULT_QUESTION, None),
        ({"question": "What color is the cat?"}, False, "What color is the cat?", None),
        ({"caption": True}, True, None, None),
        ({"caption": True, "question": None}, True, None, None),
        ({"caption": True, "question": ""}, True, None, None),
        ({"question": ""}, True, None, None),
        ({"question": "", "context": ""}, True, None, None),
        (
            {"question": "Is it asleep?", "context": "Question: What animal? Answer: a cat."},
            False,
            "Is it asleep?",
            "Question: What animal? Answer: a cat.",
        ),
        ({"question": "Why?", "context": ""}, False, "Why?", None),
        ({"context": "Question: a? Answer: b."}, False, DEFAULT_QUESTION, "Question: a? Answer: b."),
    ],
)
def test_build_prediction_input_modes(
    kwargs: dict[str, Any], caption: bool, question: str | None, context: str | None
) -> None:
    inputs = build_prediction_input(IMAGE, **kwargs)
    assert inputs.caption is caption
    assert inputs.question == question
    assert inputs.context == context
    assert inputs.image == IMAGE
    assert inputs.temperature == 1.0
    assert inputs.use_nucleus_sampling is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 0.5),
        (1.0, 1.0),
        (1, 1.0),
        (0.75, 0.75),
        ("1", 1.0),
        ("0.7", 0.7),
        (" 0.9 ", 0.9),
        ("0.5", 0.5),
    ],
)
def test_temperature_accepted(value: Any, expected: float) -> None:
    inputs = build_prediction_input(IMAGE, temperature=value, use_nucleus_sampling=True)
    assert inputs.temperature == expected
    assert isinstance(inputs.temperature, float)
    assert inputs.use_nucleus_sampling is True


@pytest.mark.parametrize(
    "value",
    [
        *(0.49, 0.4999999, 1.0000001, 1.01, 0, 2, -1, "1.5", "0.1"),
        *(math.nan, "nan", math.inf, "-inf", True, False, "abc", "", None, [0.7], {"t": 1}),
    ],
)
def test_temperature_refused(value: Any) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, temperature=value)
    message = str(caught.value)
    assert "temperature" in message
    assert "0.5" in message and "1.0" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"caption": "yes"}, "caption"),
        ({"caption": 1}, "caption"),
        ({"caption": None}, "caption"),
        ({"use_nucleus_sampling": "true"}, "use_nucleus_sampling"),
        ({"use_nucleus_sampling": 0}, "use_nucleus_sampling"),
        ({"question": 42}, "question"),
        ({"question": ["why"]}, "question"),
        ({"context": 3.5}, "context"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, **kwargs)
    assert str(caught.value).startswith(field)


def test_caption_with_question_is_refused() -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(IMAGE, caption=True, question="What is it?")
    message = str(caught.value)
    assert "caption=True" in message
    assert "'What is it?'" in message
    assert "caption=False" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"caption": True, "context": "Question: a? Answer: b."},
        {"question": "", "context": "Question: a? Answer: b."},
    ],
)
def test_context_while_captioning_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(Blip2InputError, match="context is only used when asking a question"):
        build_prediction_input(IMAGE, **kwargs)


@pytest.mark.parametrize(
    "image",
    [
        "https://example.com/a.jpg",
        "http://127.0.0.1:8080/chelsea.jpg",
        "HTTPS://EXAMPLE.COM/A.PNG",
        SIGNED_IMAGE,
        "  https://example.com/padded.webp  ",
    ],
)
def test_image_urls_accepted(image: str) -> None:
    inputs = build_prediction_input(image)
    assert inputs.image == image.strip()


@pytest.mark.parametrize(
    "image",
    [
        "s3://bucket/key/cat.jpg",
        "ftp://files.example.com/cat.jpg",
        "file:///tmp/cat.jpg",
        "gs://bucket/cat.jpg",
        "images/cat.jpg",
        "./cat.jpg",
        "/abs/cat.jpg",
        "cat.jpg",
        "example.com/cat.jpg",
        "http://",
        "https:///no-host.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_image_must_be_http_url(image: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(image)
    assert str(caught.value).startswith("image must be an http:// or https:// URL")


@pytest.mark.parametrize(
    "image",
    [
        f"s3://bucket/key/cat.jpg?{SECRET}",
        f"ftp://files.example.com/cat.jpg?{SECRET}",
        f"images/cat.jpg?{SECRET}",
        f"cat.jpg?{SECRET}",
        f"https:///no-host.jpg?{SECRET}",
        f"file:///tmp/cat.jpg?{SECRET}",
        f"ftp://user:pw-{SECRET}@files.example.com/cat.jpg",
        f"ftp://files.example.com:notaport/cat.jpg?{SECRET}",
    ],
)
def test_image_error_never_leaks_the_query_string(image: str) -> None:
    with pytest.raises(Blip2InputError) as caught:
        build_prediction_input(image)
    message = str(caught.value)
    assert message.startswith("image")
    for leak in ("deadbeefcafe", "AKIASECRETKEY", "X-Amz"):
        assert leak not in message


@pytest.mark.parametrize("image", ["", "   ", None, 42, ["https://example.com/a.jpg"]])
def test_image_must_be_non_empty_string(image: Any) -> None:
    with pytest.raises(Blip2InputError, match="image must be a non-empty URL string"):
        build_prediction_input(image)


def test_to_api_question_shape() -> None:
    inputs = build_prediction_input(
        IMAGE,
        question="Is it asleep?",
        context="Question: What animal? Answer: a cat.",
        temperature="0.7",
        use_nucleus_sampling=True,
    )
    assert inputs.to_api() == {
        "image": IMAGE,
        "caption": False,
        "use_nucleus_sampling": True,
        "temperature": 0.7,
        "question": "Is it asleep?",
        "context": "Question: What animal? Answer: a cat.",
    }


def test_to_api_default_question_shape() -> None:
    assert build_prediction_input(IMAGE).to_api() == {
        "image": IMAGE,
        "caption": False,
        "use_nucleus_sampling": False,
        "temperature": 1.0,
        "question": DEFAULT_QUESTION,
    }


@pytest.mark.parametrize("kwargs", [{"caption": True}, {"question": ""}])
def test_to_api_caption_shape(kwargs: dict[str, Any]) -> None:
    assert build_prediction_input(IMAGE, **kwargs).to_api() == {
        "image": IMAGE,
        "caption": True,
        "use_nucleus_sampling": False,
        "temperature": 1.0,
    }


def test_to_api_is_json_serialisable_and_build_create_body() -> None:
    inputs = build_prediction_input(IMAGE, question="Why?")
    body = build_create_body(inputs, model="blip-2", version="0.0.1")
    assert json.loads(json.dumps(body)) == {"model": "blip-2", "version": "0.0.1", "input": inputs.to_api()}


def test_describe_names_the_image_file_but_not_its_url() -> None:
    name = IMAGE.rsplit("/", 1)[-1]
    assert build_prediction_input(SIGNED_IMAGE, caption=True).describe() == f"caption of image {name!r}"
    described = build_prediction_input(SIGNED_IMAGE, question="Why?").describe()
    assert described == f"question 'Why?' of image {name!r}"
    assert "://" not in described


def test_prediction_input_is_frozen() -> None:
    inputs = build_prediction_input(IMAGE)
    with pytest.raises(AttributeError):
        inputs.image = "https://other.example.com/x.jpg"  # type: ignore[misc]
    assert isinstance(inputs, PredictionInput)


# --------------------------------------------------------------------------------------------------
# redact_url
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/a/b.jpg", "https://example.com/a/b.jpg"),
        (SIGNED_IMAGE, f"{IMAGE}?<redacted>"),
        ("https://user:hunter2@example.com:8443/a.png", "https://example.com:8443/a.png"),
        ("https://token@example.com/a.png?x=1", "https://example.com/a.png?<redacted>"),
        ("http://example.com/a.jpg#fragment", "http://example.com/a.jpg"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        ("cat.jpg", "cat.jpg"),
        ("cat.jpg?sig=1", "<redacted>"),
        ("x" * 81, "<redacted>"),
        ("x" * 80, "x" * 80),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"http://host:notaport/a.jpg?{SECRET}",
        f"https://host:99999/a.jpg?{SECRET}",
        f"http://[::1/a.jpg?{SECRET}",
    ],
)
def test_redact_url_never_raises_nor_leaks(url: str) -> None:
    redacted = redact_url(url)
    assert "deadbeefcafe" not in redacted


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
def test_request_builders() -> None:
    body = build_create_body(build_prediction_input(IMAGE), model="blip-2", version="0.0.1")
    create = create_prediction_request(body)
    assert (create.method, create.path, create.creates, create.json_body) == (
        "POST",
        "/v1/prediction/",
        True,
        body,
    )
    get = get_prediction_request("abc")
    assert (get.method, get.path, get.creates) == ("GET", "/v1/prediction/abc", False)
    cancel = cancel_prediction_request("abc")
    assert (cancel.method, cancel.path, cancel.creates) == ("POST", "/v1/prediction/abc/cancel", False)
    model = get_model_request("blip-2")
    assert (model.method, model.path, model.params) == ("GET", "/v1/model", {"slug": "blip-2"})


@pytest.mark.parametrize("bad_id", ["", "a/b", "../model", None, 42])
def test_prediction_ids_are_checked(bad_id: Any) -> None:
    with pytest.raises(Blip2InputError, match="prediction_id"):
        get_prediction_request(bad_id)
    with pytest.raises(Blip2InputError, match="prediction_id"):
        cancel_prediction_request(bad_id)


def test_auth_headers() -> None:
    assert auth_headers("k-1") == {
        "X-API-Key": "k-1",
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    with pytest.raises(Blip2AuthenticationError, match="No API key"):
        auth_headers("")


# --------------------------------------------------------------------------------------------------
# RetryPolicy
# --------------------------------------------------------------------------------------------------
GET = get_prediction_request("p")
CANCEL = cancel_prediction_request("p")
CREATE = create_prediction_request({"model": "blip-2", "version": "0.0.1", "input": {"image": IMAGE}})


@pytest.mark.parametrize(
    ("error", "get", "cancel", "create"),
    [
        pytest.param(Blip2RateLimitError("429", retry_after=1.0), True, True, True, id="429"),
        pytest.param(Blip2RateLimitError("429"), True, True, True, id="429-no-hint"),
        pytest.param(Blip2TransportError("reset", sent=True), True, True, False, id="transport-sent"),
        pytest.param(Blip2TransportError("refused", sent=False), True, True, True, id="transport-not-sent"),
        pytest.param(Blip2ServerError("500", status_code=500), True, True, False, id="5xx"),
        pytest.param(Blip2BadRequestError("400", status_code=400), False, False, False, id="400"),
        pytest.param(Blip2AuthenticationError("401", status_code=401), False, False, False, id="401"),
        pytest.param(Blip2InsufficientBalanceError("402"), False, False, False, id="402"),
        pytest.param(Blip2NotFoundError("404", status_code=404), False, False, False, id="404"),
        pytest.param(Blip2UnprocessableError("422"), False, False, False, id="422"),
        pytest.param(Blip2Error("418", status_code=418), False, False, False, id="other-4xx"),
        pytest.param(Blip2ProtocolError("garbage"), False, False, False, id="protocol"),
        pytest.param(Blip2AmbiguousCreateError("ambiguous"), False, False, False, id="ambiguous"),
        pytest.param(ValueError("bug"), False, False, False, id="not-a-blip2-error"),
    ],
)
def test_should_retry_matrix(error: BaseException, get: bool, cancel: bool, create: bool) -> None:
    policy = RetryPolicy()
    assert policy.should_retry(error, GET) is get
    assert policy.should_retry(error, CANCEL) is cancel
    assert policy.should_retry(error, CREATE) is create


@pytest.mark.parametrize(
    ("retry_after", "max_wait", "expected"),
    [(5.0, 30.0, 5.0), (0.0, 30.0, 0.0), (30.0, 30.0, 30.0), (100.0, 30.0, 30.0), (3600.0, 2.0, 2.0)],
)
@pytest.mark.parametrize("attempt", [1, 4])
def test_wait_honours_retry_after_capped_at_max_wait(
    retry_after: float, max_wait: float, expected: float, attempt: int
) -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=max_wait)
    error = Blip2RateLimitError("429", retry_after=retry_after)
    low = policy.wait_seconds(error, attempt, LowerRng())
    high = policy.wait_seconds(error, attempt, UpperRng())
    assert low == expected  # never shorter than the server asked (unless capped)
    assert expected <= high <= expected + 0.1  # a jitter of at most 0.1 s
    for seed in range(20):
        assert expected <= policy.wait_seconds(error, attempt, random.Random(seed)) <= expected + 0.1


def test_wait_without_retry_after_grows_exponentially_and_is_bounded() -> None:
    policy = RetryPolicy(initial_wait=1.0, max_wait=30.0)
    error = Blip2ServerError("503", status_code=503)
    ceilings = [policy.wait_seconds(error, attempt, UpperRng()) for attempt in range(1, 10)]
    floors = [policy.wait_seconds(error, attempt, LowerRng()) for attempt in range(1, 10)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert floors == [c / 2 for c in ceilings]
    rng = random.Random(7)
    for attempt in range(1, 40):
        wait = policy.wait_seconds(error, attempt, rng)
        assert 0.5 <= wait <= 30.0


@pytest.mark.parametrize(
    "error",
    [
        Blip2RateLimitError("429"),  # no Retry-After: backoff
        Blip2TransportError("reset", sent=False),
        None,
    ],
)
def test_wait_uses_backoff_when_no_retry_after(error: BaseException | None) -> None:
    policy = RetryPolicy(initial_wait=0.5, max_wait=3.0)
    assert policy.wait_seconds(error, 1, UpperRng()) == 0.5
    assert policy.wait_seconds(error, 3, UpperRng()) == 2.0
    assert policy.wait_seconds(error, 20, UpperRng()) == 3.0


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.max_elapsed, policy.initial_wait, policy.max_wait) == (
        6,
        120.0,
        1.0,
        30.0,
    )


# --------------------------------------------------------------------------------------------------
# RequestBudget
# --------------------------------------------------------------------------------------------------
def test_budget_sliding_window() -> None:
    clock = FakeClock()
    budget = RequestBudget(3, 10, window=60.0, clock=clock)
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
    monkeypatch.setattr(protocol, "_BUDGETS", {})
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


# --------------------------------------------------------------------------------------------------
# ClientSettings
# --------------------------------------------------------------------------------------------------
def test_settings_defaults() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="sekrit-api-key", extra={})
    assert settings == ClientSettings(
        base_url=DEFAULT_BASE_URL,
        api_key="sekrit-api-key",
        model=DEFAULT_MODEL,
        model_version=DEFAULT_MODEL_VERSION,
        request_timeout=DEFAULT_REQUEST_TIMEOUT,
        requests_per_minute=DEFAULT_REQUESTS_PER_MINUTE,
        max_concurrency=DEFAULT_MAX_CONCURRENCY,
        rate_window=60.0,
    )
    assert (settings.requests_per_minute, settings.max_concurrency) == (60, 10)
    assert "sekrit" not in repr(settings)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, DEFAULT_BASE_URL),
        ("", DEFAULT_BASE_URL),
        ("   ", DEFAULT_BASE_URL),
        ("api.eachlabs.ai", "https://api.eachlabs.ai"),
        ("api.eachlabs.ai/", "https://api.eachlabs.ai"),
        ("https://api.eachlabs.ai/", "https://api.eachlabs.ai"),
        ("https://api.eachlabs.ai///", "https://api.eachlabs.ai"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        (" http://127.0.0.1:8765/ ", "http://127.0.0.1:8765"),
        ("https://proxy.example.com/eachlabs/", "https://proxy.example.com/eachlabs"),
    ],
)
def test_settings_base_url(host: str | None, expected: str) -> None:
    settings = ClientSettings.from_connection_values(host=host, password="k", extra={})
    assert settings.base_url == expected


@pytest.mark.parametrize("host", ["ftp://api.eachlabs.ai", "s3://bucket", "file:///etc/hosts"])
def test_settings_refuse_non_http_host(host: str) -> None:
    with pytest.raises(Blip2InputError, match="connection host"):
        ClientSettings.from_connection_values(host=host, password="k", extra={})


def test_settings_from_extra_strings() -> None:
    extra = {
        "model": "blip-2-custom",
        "model_version": "0.0.2",
        "request_timeout": "12.5",
        "requests_per_minute": "120",
        "max_concurrency": "3",
    }
    settings = ClientSettings.from_connection_values(host="h.example.com", password="k", extra=extra)
    assert settings.model == "blip-2-custom"
    assert settings.model_version == "0.0.2"
    assert settings.request_timeout == 12.5
    assert settings.requests_per_minute == 120
    assert isinstance(settings.requests_per_minute, int)
    assert settings.max_concurrency == 3
    assert isinstance(settings.max_concurrency, int)
    assert settings.rate_window == 60.0


def test_settings_rate_window() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={"rate_window": "3"})
    assert settings.rate_window == 3.0
    assert (
        ClientSettings.from_connection_values(host=None, password="k", extra={"rate_window": 0.6}).rate_window
        == 0.6
    )


@pytest.mark.parametrize("empty", [None, ""])
def test_settings_empty_extra_fields_mean_default(empty: Any) -> None:
    names = ("model", "request_timeout", "requests_per_minute", "max_concurrency", "rate_window")
    settings = ClientSettings.from_connection_values(
        host=None, password="k", extra={name: empty for name in names}
    )
    assert settings.rate_window == 60.0
    assert settings.model == DEFAULT_MODEL
    assert settings.request_timeout == DEFAULT_REQUEST_TIMEOUT
    assert settings.requests_per_minute == DEFAULT_REQUESTS_PER_MINUTE
    assert settings.max_concurrency == DEFAULT_MAX_CONCURRENCY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("requests_per_minute", 0),
        ("requests_per_minute", "0"),
        ("requests_per_minute", "abc"),
        ("requests_per_minute", -5),
        ("requests_per_minute", 1.5),
        ("requests_per_minute", "nan"),
        ("requests_per_minute", True),
        ("max_concurrency", 0),
        ("max_concurrency", "many"),
        ("max_concurrency", 2.5),
        ("request_timeout", 0),
        ("request_timeout", "-1"),
        ("request_timeout", "soon"),
        ("request_timeout", "inf"),
        ("rate_window", 0),
        ("rate_window", "-3"),
        ("rate_window", "a minute"),
    ],
)
def test_settings_invalid_values_name_the_field(name: str, value: Any) -> None:
    with pytest.raises(Blip2InputError) as caught:
        ClientSettings.from_connection_values(host=None, password="k", extra={name: value})
    message = str(caught.value)
    assert message.startswith(name)
    assert "greater than 0" in message
    assert repr(value) in message


def test_budget_hands_recent_requests_to_another_process() -> None:
    clock = FakeClock()
    worker = RequestBudget(3, 10, window=60.0, clock=clock)
    for _ in range(3):
        assert worker.reserve_request() == 0
        worker.request_done()
    handed = worker.recent_requests()
    assert len(handed) == 3
    triggerer = RequestBudget(3, 10, window=60.0, clock=FakeClock(clock.now))
    triggerer.note_requests(handed)
    assert triggerer.reserve_request() > 0  # the window is full across the handover
    # Noting the same requests twice (both sides in one process) does not count them twice.
    worker.note_requests(handed)
    assert len(worker.recent_requests()) == 3


def test_budget_forgets_handed_requests_older_than_the_window() -> None:
    import time

    budget = RequestBudget(1, 10, window=60.0)
    budget.note_requests([time.time() - 61.0])
    assert budget.reserve_request() == 0


def test_settings_with_own_limits() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={})
    own = settings.with_limits(requests_per_minute=30, max_concurrency=None)
    assert (own.requests_per_minute, own.max_concurrency) == (30, settings.max_concurrency)
    with pytest.raises(Blip2InputError, match="max_concurrency"):
        settings.with_limits(max_concurrency=0)
