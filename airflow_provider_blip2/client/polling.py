"""
The one polling rule, shared by the worker-side wait and both triggers.

A :class:`PredictionWatch` follows one prediction: when to read it next, when its deadline has
passed, and which read results end the wait. Transient errors (network, 5xx, 429 after the
client's retries) never end it; an authentication error or a missing prediction seen
:data:`PERSISTENT_ERROR_LIMIT` times in a row does, and so does invalid input at once. The loops
that drive a watch (``time.sleep`` on a worker, ``asyncio.sleep`` in a trigger) only sleep and read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from airflow_provider_blip2.client.errors import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
)
from airflow_provider_blip2.client.models import Prediction, PredictionOutcome

#: Errors that polling again cannot fix end the wait once seen this many times in a row.
PERSISTENT_ERROR_LIMIT = 3
#: The error of a ``timeout`` outcome.
DEADLINE_PASSED = "the prediction did not finish before the deadline"


class PredictionWatch:
    """
    The wait for one prediction: its read schedule, its deadline and how it ended.

    :param prediction_id: The prediction.
    :param poll_interval: Seconds between two reads.
    :param end_time: Unix time after which the outcome is ``timeout``.
    :param log: Where failed reads are logged.
    :param first_read_at: Unix time of the first read; default a poll interval from now (a
        prediction takes about 2 s, and every read spends budget).
    :param clock: Unix clock.
    """

    def __init__(
        self,
        prediction_id: str,
        *,
        poll_interval: float,
        end_time: float,
        log: logging.Logger | Any,
        first_read_at: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prediction_id = prediction_id
        self.poll_interval = poll_interval
        self.end_time = end_time
        self.log = log
        self._clock = clock
        self.next_read_at = clock() + poll_interval if first_read_at is None else first_read_at
        self.last_read_at: float | None = None
        #: Reads that got an answer or an error, so far.
        self.reads = 0
        self.outcome: PredictionOutcome | None = None
        self._errors_in_a_row = 0

    def seconds_until_due(self) -> float:
        """Seconds until the next read or the deadline, whichever comes first."""
        return max(0.0, min(self.next_read_at, self.end_time) - self._clock())

    def expire(self) -> PredictionOutcome | None:
        """
        End the wait with a ``timeout`` outcome if the deadline has passed.

        :return: The outcome if the wait has ended, else ``None``.
        """
        if self.outcome is None and self._clock() >= self.end_time:
            self.outcome = PredictionOutcome(
                PredictionOutcome.TIMEOUT, error=DEADLINE_PASSED, prediction_id=self.prediction_id
            )
        return self.outcome

    def read(self, get: Callable[[str], Prediction]) -> PredictionOutcome | None:
        """
        Read the prediction with a blocking call and apply the result.

        :param get: Reads a prediction by id (the hook's ``get_prediction``).
        :return: The outcome if the wait has ended, else ``None``.
        """
        try:
            return self.observe(get(self.prediction_id))
        except Blip2Error as error:
            return self.observe(error)

    async def aread(self, get: Callable[[str], Awaitable[Prediction]]) -> PredictionOutcome | None:
        """
        :meth:`read` for coroutines.

        :param get: Reads a prediction by id (the hook's ``aget_prediction``).
        """
        try:
            return self.observe(await get(self.prediction_id))
        except Blip2Error as error:
            return self.observe(error)

    def observe(self, result: Prediction | Blip2Error) -> PredictionOutcome | None:
        """
        Apply one read's result: a prediction, or the error the read raised.

        :param result: What the read gave.
        :return: The outcome if the wait has ended, else ``None``.
        """
        self.last_read_at = round(self._clock(), 3)
        self.reads += 1
        # A poll interval after the read ended, not on a fixed-rate schedule: triggers started
        # together (a triggerer's restart) whose reads the loop answered one after another then
        # spread out, where a fixed rate would keep them due at the same moment every interval.
        self.next_read_at = self.last_read_at + self.poll_interval
        if isinstance(result, Prediction):
            self._errors_in_a_row = 0
            if result.status.is_terminal:
                self.outcome = result.outcome()
            else:
                self.log.debug("Prediction %s is %s", self.prediction_id, result.raw_status)
        elif isinstance(result, (Blip2AuthenticationError, Blip2NotFoundError, Blip2InputError)):
            self._errors_in_a_row += 1
            self.log.warning("Polling prediction %s failed: %s", self.prediction_id, result)
            if self._errors_in_a_row >= PERSISTENT_ERROR_LIMIT or isinstance(result, Blip2InputError):
                self.outcome = PredictionOutcome(
                    PredictionOutcome.ERROR, error=str(result), prediction_id=self.prediction_id
                )
        else:
            self._errors_in_a_row = 0
            self.log.warning("Polling prediction %s failed, will poll again: %s", self.prediction_id, result)
        return self.outcome
