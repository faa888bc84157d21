"""
What both BLIP-2 operators share: object storage for their images, a quiet cancel, URL lifetimes,
the wait on the worker before deferring, and the check of their parameters.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow_provider_blip2.client.errors import Blip2Error
from airflow_provider_blip2.client.models import RETRY_FAILURES, RETRY_TRANSIENT
from airflow_provider_blip2.client.uploads import IMAGE_TRANSFERS, retention_seconds
from airflow_provider_blip2.storage import ObjectStorage

if TYPE_CHECKING:
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

# Added to the prediction timeout for the lifetime of signed image URLs: the service may queue a
# prediction before it downloads the image.
URL_QUEUEING_ALLOWANCE = 3600.0
#: With ``deferrable=True``, the seconds an operator waits on the worker for a prediction to end
#: before it defers. A round trip through the triggerer costs a new task process and seconds of
#: scheduling; a prediction takes about 2 s, so most end before a deferral would pay off, and a
#: fast trigger is what Airflow 3.3's stale executor event (apache/airflow#67287) fails.
DEFER_AFTER_SECONDS = 10.0
#: A URL standing for the image while the other inputs are validated, before any request.
VALIDATION_IMAGE_URL = "https://images.invalid/check.jpg"


class Blip2TaskMixin:
    """
    What both operators share: object storage for their images, and a cancel that only warns.

    The operator defines ``aws_conn_id``, ``gcp_conn_id`` and a ``hook`` property, and keeps the
    parameters :func:`check_task_parameters` checks.
    """

    aws_conn_id: str
    gcp_conn_id: str
    image_transfer: str
    upload_retention: float | None
    poll_interval: float
    timeout: float
    max_attempts: int
    defer_after: float
    log: Any

    @cached_property
    def storage(self) -> ObjectStorage:
        """S3, GCS and local files through ``aws_conn_id`` and ``gcp_conn_id``."""
        return ObjectStorage(aws_conn_id=self.aws_conn_id, gcp_conn_id=self.gcp_conn_id)

    def _cancel_quietly(self, prediction_id: str) -> None:
        hook: Blip2Hook = self.hook  # type: ignore[attr-defined]
        try:
            hook.cancel_prediction(prediction_id)
        except Blip2Error as error:
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, error)


def url_expiry(url_expiry: float | None, timeout: float) -> float:
    """
    Lifetime of a signed URL: as given, or the prediction timeout plus time to queue.

    :param url_expiry: The operator's ``url_expiry``, or ``None``.
    :param timeout: The operator's prediction ``timeout``.
    """
    return timeout + URL_QUEUEING_ALLOWANCE if url_expiry is None else url_expiry


def check_defer_after(defer_after: float) -> None:
    """
    Refuse a negative ``defer_after`` at parse time.

    :param defer_after: Seconds to wait on the worker before deferring, 0 or more.
    """
    if isinstance(defer_after, bool) or not isinstance(defer_after, (int, float)) or defer_after < 0:
        raise ValueError(
            f"defer_after must be a number of seconds, 0 or more (0 defers at once), got {defer_after!r}"
        )


def check_image_transfer(image_transfer: str, upload_retention: float | None) -> None:
    """
    Refuse an unknown ``image_transfer`` or a retention the API does not accept, at parse time.

    :param image_transfer: ``auto``, ``url`` or ``upload``.
    :param upload_retention: Seconds the service keeps an uploaded copy, or ``None``.
    """
    if image_transfer not in IMAGE_TRANSFERS:
        raise ValueError(
            f"image_transfer must be one of {', '.join(IMAGE_TRANSFERS)}, got {image_transfer!r}"
        )
    if upload_retention is not None:
        retention_seconds(0, upload_retention)


def check_retry_parameters(max_attempts: int, retry_failures: str = RETRY_TRANSIENT) -> None:
    """
    Refuse ``max_attempts`` and ``retry_failures`` values the operators do not know, at parse time.

    :param max_attempts: Predictions per item (or task) and try at most, 1 or more.
    :param retry_failures: ``transient``, ``all`` or ``none``.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an integer of at least 1, got {max_attempts!r}")
    if retry_failures not in RETRY_FAILURES:
        raise ValueError(f"retry_failures must be one of {', '.join(RETRY_FAILURES)}, got {retry_failures!r}")


def check_task_parameters(
    task: Blip2TaskMixin, retry_failures: str = RETRY_TRANSIENT, max_failed_ratio: float = 0.0
) -> None:
    """
    Refuse, at parse time, values of the parameters both operators share that they do not accept.

    :param task: The operator, with its parameters kept.
    :param retry_failures: The batch operator's ``retry_failures``.
    :param max_failed_ratio: The batch operator's fraction of predictions allowed to fail, 0 to 1.
    """
    check_image_transfer(task.image_transfer, task.upload_retention)
    if not 0 <= max_failed_ratio <= 1:
        raise ValueError(f"max_failed_ratio must be between 0 and 1, got {max_failed_ratio!r}")
    if task.poll_interval <= 0 or task.timeout <= 0:
        raise ValueError(
            f"poll_interval and timeout must be > 0, got {task.poll_interval} and {task.timeout}"
        )
    check_retry_parameters(task.max_attempts, retry_failures)
    check_defer_after(task.defer_after)
