"""
The batch operator's synchronous runs: which items go that way, their hand-over and their return.

Where the connection's ``sync_run`` allows it (``auto``, unless the model was found to refuse it;
``run``), the operator hands the pending items to a
:class:`~airflow_provider_blip2.triggers.batch_run.Blip2BatchRunTrigger` in chunks of at most one
rate window's requests, each item recorded in the batch's journal first under a placeholder id
(``run:<chunk>:<index>``). The trigger runs them with one request each; its event brings back the
outcomes, the predictions still running (polled as created ones) and the items it did not run (a
refusal: they are created and polled). A new try that finds placeholders left by a try that died
with its chunk counts them as ambiguous (each may have been paid) and predicts them again.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException

from airflow_provider_blip2.batch import BatchJournal, BatchState
from airflow_provider_blip2.batch.spending import affordable, reported_cost
from airflow_provider_blip2.client.models import PredictionOutcome
from airflow_provider_blip2.client.sealing import seal
from airflow_provider_blip2.operators.batch.poll import record_poll_event
from airflow_provider_blip2.operators.uploads import batch_uploads, needs_upload

if TYPE_CHECKING:
    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator
    from airflow_provider_blip2.operators.batch.progress import BatchTry
    from airflow_provider_blip2.triggers.batch_run import Blip2BatchRunTrigger

#: How the journal names an item handed to a chunk of synchronous runs, until its run answers.
PLACEHOLDER_PREFIX = "run:"
#: The error of an item whose run was handed to a try that died before it answered.
INTERRUPTED = (
    "its synchronous run was under way when the task's try ended: a prediction may have been "
    "created and paid; it is predicted again"
)


def is_placeholder(prediction_id: str) -> bool:
    """Whether a journal's prediction id stands for an item handed to synchronous runs."""
    return prediction_id.startswith(PLACEHOLDER_PREFIX)


def chunk_to_run(op: Blip2BatchPredictionOperator, batch: BatchTry) -> Any:
    """
    Hand the next chunk of pending items to synchronous runs: the trigger, or ``None``.

    ``None`` when the connection does not run synchronously (or the model refused), while
    predictions created earlier are still in flight (they are polled first), or when nothing is
    pending. http(s) URLs with a query (perhaps presigned) are sealed for the trigger
    (:mod:`~airflow_provider_blip2.client.sealing`).

    :param op: The batch operator.
    :param batch: The batch and this try (each item handed over counts an attempt).
    """
    journal, state = batch.journal, batch.state
    if state.in_flight or not op.hook.sync_run_choice().worth_trying():
        return None
    known_cost = reported_cost(state)
    images: dict[str, str] = {}
    while not images:  # a chunk whose every upload failed is recorded; the next one is tried
        pending = state.pending()
        if not pending:
            return None
        uploading = any(needs_upload(op, state.items[i].image) for i in pending)
        # Each upload's presign is a request too: half a window's predictions when uploading. Until
        # the run knows what a prediction costs, the chunk's trigger reads one: room for it.
        size = op.hook.settings.requests_per_minute // (2 if uploading else 1)
        size = max(1, size - (1 if known_cost is None else 0))
        limit = affordable(state, op.spending_cap)
        if limit == 0:
            return None
        size = size if limit is None else min(size, limit)
        images = _chunk_images(op, batch, pending[:size])
    chunk = uuid.uuid4().hex[:12]
    deadline = time.time() + op.timeout
    for key in images:
        index = int(key)
        journal.record_attempt(state, index, batch.number)
        journal.record_created(state, index, f"{PLACEHOLDER_PREFIX}{chunk}:{index}", deadline)
    op.log.info("Running %d predictions synchronously (one request each)", len(images))
    return _trigger(op, state, chunk, images, known_cost)


def _chunk_images(op: Blip2BatchPredictionOperator, batch: BatchTry, indexes: list[int]) -> dict[str, str]:
    """
    Item index -> the image as the run trigger gets it; items whose upload failed are recorded.

    Uploaded copies' URLs are always sealed (anyone who has one may read the copy); s3:// and gs://
    URIs are signed by the trigger; http(s) URLs are sealed when they have a query.
    """
    journal, state = batch.journal, batch.state
    api_key = op.hook.settings.api_key
    uploads = batch_uploads(
        op, journal, state, [i for i in indexes if needs_upload(op, state.items[i].image)]
    )
    images: dict[str, str] = {}
    for index in indexes:
        upload = uploads.get(index)
        if isinstance(upload, Exception):
            journal.record_attempt(state, index, batch.number)
            journal.record_finished(
                state, {index: PredictionOutcome(PredictionOutcome.ERROR, error=str(upload))}
            )
        elif upload is not None:
            images[str(index)] = seal(upload.public_url, api_key, always=True)
        else:
            images[str(index)] = seal(op._image_url(state.items[index].image), api_key)
    return images


def _trigger(
    op: Blip2BatchPredictionOperator,
    state: BatchState,
    chunk: str,
    images: dict[str, str],
    unit_cost: float | None,
) -> Blip2BatchRunTrigger:
    from airflow_provider_blip2.operators.base import url_expiry
    from airflow_provider_blip2.triggers.batch_run import Blip2BatchRunTrigger
    from airflow_provider_blip2.triggers.blip2 import BATCH_DEFERRAL_SETTLE_SECONDS

    return Blip2BatchRunTrigger(
        chunk=chunk,
        images=images,
        questions={key: state.items[int(key)].question for key in images},
        blip2_conn_id=op.blip2_conn_id,
        timeout=op.timeout,
        url_expiry=url_expiry(op.url_expiry, op.timeout),
        context=op.context,
        temperature=op.temperature,
        use_nucleus_sampling=op.use_nucleus_sampling,
        aws_conn_id=op.aws_conn_id,
        gcp_conn_id=op.gcp_conn_id,
        requests_per_minute=op.requests_per_minute,
        max_concurrency=op.max_concurrency,
        recent_requests=op.hook.budget().recent_requests(),
        unit_cost=unit_cost,
        not_before=time.time() + BATCH_DEFERRAL_SETTLE_SECONDS if op.deferrable else None,
    )


def record_run_event(op: Blip2BatchPredictionOperator, batch: BatchTry, event: dict[str, Any]) -> None:
    """
    Record what a chunk of synchronous runs brought back, then go on as after a poll.

    :param op: The batch operator.
    :param batch: The batch and this try.
    :param event: The run trigger's payload.
    """
    journal, state = batch.journal, batch.state
    by_id: dict[str, Any] = {}
    for key, payload in (event.get("finished") or {}).items():
        index, outcome = int(key), PredictionOutcome.from_json(payload)
        if outcome.prediction_id:
            journal.record_created(state, index, outcome.prediction_id, state.created[index][1])
        by_id[state.created[index][0]] = payload
        if outcome.status == PredictionOutcome.AMBIGUOUS:
            journal.record_ambiguous(state, index)
    for key, (prediction_id, deadline) in (event.get("running") or {}).items():
        journal.record_created(state, int(key), str(prediction_id), float(deadline))
    for key in event.get("rerun") or []:
        journal.record_ambiguous(state, int(key))
    returned = [int(key) for key in event.get("returned") or []]
    for index in returned:
        journal.forget_attempt(state, index)  # never sent
    journal.release(state, returned)
    record_poll_event(op, batch, {"finished": by_id, "recent_requests": event.get("recent_requests")})
    if event.get("refused"):
        op.log.info("The model refused the synchronous run: the batch's other items are created and polled")
    if event.get("fatal"):
        journal.flush()
        raise AirflowException(f"The batch cannot go on: {event['fatal']}")


def fail_interrupted_runs(journal: BatchJournal, state: BatchState) -> None:
    """
    On a new try, end the items an earlier try handed to synchronous runs that never answered.

    Each counts as ambiguous: its run may have been sent and paid before that try ended.

    :param journal: The batch's journal.
    :param state: The batch's progress.
    """
    results = {}
    for index, (prediction_id, _deadline) in state.in_flight.items():
        if is_placeholder(prediction_id):
            journal.record_ambiguous(state, index)
            results[index] = PredictionOutcome(PredictionOutcome.AMBIGUOUS, error=INTERRUPTED)
    journal.record_finished(state, results)
