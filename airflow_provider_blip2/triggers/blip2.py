"""Trigger that waits for a BLIP-2 prediction in the triggerer, costing no worker slot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_blip2.client.budget import Budget
from airflow_provider_blip2.client.models import PredictionOutcome
from airflow_provider_blip2.client.polling import PredictionWatch
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.metrics import Blip2Metrics
from airflow_provider_blip2.triggers.heap import freeze_heap_once
from airflow_provider_blip2.triggers.kill import cancel_for_kill

#: Seconds after a deferral before which a trigger yields no event. A faster event can let the
#: scheduler see the worker's exit from ``defer()`` only after it resumed the task, and fail it
#: ("state mismatch", apache/airflow#67287): the operators pass ``not_before`` = defer time + this.
#: 5 s was not always enough on a loaded 2-core deployment (the exit reached the scheduler 5.5 s
#: after a deferral, just after the resumed task was queued).
DEFERRAL_SETTLE_SECONDS = 10.0
#: The same for a batch: its trigger keeps polling while it settles, so the wait hands back every
#: prediction that ended meanwhile in one round trip through the scheduler.
BATCH_DEFERRAL_SETTLE_SECONDS = 10.0


def seconds_to_settle(trigger: BaseTrigger, not_before: float | None) -> float:
    """
    In a triggerer, the seconds until ``not_before`` (a Unix time), so no event comes too soon
    after the deferral.

    A trigger run inline (``airflow dags test``, or on the worker) has no task instance set and no
    scheduler to race with, so it does not wait.

    :param trigger: The trigger about to yield its event.
    :param not_before: The time, or ``None`` for no wait.
    """
    if not_before is None or trigger.task_instance is None:
        return 0.0
    return max(0.0, not_before - time.time())


def started(trigger: BaseTrigger) -> None:
    """
    What a trigger does first: in a triggerer (not inline), freeze the heap once per process
    (:mod:`~airflow_provider_blip2.triggers.heap`).

    :param trigger: The trigger starting to run.
    """
    if trigger.task_instance is not None:
        freeze_heap_once(trigger.log)


def serialized(trigger: BaseTrigger, arguments: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """
    What a trigger's ``serialize`` returns: its class path, and its keyword arguments by name.

    :param trigger: The trigger.
    :param arguments: The names of its ``__init__`` arguments, each kept under the same attribute.
    """
    cls = type(trigger)
    return f"{cls.__module__}.{cls.__qualname__}", {name: getattr(trigger, name) for name in arguments}


def trigger_hook(trigger: Any) -> Blip2Hook:
    """
    The hook a trigger reads with: its connection, its batch's budget where it has one, and metrics
    tagged with its task.

    :param trigger: The trigger (its ``blip2_conn_id``, and perhaps ``requests_per_minute`` and
        ``max_concurrency``).
    """
    return Blip2Hook(
        blip2_conn_id=trigger.blip2_conn_id,
        requests_per_minute=getattr(trigger, "requests_per_minute", None),
        max_concurrency=getattr(trigger, "max_concurrency", None),
        metrics=Blip2Metrics.of(trigger.task_instance),
    )


async def read_once(watch: PredictionWatch, hook: Blip2Hook) -> PredictionOutcome | None:
    """
    One watch's read, or its expiry: the outcome if its wait has ended.

    :param watch: The prediction's watch.
    :param hook: Reads the prediction.
    """
    return watch.expire() or await watch.aread(hook.aget_prediction)


async def settle(trigger: BaseTrigger, not_before: float | None) -> None:
    """
    Wait :func:`seconds_to_settle`.

    :param trigger: The trigger about to yield its event.
    :param not_before: The time, or ``None`` for no wait.
    """
    await asyncio.sleep(seconds_to_settle(trigger, not_before))


class Blip2Trigger(BaseTrigger):
    """
    What the provider's triggers share: their connection, the time before which no event comes,
    their serialization, and a run that yields one event.

    A subclass names its ``__init__`` arguments in ``argument_names`` (each kept under the same
    attribute, as :meth:`serialize` returns them) and makes its event's payload in ``_event``, with
    a hook closed afterwards.

    :param blip2_conn_id: The ``blip2`` connection.
    :param not_before: Unix time before which no event is yielded; ``None`` for no wait.
    """

    argument_names: ClassVar[tuple[str, ...]]

    def __init__(self, blip2_conn_id: str, not_before: float | None) -> None:
        super().__init__()
        self.blip2_conn_id = blip2_conn_id
        self.not_before = None if not_before is None else float(not_before)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the class path and the (primitive, non-secret) keyword arguments."""
        return serialized(self, self.argument_names)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Make the event's payload with the trigger's hook; yield it once the deferral has settled."""
        started(self)
        hook = trigger_hook(self)
        try:
            payload = await self._event(hook)
        finally:
            await hook.aclose()
        await settle(self, self.not_before)
        yield TriggerEvent(payload)

    async def _event(self, hook: Blip2Hook) -> dict[str, Any]:
        """The payload of the trigger's one event."""
        raise NotImplementedError


class Blip2BatchTrigger(Blip2Trigger):
    """
    A trigger of the batch operator: it shares the task's request budget and limits with the worker.

    :param blip2_conn_id: The ``blip2`` connection.
    :param not_before: Unix time before which no event is yielded; ``None`` for no wait.
    :param recent_requests: Unix times of the worker's requests still counting against the window.
    :param requests_per_minute: The task's own request budget, or ``None`` for the connection's.
    :param max_concurrency: The task's own limit of predictions in flight, or ``None``.
    """

    def __init__(
        self,
        blip2_conn_id: str,
        not_before: float | None,
        recent_requests: list[float] | None,
        requests_per_minute: int | None,
        max_concurrency: int | None,
    ) -> None:
        super().__init__(blip2_conn_id, not_before)
        self.recent_requests = [float(t) for t in recent_requests or []]
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency

    async def budget(self, hook: Blip2Hook) -> Budget:
        """
        The hook's budget, told of the requests the deferring process sent within the rate window.

        :param hook: The trigger's hook.
        """
        budget = await hook.abudget()
        budget.note_requests(self.recent_requests)
        return budget


class Blip2PredictionTrigger(Blip2Trigger):
    """
    Poll one BLIP-2 prediction until it is terminal or the deadline passes; yield exactly one event.

    The event payload is the prediction's
    :class:`~airflow_provider_blip2.client.models.PredictionOutcome` (``to_json``): status
    ``success``, ``error``, ``cancelled`` or ``timeout``, and no inputs, URLs or keys. The first read
    comes a poll interval after the trigger starts. It polls by the one rule of
    :class:`~airflow_provider_blip2.client.polling.PredictionWatch`, as the worker-side wait does:
    transient errors (network, 5xx, 429) never end the wait; an authentication error or a missing
    prediction seen several times in a row does. When a user marks the deferred task
    failed or success, or clears it, :meth:`on_kill` cancels the prediction.

    :param prediction_id: The prediction to watch (created by the operator on the worker).
    :param blip2_conn_id: The ``blip2`` connection.
    :param poll_interval: Seconds between polls.
    :param not_before: Unix time before which no event is yielded (see
        :data:`DEFERRAL_SETTLE_SECONDS`); ``None`` yields as soon as the prediction ends.
    :param end_time: Absolute Unix time after which a ``timeout`` event is yielded; computed on the
        worker, so a triggerer restart does not restart the clock.
    """

    argument_names = ("prediction_id", "blip2_conn_id", "poll_interval", "end_time", "not_before")

    def __init__(
        self,
        prediction_id: str,
        blip2_conn_id: str,
        poll_interval: float,
        end_time: float,
        not_before: float | None = None,
    ) -> None:
        super().__init__(blip2_conn_id, not_before)
        self.prediction_id = prediction_id
        self.poll_interval = float(poll_interval)
        self.end_time = float(end_time)

    async def _event(self, hook: Blip2Hook) -> dict[str, Any]:
        """Poll until the prediction is terminal, the deadline passes or a persistent error."""
        return (await self._poll(hook)).to_json()

    async def _poll(self, hook: Blip2Hook) -> PredictionOutcome:
        watch = PredictionWatch(
            self.prediction_id, poll_interval=self.poll_interval, end_time=self.end_time, log=self.log
        )
        outcome = None
        while outcome is None:
            await asyncio.sleep(watch.seconds_until_due())
            outcome = await read_once(watch, hook)
        return outcome

    async def on_kill(self) -> None:
        """Cancel the prediction when a user marks the deferred task failed or success, or clears it."""
        await cancel_for_kill(self, trigger_hook(self), [self.prediction_id])


class Blip2BatchPredictionTrigger(Blip2BatchTrigger):
    """
    Poll the in-flight predictions of a batch; yield one event once enough of them have ended.

    The batch operator creates predictions on the worker, defers with their ids, and creates more
    when this trigger hands back the ones that ended, so waiting costs no worker slot and a
    triggerer restart only re-reads predictions (it never creates one). Predictions are polled
    round-robin, each at most every ``poll_interval`` seconds, within the request budget.

    The event payload is ``{"finished": {prediction_id: outcome}, "polled": {prediction_id: time},
    "recent_requests": [...]}``: an outcome is a
    :class:`~airflow_provider_blip2.client.models.PredictionOutcome` (``to_json``); ``polled`` says
    when each prediction still running was last read, so the next trigger does not
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
    :param not_before: Unix time before which no event is yielded (see
        :data:`BATCH_DEFERRAL_SETTLE_SECONDS`); until then predictions are still polled, and every
        one that ended by then is in the event.
    :param return_by: Unix time after which no read is made: the event is yielded with what ended
        by then, perhaps nothing (the operator's bounded wait on the worker before it defers).
        ``None`` waits for ``resume_after``.
    """

    argument_names = (
        "predictions",
        "poll_from",
        "blip2_conn_id",
        "poll_interval",
        "resume_after",
        "recent_requests",
        "requests_per_minute",
        "max_concurrency",
        "not_before",
        "return_by",
    )

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
        not_before: float | None = None,
        return_by: float | None = None,
    ) -> None:
        super().__init__(blip2_conn_id, not_before, recent_requests, requests_per_minute, max_concurrency)
        self.predictions = {str(k): float(v) for k, v in predictions.items()}
        self.poll_from = {str(k): float(v) for k, v in (poll_from or {}).items()}
        self.poll_interval = float(poll_interval)
        self.resume_after = max(1, int(resume_after))
        self.return_by = None if return_by is None else float(return_by)

    async def _event(self, hook: Blip2Hook) -> dict[str, Any]:
        """Poll until ``resume_after`` predictions ended; then hand them back, and the recent requests."""
        budget = await self.budget(hook)
        finished, polled = await self._poll(hook)
        return {"finished": finished, "polled": polled, "recent_requests": budget.recent_requests()}

    async def _poll(self, hook: Blip2Hook) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        default_start = time.time() + self.poll_interval
        waiting = {
            pid: PredictionWatch(
                pid,
                poll_interval=self.poll_interval,
                end_time=deadline,
                log=self.log,
                first_read_at=self.poll_from.get(pid, default_start),
            )
            for pid, deadline in self.predictions.items()
        }
        finished: dict[str, dict[str, Any]] = {}
        while waiting:
            watch = min(waiting.values(), key=lambda w: w.seconds_until_due())
            due_in = watch.seconds_until_due()
            if len(finished) >= self.resume_after:
                # Enough to hand back; until the deferral has settled, the reads due go on.
                settle_in = seconds_to_settle(self, self.not_before)
                if settle_in <= due_in:
                    await asyncio.sleep(settle_in)
                    break
            if self.return_by is not None and time.time() + due_in > self.return_by:
                break  # no read is due before then
            await asyncio.sleep(due_in)
            # Every read due now goes at once: each waits for the budget on its own, so a window
            # that frees several places at once serves several, and a finished prediction is not
            # left holding its slot behind another read's wait.
            due = [w for w in waiting.values() if w.seconds_until_due() <= 0] or [watch]
            outcomes = await asyncio.gather(*(read_once(w, hook) for w in due))
            for read, outcome in zip(due, outcomes, strict=True):
                if outcome is not None:
                    del waiting[read.prediction_id]
                    finished[read.prediction_id] = outcome.to_json()
        polled = {pid: w.last_read_at for pid, w in waiting.items() if w.last_read_at is not None}
        return finished, polled

    async def on_kill(self) -> None:
        """Cancel the in-flight predictions when a user marks the deferred task failed, success or cleared."""
        await cancel_for_kill(self, trigger_hook(self), list(self.predictions))
