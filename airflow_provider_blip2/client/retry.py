"""
The one retry policy of the client, for the sync and the async transport alike.

Idempotent requests (reads, cancels) retry on transport errors, 429 and 5xx. A create is retried
only when nothing can have been created: after a 429, or a connection that could not be opened.
A create that failed after it was sent becomes :class:`Blip2AmbiguousCreateError`, never resent.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import tenacity

from airflow_provider_blip2.client.errors import (
    Blip2Error,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
    ambiguous_create_error,
)
from airflow_provider_blip2.client.wire import ApiRequest


@dataclass(frozen=True)
class RetryPolicy:
    """
    When and how long to wait before a failed request is sent again.

    Every wait honours the server's Retry-After (capped at ``max_wait``), else exponential backoff
    with full jitter.

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

    def tenacity_arguments(
        self, request: ApiRequest, log: logging.Logger | Any, *, patient_until: float | None = None
    ) -> dict[str, Any]:
        """
        Keyword arguments of ``tenacity.Retrying`` / ``AsyncRetrying`` applying this policy.

        :param request: The request being retried.
        :param log: Where each retry is logged as a warning.
        :param patient_until: Unix time until which 429 answers are retried however many there
            are (a 429 creates nothing: it is back-pressure, not a failure); ``None`` applies
            ``max_attempts`` and ``max_elapsed`` to them too.
        """

        def stop(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            if patient_until is not None and isinstance(error, Blip2RateLimitError):
                return time.time() >= patient_until
            seconds = state.seconds_since_start or 0.0
            return state.attempt_number >= self.max_attempts or seconds >= self.max_elapsed

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self.wait_seconds(error, state.attempt_number)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "BLIP-2 %s failed (attempt %d), retrying in %.1f s: %s",
                request.label,
                state.attempt_number,
                state.upcoming_sleep,
                error,
            )

        return {
            "retry": tenacity.retry_if_exception(lambda error: self.should_retry(error, request)),
            "stop": stop,
            "wait": wait,
            "before_sleep": before_sleep,
            "reraise": True,
        }


#: "Test connection" answers within seconds rather than retrying for minutes.
TEST_CONNECTION_RETRY_POLICY = RetryPolicy(max_attempts=2, max_elapsed=10.0, initial_wait=0.5, max_wait=2.0)


def final_error(request: ApiRequest, error: Blip2Error) -> Blip2Error:
    """
    The error a request raises once its retries are over.

    A create that failed after it was sent is ambiguous; everything else is raised as it is.

    :param request: The request.
    :param error: Its last error.
    """
    sent_transport_failure = isinstance(error, Blip2TransportError) and error.sent
    if request.creates and (sent_transport_failure or isinstance(error, Blip2ServerError)):
        return ambiguous_create_error(error)
    return error
