"""
The wire format: transport-neutral requests and responses, the endpoints, auth and error mapping.

The transports (``requests`` in workers, ``httpx`` in triggers) only move bytes: they send what
:func:`request_arguments` describes and hand the answer back as an :class:`ApiResponse`, which
:func:`check_response` maps to an error by status code (never by body, which may be empty).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from airflow_provider_blip2.client.errors import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2ProtocolError,
    Blip2RateLimitError,
    Blip2SyncRunUnavailableError,
    Blip2TransportError,
    error_class_for,
)
from airflow_provider_blip2.client.inputs import (
    PredictionInput,
    check_prediction_id,
    parse_seconds,
    scrub_urls,
    split_public_url,
)
from airflow_provider_blip2.client.models import Prediction, parse_prediction
from airflow_provider_blip2.client.settings import ClientSettings

REQUEST_ID_HEADER = "X-Request-Id"


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiRequest:
    """
    One HTTP request to the API, transport-neutral.

    :param method: ``GET`` or ``POST``.
    :param path: Path below the base URL, e.g. ``/v1/prediction/``.
    :param json_body: JSON body, if any.
    :param params: Query parameters.
    :param creates: Whether the request creates a billed resource and is therefore not idempotent.
    :param label: Short name for logs.
    """

    method: str
    path: str
    json_body: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    creates: bool = False
    label: str = ""
    timeout: float | None = None


def build_create_body(inputs: PredictionInput, *, model: str, version: str) -> dict[str, Any]:
    """
    Return the JSON body of ``POST /v1/prediction/``.

    :param inputs: Validated inputs.
    :param model: Model slug, ``blip-2``.
    :param version: Model version; deprecated by the API and ignored, but still sent.
    """
    return {"model": model, "version": version, "input": inputs.to_api()}


def create_prediction_request(body: dict[str, Any]) -> ApiRequest:
    """Request creating a prediction. :param body: from :func:`build_create_body`."""
    return ApiRequest("POST", "/v1/prediction/", json_body=body, creates=True, label="create prediction")


#: Path of the synchronous run: it creates the prediction and answers once it has ended.
RUN_PATH = "/v1/prediction/run"


def run_prediction_request(body: dict[str, Any], *, wait: float) -> ApiRequest:
    """
    Request creating a prediction and waiting for its end (``POST /v1/prediction/run``).

    :param body: From :func:`build_create_body` (the same body as a create).
    :param wait: Seconds the answer may take: the prediction runs before the server answers.
    """
    return ApiRequest("POST", RUN_PATH, json_body=body, creates=True, label="run prediction", timeout=wait)


def get_prediction_request(prediction_id: str) -> ApiRequest:
    """Request reading a prediction. :param prediction_id: the prediction's id."""
    return ApiRequest("GET", f"/v1/prediction/{check_prediction_id(prediction_id)}", label="get prediction")


#: Keys of a prediction's ``urls`` that may name its page in the Eachlabs console, in order of
#: preference over ``get`` (the API's own address of the prediction).
PAGE_URL_KEYS = ("web", "console")


def prediction_link(base_url: str, prediction_id: str, urls: Mapping[str, Any] | None = None) -> str:
    """
    Where to look at a prediction: its console page, or the API's own address of it.

    The page is the first http(s) URL of ``urls`` under :data:`PAGE_URL_KEYS`, then ``urls["get"]``;
    without ``urls`` (a create answers with the id only) it is the address ``urls.get`` holds, the
    read endpoint below ``base_url``. Credentials and query strings are dropped: the link is shown in
    the UI and stored in XCom.

    :param base_url: The connection's API base URL.
    :param prediction_id: The prediction's id.
    :param urls: The prediction's ``urls`` as the API answered them, if it was read.
    """
    for key in (*PAGE_URL_KEYS, "get"):
        value = (urls or {}).get(key)
        if isinstance(value, str) and value.lower().startswith(("https://", "http://")):
            public = split_public_url(value)
            if public is not None:
                return "".join(public)
    origin, path = split_public_url(base_url + get_prediction_request(prediction_id).path) or ("", "")
    return origin + path


def cancel_prediction_request(prediction_id: str) -> ApiRequest:
    """Request cancelling a prediction. :param prediction_id: the prediction's id."""
    path = f"/v1/prediction/{check_prediction_id(prediction_id)}/cancel"
    return ApiRequest("POST", path, label="cancel prediction")


def get_model_request(model: str) -> ApiRequest:
    """Request reading the public model record. :param model: the model slug."""
    return ApiRequest("GET", "/v1/model", params={"slug": model}, label="get model")


def auth_headers(api_key: str) -> dict[str, str]:
    """
    Headers authenticating a request; the documented ``X-API-Key`` header.

    :param api_key: The Eachlabs API key.
    """
    if not api_key:
        raise Blip2AuthenticationError(
            "No API key: set the Eachlabs API key as the password (API Key) of the blip2 connection"
        )
    return {"X-API-Key": api_key, "Accept": "application/json", "Content-Type": "application/json"}


def request_arguments(settings: ClientSettings, request: ApiRequest) -> dict[str, Any]:
    """
    Keyword arguments of one request, the same for ``requests`` and ``httpx``.

    :param settings: The connection's settings (base URL, key, timeout).
    :param request: The request.
    """
    return {
        "method": request.method,
        "url": settings.base_url + request.path,
        "params": request.params or None,
        "json": request.json_body,
        "headers": auth_headers(settings.api_key),
        "timeout": settings.request_timeout if request.timeout is None else request.timeout,
    }


def transport_error(request: ApiRequest, error: Exception, *, sent: bool) -> Blip2TransportError:
    """
    A request that got no HTTP answer.

    :param request: The request.
    :param error: What the transport raised.
    :param sent: Whether the request may have reached the server.
    """
    stage = "after the request was sent" if sent else "before the request was sent"
    return Blip2TransportError(f"BLIP-2 {request.label}: {type(error).__name__} {stage}: {error}", sent=sent)


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiResponse:
    """
    An HTTP answer, transport-neutral.

    :param status_code: HTTP status code.
    :param headers: Response headers (case-insensitive lookups via :meth:`header`).
    :param body: Raw body bytes.
    """

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return a header value, case-insensitively. :param name: header name."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None

    @property
    def request_id(self) -> str | None:
        """The server's ``X-Request-Id``."""
        return self.header(REQUEST_ID_HEADER)

    def json(self) -> Any:
        """The decoded JSON body, or ``None`` when empty or not JSON."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def parse_retry_after(response: ApiResponse, *, now: float | None = None) -> float | None:
    """
    Seconds to wait before retrying, from the ``Retry-After`` header, else the body's ``retry_after``.

    The header may be delta-seconds (integer or decimal) or an HTTP date.

    :param response: The 429 (or 503) response.
    :param now: Current Unix time, for HTTP-date headers.
    """
    header = response.header("Retry-After")
    if header:
        seconds = parse_seconds(header)
        if seconds is None:
            seconds = _parse_http_date(header, time.time() if now is None else now)
        if seconds is not None:
            return seconds
    body = response.json()
    if isinstance(body, dict):
        return parse_seconds(body.get("retry_after"))
    return None


def error_for_response(response: ApiResponse, *, context: str) -> Blip2Error | None:
    """
    Map an HTTP answer to an exception, or ``None`` for a 2xx.

    Branches on the status code, never on the body, which may be empty or not JSON.

    :param response: The answer.
    :param context: What was being done, e.g. ``"get prediction 1234"``, for the message.
    """
    code = response.status_code
    if 200 <= code < 300:
        return None
    detail = _body_message(response.json())
    error_class, default = error_class_for(code)
    message = f"{context}: {default}" + (f": {detail}" if detail else "")
    kwargs: dict[str, Any] = {"status_code": code, "request_id": response.request_id}
    if error_class is Blip2RateLimitError:
        kwargs["retry_after"] = parse_retry_after(response)
    return error_class(message, **kwargs)


def check_response(request: ApiRequest, response: ApiResponse) -> ApiResponse:
    """
    Return a 2xx answer; raise the mapped error for any other.

    :param request: What was sent, for the message.
    :param response: The answer.
    """
    error = error_for_response(response, context=f"BLIP-2 {request.label}")
    if error is not None:
        if request.path == RUN_PATH and is_sync_run_refusal(response):
            raise Blip2SyncRunUnavailableError(
                f"BLIP-2 {request.label}: the model has no synchronous run: {error.message}",
                status_code=error.status_code,
                request_id=error.request_id,
            )
        raise error
    return response


# Words of a 400 that refuses the synchronous run itself, not the inputs.
_REFUSAL_WORDS = re.compile(r"synchron|\bsync\b|/run\b|compatib", re.IGNORECASE)
_NOT_OFFERED_WORDS = re.compile(
    r"not (enabled|supported|available|allowed)|unsupported|disabled", re.IGNORECASE
)
_INPUT_WORDS = re.compile(
    r"\b(input|image|question|caption|context|temperature|nucleus|field)\b", re.IGNORECASE
)


def is_sync_run_refusal(response: ApiResponse) -> bool:
    """
    Whether a 400 from the synchronous run says the model does not offer it.

    A body naming the synchronous run (or an unsupported model) refuses the endpoint; so do a
    404 or 405 (a server without the endpoint) and a 400 with no message at all (the inputs were
    checked against the model's schema before the request, and a create that follows answers 400
    again if they were the fault). A message about the inputs (a field, the image) is the user's
    error, raised as it is.

    :param response: The answer of ``POST /v1/prediction/run``.
    """
    if response.status_code in (404, 405):
        return True  # no such endpoint at all: a create that follows tells a missing model
    if response.status_code != 400:
        return False
    message = _body_message(response.json())
    if message is None:
        return True
    if _REFUSAL_WORDS.search(message):
        return True
    return bool(_NOT_OFFERED_WORDS.search(message)) and not _INPUT_WORDS.search(message)


def parse_create_response(response: ApiResponse) -> str:
    """
    Return the new prediction's id from a successful create answer.

    :param response: A 2xx answer (200 and 201 are both documented).
    :raises Blip2ProtocolError: when no id can be found.
    """
    body = response.json()
    if isinstance(body, dict):
        for key in ("predictionID", "predictionId", "prediction_id", "id"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
    raise Blip2ProtocolError(
        "create prediction: the answer carries no prediction id",
        status_code=response.status_code,
        request_id=response.request_id,
    )


def parse_run_response(response: ApiResponse) -> Prediction:
    """
    The prediction a synchronous run answered with: ended (its output or error), or still running.

    The answer is ``{"status", "message", "predictionID", "output", "error"}``; ``status`` is the
    prediction's (``success``, ``error``, ...; a status that is not terminal means it is still
    running and must be polled). Metrics are read when the answer carries them.

    :param response: A 2xx answer of ``POST /v1/prediction/run``.
    :raises Blip2ProtocolError: when no prediction id can be found.
    """
    prediction_id = parse_create_response(response)
    return parse_prediction(response.json(), prediction_id=prediction_id)


def parse_model_response(response: ApiResponse) -> dict[str, Any]:
    """
    Return the model record from ``GET /v1/model``.

    :param response: A 2xx answer.
    """
    body = response.json()
    if not isinstance(body, dict):
        raise Blip2ProtocolError("get model: the answer is not a JSON object", request_id=response.request_id)
    return body


def _body_message(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "details"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return scrub_urls(value.strip())[:500]
    return None


def _parse_http_date(value: str, now: float) -> float | None:
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - now)
