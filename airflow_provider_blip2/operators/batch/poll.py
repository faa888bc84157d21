"""
The batch operator's create-and-poll path: creates on the worker, polls in a trigger.

Where the connection does not run synchronously (``sync_run="poll"``, or the model refused),
pending items are created on the worker while ``max_concurrency`` has room, each recorded in the
journal at once; :class:`~airflow_provider_blip2.triggers.blip2.Blip2BatchPredictionTrigger` reads
them (on the worker, or in the triggerer when deferred) and its event brings back those that ended.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

from airflow_provider_blip2.batch import BatchState
from airflow_provider_blip2.batch.spending import affordable
from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2BadRequestError,
    Blip2InputError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.models import PredictionOutcome, create_again_within_try
from airflow_provider_blip2.client.uploads import Blip2UploadError
from airflow_provider_blip2.operators.base import url_expiry
from airflow_provider_blip2.operators.batch.images import file_name, uploaded_or_signed
from airflow_provider_blip2.operators.uploads import batch_uploads, needs_upload
from airflow_provider_blip2.storage import SigningError, StorageError

if TYPE_CHECKING:
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator
    from airflow_provider_blip2.operators.batch.progress import BatchTry
    from airflow_provider_blip2.triggers.blip2 import Blip2BatchPredictionTrigger

#: Per-item errors that end the item and let the batch go on.
ITEM_ERRORS = (StorageError, Blip2UploadError, Blip2InputError, Blip2BadRequestError, Blip2UnprocessableError)


def create_predictions(op: Blip2BatchPredictionOperator, batch: BatchTry) -> None:
    """
    Create predictions for pending items while slots are free; record each at once.

    Nothing is created while the connection may still run synchronously: the pending items wait
    for a chunk of synchronous runs, once nothing is in flight.

    :param op: The batch operator.
    :param batch: The batch and this try (each create counts an attempt).
    """
    if op.hook.sync_run_choice().worth_trying():
        return
    journal, state = batch.journal, batch.state
    free = op.hook.settings.max_concurrency - len(state.in_flight)
    expires_in = url_expiry(op.url_expiry, op.timeout)
    limit = affordable(state, op.spending_cap)
    chosen = state.pending()[: max(0, free if limit is None else min(free, limit))]
    uploads = batch_uploads(op, journal, state, [i for i in chosen if needs_upload(op, state.items[i].image)])
    for index in chosen:
        item = state.items[index]
        journal.record_attempt(state, index, batch.number)
        try:
            url = uploaded_or_signed(op, uploads.get(index), item.image, expires_in)
            prediction_id = op.hook.submit_prediction(
                op._prediction_input(item, url), patient_until=time.time() + op.timeout
            )
        except SigningError as error:
            raise AirflowFailException(str(error)) from error
        except Blip2AmbiguousCreateError as error:
            # It may exist and cost money: not created again in this try; a new try may.
            op.log.warning("%s (%s): %s", file_name(item.image), item.label, error)
            journal.record_ambiguous(state, index)
            journal.record_finished(
                state, {index: PredictionOutcome(PredictionOutcome.AMBIGUOUS, error=str(error))}
            )
            continue
        except ITEM_ERRORS as error:
            journal.record_finished(state, {index: PredictionOutcome("error", error=str(error))})
            continue
        journal.record_created(state, index, prediction_id, time.time() + op.timeout)


def record_poll_event(op: Blip2BatchPredictionOperator, batch: BatchTry, event: dict[str, Any]) -> None:
    """
    Record the predictions a poll trigger's event says ended; release those created again.

    A timed-out prediction is cancelled; one the service ended with a retryable error is created
    again while its item has had fewer than ``max_attempts`` predictions in this try.

    :param op: The batch operator.
    :param batch: The batch and this try.
    :param event: The trigger's payload (``finished``: prediction id -> outcome).
    """
    journal, state = batch.journal, batch.state
    budget = op.hook.budget()
    budget.note_requests(event.get("recent_requests") or [])
    results = {}
    again = []
    for prediction_id, payload in (event.get("finished") or {}).items():
        index = state.index_of(prediction_id)
        if index is None:
            continue
        result = PredictionOutcome.from_json(payload)
        budget.prediction_finished(prediction_id)
        if result.status == "timeout":
            op._cancel_quietly(prediction_id)
            result = PredictionOutcome(
                "timeout",
                error=f"did not finish within {op.timeout:g} s; it was cancelled",
                prediction_id=prediction_id,
            )
        item = state.items[index]
        attempts = state.attempts_in_try(index, batch.number)
        if create_again_within_try(result, attempts_this_try=attempts, max_attempts=op.max_attempts):
            op.log.warning(
                "%s (%s): %s; predicting it again (attempt %d of %d)",
                file_name(item.image),
                item.label,
                result.failure_message(),
                attempts + 1,
                op.max_attempts,
            )
            again.append(index)
        elif result.failed:
            op.log.warning("%s (%s): %s", file_name(item.image), item.label, result.error)
        results[index] = result
    journal.record_finished(state, results)
    journal.release(state, again)


def poll_trigger(
    op: Blip2BatchPredictionOperator,
    state: BatchState,
    polled: dict[str, float],
    *,
    deferred: bool = False,
    return_by: float | None = None,
) -> Blip2BatchPredictionTrigger:
    """
    The trigger for the in-flight predictions.

    :param op: The batch operator (it notes what it waits for, for ``on_kill``).
    :param state: The batch.
    :param polled: When the last trigger read each prediction still running.
    :param deferred: It runs in the triggerer (else here, on the worker).
    :param return_by: Unix time at which a trigger run here hands back what ended, even nothing.
    """
    from airflow_provider_blip2.triggers.blip2 import (
        BATCH_DEFERRAL_SETTLE_SECONDS,
        Blip2BatchPredictionTrigger,
    )

    in_flight = state.in_flight
    # First read a poll interval after the create, or after the previous trigger's last read.
    poll_from = {
        pid: max(deadline - op.timeout, float(polled.get(pid, 0.0))) + op.poll_interval
        for pid, deadline in in_flight.values()
    }
    if not state.pending():
        resume_after = len(in_flight)
    elif deferred:
        # Come back when half the slots are free: each round trip through the scheduler costs
        # seconds in which no request is sent, so it must refill several slots at once.
        resume_after = max(1, op.hook.settings.max_concurrency // 2)
    else:
        resume_after = 1
    op._waiting_for = [pid for pid, _deadline in in_flight.values()]
    return Blip2BatchPredictionTrigger(
        predictions=dict(in_flight.values()),
        poll_from=poll_from,
        blip2_conn_id=op.blip2_conn_id,
        poll_interval=op.poll_interval,
        resume_after=resume_after,
        recent_requests=op.hook.budget().recent_requests(),
        requests_per_minute=op.requests_per_minute,
        max_concurrency=op.max_concurrency,
        not_before=time.time() + BATCH_DEFERRAL_SETTLE_SECONDS if deferred else None,
        return_by=return_by,
    )


def first_event(trigger: BaseTrigger) -> dict[str, Any]:
    """Run a trigger on the worker and return its event's payload."""

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AirflowException(f"{type(trigger).__name__} ended without an event")

    return asyncio.run(first())
