"""
The Eachlabs prediction API protocol for the BLIP-2 model, independent of Airflow.

Everything the sync hook, the async hook and the trigger agree on lives here: input validation,
request building, response and status parsing, error mapping, ``Retry-After`` handling, the
retry policy and the client-side request budget. The transports (``requests`` and ``httpx``) only
move bytes; they call into this module for every decision.
"""

from __future__ import annotations

import enum
import json
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.eachlabs.ai"
DEFAULT_MODEL = "blip-2"
DEFAULT_MODEL_VERSION = "0.0.1"
DEFAULT_QUESTION = "What is this a picture of?"
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_REQUESTS_PER_MINUTE = 60
DEFAULT_MAX_CONCURRENCY = 10
TEMPERATURE_RANGE = (0.5, 1.0)
REQUEST_ID_HEADER = "X-Request-Id"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
class Blip2Error(Exception):
    """
    Base class of every error raised by this provider's API client.

    :param message: What went wrong and what to do about it.
    :param status_code: The HTTP status code, when the server answered.
    :param request_id: The server's ``X-Request-Id``, to quote to the API's support.
    """

    retryable: bool = False

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None):
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"HTTP {self.status_code}")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return parts[0] if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


class Blip2InputError(Blip2Error, ValueError):
    """An input fails validation before any request is sent; the message names the field and the fix."""


class Blip2BadRequestError(Blip2Error):
    """HTTP 400: the server refused the inputs or the model name."""


class Blip2AuthenticationError(Blip2Error):
    """HTTP 401: the API key is missing or invalid."""


class Blip2InsufficientBalanceError(Blip2Error):
    """HTTP 402: the account balance is too low to run the prediction."""


class Blip2NotFoundError(Blip2Error):
    """HTTP 404: the prediction or the model does not exist."""


class Blip2UnprocessableError(Blip2Error):
    """HTTP 422: the server could not parse the request body."""


class Blip2RateLimitError(Blip2Error):
    """
    HTTP 429: too many requests; nothing was created.

    :param retry_after: Seconds the server asked us to wait, if it said.
    """

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any):
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class Blip2ServerError(Blip2Error):
    """HTTP 5xx: a server-side failure; safe to retry only for idempotent requests."""

    retryable = True


class Blip2TransportError(Blip2Error):
    """
    The request did not get an HTTP answer (connection refused, reset, timeout).

    :param sent: Whether the request may have reached the server. ``False`` only when the
        connection could not be opened, so the server cannot have acted on it.
    """

    retryable = True

    def __init__(self, message: str, *, sent: bool, **kwargs: Any):
        self.sent = sent
        super().__init__(message, **kwargs)


class Blip2AmbiguousCreateError(Blip2Error):
    """
    A create request failed after it was sent: a prediction may exist and may be billed.

    It is never resent automatically, because the API has no idempotency key.
    """


class Blip2ProtocolError(Blip2Error):
    """The server answered with something this client cannot read."""


class Blip2PredictionFailedError(Blip2Error):
    """
    A prediction ended with status error or cancelled.

    :param prediction_id: The prediction that failed.
    :param error_code: The API's error code, e.g. ``INPUT_DOWNLOAD_ERROR``.
    """

    def __init__(self, message: str, *, prediction_id: str, error_code: str | None = None, **kwargs: Any):
        self.prediction_id = prediction_id
        self.error_code = error_code
        super().__init__(message, **kwargs)


class Blip2PredictionTimeoutError(Blip2Error):
    """
    A prediction was still running when the caller's deadline passed.

    :param prediction_id: The prediction that did not finish.
    """

    def __init__(self, message: str, *, prediction_id: str, **kwargs: Any):
        self.prediction_id = prediction_id
        super().__init__(message, **kwargs)


_ERRORS_BY_STATUS: dict[int, tuple[type[Blip2Error], str]] = {
    400: (Blip2BadRequestError, "The API refused the request as invalid"),
    401: (
        Blip2AuthenticationError,
        "The API key was refused: set a valid key as the connection's password (API Key)",
    ),
    402: (Blip2InsufficientBalanceError, "The account balance is too low: top up the Eachlabs account"),
    404: (Blip2NotFoundError, "Not found"),
    422: (Blip2UnprocessableError, "The API could not parse the request body"),
    429: (Blip2RateLimitError, "Too many requests"),
}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """
    Return ``url`` without its query string and credentials, safe for logs and error messages.

    :param url: A URL that may carry a signature (presigned URL) or credentials.
    """
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""  # .port raises ValueError on a bad port
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not parts.netloc:
        return url if len(url) <= 80 and "?" not in url else "<redacted>"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    suffix = "?<redacted>" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{suffix}"


def image_name(url: str) -> str:
    """
    The file name at the end of an image URL's path, for logs: no host, no query string.

    :param url: The image URL.
    """
    try:
        path = urlsplit(url).path
    except ValueError:
        return "<unparseable URL>"
    return path.rstrip("/").rsplit("/", 1)[-1] or "<no file name>"


@dataclass(frozen=True)
class PredictionInput:
    """
    Validated inputs of one BLIP-2 prediction. Build it with :func:`build_prediction_input`.

    :param image: http(s) URL of the image; the service downloads it.
    :param question: The question to ask, or ``None`` when captioning.
    :param context: Earlier Q&A prepended to the prompt, or ``None``.
    :param caption: Whether the model captions the image instead of answering a question.
    :param temperature: Sampling temperature (only used with nucleus sampling).
    :param use_nucleus_sampling: Sample instead of beam search.
    """

    image: str
    question: str | None
    context: str | None
    caption: bool
    temperature: float
    use_nucleus_sampling: bool

    def to_api(self) -> dict[str, Any]:
        """Return the ``input`` object of a create request."""
        payload: dict[str, Any] = {
            "image": self.image,
            "caption": self.caption,
            "use_nucleus_sampling": self.use_nucleus_sampling,
            "temperature": self.temperature,
        }
        if not self.caption:
            payload["question"] = self.question
            if self.context:
                payload["context"] = self.context
        return payload

    def describe(self) -> str:
        """A one-line description safe for logs: only the image's file name, never its URL."""
        task = "caption" if self.caption else f"question {self.question!r}"
        return f"{task} of image {image_name(self.image)!r}"


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Blip2InputError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def _check_optional_text(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Blip2InputError(f"{name} must be a string or None, got {type(value).__name__} {value!r}")


def _check_temperature(value: Any) -> float:
    low, high = TEMPERATURE_RANGE
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or math.isnan(number) or not low <= number <= high:
        raise Blip2InputError(f"temperature must be a number from {low} to {high}, got {value!r}")
    return number


def _check_image_url(value: Any) -> str:
    if not isinstance(value, str):
        raise Blip2InputError(f"image must be a non-empty URL string, got {type(value).__name__}")
    if not value.strip():
        raise Blip2InputError("image must be a non-empty URL string, got an empty string")
    image = value.strip()
    parts = urlsplit(image)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Blip2InputError(
            f"image must be an http:// or https:// URL the service can download, got {redact_url(image)!r}"
        )
    return image


def _check_mode(caption: bool, question: str | None, context: str | None) -> tuple[bool, str | None]:
    if caption and question:
        raise Blip2InputError(
            f"question={question!r} was given together with caption=True, which makes the model ignore "
            "the question: drop the question to caption, or set caption=False to ask it"
        )
    captioning = caption or question == ""
    if captioning and context:
        raise Blip2InputError(
            "context is only used when asking a question, but the model is captioning "
            "(caption=True or an empty question): set a question or drop the context"
        )
    return captioning, None if captioning else (question or DEFAULT_QUESTION)


def build_prediction_input(
    image: Any,
    *,
    question: Any = None,
    context: Any = None,
    caption: Any = False,
    temperature: Any = 1.0,
    use_nucleus_sampling: Any = False,
) -> PredictionInput:
    """
    Validate BLIP-2 inputs against the model's schema and return them normalised.

    ``caption=True`` or an empty question means captioning, as the model does; a question together
    with ``caption=True`` is refused rather than silently ignored. ``temperature`` accepts numeric
    strings ("1") and must lie in [0.5, 1.0]; it only matters with nucleus sampling.

    :param image: http(s) URL of the image.
    :param question: Question to ask; ``None`` asks the model's default question.
    :param context: Earlier Q&A, ``Question: {q} Answer: {a}.`` joined by spaces.
    :param caption: Caption the image instead of answering a question.
    :param temperature: Sampling temperature, 0.5 to 1.0.
    :param use_nucleus_sampling: Sample instead of beam search.
    :raises Blip2InputError: naming the field, the value and the allowed values.
    """
    caption_flag = _check_bool("caption", caption)
    nucleus = _check_bool("use_nucleus_sampling", use_nucleus_sampling)
    temp = _check_temperature(temperature)
    text_question = _check_optional_text("question", question)
    text_context = _check_optional_text("context", context)
    captioning, final_question = _check_mode(caption_flag, text_question, text_context)
    return PredictionInput(
        image=_check_image_url(image),
        question=final_question,
        context=text_context or None,
        caption=captioning,
        temperature=temp,
        use_nucleus_sampling=nucleus,
    )


def build_create_body(inputs: PredictionInput, *, model: str, version: str) -> dict[str, Any]:
    """
    Return the JSON body of ``POST /v1/prediction/``.

    :param inputs: Validated inputs.
    :param model: Model slug, ``blip-2``.
    :param version: Model version; deprecated by the API and ignored, but still sent.
    """
    return {"model": model, "version": version, "input": inputs.to_api()}


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


def create_prediction_request(body: dict[str, Any]) -> ApiRequest:
    """Request creating a prediction. :param body: from :func:`build_create_body`."""
    return ApiRequest("POST", "/v1/prediction/", json_body=body, creates=True, label="create prediction")


def get_prediction_request(prediction_id: str) -> ApiRequest:
    """Request reading a prediction. :param prediction_id: the prediction's id."""
    return ApiRequest("GET", f"/v1/prediction/{_check_id(prediction_id)}", label="get prediction")


def cancel_prediction_request(prediction_id: str) -> ApiRequest:
    """Request cancelling a prediction. :param prediction_id: the prediction's id."""
    return ApiRequest("POST", f"/v1/prediction/{_check_id(prediction_id)}/cancel", label="cancel prediction")


def get_model_request(model: str) -> ApiRequest:
    """Request reading the public model record. :param model: the model slug."""
    return ApiRequest("GET", "/v1/model", params={"slug": model}, label="get model")


def _check_id(prediction_id: str) -> str:
    if not isinstance(prediction_id, str) or not prediction_id or "/" in prediction_id:
        raise Blip2InputError(f"prediction_id must be a non-empty id without '/', got {prediction_id!r}")
    return prediction_id


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


def _body_message(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "details"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return scrub_urls(value.strip())[:500]
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
        seconds = _parse_seconds(header)
        if seconds is None:
            seconds = _parse_http_date(header, time.time() if now is None else now)
        if seconds is not None:
            return seconds
    body = response.json()
    if isinstance(body, dict):
        return _parse_seconds(body.get("retry_after"))
    return None


def _parse_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _parse_http_date(value: str, now: float) -> float | None:
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - now)


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
    error_class, default = _ERRORS_BY_STATUS.get(
        code, (Blip2ServerError, "The API failed") if code >= 500 else (Blip2Error, "Unexpected answer")
    )
    message = f"{context}: {default}" + (f": {detail}" if detail else "")
    kwargs: dict[str, Any] = {"status_code": code, "request_id": response.request_id}
    if error_class is Blip2RateLimitError:
        kwargs["retry_after"] = parse_retry_after(response)
    return error_class(message, **kwargs)


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


class PredictionStatus(str, enum.Enum):
    """Normalised status of a prediction."""

    RUNNING = "running"
    SUCCEEDED = "success"
    FAILED = "error"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the prediction will not change any more."""
        return self is not PredictionStatus.RUNNING


# The one status table. Unknown spellings mean "still running", bounded by the caller's timeout.
STATUS_TABLE: dict[str, PredictionStatus] = {
    "created": PredictionStatus.RUNNING,
    "starting": PredictionStatus.RUNNING,
    "processing": PredictionStatus.RUNNING,
    "queued": PredictionStatus.RUNNING,
    "running": PredictionStatus.RUNNING,
    "success": PredictionStatus.SUCCEEDED,
    "succeeded": PredictionStatus.SUCCEEDED,
    "completed": PredictionStatus.SUCCEEDED,
    "error": PredictionStatus.FAILED,
    "failed": PredictionStatus.FAILED,
    "cancelled": PredictionStatus.CANCELLED,
    "canceled": PredictionStatus.CANCELLED,
}


def normalise_status(raw: Any) -> PredictionStatus:
    """
    Map any status spelling the API has used to a :class:`PredictionStatus`.

    :param raw: The ``status`` field as received.
    """
    if not isinstance(raw, str):
        return PredictionStatus.RUNNING
    return STATUS_TABLE.get(raw.strip().lower(), PredictionStatus.RUNNING)


@dataclass(frozen=True)
class Prediction:
    """
    One prediction as read from the API.

    :param id: The prediction id.
    :param status: Normalised status.
    :param raw_status: The status string as the API spelled it.
    :param output: The model's text on success, else ``None``.
    :param error: A readable error message when the prediction failed, else ``None``.
    :param error_code: The API's error code (e.g. ``INPUT_DOWNLOAD_ERROR``), when given.
    :param predict_time: Seconds the model ran, when reported.
    :param raw: The whole JSON payload.
    """

    id: str
    status: PredictionStatus
    raw_status: str
    output: str | None
    error: str | None
    error_code: str | None
    predict_time: float | None
    raw: dict[str, Any]

    def raise_for_status(self) -> Prediction:
        """Return the prediction if it succeeded, else raise :class:`Blip2PredictionFailedError`."""
        if self.status is PredictionStatus.SUCCEEDED:
            return self
        if not self.status.is_terminal:
            raise Blip2PredictionFailedError(
                f"prediction {self.id} has not finished (status {self.raw_status})", prediction_id=self.id
            )
        raise Blip2PredictionFailedError(
            failure_message(
                self.id, self.status.value, self.error or f"status {self.raw_status}", self.error_code
            ),
            prediction_id=self.id,
            error_code=self.error_code,
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-safe summary without the inputs (which may hold presigned URLs)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "output": self.output,
            "error": self.error,
            "error_code": self.error_code,
            "predict_time": self.predict_time,
        }


def failure_message(prediction_id: str, status: str, error: str | None, error_code: str | None) -> str:
    """
    How a failed or cancelled prediction is reported, on the worker and after a trigger alike.

    :param prediction_id: The prediction.
    :param status: Its normalised status (``error`` or ``cancelled``).
    :param error: The readable reason.
    :param error_code: The API's error code, if any.
    """
    code = f" [{error_code}]" if error_code else ""
    return f"prediction {prediction_id} ended {status}{code}: {error}"


def _output_text(output: Any) -> str | None:
    if output is None or isinstance(output, dict):
        return None
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(item, str) for item in output):
        return "".join(output)
    return json.dumps(output)


def _error_details(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    output = payload.get("output")
    envelope = output if isinstance(output, dict) else {}
    code = envelope.get("error_code")
    for candidate in (envelope.get("error_message"), envelope.get("error"), payload.get("error")):
        if isinstance(candidate, str) and candidate.strip():
            return scrub_urls(candidate.strip()), code if isinstance(code, str) else None
    logs = payload.get("logs")
    if isinstance(logs, str) and logs.strip():
        return scrub_urls(logs.strip()[-500:]), code if isinstance(code, str) else None
    return None, code if isinstance(code, str) else None


def parse_prediction(payload: Any, *, prediction_id: str) -> Prediction:
    """
    Build a :class:`Prediction` from a ``GET /v1/prediction/{id}`` body.

    :param payload: The decoded JSON body.
    :param prediction_id: The id that was asked for (used when the body omits it).
    :raises Blip2ProtocolError: when the body is not a JSON object.
    """
    if not isinstance(payload, dict):
        raise Blip2ProtocolError(f"get prediction {prediction_id}: the answer is not a JSON object")
    raw_status = payload.get("status")
    status = normalise_status(raw_status)
    error, error_code = (None, None)
    if status is not PredictionStatus.SUCCEEDED:
        error, error_code = _error_details(payload)
        if status is PredictionStatus.FAILED and error is None:
            error = "the prediction failed without an error message"
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), dict) else {}
    return Prediction(
        id=str(payload.get("id") or prediction_id),
        status=status,
        raw_status=str(raw_status),
        output=_output_text(payload.get("output")) if status is PredictionStatus.SUCCEEDED else None,
        error=error if status.is_terminal else None,
        error_code=error_code if status.is_terminal else None,
        predict_time=_parse_seconds((metrics or {}).get("predict_time")),
        raw=payload,
    )


def parse_model_response(response: ApiResponse) -> dict[str, Any]:
    """
    Return the model record from ``GET /v1/model``.

    :param response: A 2xx answer.
    """
    body = response.json()
    if not isinstance(body, dict):
        raise Blip2ProtocolError("get model: the answer is not a JSON object", request_id=response.request_id)
    return body


# --------------------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """
    The one retry policy of the client, used by both the sync and the async transport.

    Idempotent requests (GET, cancel) retry on transport errors, 429 and 5xx. A create retries only
    on 429 and on transport errors raised before the request was sent. Every wait honours the
    server's Retry-After (capped at ``max_wait``), else exponential backoff with full jitter.

    :param max_attempts: Attempts in all, the first one included.
    :param max_elapsed: Seconds after which no new attempt starts.
    :param initial_wait: First backoff step in seconds.
    :param max_wait: Longest single wait in seconds.
    """

    max_attempts: int = 6
    max_elapsed: float = 120.0
    initial_wait: float = 1.0
    max_wait: float = 30.0

    def should_retry(self, error: BaseException, request: ApiRequest) -> bool:
        """Whether ``error`` may be retried for ``request``."""
        if isinstance(error, Blip2RateLimitError):
            return True
        if isinstance(error, Blip2TransportError):
            return not (request.creates and error.sent)
        if isinstance(error, Blip2ServerError):
            return not request.creates
        return False

    def wait_seconds(
        self, error: BaseException | None, attempt: int, rng: random.Random | None = None
    ) -> float:
        """
        Seconds to wait after failed attempt number ``attempt`` (1-based).

        :param error: The error of that attempt.
        :param attempt: How many attempts were made so far.
        :param rng: Random source for the jitter.
        """
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, (int, float)):
            jitter = (rng or random).uniform(0, min(1.0, self.initial_wait))
            return min(self.max_wait, float(retry_after) + jitter * 0.1)
        ceiling = min(self.max_wait, self.initial_wait * (2 ** (attempt - 1)))
        return (rng or random).uniform(ceiling / 2, ceiling)


def ambiguous_create_error(error: Blip2Error) -> Blip2AmbiguousCreateError:
    """
    Wrap a failure of a create request that was already sent.

    :param error: The transport error or 5xx answer.
    """
    return Blip2AmbiguousCreateError(
        f"create prediction failed after the request was sent ({error.message}); a prediction may "
        "have been created and billed, so it was not resent: check the Eachlabs dashboard before "
        "running the task again",
        status_code=error.status_code,
        request_id=error.request_id,
    )


# --------------------------------------------------------------------------------------------------
# Client-side request budget
# --------------------------------------------------------------------------------------------------
class RequestBudget:
    """
    Requests-per-minute and predictions-in-flight limits shared by every client in a process.

    It never blocks by itself: :meth:`reserve_request` and :meth:`reserve_prediction` return how long
    to wait (0 when granted), so threads sleep and coroutines ``await asyncio.sleep`` on the same
    shared state. Get instances from :func:`budget_for`, one per connection.

    A request counts from the moment it is reserved; once :meth:`request_done` is called it counts
    until ``window`` seconds after it finished. The server counts it from its arrival, which lies
    between the two, so the client's window always covers the server's and never provokes a 429.

    :param requests_per_minute: Requests allowed in any sliding window of ``window`` seconds.
    :param max_concurrency: Predictions created by this process and not yet seen finished.
    :param window: Window length in seconds.
    :param in_flight_ttl: Seconds after which an unfinished prediction stops counting (a safety net).
    :param clock: Monotonic clock.
    """

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrency: int,
        *,
        window: float = 60.0,
        in_flight_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency
        self.window = window
        self.in_flight_ttl = in_flight_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._finished_requests: deque[float] = deque()
        self._open_requests = 0
        self._in_flight: dict[str, float] = {}
        self._pending_slots = 0

    def reserve_request(self) -> float:
        """Take a request slot and return 0, or return the seconds to wait before asking again."""
        with self._lock:
            now = self._clock()
            finished = self._finished_requests
            while finished and finished[0] <= now - self.window:
                finished.popleft()
            if len(finished) + self._open_requests < self.requests_per_minute:
                self._open_requests += 1
                return 0.0
            return max(0.001, finished[0] + self.window - now) if finished else 0.05

    def request_done(self) -> None:
        """Mark a reserved request finished (answered or failed): it counts for ``window`` from now."""
        with self._lock:
            self._open_requests = max(0, self._open_requests - 1)
            self._finished_requests.append(self._clock())

    def reserve_prediction(self) -> float:
        """Take a slot for a prediction about to be created; 0, or seconds to wait before asking again."""
        with self._lock:
            now = self._clock()
            for key, expiry in list(self._in_flight.items()):
                if expiry <= now:
                    del self._in_flight[key]
            if len(self._in_flight) + self._pending_slots < self.max_concurrency:
                self._pending_slots += 1
                return 0.0
            return 0.05

    def prediction_created(self, prediction_id: str | None) -> None:
        """Turn a reserved slot into a tracked prediction (``None`` when the create failed)."""
        with self._lock:
            self._pending_slots = max(0, self._pending_slots - 1)
            if prediction_id:
                self._in_flight[prediction_id] = self._clock() + self.in_flight_ttl

    def prediction_finished(self, prediction_id: str) -> None:
        """Free the slot of a prediction seen finished or handed to another process."""
        with self._lock:
            self._in_flight.pop(prediction_id, None)

    @property
    def in_flight(self) -> int:
        """Predictions currently counted against ``max_concurrency``."""
        with self._lock:
            return len(self._in_flight) + self._pending_slots

    def recent_requests(self) -> list[float]:
        """
        Unix times of the requests that still count against the window (open ones count as now).

        Hand them to the next process that works for the same job (worker -> triggerer and back),
        which passes them to :meth:`note_requests`, so a handover does not start with a full window.
        """
        with self._lock:
            now = self._clock()
            offset = time.time() - now
            times = [t + offset for t in self._finished_requests if t > now - self.window]
            return sorted(round(t, 3) for t in times + [now + offset] * self._open_requests)

    def note_requests(self, unix_times: Sequence[float]) -> None:
        """
        Count requests another process made (from its :meth:`recent_requests`) against the window.

        Times this budget already counts (the same process on both sides) are not added twice.

        :param unix_times: Unix times of the requests.
        """
        with self._lock:
            now = self._clock()
            offset = time.time() - now
            unmatched = list(self._finished_requests)
            added = []
            for unix_time in unix_times:
                moment = float(unix_time) - offset
                if moment <= now - self.window:
                    continue
                twin = next((k for k in unmatched if abs(moment - k) < 0.005), None)
                if twin is None:
                    added.append(moment)
                else:
                    unmatched.remove(twin)
            self._finished_requests = deque(sorted([*self._finished_requests, *added]))


_BUDGETS: dict[tuple[str, str], RequestBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def budget_for(
    key: str, base_url: str, requests_per_minute: int, max_concurrency: int, window: float = 60.0
) -> RequestBudget:
    """
    Return the process-wide budget of a connection, creating it on first use.

    Limits changed in the connection take effect on the existing budget.

    :param key: The connection id.
    :param base_url: The API base URL (one budget per connection and server).
    :param requests_per_minute: Requests allowed per 60 s.
    :param max_concurrency: Predictions in flight allowed.
    :param window: Seconds ``requests_per_minute`` counts over.
    """
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get((key, base_url))
        if budget is None:
            budget = _BUDGETS[(key, base_url)] = RequestBudget(requests_per_minute, max_concurrency)
        budget.requests_per_minute = requests_per_minute
        budget.max_concurrency = max_concurrency
        budget.window = window
        return budget


def check_positive_number(name: str, value: Any, *, integer: bool = False) -> float:
    """
    Validate a positive setting such as ``request_timeout`` or ``requests_per_minute``.

    :param name: Setting name, for the message.
    :param value: The value, possibly a numeric string from the connection form.
    :param integer: Require a whole number.
    """
    number = _parse_seconds(value)
    if number is None or number <= 0 or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise Blip2InputError(f"{name} must be {kind} greater than 0, got {value!r}")
    return number


@dataclass(frozen=True)
class ClientSettings:
    """
    Everything the client needs from a connection, validated.

    :param base_url: API base URL, without a trailing slash.
    :param api_key: The API key.
    :param model: Model slug.
    :param model_version: Model version sent with creates.
    :param request_timeout: Seconds to wait for one HTTP answer.
    :param requests_per_minute: Client-side request budget per 60 s.
    :param max_concurrency: Client-side limit of predictions in flight.
    :param rate_window: Seconds of the window ``requests_per_minute`` counts over: 60, except
        against an emulator whose time is scaled (``time_scale * 60``).
    """

    base_url: str
    api_key: str = field(repr=False)
    model: str = DEFAULT_MODEL
    model_version: str = DEFAULT_MODEL_VERSION
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    requests_per_minute: int = DEFAULT_REQUESTS_PER_MINUTE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    rate_window: float = 60.0

    def with_limits(
        self, *, requests_per_minute: int | None = None, max_concurrency: int | None = None
    ) -> ClientSettings:
        """
        Return these settings with a task's own limits in place of the connection's.

        :param requests_per_minute: Requests per window, or ``None`` for the connection's.
        :param max_concurrency: Predictions in flight, or ``None`` for the connection's.
        """
        return replace(
            self,
            requests_per_minute=self.requests_per_minute
            if requests_per_minute is None
            else int(check_positive_number("requests_per_minute", requests_per_minute, integer=True)),
            max_concurrency=self.max_concurrency
            if max_concurrency is None
            else int(check_positive_number("max_concurrency", max_concurrency, integer=True)),
        )

    @classmethod
    def from_connection_values(
        cls, *, host: str | None, password: str | None, extra: Mapping[str, Any]
    ) -> ClientSettings:
        """
        Build settings from a connection's host, password and extra fields.

        :param host: Base URL; a bare host name gets ``https://``. Empty means the public API.
        :param password: The API key.
        :param extra: The connection's extra fields.
        """
        return cls(
            base_url=normalise_base_url(host),
            api_key=password or "",
            model=str(extra.get("model") or DEFAULT_MODEL),
            model_version=str(extra.get("model_version") or DEFAULT_MODEL_VERSION),
            request_timeout=check_positive_number(
                "request_timeout", _extra_or_default(extra, "request_timeout", DEFAULT_REQUEST_TIMEOUT)
            ),
            requests_per_minute=int(
                check_positive_number(
                    "requests_per_minute",
                    _extra_or_default(extra, "requests_per_minute", DEFAULT_REQUESTS_PER_MINUTE),
                    integer=True,
                )
            ),
            max_concurrency=int(
                check_positive_number(
                    "max_concurrency",
                    _extra_or_default(extra, "max_concurrency", DEFAULT_MAX_CONCURRENCY),
                    integer=True,
                )
            ),
            rate_window=check_positive_number("rate_window", _extra_or_default(extra, "rate_window", 60.0)),
        )


def _extra_or_default(extra: Mapping[str, Any], name: str, default: Any) -> Any:
    """An extra field's value, or ``default`` when it is unset or empty; 0 is kept (and refused)."""
    value = extra.get(name)
    return default if value is None or value == "" else value


def normalise_base_url(host: str | None) -> str:
    """
    Return the API base URL for a connection host.

    :param host: ``https://api.eachlabs.ai``, ``api.eachlabs.ai``, ``http://127.0.0.1:8765`` or empty.
    """
    value = (host or "").strip()
    if not value:
        return DEFAULT_BASE_URL
    if "://" not in value:
        value = f"https://{value}"
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Blip2InputError(
            f"connection host must be the API base URL such as {DEFAULT_BASE_URL}, got {redact_url(value)!r}"
        )
    return value


_URL_PATTERN = re.compile(r"https?://[^\s'\"<>]+")


def scrub_urls(text: str) -> str:
    """
    Replace every URL in ``text`` by its redacted form (no query string, no credentials).

    :param text: A message from the server that may quote a presigned URL.
    """
    return _URL_PATTERN.sub(lambda match: redact_url(match.group(0)), text)
