"""
The trigger that runs a chunk of a batch's predictions synchronously, one request each.

The batch operator hands it the items of a chunk (image URIs that hold no secret, and what to ask),
and waits for its one event without holding a worker slot. It runs at most ``max_concurrency``
at once, within the connection's request budget, and keeps a journal of what it started and what
ended in the task instance's XCom (:class:`RunJournal`): a triggerer restart re-runs ``run()``
from the start, and the journal tells it which items ended already (not run again) and which were
running when the triggerer stopped (run again, and reported as ``ambiguous``: each may be paid
twice). Signed URLs of ``s3://`` and ``gs://`` images are made in the triggerer, just before each
run, in a thread; they never reach kwargs, the journal or the event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InputError,
    Blip2SyncRunUnavailableError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.inputs import prompt_input
from airflow_provider_blip2.client.models import PredictionOutcome
from airflow_provider_blip2.client.sealing import SEALED_PREFIX, unseal
from airflow_provider_blip2.client.settings import SYNC_RUN_ALWAYS
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.storage import ObjectStorage, SigningError, StorageError
from airflow_provider_blip2.storage.masking import mask_signed_url
from airflow_provider_blip2.storage.uris import is_http
from airflow_provider_blip2.triggers.blip2 import Blip2BatchTrigger, trigger_hook
from airflow_provider_blip2.triggers.kill import cancel_for_kill
from airflow_provider_blip2.triggers.run_journal import RunJournal


class Blip2BatchRunTrigger(Blip2BatchTrigger):
    """
    Run a chunk of a batch's predictions synchronously; yield one event when all have ended.

    The event payload is ``{"run": True, "chunk": id, "finished": {index: outcome}, "running":
    {index: [prediction_id, deadline]}, "returned": [index, ...], "rerun": [index, ...], "refused":
    bool, "fatal": message or None, "recent_requests": [...]}``: ``finished`` holds
    :class:`~airflow_provider_blip2.client.models.PredictionOutcome` (``to_json``) by item index;
    ``running`` the predictions whose run answered before they ended (the operator polls them);
    ``returned`` the items not run (the model refused the synchronous run, or an error that ends the
    batch came first), for the operator to create and poll; ``rerun`` the items a triggerer restart
    interrupted and that were run again (perhaps paid twice). No URLs, inputs or keys.

    :param chunk: An id of this chunk, unique in the task instance (its journal's).
    :param images: Item index -> image URI (``s3://``, ``gs://``, an http(s) URL, sealed when it
        has a query: :mod:`~airflow_provider_blip2.client.sealing`).
    :param questions: Item index -> question (``""`` captions, ``None`` asks the default question).
    :param blip2_conn_id: The ``blip2`` connection.
    :param timeout: Seconds one prediction may take.
    :param url_expiry: Lifetime in seconds of the signed image URLs.
    :param context: Earlier Q&A prepended to every prompt.
    :param temperature: 0.5 to 1.0, with nucleus sampling.
    :param use_nucleus_sampling: Sample instead of beam search.
    :param aws_conn_id: The AWS connection for ``s3://`` images.
    :param gcp_conn_id: The Google Cloud connection for ``gs://`` images.
    :param requests_per_minute: The task's own request budget, or ``None`` for the connection's.
    :param max_concurrency: The task's own limit of predictions in flight, or ``None``.
    :param recent_requests: Unix times of the worker's requests still counting against the window.
    :param not_before: Unix time before which no event is yielded (the deferral settles first).
    :param unit_cost: What the API reported a prediction of this batch to cost, when an earlier
        chunk read it: the chunk's successes carry it, and no read is made to price them.
    """

    argument_names = (
        "chunk",
        "images",
        "questions",
        "blip2_conn_id",
        "timeout",
        "url_expiry",
        "context",
        "temperature",
        "use_nucleus_sampling",
        "aws_conn_id",
        "gcp_conn_id",
        "requests_per_minute",
        "max_concurrency",
        "recent_requests",
        "not_before",
        "unit_cost",
    )

    def __init__(
        self,
        chunk: str,
        images: dict[str, str],
        questions: dict[str, str | None],
        blip2_conn_id: str,
        timeout: float,
        url_expiry: float,
        context: str | None = None,
        temperature: float | str = 1.0,
        use_nucleus_sampling: bool = False,
        aws_conn_id: str = "aws_default",
        gcp_conn_id: str = "google_cloud_default",
        requests_per_minute: int | None = None,
        max_concurrency: int | None = None,
        recent_requests: list[float] | None = None,
        not_before: float | None = None,
        unit_cost: float | None = None,
    ) -> None:
        super().__init__(blip2_conn_id, not_before, recent_requests, requests_per_minute, max_concurrency)
        self.chunk = str(chunk)
        self.images = {str(k): str(v) for k, v in images.items()}
        self.questions = {str(k): v for k, v in questions.items()}
        self.timeout = float(timeout)
        self.url_expiry = float(url_expiry)
        self.context = context
        self.temperature = temperature
        self.use_nucleus_sampling = bool(use_nucleus_sampling)
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.unit_cost = None if unit_cost is None else float(unit_cost)
        self._storage: ObjectStorage | None = None
        self._stop = False
        self._refused = False
        self._fatal: str | None = None

    async def _event(self, hook: Blip2Hook) -> dict[str, Any]:
        """Run every item not ended yet, at most ``max_concurrency`` at once; then hand back what ended."""
        journal = RunJournal.for_trigger(self)
        budget = await self.budget(hook)
        await journal.load()
        rerun = journal.interrupted()
        if rerun:
            self.log.warning(
                "%d prediction(s) were running when this trigger last stopped: they run again "
                "and are counted as ambiguous (each may be paid twice)",
                len(rerun),
            )
        for index in rerun:  # the slots the stopped trigger held in a shared budget are free
            await budget.aprediction_finished(self._slot(index))
        await self._run_all(hook, journal, [k for k in self.images if k not in journal.finished])
        await self._price(hook, journal)
        return self._payload(journal, rerun, budget.recent_requests())

    async def _run_all(self, hook: Blip2Hook, journal: RunJournal, indexes: list[str]) -> None:
        limit = (await hook.aget_settings()).max_concurrency
        queue = list(indexes)

        async def lane() -> None:
            while queue and not self._stop:
                await self._run_one(hook, journal, queue.pop(0))

        await asyncio.gather(*(lane() for _ in range(min(limit, len(queue)) or 1)))

    async def _run_one(self, hook: Blip2Hook, journal: RunJournal, index: str) -> None:
        choice = await hook.async_run_choice()
        if not await choice.adecide():
            self._refused = True
            self._stop = True
            return
        end_time = time.time() + self.timeout
        question = self.questions[index]
        try:
            image = await asyncio.to_thread(self._signed_url, await self._unsealed(hook, index))
            inputs = prompt_input(image, None if question == "" else question, question == "", self)
        except SigningError as error:  # the credentials cannot sign: no image of the batch can go
            self._fatal, self._stop = str(error), True
            return
        except (StorageError, Blip2InputError) as error:
            await journal.finish(index, PredictionOutcome(PredictionOutcome.ERROR, error=str(error)))
            return
        await journal.start(index)
        await self._record(hook, journal, index, inputs, end_time)

    async def _record(
        self, hook: Blip2Hook, journal: RunJournal, index: str, inputs: Any, end_time: float
    ) -> None:
        try:
            prediction = await hook.arun_prediction(inputs, end_time=end_time, slot=self._slot(index))
        except Blip2SyncRunUnavailableError as error:
            await journal.unstart(index)
            self._refused = self._stop = True
            if (await hook.aget_settings()).sync_run == SYNC_RUN_ALWAYS:
                self._fatal = f"{error}; the connection's sync_run is 'run': set it to auto or poll"
            return
        except Blip2AmbiguousCreateError as error:
            await journal.finish(index, PredictionOutcome(PredictionOutcome.AMBIGUOUS, error=str(error)))
            return
        except (Blip2BadRequestError, Blip2UnprocessableError) as error:
            await journal.finish(index, PredictionOutcome(PredictionOutcome.ERROR, error=str(error)))
            return
        except Blip2Error as error:  # a key refused, no balance: the batch cannot go on
            await journal.unstart(index)
            self._fatal, self._stop = str(error), True
            return
        if prediction.status.is_terminal:
            await journal.finish(index, prediction.outcome())
        else:
            await journal.running(index, prediction.id, end_time)

    async def _price(self, hook: Blip2Hook, journal: RunJournal) -> None:
        """
        Give the chunk's successes the cost the API reports on a read, when their answers had none.

        The synchronous run's answer carries no metrics: one read of one success tells the
        model's cost of a prediction, which every success of the chunk without one then carries
        (one request for the chunk, not one a prediction). When an earlier chunk read it
        (``unit_cost``), no read is made: a read past the chunk's window would wait for it.
        """
        unpriced = [
            k for k, v in journal.finished.items() if v.succeeded and v.cost is None and v.prediction_id
        ]
        if not unpriced:
            return
        cost, predict_time = self.unit_cost, None
        if cost is None:
            cost, predict_time = await self._read_cost(hook, journal.finished[unpriced[0]])
        if cost is None:
            return
        for index in unpriced:
            outcome = journal.finished[index]
            timing = (
                predict_time if index == unpriced[0] and predict_time is not None else outcome.predict_time
            )
            journal.finished[index] = dataclasses.replace(outcome, cost=cost, predict_time=timing)
        await journal.save()

    async def _read_cost(
        self, hook: Blip2Hook, sample: PredictionOutcome
    ) -> tuple[float | None, float | None]:
        """The cost and predict time one read of a success reports (``None`` when it cannot be read)."""
        try:
            read = await hook.aget_prediction(str(sample.prediction_id))
        except Blip2Error as error:
            self.log.warning("Could not read the cost of prediction %s: %s", sample.prediction_id, error)
            return None, None
        return read.cost, read.predict_time

    async def _unsealed(self, hook: Blip2Hook, index: str) -> str:
        """An item's image URI, unsealed (and then masked: a presigned URL or an uploaded copy's)."""
        value = self.images[index]
        if not value.startswith(SEALED_PREFIX):
            return value
        uri = unseal(value, (await hook.aget_settings()).api_key)
        mask_signed_url(uri)
        return uri

    def _slot(self, index: str) -> str:
        """The name of an item's slot in the budget: a trigger resuming this chunk frees it."""
        return f"run:{self.chunk}:{index}"

    def _signed_url(self, uri: str) -> str:
        if is_http(uri):
            return uri
        if self._storage is None:
            self._storage = ObjectStorage(aws_conn_id=self.aws_conn_id, gcp_conn_id=self.gcp_conn_id)
        return self._storage.signed_url(uri, expires_in=self.url_expiry)

    def _payload(self, journal: RunJournal, rerun: list[str], recent: list[float]) -> dict[str, Any]:
        done = set(journal.finished) | set(journal.in_flight)
        return {
            "run": True,
            "chunk": self.chunk,
            "finished": {k: v.to_json() for k, v in journal.finished.items()},
            "running": {k: list(v) for k, v in journal.in_flight.items()},
            "returned": [k for k in self.images if k not in done],
            "rerun": rerun,
            "refused": self._refused,
            "fatal": self._fatal,
            "recent_requests": recent,
        }

    async def on_kill(self) -> None:
        """Cancel the predictions known to be running when a user marks the task failed or success."""
        journal = RunJournal.for_trigger(self)
        await journal.load()
        await cancel_for_kill(self, trigger_hook(self), [pid for pid, _ in journal.in_flight.values()])
