"""Operator that captions, or asks questions about, a whole list or prefix of images with BLIP-2."""

from __future__ import annotations

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
    image_key,
)
from airflow_provider_blip2.batch.spending import capped
from airflow_provider_blip2.client.inputs import PredictionInput, prompt_input
from airflow_provider_blip2.client.models import RETRY_TRANSIENT
from airflow_provider_blip2.client.uploads import TRANSFER_AUTO
from airflow_provider_blip2.operators.base import (
    DEFER_AFTER_SECONDS,
    Blip2TaskMixin,
    check_task_parameters,
)
from airflow_provider_blip2.operators.batch.cache import start_batch
from airflow_provider_blip2.operators.batch.finish import finish_batch
from airflow_provider_blip2.operators.batch.images import image_list
from airflow_provider_blip2.operators.batch.poll import (
    create_predictions,
    first_event,
    poll_trigger,
    record_poll_event,
)
from airflow_provider_blip2.operators.batch.progress import BatchTry
from airflow_provider_blip2.operators.batch.run import chunk_to_run, record_run_event
from airflow_provider_blip2.operators.batch.spending import (
    check_costs_known,
    check_max_cost,
)
from airflow_provider_blip2.operators.batch.tries import (
    open_journal,
    predict_again,
    try_number,
)

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook
    from airflow_provider_blip2.triggers.batch_run import Blip2BatchRunTrigger


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
    :param cache_uri: A result cache (``s3://``, ``gs://`` or a local path; the same for every
        run): an item whose image is unchanged and whose inputs and model are the same as when it
        succeeded is not predicted again; its cached line is written with ``"cached": true`` and
        cost 0. Each run adds its new successes. See the docs' "Nightly runs" guide. (templated)
    :param cache_compact: Rewrite the cache with only this run's items (drop the others).
    :param max_cost: A spending cap in the API's cost unit: the batch starts no prediction that
        could take its spend past it, writes what finished (and the cache), then fails naming
        what was spent and how many items are left. (templated)
    """

    template_fields: Sequence[str] = (
        "images",
        "output_uri",
        "question",
        "questions",
        "context",
        "cache_uri",
        "max_cost",
    )
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
        cache_uri: str | None = None,
        cache_compact: bool = False,
        max_cost: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cache_uri = cache_uri
        self.cache_compact = cache_compact
        self.max_cost = max_cost
        # max_cost as a number, once rendered (execute).
        self.spending_cap: float | None = None
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
        check_task_parameters(self, retry_failures, max_failed_ratio)
        self._urls_by_key: dict[str, str] | None = None
        self._waiting_for: list[str] = []
        # Lines this instance wrote to output_uri, for the lineage (None until it wrote them).
        self._output_rows: int | None = None

    @cached_property
    def hook(self) -> Blip2Hook:
        """The hook of ``blip2_conn_id``, with this task's limits."""
        from airflow_provider_blip2.hooks.blip2 import Blip2Hook
        from airflow_provider_blip2.metrics import Blip2Metrics

        return Blip2Hook(
            blip2_conn_id=self.blip2_conn_id,
            requests_per_minute=self.requests_per_minute,
            max_concurrency=self.max_concurrency,
            metrics=Blip2Metrics.of(self),
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
        self.spending_cap = check_max_cost(self.max_cost)
        journal = open_journal(self, context)
        state = journal.load()
        if state is None:
            state = start_batch(self, journal)
            self.log.info("Starting a batch of %d predictions", len(state.items))
        else:
            self.log.info("Resuming the stored batch: %s", state.progress_line())
            predict_again(self, journal, state)
        return self._run(context, journal, state, None)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """
        Resume after the trigger's event: record the predictions that ended and go on.

        :param context: The task context.
        :param event: The trigger's payload.
        """
        self.spending_cap = check_max_cost(self.max_cost)
        journal = open_journal(self, context)
        state = journal.load()
        if state is None:
            raise AirflowException("The batch's progress is missing (task state store, or XCom before 3.3)")
        return self._run(context, journal, state, event)

    def _run(
        self, context: Context, journal: BatchJournal, state: BatchState, event: dict[str, Any] | None
    ) -> dict[str, Any]:
        batch = BatchTry(journal, state, try_number(context))
        while True:
            journal.begin_cycle(state)
            if event is not None and event.get("run"):
                record_run_event(self, batch, event)
            elif event is not None:
                record_poll_event(self, batch, event)
            if self.spending_cap is not None:
                check_costs_known(self, state)
            runs = chunk_to_run(self, batch)
            if runs is None:
                create_predictions(self, batch)
            journal.flush()
            self.log.info("Batch progress: %s", state.progress_line())
            if state.done or capped(state, self.spending_cap):
                return finish_batch(self, context, state)
            if runs is not None:
                event = self._wait_for_runs(context, runs)
            else:
                event = self._wait_on_worker(state, (event or {}).get("polled") or {})

    def _wait_for_runs(self, context: Context, trigger: Blip2BatchRunTrigger) -> dict[str, Any]:
        """Run a chunk of synchronous runs: in the triggerer when deferrable, else here."""
        if not self.deferrable:
            return first_event(trigger)
        from airflow_provider_blip2.triggers.run_journal import XCOM_KEY, RunJournal

        # The chunk's journal starts empty in XCom, where the trigger's first read finds it.
        context["ti"].xcom_push(key=XCOM_KEY, value=RunJournal(trigger.chunk).to_json())
        self.defer(trigger=trigger, method_name="execute_complete")

    def _wait_on_worker(self, state: BatchState, polled: dict[str, float]) -> dict[str, Any]:
        """
        Wait here until a prediction ends; when deferrable, at most ``defer_after``, then defer.

        :param state: The batch, with predictions in flight.
        :param polled: When the last trigger read each prediction still running.
        """
        if not self.deferrable:
            return first_event(poll_trigger(self, state, polled))
        if self.defer_after > 0:
            event = first_event(poll_trigger(self, state, polled, return_by=time.time() + self.defer_after))
            if event.get("finished"):
                return event
            self.hook.budget().note_requests(event.get("recent_requests") or [])
            polled = event.get("polled") or polled
        self.log.info("No prediction ended within %g s; deferring", self.defer_after)
        self.defer(trigger=poll_trigger(self, state, polled, deferred=True), method_name="execute_complete")

    def _image_url(self, key: str) -> str:
        """
        The image URI behind a journal key.

        http(s) URLs with a query (perhaps a signature) are kept in the journal as a redacted key;
        the URL itself comes from ``images``, rendered again on every run.
        """
        if "?<redacted" not in key:
            return key
        if self._urls_by_key is None:
            self._urls_by_key = {image_key(url): url for url in image_list(self.images)}
        url = self._urls_by_key.get(key)
        if url is None:
            raise AirflowFailException(
                f"images no longer holds the URL of {key} (they changed since the batch started); "
                "give the same list to every try, or clear the task's state to start over"
            )
        return url

    def _prediction_input(self, item: BatchItem, url: str) -> PredictionInput:
        return prompt_input(url, None if item.captions else item.question, item.captions, self)

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
