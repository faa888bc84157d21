"""Hook for the BLIP-2 model served by the Eachlabs prediction API."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from airflow_provider_blip2.client.budget import wait_async, wait_sync
from airflow_provider_blip2.client.errors import Blip2PredictionFailedError, Blip2SyncRunUnavailableError
from airflow_provider_blip2.client.inputs import PredictionInput, build_prediction_input
from airflow_provider_blip2.client.models import Prediction, PredictionOutcome, parse_prediction
from airflow_provider_blip2.client.polling import PredictionWatch
from airflow_provider_blip2.client.settings import ClientSettings
from airflow_provider_blip2.client.sync_run import SyncRunChoice
from airflow_provider_blip2.client.timing import FirstReadTiming
from airflow_provider_blip2.client.uploads import (
    Blip2UploadError,
    PresignedUpload,
    parse_presign_response,
    presign_request,
)
from airflow_provider_blip2.client.wire import (
    ApiRequest,
    ApiResponse,
    build_create_body,
    cancel_prediction_request,
    create_prediction_request,
    get_prediction_request,
    parse_create_response,
    parse_run_response,
    prediction_link,
    run_prediction_request,
)
from airflow_provider_blip2.hooks.base import Blip2ConnectionHook
from airflow_provider_blip2.hooks.connection_form import connection_form_widgets, ui_field_behaviour
from airflow_provider_blip2.storage.masking import mask_signed_url

#: Seconds a create waits out 429 answers by default (nothing is created by a 429).
CREATE_PATIENCE = 600.0


class Blip2Hook(Blip2ConnectionHook):
    """
    Interact with the BLIP-2 model of the Eachlabs prediction API.

    Synchronous calls use ``requests``, asynchronous ones (for triggers) ``httpx``; both go through
    the same retry policy, error mapping and per-connection request budget. The connection is read
    on first use, never in ``__init__``.

    :param blip2_conn_id: The Airflow connection of type ``blip2``: host = API base URL,
        password = API key, extra fields ``model``, ``model_version``, ``request_timeout``,
        ``requests_per_minute`` and ``max_concurrency``.
    :param retry_policy: How failed requests are retried; the default suits the public API.
    :param requests_per_minute: This hook's own request budget instead of the connection's. A hook
        with limits of its own paces itself within them and does not share the connection's
        budget with the other hooks of the process.
    :param max_concurrency: This hook's own limit of predictions in flight instead of the connection's.
    """

    conn_name_attr = "blip2_conn_id"
    default_conn_name = "blip2_default"
    conn_type = "blip2"
    hook_name = "BLIP-2 (Eachlabs)"

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form in the Airflow 2 UI (read from this class only)."""
        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and pre-filled fields of the Airflow 2 connection form."""
        return ui_field_behaviour()

    # ----------------------------------------------------------------------------------------------
    # Sync API
    # ----------------------------------------------------------------------------------------------
    #: Validate a prediction's inputs against the model's schema, before any request; raises
    #: :class:`~airflow_provider_blip2.client.errors.Blip2InputError` naming the field and the fix.
    prediction_input = staticmethod(build_prediction_input)

    def create_prediction(self, image: str, **inputs: Any) -> str:
        """
        Validate the inputs, create a prediction and return its id.

        Waits for the connection's budget first (requests per minute, predictions in flight). A
        create that fails after it was sent is never resent: it raises
        :class:`~airflow_provider_blip2.client.errors.Blip2AmbiguousCreateError`.

        :param image: http(s) URL of the image.
        :param inputs: ``question``, ``context``, ``caption``, ``temperature``, ``use_nucleus_sampling``
            as :meth:`prediction_input` takes them.
        """
        return self.submit_prediction(self.prediction_input(image, **inputs))

    def submit_prediction(self, inputs: PredictionInput, *, patient_until: float | None = None) -> str:
        """
        Create a prediction from already validated inputs and return its id.

        A 429 creates nothing, so it is retried (honouring Retry-After) until ``patient_until``.

        :param inputs: From :meth:`prediction_input`.
        :param patient_until: Unix time until which 429 answers are waited out; default
            :data:`CREATE_PATIENCE` seconds from now. Operators pass their task's deadline.
        """
        settings = self.settings
        budget = self.budget()
        wait_sync(budget.reserve_prediction)
        prediction_id: str | None = None
        deadline = time.time() + CREATE_PATIENCE if patient_until is None else patient_until
        try:
            body = build_create_body(inputs, model=settings.model, version=settings.model_version)
            response = self._send(create_prediction_request(body), patient_until=deadline)
            prediction_id = parse_create_response(response)
        finally:
            budget.prediction_created(prediction_id)
        self.metrics.created()
        self.log.info("Created BLIP-2 prediction %s (%s)", prediction_id, inputs.describe())
        return prediction_id

    def sync_run_choice(self) -> SyncRunChoice:
        """Whether predictions of this connection run synchronously (see :mod:`~.client.sync_run`)."""
        settings = self.settings
        return SyncRunChoice(settings.sync_run, self.budget().notes, settings.model, self.log)

    async def async_run_choice(self) -> SyncRunChoice:
        """:meth:`sync_run_choice`, resolving the connections without blocking the event loop."""
        settings = await self.aget_settings()
        return SyncRunChoice(settings.sync_run, (await self.abudget()).notes, settings.model, self.log)

    def run_prediction(self, inputs: PredictionInput, *, end_time: float) -> Prediction:
        """
        Run a prediction synchronously (one request): its end, or a prediction still running.

        Holds one slot of the budget's predictions in flight while the call lasts (and after it, for
        a prediction still running, until it is seen finished); a 429 is waited out until
        ``end_time``. A call that fails after it was sent is never resent: it raises
        :class:`~airflow_provider_blip2.client.errors.Blip2AmbiguousCreateError`. A model without
        the synchronous run raises
        :class:`~airflow_provider_blip2.client.errors.Blip2SyncRunUnavailableError` (nothing was
        created) and is remembered as such.

        :param inputs: From :meth:`prediction_input`.
        :param end_time: Unix time the prediction must end by; the call waits at most that long.
        """
        settings = self.settings
        budget = self.budget()
        choice = self.sync_run_choice()
        wait_sync(budget.reserve_prediction)
        prediction: Prediction | None = None
        offered: bool | None = None
        try:
            prediction = self._ran(
                self._send(_run_request(settings, inputs, end_time), patient_until=end_time)
            )
            offered = True
        except Blip2SyncRunUnavailableError:
            offered = False
            raise
        finally:
            budget.prediction_created(_still_running(prediction))
            choice.answered(offered=offered)
        self.log.info(
            "Ran BLIP-2 prediction %s (%s): %s", prediction.id, inputs.describe(), prediction.raw_status
        )
        return prediction

    async def arun_prediction(
        self, inputs: PredictionInput, *, end_time: float, slot: str | None = None
    ) -> Prediction:
        """
        :meth:`run_prediction` without blocking the event loop.

        :param inputs: Validated inputs.
        :param end_time: Unix time the prediction must end by.
        :param slot: The name of its slot in the budget (see :meth:`Budget.areserve_prediction`).
        """
        settings = await self.aget_settings()
        budget = await self.abudget()
        choice = await self.async_run_choice()
        await wait_async(functools.partial(budget.areserve_prediction, slot))
        prediction: Prediction | None = None
        offered: bool | None = None
        try:
            request = _run_request(settings, inputs, end_time)
            prediction = self._ran(await self._asend(request, patient_until=end_time))
            offered = True
        except Blip2SyncRunUnavailableError:
            offered = False
            raise
        finally:
            await budget.aprediction_created(_still_running(prediction))
            await choice.aanswered(offered=offered)
        return prediction

    def _ran(self, response: ApiResponse) -> Prediction:
        """The prediction a synchronous run's answer describes, counted as created."""
        prediction = parse_run_response(response)
        self.metrics.created()
        return prediction

    def upload_file(self, path: Path, *, content_type: str, size: int, retention: int) -> PresignedUpload:
        """
        Upload an image file through the API's upload endpoint; its ``public_url`` is the image.

        The presign is an API request (within the budget); the PUT goes to object storage, streamed
        from the file. A PUT refused as not matching its signature (HTTP 403) is tried once more
        with a new presign. The presigned and public URLs are masked in logs.

        :param path: The file, checked by :func:`~airflow_provider_blip2.client.uploads.check_image_file`.
        :param content_type: Its Content-Type.
        :param size: Its size in bytes.
        :param retention: Seconds the service keeps the copy.
        :raises Blip2UploadError: when the PUT fails, or is refused twice.
        """
        for attempt in (1, 2):
            response = self._send(presign_request(content_type, retention))
            upload = parse_presign_response(response, retention=retention, now=time.time())
            mask_signed_url(upload.presigned_url)
            mask_signed_url(upload.public_url)
            status = self._put_file(upload.presigned_url, upload.put_headers(content_type, size), path)
            if 200 <= status < 300:
                self.log.info(
                    "Uploaded %s (%d bytes, kept %d s) as upload %s", path.name, size, retention, upload.id
                )
                return upload
            if status != 403 or attempt == 2:
                break
            self.log.warning(
                "The upload of %s was refused (HTTP 403: signature or headers); presigning again", path.name
            )
        raise Blip2UploadError(
            f"image upload of {path.name} refused (HTTP {status}): the storage did not accept the file "
            "with the headers it was signed for" + (" twice" if status == 403 else "")
        )

    def get_prediction(self, prediction_id: str) -> Prediction:
        """
        Read a prediction.

        :param prediction_id: The prediction id.
        """
        prediction = _parse(self._send(get_prediction_request(prediction_id)), prediction_id)
        if prediction.status.is_terminal:
            self.budget().prediction_finished(prediction_id)
        return prediction

    def prediction_link(self, prediction_id: str, prediction: Prediction | None = None) -> str:
        """
        Where to look at a prediction: its console page when the API names one, else its ``urls.get``.

        Sends no request: without a ``prediction`` read already, the link is the address the API
        gives as ``urls.get`` (the read endpoint below the connection's host). Never holds a key,
        credentials or a query string.

        :param prediction_id: The prediction id.
        :param prediction: The prediction, when it was read (its ``urls`` may name a console page).
        """
        urls = prediction.urls if prediction is not None else None
        return prediction_link(self.settings.base_url, prediction_id, urls)

    def cancel_prediction(self, prediction_id: str) -> None:
        """
        Ask the API to cancel a prediction (best effort; an unknown id may answer 500).

        :param prediction_id: The prediction id.
        """
        self._send(cancel_prediction_request(prediction_id))
        self.budget().prediction_finished(prediction_id)
        self.log.info("Cancelled BLIP-2 prediction %s", prediction_id)

    def wait_for_prediction(
        self, prediction_id: str, *, poll_interval: float = 2.0, timeout: float = 600.0
    ) -> PredictionOutcome:
        """
        Poll a prediction until it ends, by the same rule as the triggers, and say how it ended.

        The first read comes a poll interval after the call. Passing errors never end the wait; an
        authentication error or a missing prediction seen several times in a row does.

        :param prediction_id: The prediction id.
        :param poll_interval: Seconds between polls.
        :param timeout: Seconds to wait in all; then the outcome is ``timeout``.
        """
        outcome = self.poll_prediction(
            prediction_id, poll_interval=poll_interval, end_time=time.time() + timeout
        )
        assert outcome is not None  # without wait_at_most the wait ends only with an outcome
        return outcome

    def poll_prediction(
        self,
        prediction_id: str,
        *,
        poll_interval: float,
        end_time: float,
        wait_at_most: float | None = None,
        created_at: float | None = None,
    ) -> PredictionOutcome | None:
        """
        Poll a prediction as :meth:`wait_for_prediction` does; give up after ``wait_at_most`` seconds.

        :param prediction_id: The prediction id.
        :param poll_interval: Seconds between polls; the first read comes one after the call.
        :param end_time: Unix time after which the outcome is ``timeout``.
        :param wait_at_most: Seconds after which, if the prediction has not ended (nor ``end_time``
            passed), ``None`` is returned so the caller can wait elsewhere; ``None`` waits to the end.
        :param created_at: Unix time the prediction's create answered, for one just created: its
            first read then comes when the connection's recent predictions had ended
            (:class:`~airflow_provider_blip2.client.timing.FirstReadTiming`), which it teaches in turn.
        """
        timing = None
        first_read_at = None
        if created_at is not None:
            timing = FirstReadTiming(self.budget().notes, self.settings.model, poll_interval)
            first_read_at = created_at + timing.delay()
        watch = PredictionWatch(
            prediction_id,
            poll_interval=poll_interval,
            end_time=end_time,
            log=self.log,
            first_read_at=first_read_at,
        )
        give_up_at = None if wait_at_most is None else time.monotonic() + wait_at_most
        outcome = None
        while outcome is None:
            due_in = watch.seconds_until_due()
            if give_up_at is not None and time.monotonic() + due_in > give_up_at:
                return None
            time.sleep(due_in)
            outcome = watch.expire() or watch.read(self.get_prediction)
            if timing is not None and created_at is not None and watch.reads == 1:
                used = watch.last_read_at - created_at if watch.last_read_at else poll_interval
                timing.learn(
                    used,
                    ended_at_first_read=outcome is not None and outcome.status != PredictionOutcome.TIMEOUT,
                    predict_time=outcome.predict_time if outcome is not None else None,
                )
        return outcome

    def run(
        self, image: str, *, poll_interval: float = 2.0, timeout: float = 600.0, **inputs: Any
    ) -> PredictionOutcome:
        """
        Create a prediction, wait for it and return its outcome; raise if it did not succeed.

        :param image: http(s) URL of the image.
        :param poll_interval: Seconds between polls.
        :param timeout: Seconds to wait for the result.
        :param inputs: ``question``, ``context``, ``caption``, ``temperature``, ``use_nucleus_sampling``.
        :raises Blip2PredictionFailedError: when it ended otherwise than ``success``.
        """
        prediction_id = self.create_prediction(image, **inputs)
        outcome = self.wait_for_prediction(prediction_id, poll_interval=poll_interval, timeout=timeout)
        if not outcome.succeeded:
            raise Blip2PredictionFailedError(
                outcome.failure_message(), prediction_id=prediction_id, error_code=outcome.error_code
            )
        return outcome

    # ----------------------------------------------------------------------------------------------
    # Async API (for triggers)
    # ----------------------------------------------------------------------------------------------
    async def aget_prediction(self, prediction_id: str) -> Prediction:
        """
        Read a prediction without blocking the event loop.

        :param prediction_id: The prediction id.
        """
        prediction = _parse(await self._asend(get_prediction_request(prediction_id)), prediction_id)
        if prediction.status.is_terminal:
            await (await self.abudget()).aprediction_finished(prediction_id)
        return prediction

    async def acancel_prediction(self, prediction_id: str) -> None:
        """
        Ask the API to cancel a prediction, without blocking the event loop.

        :param prediction_id: The prediction id.
        """
        await self._asend(cancel_prediction_request(prediction_id))
        await (await self.abudget()).aprediction_finished(prediction_id)
        self.log.info("Cancelled BLIP-2 prediction %s", prediction_id)


def _run_request(settings: ClientSettings, inputs: PredictionInput, end_time: float) -> ApiRequest:
    """The synchronous run of ``inputs``, waiting for its answer until ``end_time`` (or a request timeout)."""
    body = build_create_body(inputs, model=settings.model, version=settings.model_version)
    return run_prediction_request(body, wait=max(settings.request_timeout, end_time - time.time()))


def _still_running(prediction: Prediction | None) -> str | None:
    """The id of a run's prediction that has not ended (it keeps its slot), else ``None``."""
    return prediction.id if prediction is not None and not prediction.status.is_terminal else None


def _parse(response: ApiResponse, prediction_id: str) -> Prediction:
    return parse_prediction(response.json(), prediction_id=prediction_id)
