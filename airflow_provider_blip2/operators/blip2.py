"""Operator that captions an image or answers a question about it with BLIP-2."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    BaseOperator,
    ResumableJobMixin,
    conf,
    mask_secret,
)

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook
    from airflow_provider_blip2.protocol import Prediction, PredictionInput

PREDICTION_ID_XCOM_KEY = "prediction_id"
# Status reported for a stored prediction id the API does not know: a retry then creates a new one.
PREDICTION_NOT_FOUND = "not found"


class Blip2PredictionOperator(ResumableJobMixin, BaseOperator):
    """
    Caption an image, or ask a question about it, with BLIP-2 on the Eachlabs API.

    The prediction is created on the worker and its id pushed to XCom (key ``prediction_id``).
    Then the operator either defers to :class:`~airflow_provider_blip2.triggers.blip2.Blip2PredictionTrigger`
    (``deferrable=True``: waiting costs no worker slot) or polls on the worker. The model's text is
    the return value (XCom ``return_value``). When the prediction does not finish within ``timeout``
    it is cancelled and the task fails.

    On Airflow 3.3+ the prediction id is kept in the task state store before waiting, so a retried
    try reattaches to a running or succeeded prediction instead of paying for a new one (``durable``).

    Image URLs are masked in logs and rendered fields; they may be presigned.

    :param image: http(s) URL of a jpeg, png or webp image the service can download. (templated)
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
    :param poll_interval: Seconds between status polls.
    :param timeout: Seconds to wait for the prediction before cancelling it and failing.
    :param durable: Reattach to the previous try's prediction on retry (Airflow 3.3+).
    """

    template_fields: Sequence[str] = ("image", "question", "context")
    ui_color = "#e8e1f7"
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
        poll_interval: float = 2.0,
        timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.question = question
        self.context = context
        self.caption = caption
        self.temperature = temperature
        self.use_nucleus_sampling = use_nucleus_sampling
        self.blip2_conn_id = blip2_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.prediction_id: str | None = None
        self._finished: Prediction | None = None
        if poll_interval <= 0 or timeout <= 0:
            raise ValueError(f"poll_interval and timeout must be > 0, got {poll_interval} and {timeout}")

    @cached_property
    def hook(self) -> Blip2Hook:
        """The hook of ``blip2_conn_id``."""
        from airflow_provider_blip2.hooks.blip2 import Blip2Hook

        return Blip2Hook(blip2_conn_id=self.blip2_conn_id)

    def _do_render_template_fields(self, parent: Any, *args: Any, **kwargs: Any) -> None:
        """Render the templated fields, then mask the image URL before Airflow stores rendered fields."""
        # Plain and mapped (.expand) tasks both render through here, before rendered fields are stored.
        super()._do_render_template_fields(parent, *args, **kwargs)
        if parent is self and isinstance(self.image, str) and self.image:
            mask_secret(self.image)

    # ------------------------------------------------------------------------------------------
    # Execution
    # ------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> str | None:
        """Create the prediction (or reattach to the previous try's) and wait for its output."""
        return self.execute_resumable(context)

    def prediction_input(self) -> PredictionInput:
        """Validate the inputs; bad input fails the task without retries."""
        from airflow_provider_blip2.protocol import Blip2InputError, build_prediction_input

        try:
            return build_prediction_input(
                self.image,
                question=self.question,
                context=self.context,
                caption=self.caption,
                temperature=self.temperature,
                use_nucleus_sampling=self.use_nucleus_sampling,
            )
        except Blip2InputError as error:
            raise AirflowFailException(f"Invalid BLIP-2 input for task {self.task_id}: {error}") from error

    def submit_job(self, context: Context) -> str:
        """Create the prediction and push its id to XCom."""
        self.prediction_id = self.hook.submit_prediction(self.prediction_input())
        context["ti"].xcom_push(key=PREDICTION_ID_XCOM_KEY, value=self.prediction_id)
        return self.prediction_id

    def get_job_status(self, external_id: Any, context: Context) -> str:
        """Return the raw status of a stored prediction id (``not found`` when the API has none)."""
        from airflow_provider_blip2.protocol import Blip2NotFoundError

        try:
            return self.hook.get_prediction(str(external_id)).raw_status
        except Blip2NotFoundError:
            self.log.warning("The previous try's prediction %s no longer exists", external_id)
            return PREDICTION_NOT_FOUND

    def is_job_active(self, status: str) -> bool:
        """Whether a prediction with this raw status is still running."""
        from airflow_provider_blip2.protocol import normalise_status

        return status != PREDICTION_NOT_FOUND and not normalise_status(status).is_terminal

    def is_job_succeeded(self, status: str) -> bool:
        """Whether a prediction with this raw status succeeded."""
        from airflow_provider_blip2.protocol import PredictionStatus, normalise_status

        return normalise_status(status) is PredictionStatus.SUCCEEDED

    def poll_until_complete(self, external_id: Any, context: Context) -> str | None:  # type: ignore[override]
        """
        Defer to the trigger, or poll on the worker until the prediction is terminal.

        Returns the output because the mixin returns this method's value when it reattaches.
        """
        if self.prediction_id != str(external_id):  # reattached on retry: this try's XCom is empty
            context["ti"].xcom_push(key=PREDICTION_ID_XCOM_KEY, value=str(external_id))
        self.prediction_id = str(external_id)
        if self.deferrable:
            self._defer(self.prediction_id)
        self._finished = self._wait_on_worker(self.prediction_id)
        return self._output_of(self._finished)

    def get_job_result(self, external_id: Any, context: Context) -> str | None:
        """Return the output of a finished prediction (also when a retry finds one that succeeded)."""
        self.prediction_id = str(external_id)
        finished = self._finished
        if finished is None or finished.id != self.prediction_id:
            context["ti"].xcom_push(key=PREDICTION_ID_XCOM_KEY, value=self.prediction_id)
            finished = self.hook.get_prediction(self.prediction_id)
        return self._output_of(finished)

    def _defer(self, prediction_id: str) -> None:
        from airflow_provider_blip2.triggers.blip2 import Blip2PredictionTrigger

        self.log.info("Deferring; waiting for prediction %s in the triggerer", prediction_id)
        self.defer(
            trigger=Blip2PredictionTrigger(
                prediction_id=prediction_id,
                blip2_conn_id=self.blip2_conn_id,
                poll_interval=self.poll_interval,
                end_time=time.time() + self.timeout,
            ),
            method_name="execute_complete",
        )

    def _wait_on_worker(self, prediction_id: str) -> Prediction:
        from airflow_provider_blip2.protocol import Blip2PredictionTimeoutError

        try:
            return self.hook.wait_for_prediction(
                prediction_id, poll_interval=self.poll_interval, timeout=self.timeout
            )
        except Blip2PredictionTimeoutError as error:
            self._cancel_quietly(prediction_id)
            raise AirflowException(f"{error}; the prediction was cancelled") from error

    def _output_of(self, prediction: Prediction) -> str | None:
        from airflow_provider_blip2.protocol import Blip2PredictionFailedError

        try:
            prediction.raise_for_status()
        except Blip2PredictionFailedError as error:
            raise AirflowException(str(error)) from error
        return self._succeeded(prediction.id, prediction.predict_time, prediction.output)

    def _succeeded(self, prediction_id: str, predict_time: float | None, output: str | None) -> str | None:
        self.log.info("Prediction %s succeeded in %s s: %r", prediction_id, predict_time, output)
        return output

    def execute_complete(self, context: Context, event: dict[str, Any]) -> str | None:
        """
        Resume after the trigger's event: return the output, or cancel on timeout and fail.

        :param context: The task context.
        :param event: The trigger's payload.
        """
        prediction_id = str(event.get("prediction_id"))
        self.prediction_id = prediction_id
        status = event.get("status")
        if status == "success":
            return self._succeeded(prediction_id, event.get("predict_time"), event.get("output"))
        if status == "timeout":
            self._cancel_quietly(prediction_id)
            raise AirflowException(
                f"Prediction {prediction_id} did not finish within {self.timeout:g} s; it was cancelled"
            )
        from airflow_provider_blip2.protocol import failure_message

        raise AirflowException(
            failure_message(prediction_id, str(status), event.get("error"), event.get("error_code"))
        )

    def on_kill(self) -> None:
        """Cancel the prediction this try is waiting for on the worker (sync mode)."""
        if self.prediction_id:
            self._cancel_quietly(self.prediction_id)

    def _cancel_quietly(self, prediction_id: str) -> None:
        from airflow_provider_blip2.protocol import Blip2Error

        try:
            self.hook.cancel_prediction(prediction_id)
        except Blip2Error as error:
            self.log.warning("Could not cancel prediction %s: %s", prediction_id, error)
