"""Operator that captions an image or answers a question about it with BLIP-2."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    BaseOperator,
    ResumableJobMixin,
    conf,
    mask_secret,
)

from airflow_provider_blip2.client.errors import Blip2InputError, Blip2NotFoundError
from airflow_provider_blip2.client.inputs import PredictionInput, prompt_input
from airflow_provider_blip2.client.models import (
    Prediction,
    PredictionOutcome,
    PredictionStatus,
    create_again_within_try,
)
from airflow_provider_blip2.client.uploads import TRANSFER_AUTO, Blip2UploadError, transfer_for
from airflow_provider_blip2.links.blip2 import PREDICTION_URL_XCOM_KEY, Blip2PredictionLink
from airflow_provider_blip2.operators.base import (
    DEFER_AFTER_SECONDS,
    VALIDATION_IMAGE_URL,
    Blip2TaskMixin,
    check_task_parameters,
)
from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator
from airflow_provider_blip2.operators.prediction_end import (
    COST_XCOM_KEY,
    PREDICT_TIME_XCOM_KEY,
    push_reported,
    try_cost,
)
from airflow_provider_blip2.operators.prediction_image import single_image_url
from airflow_provider_blip2.storage import StorageError
from airflow_provider_blip2.storage.staging import ImageFetchError

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

__all__ = [
    "COST_XCOM_KEY",
    "PREDICTION_ID_XCOM_KEY",
    "PREDICTION_URL_XCOM_KEY",
    "PREDICT_TIME_XCOM_KEY",
    "Blip2BatchPredictionOperator",
    "Blip2PredictionOperator",
]

PREDICTION_ID_XCOM_KEY = "prediction_id"
# Status reported for a stored prediction id the API does not know: a retry then creates a new one.
PREDICTION_NOT_FOUND = "not found"


class Blip2PredictionOperator(Blip2TaskMixin, ResumableJobMixin, BaseOperator):
    """
    Caption an image, or ask a question about it, with BLIP-2 on the Eachlabs API.

    The prediction is created on the worker and its id pushed to XCom (key ``prediction_id``), with
    its address (key ``prediction_url``) behind the task's extra link "BLIP-2 prediction"
    (:class:`~airflow_provider_blip2.links.blip2.Blip2PredictionLink`).
    Then the operator either defers to :class:`~airflow_provider_blip2.triggers.blip2.Blip2PredictionTrigger`
    (``deferrable=True``: waiting costs no worker slot) or polls on the worker. The model's text is
    the return value (XCom ``return_value``); the cost and the model's run time the API reported
    are logged and pushed under the XCom keys ``cost`` and ``predict_time``. When the prediction
    does not finish within ``timeout`` it is cancelled and the task fails. A prediction the service
    ended with a retryable error is created again in the same try, up to ``max_attempts``
    predictions in all.

    On Airflow 3.3+ the prediction id is kept in the task state store before waiting, so a retried
    try reattaches to a running or succeeded prediction instead of paying for a new one. That is why
    this operator creates and polls rather than using the API's synchronous run (whose id comes
    only with its answer). Its first read comes when the connection's recent predictions had ended
    (a delay learned from earlier first reads, shared through Redis with ``redis_conn_id``), so a
    prediction costs about two requests.

    Image URLs are masked in logs and rendered fields; they may be presigned.

    :param image: A jpeg, png or webp image: an http(s) URL the service can download,
        ``s3://bucket/key`` / ``gs://bucket/object`` (sent as a presigned (signed) URL made on the
        worker after checking the object exists), or a local path or ``file://`` URI on the worker
        (uploaded, see ``image_transfer``). (templated)
    :param question: Question to ask; ``None`` asks "What is this a picture of?", an empty string
        captions. (templated)
    :param context: Earlier Q&A, ``Question: {q} Answer: {a}.`` joined by spaces, prepended to the
        prompt. (templated)
    :param caption: Caption the image instead of answering a question. A question together with
        ``caption=True`` is refused.
    :param temperature: 0.5 to 1.0; used with nucleus sampling.
    :param use_nucleus_sampling: Sample instead of beam search.
    :param blip2_conn_id: The ``blip2`` connection.
    :param deferrable: Wait in the triggerer; defaults to ``[operators] default_deferrable``.
    :param defer_after: With ``deferrable=True``, seconds to wait on the worker before deferring: a
        prediction that ends sooner completes the task without a round trip through the triggerer,
        which costs a new task process and seconds of scheduling. ``0`` defers at once.
    :param poll_interval: Seconds between status polls.
    :param timeout: Seconds to wait for the prediction before cancelling it and failing.
    :param aws_conn_id: The AWS connection for ``s3://`` images (needs the ``[amazon]`` extra).
    :param gcp_conn_id: The Google Cloud connection for ``gs://`` images (needs the ``[google]`` extra).
    :param url_expiry: Lifetime in seconds of a signed image URL; default ``timeout`` plus an hour
        of queueing.
    :param image_transfer: How the image reaches the service: ``url`` (its URL, signed for
        ``s3://`` and ``gs://``), ``upload`` (the worker reads it, from a local path, ``file://``,
        ``http(s)://``, ``s3://`` or ``gs://``, and uploads it through the API's upload endpoint),
        or ``auto`` (the default: upload local paths and ``file://``, a URL otherwise).
    :param upload_retention: Seconds the service keeps an uploaded copy; default the ``timeout``
        plus 15 minutes (at least 60 s, the API's minimum).
    :param max_attempts: Predictions per try at most: one the service ended with a retryable error
        (its envelope says ``retryable``, or a code such as ``PROVIDER_FAILED``) is created again
        while fewer were made (1: never). ``timeout`` applies to each.
    """

    template_fields: Sequence[str] = ("image", "question", "context")
    ui_color = "#e8e1f7"
    operator_extra_links = (Blip2PredictionLink(),)
    external_id_key = "blip2_prediction_id"

    def __init__(
        self,
        *,
        image: str,
        question: str | None = None,
        context: str | None = None,
        caption: bool = False,
        temperature: float | str = 1.0,
        use_nucleus_sampling: bool = False,
        blip2_conn_id: str = "blip2_default",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        defer_after: float = DEFER_AFTER_SECONDS,
        poll_interval: float = 2.0,
        timeout: float = 600.0,
        aws_conn_id: str = "aws_default",
        gcp_conn_id: str = "google_cloud_default",
        url_expiry: float | None = None,
        max_attempts: int = 2,
        image_transfer: str = TRANSFER_AUTO,
        upload_retention: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_transfer = image_transfer
        self.upload_retention = upload_retention
        self.image = image
        self.aws_conn_id = aws_conn_id
        self.gcp_conn_id = gcp_conn_id
        self.url_expiry = url_expiry
        self.question = question
        self.context = context
        self.caption = caption
        self.temperature = temperature
        self.use_nucleus_sampling = use_nucleus_sampling
        self.blip2_conn_id = blip2_conn_id
        self.deferrable = deferrable
        self.defer_after = defer_after
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.prediction_id: str | None = None
        self._completed: tuple[str | None] | None = None
        # The prediction this instance created and when its create answered (its first read is timed).
        self._created: tuple[str, float] | None = None
        check_task_parameters(self)

    @cached_property
    def hook(self) -> Blip2Hook:
        """The hook of ``blip2_conn_id``."""
        from airflow_provider_blip2.hooks.blip2 import Blip2Hook
        from airflow_provider_blip2.metrics import Blip2Metrics

        return Blip2Hook(blip2_conn_id=self.blip2_conn_id, metrics=Blip2Metrics.of(self))

    def _do_render_template_fields(self, parent: Any, *args: Any, **kwargs: Any) -> None:
        """Render the templated fields, then mask the image URL before Airflow stores rendered fields."""
        # Plain and mapped (.expand) tasks both render through here, before rendered fields are stored.
        super()._do_render_template_fields(parent, *args, **kwargs)
        # s3:// and gs:// URIs are no secret (their signed URLs are masked when made), http(s) URLs may be.
        if parent is self and isinstance(self.image, str) and self.image.startswith(("http://", "https://")):
            mask_secret(self.image)

    # ------------------------------------------------------------------------------------------
    # Execution
    # ------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> str | None:
        """Create the prediction (or reattach to the previous try's) and wait for its output."""
        return self.execute_resumable(context)

    def prediction_input(self, context: Context | None = None) -> PredictionInput:
        """
        Validate the inputs, then make the image's URL (signing it, or uploading the image).

        Bad input fails the task without retries, before any request; an upload that failed (its
        source unreadable, the PUT refused) fails the try, so that a retry may upload it again.

        :param context: The task context (its state store keeps an uploaded copy for a retry).
        """
        try:
            self._validate_inputs()
            return self._inputs_for(single_image_url(self, context))
        except (Blip2UploadError, ImageFetchError) as error:
            raise AirflowException(f"Could not upload the image of task {self.task_id}: {error}") from error
        except (Blip2InputError, StorageError, ValueError) as error:
            raise AirflowFailException(f"Invalid BLIP-2 input for task {self.task_id}: {error}") from error

    def _inputs_for(self, image_url: str) -> PredictionInput:
        return prompt_input(image_url, self.question, self.caption, self)

    def _validate_inputs(self) -> None:
        """Check every input but the image's URL, and how the image is sent, before any request."""
        if isinstance(self.image, str):
            transfer_for(self.image_transfer, self.image)
            self._inputs_for(VALIDATION_IMAGE_URL)

    def submit_job(self, context: Context) -> str:
        """Create the prediction and push its id and link to XCom."""
        self.prediction_id = self.hook.submit_prediction(
            self.prediction_input(context), patient_until=time.time() + self.timeout
        )
        self._created = (self.prediction_id, time.time())
        self._push_prediction(context, self.prediction_id)
        return self.prediction_id

    def _push_prediction(self, context: Context, prediction_id: str, read: Prediction | None = None) -> None:
        """Push the prediction's id and link (before waiting or deferring: the link shows meanwhile)."""
        ti = context["ti"]
        ti.xcom_push(key=PREDICTION_ID_XCOM_KEY, value=prediction_id)
        ti.xcom_push(key=PREDICTION_URL_XCOM_KEY, value=self.hook.prediction_link(prediction_id, read))

    def get_job_status(self, external_id: Any, context: Context) -> str:
        """Return the status of a stored prediction id (``not found`` when the API has none)."""
        try:
            return self.hook.get_prediction(str(external_id)).status.value
        except Blip2NotFoundError:
            self.log.warning("The previous try's prediction %s no longer exists", external_id)
            return PREDICTION_NOT_FOUND

    def is_job_active(self, status: str) -> bool:
        """Whether a prediction with this status (from :meth:`get_job_status`) is still running."""
        return status == PredictionStatus.RUNNING.value

    def is_job_succeeded(self, status: str) -> bool:
        """Whether a prediction with this status (from :meth:`get_job_status`) succeeded."""
        return status == PredictionStatus.SUCCEEDED.value

    def poll_until_complete(self, external_id: Any, context: Context) -> str | None:  # type: ignore[override]
        """
        Defer to the trigger, or poll on the worker until the prediction has ended.

        Returns the output because the mixin returns this method's value when it reattaches.
        """
        if self.prediction_id != str(external_id):  # reattached on retry: this try's XCom is empty
            self._push_prediction(context, str(external_id))
        self.prediction_id = str(external_id)
        return self._wait(context, attempt=1, spent=None)

    def _wait(self, context: Context, *, attempt: int, spent: float | None) -> str | None:
        """Wait for ``self.prediction_id`` here (at most ``defer_after`` when deferrable), then complete."""
        assert self.prediction_id is not None
        end_time = time.time() + self.timeout
        created = self._created if self._created and self._created[0] == self.prediction_id else None
        outcome = self.hook.poll_prediction(  # defer_after=0: None at once, with no read
            self.prediction_id,
            poll_interval=self.poll_interval,
            end_time=end_time,
            wait_at_most=self.defer_after if self.deferrable else None,
            created_at=created[1] if created else None,
        )
        if outcome is None:
            self._defer(self.prediction_id, end_time=end_time, attempt=attempt, spent=spent)
        return self._complete(context, outcome, attempt=attempt, spent=spent)

    def get_job_result(self, external_id: Any, context: Context) -> str | None:
        """Return the output of a finished prediction (also when a retry finds one that succeeded)."""
        if self._completed is not None:  # waited for on the worker in this call of execute()
            return self._completed[0]
        self.prediction_id = str(external_id)
        read = self.hook.get_prediction(self.prediction_id)
        self._push_prediction(context, self.prediction_id, read)
        return self._complete(context, read.outcome(), attempt=1, spent=None)

    def _defer(self, prediction_id: str, *, end_time: float, attempt: int, spent: float | None) -> NoReturn:
        from airflow_provider_blip2.triggers.blip2 import DEFERRAL_SETTLE_SECONDS, Blip2PredictionTrigger

        self.log.info("Deferring; waiting for prediction %s in the triggerer", prediction_id)
        self.defer(
            trigger=Blip2PredictionTrigger(
                prediction_id=prediction_id,
                blip2_conn_id=self.blip2_conn_id,
                poll_interval=self.poll_interval,
                end_time=end_time,
                not_before=time.time() + DEFERRAL_SETTLE_SECONDS,
            ),
            method_name="execute_complete",
            kwargs={"attempt": attempt, "spent": spent},
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any], attempt: int = 1, spent: float | None = None
    ) -> str | None:
        """
        Resume after the trigger's event: return the output, or cancel on timeout and fail.

        :param context: The task context.
        :param event: The trigger's payload: a
            :class:`~airflow_provider_blip2.client.models.PredictionOutcome` as ``to_json`` gives it.
        :param attempt: Which prediction of this try it was (1 for the first).
        :param spent: The cost of the try's earlier predictions, when the API reported one.
        """
        outcome = PredictionOutcome.from_json(event)
        self.prediction_id = outcome.prediction_id
        return self._complete(context, outcome, attempt=attempt, spent=spent)

    def _complete(
        self, context: Context, outcome: PredictionOutcome, *, attempt: int, spent: float | None
    ) -> str | None:
        """The task's end, the same on the worker and after the trigger: the output, or a failure."""
        self.hook.metrics.ended(outcome)
        cost = try_cost(spent, outcome)
        push_reported(context, outcome, cost)
        if outcome.succeeded:
            self.log.info(
                "Prediction %s succeeded in %s s, cost %s: %r",
                outcome.prediction_id,
                outcome.predict_time,
                cost,
                outcome.output,
            )
            self._completed = (outcome.output,)
            return outcome.output
        if outcome.status == PredictionOutcome.TIMEOUT and outcome.prediction_id:
            self._cancel_quietly(outcome.prediction_id)
            raise AirflowException(
                f"Prediction {outcome.prediction_id} did not finish within {self.timeout:g} s; "
                "it was cancelled"
            )
        if create_again_within_try(outcome, attempts_this_try=attempt, max_attempts=self.max_attempts):
            self.log.warning(
                "%s; predicting again (attempt %d of %d)",
                outcome.failure_message(),
                attempt + 1,
                self.max_attempts,
            )
            self._create_again(context)
            return self._wait(context, attempt=attempt + 1, spent=cost)
        raise AirflowException(outcome.failure_message())

    def _create_again(self, context: Context) -> None:
        """Create a new prediction in this try and store its id, as the mixin stores the first one."""
        prediction_id = self.submit_job(context)
        store = context.get("task_state_store")  # type: ignore[call-overload]
        if store is not None and getattr(self, "durable", False):
            store.set(self.external_id_key, prediction_id)

    def on_kill(self) -> None:
        """Cancel the prediction this try is waiting for on the worker (sync mode)."""
        if self.prediction_id:
            self._cancel_quietly(self.prediction_id)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage | None:
        """
        The task's lineage for OpenLineage: the image as input, the prediction as the run's external id.

        The image is named by its bucket and key (``s3://bucket`` or ``gs://bucket``), or by its
        URL's origin and path, never its query string. Reads only this instance, which ran the task
        (or resumed it), and sends no request. Returns ``None`` when the OpenLineage provider is not
        installed.

        :param task_instance: The finished task instance (unused).
        """
        from airflow_provider_blip2.lineage import operator_lineage, single_image

        return operator_lineage(inputs=single_image(self.image), prediction_id=self.prediction_id)
