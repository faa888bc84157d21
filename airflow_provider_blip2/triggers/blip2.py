"""Trigger that waits for a BLIP-2 prediction in the triggerer, costing no worker slot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_blip2.batch import BatchResult
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.protocol import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Prediction,
    PredictionStatus,
)

# Errors that polling again cannot fix once they have been seen this many times in a row.
PERSISTENT_ERROR_LIMIT = 3
# Bound on the remote cancel when a user kills the task.
ON_KILL_TIMEOUT = 20.0


class PredictionReader:
    """
    Read predictions for a trigger, telling passing trouble from errors that end the wait.

    Transient errors (network, 5xx, 429 after the hook's retries) are logged and read again later.
    An authentication error or a missing prediction seen :data:`PERSISTENT_ERROR_LIMIT` times in a
    row for the same prediction, or invalid input, ends the wait for it.

    :param hook: The hook to read with.
    :param log: Where to log failed reads.
    """

    def __init__(self, hook: Blip2Hook, log: logging.Logger | Any) -> None:
        self.hook = hook
        self.log = log
        self._errors_in_a_row: dict[str, int] = {}

    async def read(self, prediction_id: str) -> Prediction | str | None:
        """
        Read one prediction.

        :param prediction_id: The prediction.
        :return: The prediction; or an error message when waiting for it should end; or ``None``
            after a failed read worth repeating.
        """
        try:
            prediction = await self.hook.aget_prediction(prediction_id)
        except (Blip2AuthenticationError, Blip2NotFoundError, Blip2InputError) as error:
            count = self._errors_in_a_row[prediction_id] = self._errors_in_a_row.get(prediction_id, 0) + 1
            self.log.warning("Polling prediction %s failed: %s", prediction_id, error)
            if count >= PERSISTENT_ERROR_LIMIT or isinstance(error, Blip2InputError):
                return str(error)
            return None
        except Blip2Error as error:
            self._errors_in_a_row.pop(prediction_id, None)
            self.log.warning("Polling prediction %s failed, will poll again: %s", prediction_id, error)
            return None
        self._errors_in_a_row.pop(prediction_id, None)
        if not prediction.status.is_terminal:
            self.log.debug("Prediction %s is %s", prediction_id, prediction.raw_status)
        return prediction


class Blip2PredictionTrigger(BaseTrigger):
    """
    Poll one BLIP-2 prediction until it is terminal or the deadline passes; yield exactly one event.

    The event payload is ``{"status": "success" | "error" | "cancelled" | "timeout",
    "prediction_id", "output", "error", "error_code", "predict_time"}``: no inputs, URLs or keys.
    Transient errors (network, 5xx, 429) are retried and never end the wait; an authentication error
    or a missing prediction seen several times in a row does. When a user marks the deferred task
    failed or success, or clears it, :meth:`on_kill` cancels the prediction.

    :param prediction_id: The prediction to watch (created by the operator on the worker).
    :param blip2_conn_id: The ``blip2`` connection.
    :param poll_interval: Seconds between polls.
    :param end_time: Absolute Unix time after which a ``timeout`` event is yielded; computed on the
        worker, so a triggerer restart does not restart the clock.
    """

    def __init__(
        self,
        prediction_id: str,
        blip2_conn_id: str,
        poll_interval: float,
        end_time: float,
    ) -> None:
        super().__init__()
        self.prediction_id = prediction_id
        self.blip2_conn_id = blip2_conn_id
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the (primitive, non-secret) keyword arguments."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prediction_id": self.prediction_id,
                "blip2_conn_id": self.blip2_conn_id,
                "poll_interval": self.poll_interval,
                "end_time": self.end_time,
            },
        )

    def _hook(self) -> Blip2Hook:
        return Blip2Hook(blip2_conn_id=self.blip2_conn_id)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the prediction is terminal, the deadline passes or a persistent error."""
        hook = self._hook()
        try:
            payload = await self._poll(hook)
        finally:
            await hook.aclose()
        yield TriggerEvent(payload)

    async def _poll(self, hook: Blip2Hook) -> dict[str, Any]:
        reader = PredictionReader(hook, self.log)
        while True:
            if time.time() >= self.end_time:
                return self._payload("timeout", error="the prediction did not finish before the deadline")
            outcome = await reader.read(self.prediction_id)
            if isinstance(outcome, Prediction):
                if outcome.status.is_terminal:
                    return self._prediction_payload(outcome)
            elif outcome is not None:
                return self._payload("error", error=outcome)
            await asyncio.sleep(max(0.0, min(self.poll_interval, self.end_time - time.time())))

    def _prediction_payload(self, prediction: Prediction) -> dict[str, Any]:
        return self._payload(
            prediction.status.value,
            output=prediction.output,
            error=prediction.error,
            error_code=prediction.error_code,
            predict_time=prediction.predict_time,
        )

    def _payload(
        self,
        status: str,
        *,
        output: str | None = None,
        error: str | None = None,
        error_code: str | None = None,
        predict_time: float | None = None,
    ) -> dict[str, Any]:
        return {
            "status": status,
            "prediction_id": self.prediction_id,
            "output": output,
            "error": error,
            "error_code": error_code,
            "predict_time": predict_time,
        }

    async def on_kill(self) -> None:
        """Cancel the prediction when a user marks the deferred task failed or success, or clears it."""
        hook = self._hook()
        try:
            await asyncio.wait_for(hook.acancel_prediction(self.prediction_id), timeout=ON_KILL_TIMEOUT)
            self.log.info("Cancelled prediction %s because the task was killed", self.prediction_id)
        except (Blip2Error, asyncio.TimeoutError) as error:
            self.log.warning("Could not cancel prediction %s: %s", self.prediction_id, error)
        finally:
            await hook.aclose()


class Blip2BatchPredictionTrigger(BaseTrigger):
    """
    Poll the in-flight predictions of a batch; yield one event once enough of them have ended.

    The batch operator creates predictions on the worker, defers with their ids, and creates more
    when this trigger hands back the ones that ended, so waiting costs no worker slot and a
    triggerer restart only re-reads predictions (it never creates one). Predictions are polled
    round-robin, each at most every ``poll_interval`` seconds, within the request budget.

    The event payload is ``{"finished": {prediction_id: result}, "polled": {prediction_id: time},
    "recent_requests": [...]}``: a result has ``status`` (``success``, ``error``, ``cancelled`` or
    ``timeout``), ``output``, ``error``, ``error_code``, ``prediction_id`` and ``predict_time``;
    ``polled`` says when each prediction still running was last read, so the next trigger does not
    read it again at once; ``recent_requests`` are the Unix times of the requests still counting
    against the rate window, for the worker's budget. No inputs, URLs or keys.

    :param predictions: Prediction id -> Unix time after which it is reported as ``timeout``.
    :param poll_from: Prediction id -> Unix time of its first read (default: a poll interval from now).
    :param blip2_conn_id: The ``blip2`` connection.
    :param poll_interval: Seconds between two polls of the same prediction.
    :param resume_after: Yield once this many predictions have ended (or all of them).
    :param recent_requests: Unix times of the worker's requests still counting against the window.
    :param requests_per_minute: The task's own request budget, or ``None`` for the connection's.
    :param max_concurrency: The task's own limit of predictions in flight, or ``None``.
    """

    def __init__(
        self,
        predictions: dict[str, float],
        blip2_conn_id: str,
        poll_interval: float,
        resume_after: int,
        poll_from: dict[str, float] | None = None,
        recent_requests: list[float] | None = None,
        requests_per_minute: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        super().__init__()
        self.predictions = {str(k): float(v) for k, v in predictions.items()}
        self.poll_from = {str(k): float(v) for k, v in (poll_from or {}).items()}
        self.blip2_conn_id = blip2_conn_id
        self.poll_interval = float(poll_interval)
        self.resume_after = max(1, int(resume_after))
        self.recent_requests = [float(t) for t in recent_requests or []]
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the (primitive, non-secret) keyword arguments."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "predictions": self.predictions,
                "poll_from": self.poll_from,
                "blip2_conn_id": self.blip2_conn_id,
                "poll_interval": self.poll_interval,
                "resume_after": self.resume_after,
                "recent_requests": self.recent_requests,
                "requests_per_minute": self.requests_per_minute,
                "max_concurrency": self.max_concurrency,
            },
        )

    def _hook(self) -> Blip2Hook:
        return Blip2Hook(
            blip2_conn_id=self.blip2_conn_id,
            requests_per_minute=self.requests_per_minute,
            max_concurrency=self.max_concurrency,
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until ``resume_after`` predictions ended; then yield them and the recent requests."""
        hook = self._hook()
        try:
            budget = await hook.abudget()
            budget.note_requests(self.recent_requests)
            finished, polled = await self._poll(hook)
            recent_requests = budget.recent_requests()
        finally:
            await hook.aclose()
        yield TriggerEvent({"finished": finished, "polled": polled, "recent_requests": recent_requests})

    async def _poll(self, hook: Blip2Hook) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        reader = PredictionReader(hook, self.log)
        waiting = dict(self.predictions)
        default_start = time.time() + self.poll_interval
        next_poll = {pid: self.poll_from.get(pid, default_start) for pid in waiting}
        polled: dict[str, float] = {}
        finished: dict[str, dict[str, Any]] = {}
        while waiting and len(finished) < self.resume_after:
            prediction_id = min(waiting, key=lambda pid: min(next_poll[pid], waiting[pid]))
            deadline = waiting[prediction_id]
            await asyncio.sleep(max(0.0, min(next_poll[prediction_id], deadline) - time.time()))
            if time.time() >= deadline:
                error = "the prediction did not finish before the deadline"
                finished[prediction_id] = BatchResult(
                    "timeout", error=error, prediction_id=prediction_id
                ).to_json()
            else:
                outcome = await reader.read(prediction_id)
                polled[prediction_id] = round(time.time(), 3)
                next_poll[prediction_id] = polled[prediction_id] + self.poll_interval
                if isinstance(outcome, Prediction) and outcome.status.is_terminal:
                    finished[prediction_id] = _result_of(outcome).to_json()
                elif isinstance(outcome, str):
                    finished[prediction_id] = BatchResult(
                        "error", error=outcome, prediction_id=prediction_id
                    ).to_json()
            if prediction_id in finished:
                del waiting[prediction_id]
        return finished, {pid: when for pid, when in polled.items() if pid in waiting}

    async def on_kill(self) -> None:
        """Cancel the in-flight predictions when a user marks the deferred task failed, success or cleared."""
        hook = self._hook()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(hook.acancel_prediction(pid) for pid in self.predictions), return_exceptions=True
                ),
                timeout=ON_KILL_TIMEOUT,
            )
            for prediction_id, result in zip(self.predictions, results, strict=True):
                if isinstance(result, BaseException):
                    self.log.warning("Could not cancel prediction %s: %s", prediction_id, result)
        except asyncio.TimeoutError:
            self.log.warning("Cancelling %d predictions timed out", len(self.predictions))
        finally:
            await hook.aclose()


def _result_of(prediction: Prediction) -> BatchResult:
    """A batch result from a finished prediction."""
    return BatchResult(
        status=prediction.status.value,
        output=prediction.output if prediction.status is PredictionStatus.SUCCEEDED else None,
        error=prediction.error,
        error_code=prediction.error_code,
        prediction_id=prediction.id,
        predict_time=prediction.predict_time,
    )
