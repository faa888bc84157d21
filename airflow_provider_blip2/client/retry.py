"""
The one retry policy of the client, for the sync and the async transport alike.

Idempotent requests (reads, cancels) retry on transport errors, 429 and 5xx. A create is retried
only when nothing can have been created: after a 429, or a connection that could not be opened.
A create that failed after it was sent becomes :class:`Blip2AmbiguousCreateError`, never resent.
:meth:`RetryPolicy.call` and :meth:`RetryPolicy.acall` drive a request by this policy in a thread
and in an event loop: the same decisions (:meth:`RetryPolicy.wait_after`), only the sleep differs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from airflow_provider_blip2.client.errors import (
    Blip2Error,
    Blip2RateLimitError,
    Blip2ServerError,
    Blip2TransportError,
    ambiguous_create_error,
)
from airflow_provider_blip2.client.wire import ApiRequest

T = TypeVar("T")


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

    def wait_after(
        self,
        error: BaseException,
        request: ApiRequest,
        *,
        attempt: int,
        elapsed: float,
        patient_until: float | None = None,
        now: float | None = None,
    ) -> float | None:
        """
        Seconds to wait before sending ``request`` again after failed attempt ``attempt``, or ``None``
        when ``error`` is final.

        :param error: The error of that attempt.
        :param request: The request.
        :param attempt: How many attempts were made so far (1-based).
        :param elapsed: Seconds since the first attempt started.
        :param patient_until: Unix time until which 429 answers are retried however many there
            are (a 429 creates nothing: it is back-pressure, not a failure); ``None`` applies
            ``max_attempts`` and ``max_elapsed`` to them too.
        :param now: The Unix time (default: now), for ``patient_until``.
        """
        if not self.should_retry(error, request):
            return None
        if patient_until is not None and isinstance(error, Blip2RateLimitError):
            if (time.time() if now is None else now) >= patient_until:
                return None
        elif attempt >= self.max_attempts or elapsed >= self.max_elapsed:
            return None
        return self.wait_seconds(error, attempt)

    def call(
        self, attempt: Callable[[], T], request: ApiRequest, log: logging.Logger | Any, *,
        patient_until: float | None = None,
    ) -> T:  # fmt: skip
        """
        Run ``attempt`` until it returns, retrying its failures by this policy; raise the final error.

        :param attempt: Sends the request once.
        :param request: The request, for the decision and the log.
        :param log: Where each retry is logged as a warning.
        :param patient_until: See :meth:`wait_after`.
        """
        started = time.monotonic()
        for number in itertools.count(1):
            try:
                return attempt()
            except Exception as error:
                wait = self._after_failure(error, request, log, number, started, patient_until)
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(
        self, attempt: Callable[[], Awaitable[T]], request: ApiRequest, log: logging.Logger | Any, *,
        patient_until: float | None = None,
    ) -> T:  # fmt: skip
        """
        :meth:`call` for coroutines: the same decisions, waiting with ``asyncio.sleep``.

        :param attempt: Sends the request once.
        :param request: The request, for the decision and the log.
        :param log: Where each retry is logged as a warning.
        :param patient_until: See :meth:`wait_after`.
        """
        started = time.monotonic()
        for number in itertools.count(1):
            try:
                return await attempt()
            except Exception as error:
                wait = self._after_failure(error, request, log, number, started, patient_until)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _after_failure(
        self,
        error: Exception,
        request: ApiRequest,
        log: logging.Logger | Any,
        attempt: int,
        started: float,
        patient_until: float | None,
    ) -> float:
        """The wait before the next attempt, logged; raises ``error`` when it is final."""
        wait = self.wait_after(
            error, request, attempt=attempt, elapsed=time.monotonic() - started, patient_until=patient_until
        )
        if wait is None:
            raise error
        log.warning(
            "BLIP-2 %s failed (attempt %d), retrying in %.1f s: %s", request.label, attempt, wait, error
        )
        return wait


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
