"""Operator that captions, or asks questions about, a whole list or prefix of images with BLIP-2."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    BaseOperator,
    conf,
    mask_secret,
)

from airflow_provider_blip2.batch import (
    BatchItem,
    BatchJournal,
    BatchState,
    build_items,
    describe_failures,
    failed_ratio_exceeded,
    image_key,
)
from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2BadRequestError,
    Blip2Error,
    Blip2InputError,
    Blip2UnprocessableError,
)
from airflow_provider_blip2.client.inputs import PredictionInput
from airflow_provider_blip2.client.models import (
    RETRY_TRANSIENT,
    PredictionOutcome,
    PredictionStatus,
    create_again_within_try,
    predict_again_on_new_try,
)
from airflow_provider_blip2.client.uploads import (
    TRANSFER_AUTO,
    Blip2UploadError,
    check_image_file,
    local_path,
    transfer_for,
)
from airflow_provider_blip2.operators.base import (
    DEFER_AFTER_SECONDS,
    Blip2TaskMixin,
    check_defer_after,
    check_image_transfer,
    check_retry_parameters,
    url_expiry,
)
from airflow_provider_blip2.operators.batch_run import (
    chunk_to_run,
    fail_interrupted_runs,
    record_run_event,
)
from airflow_provider_blip2.operators.uploads import UploadedImage, batch_uploads, needs_upload
from airflow_provider_blip2.storage import SigningError, StorageError, is_remote_object

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.providers.openlineage.extractors import OperatorLineage
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook
    from airflow_provider_blip2.triggers.blip2 import Blip2BatchPredictionTrigger


class Blip2BatchPredictionOperator(Blip2TaskMixin, BaseOperator):
    """
    Caption, or ask questions about, every image of a list or of an S3/GCS prefix with BLIP-2.

    The images are listed (or checked to exist) on the worker before any prediction is created.
    Where the connection's ``sync_run`` allows it (``auto``, the default: where the model offers
    the API's synchronous run), predictions are run with one request each by
    :class:`~airflow_provider_blip2.triggers.batch_run.Blip2BatchRunTrigger`, in chunks of at most
    ``requests_per_minute`` items, in the triggerer when deferrable (no worker slot is held while
    they run), else on the worker; a refusal sends the rest the create-and-poll way. Otherwise
    predictions are created on the worker, at most ``max_concurrency`` in flight and within
    ``requests_per_minute``; with ``deferrable=True``, whenever no prediction ends within
    ``defer_after`` seconds the operator waits in the triggerer
    (:class:`~airflow_provider_blip2.triggers.blip2.Blip2BatchPredictionTrigger`), so a long wait
    costs no worker slot.

    Progress is kept in Airflow's task state store (Airflow 3.3+; in XCom before, which lasts one
    try): a triggerer restart or a task retry never creates a prediction again for an image and
    question that already has one, and never loses a finished result. Per-image failures (an image
    the service cannot download, a model error, a timeout) are recorded and do not stop the batch.
    A prediction the service ended with a retryable error is created again at once, up to
    ``max_attempts`` predictions per item and try. When the batch ends with failures a new try can
    fix (ambiguous creates, timeouts, predictions cancelled in flight, retryable service errors, as
    ``retry_failures`` selects) and the task has retries left (Airflow 3.3+), the try fails and the
    next one predicts those items again, keeping every other result. Otherwise the task fails only
    if the failed fraction exceeds ``max_failed_ratio``, after writing the results.

    Results: one JSON line per image and question (``image``, ``label``, ``question``, ``output``,
    ``status``, ``error``, ``prediction_id``, ``predict_time``, ``cost``, ``attempts``) written to
    ``output_uri``. The return value (XCom) is a summary: ``total``, ``succeeded``, ``failed``,
    ``statuses``, ``retried``, ``attempts``, ``ambiguous`` (predictions that may have been created
    and paid without an answer), ``cost``, ``images``, ``output_uri``, ``elapsed`` (seconds since
    the batch started, over all tries).

    ``s3://`` and ``gs://`` images are sent as presigned/signed URLs made on the worker just before
    each create; they are masked in logs and never stored in XCom, rendered fields or trigger kwargs.

    :param images: A prefix ``s3://bucket/path/`` or ``gs://bucket/path/``, or a local directory
        (listed recursively and filtered by ``image_patterns``), or a list of ``s3://``, ``gs://``,
        ``https://`` or ``file://`` image URIs and local paths (uploaded, see ``image_transfer``).
        (templated)
    :param output_uri: Where to write the JSON lines: ``s3://``, ``gs://`` or a local path. (templated)
    :param question: The one question to ask of every image; ``None`` asks "What is this a picture of?".
        (templated)
    :param questions: ``{"label": "question", ...}`` to ask several questions of every image. (templated)
    :param caption: Caption every image instead of asking a question.
    :param context: Earlier Q&A prepended to every prompt. (templated)
    :param temperature: 0.5 to 1.0; used with nucleus sampling.
    :param use_nucleus_sampling: Sample instead of beam search.
    :param image_patterns: File-name globs a listed object must match (case-insensitive).
    :param max_failed_ratio: Fraction of predictions allowed to fail (0 to 1) before the task fails.
    :param retry_failures: Which failed items a new try of the task (a retry, or a clear) predicts
        again: ``transient`` (ambiguous creates, timeouts, predictions cancelled in flight, service
        errors marked retryable or with a 5xx-like code), ``all`` (every failure), or ``none``.
    :param max_attempts: Predictions per item and try at most: a prediction the service ended
        with a retryable error is created again while its item has had fewer (1: never).
    :param max_concurrency: Predictions in flight at most; ``None`` takes the connection's.
    :param requests_per_minute: Requests per minute at most; ``None`` takes the connection's (and
        shares its budget with the other tasks of the process).
    :param blip2_conn_id: The ``blip2`` connection.
    :param aws_conn_id: The AWS connection for ``s3://`` URIs.
    :param gcp_conn_id: The Google Cloud connection for ``gs://`` URIs.
    :param deferrable: Wait in the triggerer; defaults to ``[operators] default_deferrable``.
    :param defer_after: With ``deferrable=True``, seconds to wait on the worker for a prediction to
        end before deferring: while predictions end that soon, the batch goes on creating without a
        round trip through the triggerer, which costs a new task process and seconds of scheduling
        in which no slot is refilled. ``0`` defers after every round of creates.
    :param poll_interval: Seconds between two polls of the same prediction.
    :param timeout: Seconds one prediction may take before it is cancelled and recorded as failed.
    :param url_expiry: Lifetime in seconds of the signed URLs; default ``timeout`` plus an hour of queueing.
    :param image_transfer: How images reach the service: ``url`` (their URLs, signed for ``s3://``
        and ``gs://``), ``upload`` (the worker reads each, from a local path, ``file://``,
        ``http(s)://``, ``s3://`` or ``gs://``, and uploads it through the API's upload endpoint),
        or ``auto`` (the default: upload local paths and ``file://``, a URL otherwise).
    :param upload_retention: Seconds the service keeps an uploaded copy; default the ``timeout``
        plus 15 minutes (at least 60 s, the API's minimum).
    """

    template_fields: Sequence[str] = ("images", "output_uri", "question", "questions", "context")
    ui_color = "#d9cdf5"

    def __init__(
        self,
        *,
        images: str | list[str],
        output_uri: str,
        question: str | None = None,
        questions: dict[str, str] | None = None,
        caption: bool = False,
        context: str | None = None,
        temperature: float | str = 1.0,
        use_nucleus_sampling: bool = False,
        image_patterns: Sequence[str] = ("*.jpg", "*.jpeg", "*.png", "*.webp"),
        max_failed_ratio: float = 0.0,
        retry_failures: str = RETRY_TRANSIENT,
        max_attempts: int = 2,
        max_concurrency: int | None = None,
        requests_per_minute: int | None = None,
        blip2_conn_id: str = "blip2_default",
        aws_conn_id: str = "aws_default",
        gcp_conn_id: str = "google_cloud_default",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        defer_after: float = DEFER_AFTER_SECONDS,
        poll_interval: float = 2.0,
        timeout: float = 600.0,
        url_expiry: float | None = None,
        image_transfer: str = TRANSFER_AUTO,
        upload_retention: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_image_transfer(image_transfer, upload_retention)
        self.image_transfer = image_transfer
        self.upload_retention = upload_retention
        self.images = images
        self.output_uri = output_uri
        self.question = question
        self.questions = questions
        self.caption = caption
        self.context = context
        self.temperature = temperature
        self.use_nucleus_sampling = use_nucleus_sampling
        self.image_patterns = tuple(image_patterns)
        self.max_failed_ratio = max_failed_ratio
        self.retry_failures = retry_failures
        self.max_attempts = max_attempts
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self.blip2_conn_id = blip2_conn_id
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.deferrable = deferrable
        self.defer_after = defer_after
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.url_expiry = url_expiry
        if not 0 <= max_failed_ratio <= 1:
            raise ValueError(f"max_failed_ratio must be between 0 and 1, got {max_failed_ratio!r}")
        if poll_interval <= 0 or timeout <= 0:
            raise ValueError(f"poll_interval and timeout must be > 0, got {poll_interval} and {timeout}")
        check_retry_parameters(max_attempts, retry_failures)
        check_defer_after(defer_after)
        self._urls_by_key: dict[str, str] | None = None
        self._waiting_for: list[str] = []
        # Lines this instance wrote to output_uri, for the lineage (None until it wrote them).
        self._output_rows: int | None = None

    @cached_property
    def hook(self) -> Blip2Hook:
        """The hook of ``blip2_conn_id``, with this task's limits."""
        from airflow_provider_blip2.hooks.blip2 import Blip2Hook

        return Blip2Hook(
            blip2_conn_id=self.blip2_conn_id,
            requests_per_minute=self.requests_per_minute,
            max_concurrency=self.max_concurrency,
        )

    def _do_render_template_fields(self, parent: Any, *args: Any, **kwargs: Any) -> None:
        """Render the templated fields, then mask http(s) image URLs that carry a query (a signature)."""
        super()._do_render_template_fields(parent, *args, **kwargs)
        if parent is self:
            images = [self.images] if isinstance(self.images, str) else self.images or []
            for image in images:
                if isinstance(image, str) and image.startswith(("http://", "https://")) and "?" in image:
                    mask_secret(image)

    # ------------------------------------------------------------------------------------------
    # Execution: every worker cycle records what ended, creates what fits, then waits.
    # ------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        """List the images (or resume the stored batch), then run it."""
        journal = self._journal(context)
        state = journal.load()
        if state is None:
            state = journal.start(self._items())
            self.log.info("Starting a batch of %d predictions", len(state.items))
        else:
            self.log.info("Resuming the stored batch: %s", state.progress_line())
            self._predict_again(journal, state)
        return self._run(context, journal, state, None)

    def _predict_again(self, journal: BatchJournal, state: BatchState) -> None:
        """
        On a new try, release the items it predicts again (``retry_failures``); keep the others.

        Predictions still in flight are kept and waited for, except those cancelled in flight (a
        user cleared or failed the deferred task, and its trigger cancelled them). Finished items
        are predicted again when the retry rule says a new try can change how they ended.
        """
        journal.begin_cycle(state)
        fail_interrupted_runs(journal, state)
        cancelled = []
        for index, (prediction_id, _deadline) in state.in_flight.items():
            try:
                status = self.hook.get_prediction(prediction_id).status
            except Blip2Error as error:
                self.log.warning("Could not read prediction %s: %s", prediction_id, error)
                continue
            outcome = PredictionOutcome(PredictionOutcome.CANCELLED, prediction_id=prediction_id)
            if status is PredictionStatus.CANCELLED and predict_again_on_new_try(
                outcome, self.retry_failures
            ):
                self.log.info(
                    "Prediction %s was cancelled in flight; its image is predicted again", prediction_id
                )
                cancelled.append(index)
        again = state.to_predict_again(self.retry_failures)
        if again:
            self.log.info(
                "This try predicts again %d items that failed in an earlier try (%s); "
                "it keeps the other %d results",
                len(again),
                describe_failures([state.finished[index] for index in again]),
                len(state.finished) - len(again),
            )
        journal.release(state, cancelled + again)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Resume after the trigger's event: record the predictions that ended and go on.

        :param context: The task context.
        :param event: The trigger's payload.
        """
        journal = self._journal(context)
        state = journal.load()
        if state is None:
            raise AirflowException("The batch's progress is missing (task state store, or XCom before 3.3)")
        return self._run(context, journal, state, event)

    def _run(
        self, context: Context, journal: BatchJournal, state: BatchState, event: dict[str, Any] | None
    ) -> dict[str, Any]:
        try_number = _try_number(context)
        while True:
            journal.begin_cycle(state)
            if event is not None and event.get("run"):
                record_run_event(self, journal, state, event, try_number)
            elif event is not None:
                self._record_event(journal, state, event, try_number)
            runs = chunk_to_run(self, journal, state, try_number)
            if runs is None:
                self._create_predictions(journal, state, try_number)
            journal.flush()
            self.log.info("Batch progress: %s", state.progress_line())
            if state.done:
                return self._finish(context, state)
            if runs is not None:
                event = self._wait_for_runs(runs)
            else:
                event = self._wait_on_worker(state, (event or {}).get("polled") or {})

    def _wait_for_runs(self, trigger: BaseTrigger) -> dict[str, Any]:
        """Run a chunk of synchronous runs: in the triggerer when deferrable, else here."""
        if not self.deferrable:
            return _first_event(trigger)
        self.defer(trigger=trigger, method_name="execute_complete")

    def _wait_on_worker(self, state: BatchState, polled: dict[str, float]) -> dict[str, Any]:
        """
        Wait here until a prediction ends; when deferrable, at most ``defer_after``, then defer.

        :param state: The batch, with predictions in flight.
        :param polled: When the last trigger read each prediction still running.
        """
        if not self.deferrable:
            return _first_event(self._trigger(state, polled))
        if self.defer_after > 0:
            event = _first_event(self._trigger(state, polled, return_by=time.time() + self.defer_after))
            if event.get("finished"):
                return event
            self.hook.budget().note_requests(event.get("recent_requests") or [])
            polled = event.get("polled") or polled
        self.log.info("No prediction ended within %g s; deferring", self.defer_after)
        self.defer(trigger=self._trigger(state, polled, deferred=True), method_name="execute_complete")

    def _items(self) -> list[BatchItem]:
        """Resolve ``images`` to the batch's items, failing before any create on bad input."""

        try:
            self.storage.check_writable(self.output_uri)
            uris: list[str] = []
            for entry in _image_list(self.images, self.image_transfer):
                if _is_prefix(entry, listing_one=isinstance(self.images, str)):
                    listed = _list_prefix(self, entry)
                    self.log.info("Found %d images under %s", len(listed), entry)
                    uris += listed
                else:
                    uris.append(entry)
            uris = list(dict.fromkeys(uris))
            self.storage.check_all_exist([uri for uri in uris if is_remote_object(uri)])
            for uri in uris:
                if (path := local_path(uri)) is not None:
                    check_image_file(path, field_name="images")
            keys = [image_key(uri) for uri in uris]
            items = build_items(keys, questions=self.questions, question=self.question, caption=self.caption)
            for item in {(item.question,): item for item in items}.values():
                self._prediction_input(item, "https://images.invalid/check.jpg")
        except (StorageError, Blip2InputError, ValueError) as error:
            raise AirflowFailException(f"Invalid batch for task {self.task_id}: {error}") from error
        if not items:
            self.log.warning("No images to predict: %s matched nothing", self.images)
        return items

    def _image_url(self, key: str) -> str:
        """
        The image URI behind a journal key.

        http(s) URLs with a query (perhaps a signature) are kept in the journal as a redacted key;
        the URL itself comes from ``images``, rendered again on every run.
        """
        if "?<redacted" not in key:
            return key
        if self._urls_by_key is None:
            self._urls_by_key = {image_key(url): url for url in _image_list(self.images)}
        url = self._urls_by_key.get(key)
        if url is None:
            raise AirflowFailException(
                f"images no longer holds the URL of {key} (they changed since the batch started); "
                "give the same list to every try, or clear the task's state to start over"
            )
        return url

    def _prediction_input(self, item: BatchItem, url: str) -> PredictionInput:

        return self.hook.prediction_input(
            url,
            question=None if item.captions else item.question,
            context=self.context,
            caption=item.captions,
            temperature=self.temperature,
            use_nucleus_sampling=self.use_nucleus_sampling,
        )

    def _create_predictions(self, journal: BatchJournal, state: BatchState, try_number: int | None) -> None:
        """Create predictions for pending items while slots are free; record each at once."""
        free = self.hook.settings.max_concurrency - len(state.in_flight)
        expires_in = url_expiry(self.url_expiry, self.timeout)
        pending = state.pending()
        if self.hook.sync_run_choice().worth_trying():
            pending = []  # they wait for a chunk of synchronous runs, once nothing is in flight
        chosen = pending[: max(0, free)]
        uploads = batch_uploads(
            self, journal, state, [i for i in chosen if needs_upload(self, state.items[i].image)]
        )
        for index in chosen:
            item = state.items[index]
            journal.record_attempt(state, index, try_number)
            try:
                url = _uploaded_or_signed(self, uploads.get(index), item.image, expires_in)
                prediction_id = self.hook.submit_prediction(
                    self._prediction_input(item, url), patient_until=time.time() + self.timeout
                )
            except SigningError as error:
                raise AirflowFailException(str(error)) from error
            except Blip2AmbiguousCreateError as error:
                # It may exist and cost money: not created again in this try; a new try may.
                self.log.warning("%s (%s): %s", _file_name(item.image), item.label, error)
                outcome = PredictionOutcome(PredictionOutcome.AMBIGUOUS, error=str(error))
                journal.record_ambiguous(state, index)
                journal.record_finished(state, {index: outcome})
                continue
            except (
                StorageError,
                Blip2UploadError,
                Blip2InputError,
                Blip2BadRequestError,
                Blip2UnprocessableError,
            ) as error:
                journal.record_finished(state, {index: PredictionOutcome("error", error=str(error))})
                continue
            journal.record_created(state, index, prediction_id, time.time() + self.timeout)

    def _record_event(
        self, journal: BatchJournal, state: BatchState, event: dict[str, Any], try_number: int | None
    ) -> None:

        budget = self.hook.budget()
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
                self._cancel_quietly(prediction_id)
                result = PredictionOutcome(
                    "timeout",
                    error=f"did not finish within {self.timeout:g} s; it was cancelled",
                    prediction_id=prediction_id,
                )
            item = state.items[index]
            attempts = state.attempts_in_try(index, try_number)
            if create_again_within_try(result, attempts_this_try=attempts, max_attempts=self.max_attempts):
                self.log.warning(
                    "%s (%s): %s; predicting it again (attempt %d of %d)",
                    _file_name(item.image),
                    item.label,
                    result.failure_message(),
                    attempts + 1,
                    self.max_attempts,
                )
                again.append(index)
            elif result.failed:
                self.log.warning("%s (%s): %s", _file_name(item.image), item.label, result.error)
            results[index] = result
        journal.record_finished(state, results)
        journal.release(state, again)

    def _trigger(
        self,
        state: BatchState,
        polled: dict[str, float],
        *,
        deferred: bool = False,
        return_by: float | None = None,
    ) -> Blip2BatchPredictionTrigger:
        """
        The trigger for the in-flight predictions.

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
            pid: max(deadline - self.timeout, float(polled.get(pid, 0.0))) + self.poll_interval
            for pid, deadline in in_flight.values()
        }
        if not state.pending():
            resume_after = len(in_flight)
        elif deferred:
            # Come back when half the slots are free: each round trip through the scheduler costs
            # seconds in which no request is sent, so it must refill several slots at once.
            resume_after = max(1, self.hook.settings.max_concurrency // 2)
        else:
            resume_after = 1
        self._waiting_for = [pid for pid, _deadline in in_flight.values()]
        return Blip2BatchPredictionTrigger(
            predictions=dict(in_flight.values()),
            poll_from=poll_from,
            blip2_conn_id=self.blip2_conn_id,
            poll_interval=self.poll_interval,
            resume_after=resume_after,
            recent_requests=self.hook.budget().recent_requests(),
            requests_per_minute=self.requests_per_minute,
            max_concurrency=self.max_concurrency,
            not_before=time.time() + BATCH_DEFERRAL_SETTLE_SECONDS if deferred else None,
            return_by=return_by,
        )

    def _finish(self, context: Context, state: BatchState) -> dict[str, Any]:
        """Write the results, return the summary; fail if too many predictions failed."""
        self.storage.write_bytes(
            self.output_uri, state.result_lines().encode(), content_type="application/x-ndjson"
        )
        self._output_rows = len(state.items)
        summary = state.summary(self.output_uri)
        self.log.info("Batch finished: %s", summary)
        again = state.to_predict_again(self.retry_failures)
        if again and _retries_left(context):
            raise AirflowException(
                f"{len(again)} of {summary['total']} predictions failed in a way a new try can fix "
                f"({describe_failures([state.finished[index] for index in again])}): the next try "
                f"predicts them again and keeps the other {summary['total'] - len(again)} results; "
                f"results so far in {self.output_uri}"
            )
        if failed_ratio_exceeded(state, self.max_failed_ratio):
            raise AirflowFailException(
                f"{summary['failed']} of {summary['total']} predictions failed, more than "
                f"max_failed_ratio={self.max_failed_ratio:g} allows; results in {self.output_uri}"
            )
        if not summary["failed"]:
            _forget_progress(context)
        return summary

    def _journal(self, context: Context) -> BatchJournal:

        store: Any = context.get("task_state_store")  # type: ignore[call-overload]
        if store is None:
            self.log.warning("No task state store (Airflow < 3.3): progress lasts one try, not retries")
            store = _XComStore(context)
        return BatchJournal(store)

    def on_kill(self) -> None:
        """Cancel the predictions this try waits for on the worker (``deferrable=False``)."""
        for prediction_id in self._waiting_for:
            self._cancel_quietly(prediction_id)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage | None:
        """
        The task's lineage for OpenLineage: the images' folders in, ``output_uri`` and its lines out.

        Inputs are the prefix listed, or the folders of the images given (``s3://bucket`` or
        ``gs://bucket`` and the key prefix, or a URL's origin and path, never its query string); the
        output is ``output_uri`` with the number of lines written (``outputStatistics.rowCount``),
        once this instance wrote them (also when the task then fails on ``max_failed_ratio``). Reads
        only this instance, which ran the task (or resumed it), and sends no request. Returns
        ``None`` when the OpenLineage provider is not installed.

        :param task_instance: The finished task instance (unused).
        """
        from airflow_provider_blip2.lineage import batch_images, dataset_name, operator_lineage

        output = dataset_name(self.output_uri) if isinstance(self.output_uri, str) else None
        outputs = []
        if output is not None and self._output_rows is not None:
            outputs.append((output[0], output[1], self._output_rows))
        return operator_lineage(inputs=batch_images(self.images), outputs=outputs)


def _try_number(context: Context) -> int | None:
    """This try's number, when the task instance tells it."""
    number = getattr(context.get("ti"), "try_number", None)
    return number if isinstance(number, int) else None


def _retries_left(context: Context) -> bool:
    """
    Whether a failure of this try leads to another try that keeps the batch's progress.

    Only with a task state store (Airflow 3.3+): before, a new try starts the batch over. Airflow
    retries while ``try_number <= max_tries``.
    """
    if context.get("task_state_store") is None:  # type: ignore[call-overload]
        return False
    max_tries = getattr(context.get("ti"), "max_tries", None)
    number = _try_number(context)
    return isinstance(max_tries, int) and number is not None and max_tries > 0 and number <= max_tries


def _file_name(image: str) -> str:
    """How log lines name an image: its file name (a URL's query is redacted in journal keys)."""
    return image.rstrip("/").rsplit("/", 1)[-1]


def _uploaded_or_signed(
    op: Blip2BatchPredictionOperator, upload: UploadedImage | Exception | None, image: str, expires_in: float
) -> str:
    """An item's image URL: its uploaded copy's (raising the upload's error), else signed or as given."""
    if isinstance(upload, Exception):
        raise upload
    if upload is not None:
        return upload.public_url
    return op.storage.signed_url(op._image_url(image), expires_in=expires_in)


def _image_list(images: Any, image_transfer: str = "auto") -> list[str]:
    """Validate a list of image URIs (or one URL or path), keeping the first of duplicates."""
    values = [images] if isinstance(images, str) else list(images or [])
    uris: dict[str, None] = {}
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"images: {value!r} is not an image URI or path")
        if "://" in value and not value.startswith(("https://", "http://", "s3://", "gs://", "file://")):
            raise ValueError(
                f"images: {value!r} is not an https://, http://, s3://, gs:// or file:// URI, or a path"
            )
        transfer_for(image_transfer, value, field_name="images")
        uris.setdefault(value, None)
    return list(uris)


def _is_prefix(entry: str, *, listing_one: bool) -> bool:
    """Whether an entry of ``images`` is a folder to list: a bucket prefix, or a local directory."""
    path = local_path(entry)
    if path is not None:
        return path.is_dir()
    return is_remote_object(entry) and (listing_one or entry.endswith("/"))


def _list_prefix(op: Blip2BatchPredictionOperator, entry: str) -> list[str]:
    """The images under a prefix or in a local directory (recursively), matching ``image_patterns``."""
    path = local_path(entry)
    if path is None:
        return op.storage.list_images(entry, op.image_patterns)
    patterns = [pattern.lower() for pattern in op.image_patterns]
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return [str(p) for p in files if any(fnmatch.fnmatch(p.name.lower(), pattern) for pattern in patterns)]


def _first_event(trigger: BaseTrigger) -> dict[str, Any]:
    """Run a trigger on the worker and return its event's payload."""
    import asyncio

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AirflowException(f"{type(trigger).__name__} ended without an event")

    return asyncio.run(first())


class _XComStore:
    """The journal's store before Airflow 3.3: this task instance's XCom (kept across deferrals)."""

    def __init__(self, context: Context) -> None:
        self.ti = context["ti"]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.ti.xcom_pull(task_ids=self.ti.task_id, key=key, map_indexes=self.ti.map_index)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        self.ti.xcom_push(key=key, value=value)


def _forget_progress(context: Context) -> None:
    """Drop the finished batch's progress, so a cleared task predicts again."""
    store = context.get("task_state_store")  # type: ignore[call-overload]
    if store is not None:
        store.clear()
