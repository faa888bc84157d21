"""Trigger that waits for a BLIP-2 prediction in the triggerer, costing no worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.protocol import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Prediction,
)

# Errors that polling again cannot fix once they have been seen this many times in a row.
PERSISTENT_ERROR_LIMIT = 3
# Bound on the remote cancel when a user kills the task.
ON_KILL_TIMEOUT = 20.0


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
        persistent_errors = 0
        while True:
            if time.time() >= self.end_time:
                return self._payload("timeout", error="the prediction did not finish before the deadline")
            try:
                prediction = await hook.aget_prediction(self.prediction_id)
            except (Blip2AuthenticationError, Blip2NotFoundError, Blip2InputError) as error:
                persistent_errors += 1
                self.log.warning("Polling prediction %s failed: %s", self.prediction_id, error)
                if persistent_errors >= PERSISTENT_ERROR_LIMIT or isinstance(error, Blip2InputError):
                    return self._payload("error", error=str(error))
            except Blip2Error as error:
                persistent_errors = 0
                self.log.warning(
                    "Polling prediction %s failed, will poll again: %s", self.prediction_id, error
                )
            else:
                persistent_errors = 0
                if prediction.status.is_terminal:
                    return self._prediction_payload(prediction)
                self.log.debug("Prediction %s is %s", self.prediction_id, prediction.raw_status)
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
