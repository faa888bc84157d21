"""
Unit tests of the client: the exceptions.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InsufficientBalanceError,
    Blip2NotFoundError,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2UnprocessableError,
    ambiguous_create_error,
    error_class_for,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (400, Blip2BadRequestError),
        (401, Blip2AuthenticationError),
        (402, Blip2InsufficientBalanceError),
        (404, Blip2NotFoundError),
        (422, Blip2UnprocessableError),
        (429, Blip2RateLimitError),
        (500, Blip2ServerError),
        (503, Blip2ServerError),
        (418, Blip2Error),
    ],
)
def test_error_class_for_status_code(code: int, expected: type[Blip2Error]) -> None:
    error_class, message = error_class_for(code)
    assert error_class is expected
    assert message


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
