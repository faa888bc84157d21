"""
Unit tests of the client: the wire format: error mapping, Retry-After, create answers, request
builders.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2AuthenticationError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InputError,
    Blip2InsufficientBalanceError,
    Blip2NotFoundError,
    Blip2ProtocolError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.inputs import (
    build_prediction_input,
)
from airflow_provider_blip2.client.wire import (
    auth_headers,
    build_create_body,
    cancel_prediction_request,
    create_prediction_request,
    error_for_response,
    get_model_request,
    get_prediction_request,
    parse_create_response,
    parse_retry_after,
    prediction_link,
)
from tests.unit.client.helpers import (
    IMAGE,
    REQUEST_ID,
    SIGNED_IMAGE,
    response,
)

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
# The link to a prediction
# --------------------------------------------------------------------------------------------------
PREDICTION_ID = "4f1c2e8a-5b6d-4e7f-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (None, f"https://api.eachlabs.ai/v1/prediction/{PREDICTION_ID}"),
        ({}, f"https://api.eachlabs.ai/v1/prediction/{PREDICTION_ID}"),
        (
            {"get": f"https://api.eachlabs.ai/v1/prediction/{PREDICTION_ID}", "cancel": "https://x/cancel"},
            f"https://api.eachlabs.ai/v1/prediction/{PREDICTION_ID}",
        ),
        # A console page, when the API names one, comes first.
        (
            {"get": "https://api.eachlabs.ai/v1/prediction/p", "web": "https://console.eachlabs.ai/p/1"},
            "https://console.eachlabs.ai/p/1",
        ),
        (
            {"console": "https://console.eachlabs.ai/p/2", "get": "https://a/b"},
            "https://console.eachlabs.ai/p/2",
        ),
        # Never a query string or credentials; nothing but http(s).
        ({"web": "https://console.eachlabs.ai/p/3?token=s3cr3t"}, "https://console.eachlabs.ai/p/3"),
        (
            {"get": "https://user:s3cr3t@api.eachlabs.ai/v1/prediction/p"},
            "https://api.eachlabs.ai/v1/prediction/p",
        ),
        ({"web": "javascript:alert(1)", "get": 7}, f"https://api.eachlabs.ai/v1/prediction/{PREDICTION_ID}"),
    ],
)
def test_prediction_link(urls: dict[str, Any] | None, expected: str) -> None:
    assert prediction_link("https://api.eachlabs.ai", PREDICTION_ID, urls) == expected


def test_prediction_link_is_the_read_endpoint_below_the_base_url() -> None:
    link = prediction_link("http://127.0.0.1:8765/proxy", PREDICTION_ID)
    assert link == "http://127.0.0.1:8765/proxy" + get_prediction_request(PREDICTION_ID).path


def test_prediction_link_refuses_an_id_that_is_not_one() -> None:
    with pytest.raises(Blip2InputError):
        prediction_link("https://api.eachlabs.ai", "../../v1/model?slug=x")
