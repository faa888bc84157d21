"""
The client's exceptions, and the table that maps an HTTP status code to one of them.

Every error carries the server's ``X-Request-Id`` when there was an answer, so a message can be
quoted to the API's support. Nothing here imports Airflow.
"""

from __future__ import annotations

from typing import Any


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


class Blip2SyncRunUnavailableError(Blip2BadRequestError):
    """
    HTTP 400 from ``POST /v1/prediction/run``: the model has no synchronous execution enabled.

    Nothing was created; the prediction can be created and polled instead.
    """


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


#: HTTP status code -> the error it raises and the start of its message. Other codes: 5xx raise
#: :class:`Blip2ServerError`, anything else non-2xx a plain :class:`Blip2Error`.
ERRORS_BY_STATUS: dict[int, tuple[type[Blip2Error], str]] = {
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


def error_class_for(status_code: int) -> tuple[type[Blip2Error], str]:
    """
    The error class and message start of a non-2xx answer.

    :param status_code: The HTTP status code.
    """
    if status_code in ERRORS_BY_STATUS:
        return ERRORS_BY_STATUS[status_code]
    return (Blip2ServerError, "The API failed") if status_code >= 500 else (Blip2Error, "Unexpected answer")


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
