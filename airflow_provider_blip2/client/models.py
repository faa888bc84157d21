"""
Typed models of what the API returns: a prediction's status, the prediction, and how it ended.

:class:`PredictionOutcome` is the one shape of "how a prediction ended". Both triggers put it in
their events (``to_json``), both operators' ``execute_complete`` read it back (``from_json``), the
worker-side wait returns it and the batch stores it; nothing else describes an ending.

:func:`failure_kind` is the one rule of what predicting again could change (the table
:data:`FAILURE_KIND_BY_STATUS` and the error codes :data:`TRANSIENT_ERROR_CODES`);
:func:`create_again_within_try` and :func:`predict_again_on_new_try` apply it for the operators.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from airflow_provider_blip2.client.errors import Blip2PredictionFailedError, Blip2ProtocolError
from airflow_provider_blip2.client.inputs import parse_seconds, scrub_urls


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


def failure_message(prediction_id: str | None, status: str, error: str | None, error_code: str | None) -> str:
    """
    How a prediction that did not succeed is reported, on the worker and after a trigger alike.

    :param prediction_id: The prediction, or ``None`` when none was created.
    :param status: How it ended (``error``, ``cancelled``, ``timeout`` or ``ambiguous``).
    :param error: The readable reason.
    :param error_code: The API's error code, if any.
    """
    code = f" [{error_code}]" if error_code else ""
    return f"prediction {prediction_id} ended {status}{code}: {error}"


@dataclass(frozen=True)
class PredictionOutcome:
    """
    How one prediction ended: the one outcome shape of the provider.

    :param status: ``success``, ``error``, ``cancelled``, ``timeout`` or ``ambiguous`` (a create
        was sent but not confirmed: a prediction may exist, unknown to the client).
    :param output: The model's text on success.
    :param error: What went wrong otherwise.
    :param error_code: The API's error code, when it gave one.
    :param prediction_id: The prediction, or ``None`` when none was created (or none is known).
    :param predict_time: Seconds the model ran, when the API reported it.
    :param retryable: The ``retryable`` flag of the API's error envelope, when it gave one.
    :param cost: ``metrics.cost`` the API reported for the prediction, when it did.
    """

    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    AMBIGUOUS = "ambiguous"

    status: str
    output: str | None = None
    error: str | None = None
    error_code: str | None = None
    prediction_id: str | None = None
    predict_time: float | None = None
    retryable: bool | None = None
    cost: float | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the prediction produced an output."""
        return self.status == self.SUCCESS

    @property
    def failed(self) -> bool:
        """Whether it ended without an output (counts against a batch's ``max_failed_ratio``)."""
        return not self.succeeded

    @property
    def failure_kind(self) -> FailureKind:
        """What predicting again could change (see :func:`failure_kind`)."""
        return failure_kind(self)

    def failure_message(self) -> str:
        """The message a task fails with when this outcome is not a success."""
        return failure_message(self.prediction_id, self.status, self.error, self.error_code)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for trigger events and the batch's journal (no inputs, URLs or keys)."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> PredictionOutcome:
        """
        Inverse of :meth:`to_json`.

        :param value: A dict from :meth:`to_json`.
        """
        predict_time = value.get("predict_time")
        prediction_id = value.get("prediction_id")
        retryable = value.get("retryable")
        cost = value.get("cost")
        return cls(
            status=str(value["status"]),
            output=value.get("output"),
            error=value.get("error"),
            error_code=value.get("error_code"),
            prediction_id=None if prediction_id is None else str(prediction_id),
            predict_time=None if predict_time is None else float(predict_time),
            # Journals and events written before these fields existed have neither.
            retryable=None if retryable is None else bool(retryable),
            cost=None if cost is None else float(cost),
        )


class FailureKind(str, enum.Enum):
    """What predicting an item again could change: the answer of :func:`failure_kind`."""

    #: It succeeded: nothing to predict again.
    NONE = "none"
    #: The service ended it with an error of its own (its envelope says ``retryable``, or the code
    #: is one of :data:`TRANSIENT_ERROR_CODES`): a new create most likely succeeds, even at once.
    RETRYABLE = "retryable"
    #: The model never answered: an ambiguous create, a timeout, a prediction cancelled in flight.
    #: A new try predicts it again; within a try it is kept (an ambiguous create may be billed).
    TRANSIENT = "transient"
    #: The image or the request is at fault (a download error, an invalid image, a 4xx refusal):
    #: predicting again would fail again.
    PERMANENT = "permanent"


#: Error codes of predictions the service ended for reasons of its own, not of the input: besides
#: these, any code spelled like an HTTP 5xx (``500``, ``HTTP_503``) counts as one.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "PROVIDER_FAILED",
        "EXECUTION_TIMEOUT",
        "INTERNAL_ERROR",
        "INTERNAL_SERVER_ERROR",
        "SERVER_ERROR",
        "SERVICE_UNAVAILABLE",
        "PROVIDER_UNAVAILABLE",
        "TIMEOUT",
        "RATE_LIMITED",
    }
)
_HTTP_5XX_CODE = re.compile(r"(?:HTTP[_ ]?)?5\d\d", re.IGNORECASE)

#: The one table of the retry rule: how each ending status is judged. ``error`` is not in it: an
#: error is :attr:`FailureKind.RETRYABLE` or :attr:`FailureKind.PERMANENT` by its envelope.
FAILURE_KIND_BY_STATUS: dict[str, FailureKind] = {
    PredictionOutcome.SUCCESS: FailureKind.NONE,
    PredictionOutcome.AMBIGUOUS: FailureKind.TRANSIENT,
    PredictionOutcome.TIMEOUT: FailureKind.TRANSIENT,
    PredictionOutcome.CANCELLED: FailureKind.TRANSIENT,
}

#: Values of the operators' ``retry_failures``: which failures a new try predicts again.
RETRY_TRANSIENT = "transient"
RETRY_ALL = "all"
RETRY_NONE = "none"
RETRY_FAILURES = (RETRY_TRANSIENT, RETRY_ALL, RETRY_NONE)


def failure_kind(outcome: PredictionOutcome) -> FailureKind:
    """
    The retry rule: what predicting again could change about how a prediction ended.

    :param outcome: How it ended.
    """
    kind = FAILURE_KIND_BY_STATUS.get(outcome.status)
    if kind is not None:
        return kind
    code = (outcome.error_code or "").strip().upper()
    if outcome.retryable or code in TRANSIENT_ERROR_CODES or _HTTP_5XX_CODE.fullmatch(code):
        return FailureKind.RETRYABLE
    return FailureKind.PERMANENT


def create_again_within_try(outcome: PredictionOutcome, *, attempts_this_try: int, max_attempts: int) -> bool:
    """
    Whether a prediction that ended so is created again at once, in the same try.

    Only a retryable service error is, while the item has had fewer than ``max_attempts``
    predictions in this try. Never an ambiguous create: it may have created a billed prediction.

    :param outcome: How the item's last prediction ended.
    :param attempts_this_try: Predictions of the item in this try so far, that one included.
    :param max_attempts: Predictions per item and try at most (the operators' ``max_attempts``).
    """
    return failure_kind(outcome) is FailureKind.RETRYABLE and attempts_this_try < max_attempts


def predict_again_on_new_try(outcome: PredictionOutcome, retry_failures: str) -> bool:
    """
    Whether a new try of the task (a retry, or a clear) predicts again an item that ended so.

    :param outcome: How the item ended in an earlier try.
    :param retry_failures: ``transient`` (retryable and transient failures), ``all`` (every
        failure) or ``none``.
    """
    kind = failure_kind(outcome)
    if kind is FailureKind.NONE or retry_failures == RETRY_NONE:
        return False
    return retry_failures == RETRY_ALL or kind is not FailureKind.PERMANENT


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
    :param retryable: The error envelope's ``retryable`` flag, when it gave one.
    :param cost: ``metrics.cost``, when reported.
    """

    id: str
    status: PredictionStatus
    raw_status: str
    output: str | None
    error: str | None
    error_code: str | None
    predict_time: float | None
    raw: dict[str, Any]
    retryable: bool | None = None
    cost: float | None = None

    @property
    def urls(self) -> dict[str, str]:
        """The prediction's ``urls`` as the API gave them (``get``, ``cancel``, perhaps a page)."""
        urls = self.raw.get("urls")
        if not isinstance(urls, dict):
            return {}
        return {str(key): value for key, value in urls.items() if isinstance(value, str)}

    def outcome(self) -> PredictionOutcome:
        """How this finished prediction ended."""
        if not self.status.is_terminal:
            raise ValueError(f"prediction {self.id} has not finished (status {self.raw_status})")
        return PredictionOutcome(
            status=self.status.value,
            output=self.output if self.status is PredictionStatus.SUCCEEDED else None,
            error=self.error,
            error_code=self.error_code,
            prediction_id=self.id,
            predict_time=self.predict_time,
            retryable=self.retryable,
            cost=self.cost,
        )

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
    error, error_code, retryable = (None, None, None)
    if status is not PredictionStatus.SUCCEEDED:
        error, error_code = _error_details(payload)
        if status is PredictionStatus.FAILED and error is None:
            error = "the prediction failed without an error message"
        if status.is_terminal:
            envelope = payload.get("output")
            flag = envelope.get("retryable") if isinstance(envelope, dict) else None
            retryable = _flag(payload.get("retryable") if flag is None else flag)
    metrics = payload.get("metrics") if isinstance(payload.get("metrics"), dict) else {}
    return Prediction(
        id=str(payload.get("id") or prediction_id),
        status=status,
        raw_status=str(raw_status),
        output=_output_text(payload.get("output")) if status is PredictionStatus.SUCCEEDED else None,
        error=error if status.is_terminal else None,
        error_code=error_code if status.is_terminal else None,
        predict_time=parse_seconds((metrics or {}).get("predict_time")),
        raw=payload,
        retryable=retryable,
        # A cost is a non-negative number, like seconds; 0 while running means "not known yet".
        cost=parse_seconds((metrics or {}).get("cost")) if status.is_terminal else None,
    )


def _flag(value: Any) -> bool | None:
    """A boolean as JSON or as the strings ``true`` / ``false``; ``None`` for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


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
    code = code if isinstance(code, str) else None
    for candidate in (envelope.get("error_message"), envelope.get("error"), payload.get("error")):
        if isinstance(candidate, str) and candidate.strip():
            return scrub_urls(candidate.strip()), code
    logs = payload.get("logs")
    if isinstance(logs, str) and logs.strip():
        return scrub_urls(logs.strip()[-500:]), code
    return None, code
