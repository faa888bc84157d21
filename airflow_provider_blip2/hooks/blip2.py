"""Hook for the BLIP-2 model served by the Eachlabs prediction API."""

from __future__ import annotations

import time
from typing import Any

import requests
import tenacity
from airflow.providers.common.compat.sdk import BaseHook
from requests.adapters import HTTPAdapter

from airflow_provider_blip2.client.budget import Budget, budget_for, wait_async, wait_sync
from airflow_provider_blip2.client.errors import (
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Blip2PredictionFailedError,
    Blip2TransportError,
)
from airflow_provider_blip2.client.inputs import PredictionInput, build_prediction_input
from airflow_provider_blip2.client.models import Prediction, PredictionOutcome, parse_prediction
from airflow_provider_blip2.client.polling import PredictionWatch
from airflow_provider_blip2.client.retry import TEST_CONNECTION_RETRY_POLICY, RetryPolicy, final_error
from airflow_provider_blip2.client.settings import (
    CONNECTION_FIELDS,
    DEFAULT_BASE_URL,
    UI_FIELD_BEHAVIOUR,
    ClientSettings,
)
from airflow_provider_blip2.client.shared_budget import (
    BudgetScope,
    RedisParams,
    account_scope_name,
    redis_params,
    shared_budget_for,
)
from airflow_provider_blip2.client.wire import (
    ApiRequest,
    ApiResponse,
    build_create_body,
    cancel_prediction_request,
    check_response,
    create_prediction_request,
    get_model_request,
    get_prediction_request,
    parse_create_response,
    parse_model_response,
    prediction_link,
    request_arguments,
    transport_error,
)
from airflow_provider_blip2.hooks.event_loop import aconnection, arequest

#: Seconds a create waits out 429 answers by default (nothing is created by a 429).
CREATE_PATIENCE = 600.0
# An id no prediction has: reading it tells a valid key (404) from an invalid one (401).
_PROBE_PREDICTION_ID = "00000000-0000-4000-8000-000000000000"


class Blip2Hook(BaseHook):
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

    def __init__(
        self,
        blip2_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        requests_per_minute: int | None = None,
        max_concurrency: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.blip2_conn_id = blip2_conn_id
        self.retry_policy = retry_policy or RetryPolicy()
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency
        self._settings: ClientSettings | None = None
        self._connection_settings: ClientSettings | None = None
        self._budget: Budget | None = None
        self._session: requests.Session | None = None

    # ----------------------------------------------------------------------------------------------
    # Connection form (Airflow 2.x UI; Airflow 3.2+ reads the declarative metadata in provider info)
    # ----------------------------------------------------------------------------------------------
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form in the Airflow 2 UI."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField
        from wtforms.validators import NumberRange, Optional

        widgets: dict[str, Any] = {}
        for field in CONNECTION_FIELDS:
            if field.type == "integer":
                widgets[field.name] = IntegerField(
                    lazy_gettext(field.label),
                    widget=BS3TextFieldWidget(),
                    validators=[Optional(), NumberRange(min=field.minimum)],
                    default=field.default,
                    description=field.description,
                )
            else:
                widgets[field.name] = StringField(
                    lazy_gettext(field.label),
                    widget=BS3TextFieldWidget(),
                    default=field.default,
                    description=field.description,
                )
        return widgets

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and pre-filled fields of the connection form in the Airflow 2 UI."""
        return {
            "hidden_fields": list(UI_FIELD_BEHAVIOUR["hidden-fields"]),
            "relabeling": dict(UI_FIELD_BEHAVIOUR["relabeling"]),
            "placeholders": dict(UI_FIELD_BEHAVIOUR["placeholders"]),
        }

    # ----------------------------------------------------------------------------------------------
    # Settings
    # ----------------------------------------------------------------------------------------------
    @property
    def settings(self) -> ClientSettings:
        """The connection's settings (with this hook's own limits), read synchronously on first use."""
        if self._settings is None:
            conn = self.get_connection(self.blip2_conn_id)
            self._use_connection(conn.host, conn.password, conn.extra_dejson)
        return self._settings  # type: ignore[return-value]

    async def aget_settings(self) -> ClientSettings:
        """The connection's settings, resolved without blocking the event loop."""
        if self._settings is None:
            conn, extra = await aconnection(self.blip2_conn_id, hook=self)
            self._use_connection(conn.host, conn.password, extra)
        return self._settings  # type: ignore[return-value]

    def _use_connection(self, host: str | None, password: str | None, extra: dict[str, Any]) -> None:
        self._connection_settings = ClientSettings.from_connection_values(
            host=host, password=password, extra=extra
        )
        self._settings = self._connection_settings.with_limits(
            requests_per_minute=self.requests_per_minute, max_concurrency=self.max_concurrency
        )

    def budget(self) -> Budget:
        """
        The request budget this hook's calls are paced by.

        Without ``redis_conn_id`` it is shared by the hooks and triggers of one process; with it, by
        every process of the deployment (see :mod:`~airflow_provider_blip2.client.shared_budget`).
        """
        if self._budget is None:
            settings = self.settings
            redis = None
            if settings.redis_conn_id:
                try:
                    conn = self.get_connection(settings.redis_conn_id)
                    redis = redis_params(conn.host, conn.port, conn.login, conn.password, conn.extra_dejson)
                except Exception as error:
                    self._redis_unusable(settings.redis_conn_id, error)
            self._budget = self._make_budget(settings, redis)
        return self._budget

    async def abudget(self) -> Budget:
        """:meth:`budget`, resolving the connections without blocking the event loop."""
        if self._budget is None:
            settings = await self.aget_settings()
            redis = None
            if settings.redis_conn_id:
                try:
                    conn, extra = await aconnection(settings.redis_conn_id)
                    redis = redis_params(conn.host, conn.port, conn.login, conn.password, extra)
                except Exception as error:
                    self._redis_unusable(settings.redis_conn_id, error)
            self._budget = self._make_budget(settings, redis)
        return self._budget

    def _redis_unusable(self, conn_id: str, error: Exception) -> None:
        self.log.warning(
            "Redis connection %r of the shared BLIP-2 budget is unusable (%s); this process paces "
            "itself on its own budget",
            conn_id,
            error,
        )

    def _make_budget(self, settings: ClientSettings, redis: RedisParams | None) -> Budget:
        own_limits = self.requests_per_minute is not None or self.max_concurrency is not None
        limits = f"{settings.requests_per_minute}/{settings.max_concurrency}"
        local = budget_for(
            f"{self.blip2_conn_id}[{limits}]" if own_limits else self.blip2_conn_id,
            settings.base_url,
            settings.requests_per_minute,
            settings.max_concurrency,
            settings.rate_window,
        )
        if redis is None:
            return local
        connection = self._connection_settings or settings
        account = account_scope_name(connection.base_url, connection.api_key)
        scopes = [BudgetScope(account, connection.requests_per_minute, connection.max_concurrency)]
        if own_limits:
            scopes.append(
                BudgetScope(f"{account}:{limits}", settings.requests_per_minute, settings.max_concurrency)
            )
        return shared_budget_for(scopes, redis, window=settings.rate_window, fallback=local, log=self.log)

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
        self.log.info("Created BLIP-2 prediction %s (%s)", prediction_id, inputs.describe())
        return prediction_id

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
    ) -> PredictionOutcome | None:
        """
        Poll a prediction as :meth:`wait_for_prediction` does; give up after ``wait_at_most`` seconds.

        :param prediction_id: The prediction id.
        :param poll_interval: Seconds between polls; the first read comes one after the call.
        :param end_time: Unix time after which the outcome is ``timeout``.
        :param wait_at_most: Seconds after which, if the prediction has not ended (nor ``end_time``
            passed), ``None`` is returned so the caller can wait elsewhere; ``None`` waits to the end.
        """
        watch = PredictionWatch(prediction_id, poll_interval=poll_interval, end_time=end_time, log=self.log)
        give_up_at = None if wait_at_most is None else time.monotonic() + wait_at_most
        outcome = None
        while outcome is None:
            due_in = watch.seconds_until_due()
            if give_up_at is not None and time.monotonic() + due_in > give_up_at:
                return None
            time.sleep(due_in)
            outcome = watch.expire() or watch.read(self.get_prediction)
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

    def get_model(self) -> dict[str, Any]:
        """Return the model's public record, with its input schema (``request_schema``)."""
        return parse_model_response(self._send(get_model_request(self.settings.model)))

    def test_connection(self) -> tuple[bool, str]:
        """Check the host, the model and the API key against the server; say what is wrong."""
        try:
            settings = self.settings
        except Blip2InputError as error:
            return False, f"The connection is misconfigured: {error}"
        probe = type(self)(self.blip2_conn_id, retry_policy=TEST_CONNECTION_RETRY_POLICY)
        probe._settings = settings
        where = settings.base_url
        try:
            probe.get_model()
        except Blip2TransportError as error:
            return False, f"Cannot reach the API at {where}: {error.message}"
        except Blip2NotFoundError:
            return False, (
                f"No Eachlabs API, or no model {settings.model!r}, at {where}: check the host "
                f"(the public API is {DEFAULT_BASE_URL}) and the connection's model field"
            )
        except Blip2AuthenticationError:
            return False, "The API key was refused (HTTP 401): set a valid key as the connection's API Key"
        except Blip2Error as error:
            return False, f"The API at {where} answered with an error: {error}"
        try:
            probe._send(get_prediction_request(_PROBE_PREDICTION_ID))
        except Blip2NotFoundError:
            pass
        except Blip2AuthenticationError:
            return False, "The API key was refused (HTTP 401): set a valid key as the connection's API Key"
        except Blip2Error as error:
            return False, f"The API at {where} answered with an error while checking the key: {error}"
        return True, f"Connected to {where}: the API key is valid, model {settings.model!r} exists"

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

    async def aclose(self) -> None:
        """Nothing to close: the async HTTP client belongs to the event loop, shared by its hooks."""

    def close(self) -> None:
        """Close the sync HTTP session, if one was opened."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # ----------------------------------------------------------------------------------------------
    # Transports: the only two places that do HTTP; every decision is the client package's.
    # ----------------------------------------------------------------------------------------------
    def _send(self, request: ApiRequest, *, patient_until: float | None = None) -> ApiResponse:
        settings = self.settings
        budget = self.budget()

        def attempt() -> ApiResponse:
            wait_sync(budget.reserve_request)
            status = None
            try:
                response = self._send_once(settings, request)
                status = response.status_code
            finally:
                budget.request_done(rate_limited=status == 429)
            return check_response(request, response)

        arguments = self.retry_policy.tenacity_arguments(request, self.log, patient_until=patient_until)
        retrying = tenacity.Retrying(**arguments)
        try:
            return retrying(attempt)
        except Blip2Error as error:
            raise final_error(request, error) from error
        finally:
            retrying.iter_state.reset()  # as in _asend

    async def _asend(self, request: ApiRequest) -> ApiResponse:
        settings = await self.aget_settings()
        budget = await self.abudget()

        async def attempt() -> ApiResponse:
            await wait_async(budget.areserve_request)
            status = None
            try:
                response = await self._asend_once(settings, request)
                status = response.status_code
            finally:
                await budget.arequest_done(rate_limited=status == 429)
            return check_response(request, response)

        retrying = tenacity.AsyncRetrying(**self.retry_policy.tenacity_arguments(request, self.log))
        try:
            return await retrying(attempt)
        except Blip2Error as error:
            raise final_error(request, error) from error
        finally:
            # tenacity keeps its next actions, methods of the retrying object, in the object: a
            # reference cycle per request, which only the cyclic collector frees. In a triggerer,
            # hundreds of reads a second make that collector run its full, loop-stalling passes.
            retrying.iter_state.reset()

    def get_conn(self) -> requests.Session:
        """The HTTP session of the sync calls (retries are the hook's, not urllib3's)."""
        if self._session is None:
            self._session = requests.Session()
            self._session.mount("http://", HTTPAdapter(max_retries=0))
            self._session.mount("https://", HTTPAdapter(max_retries=0))
        return self._session

    def _send_once(self, settings: ClientSettings, request: ApiRequest) -> ApiResponse:
        try:
            answer = self.get_conn().request(**request_arguments(settings, request))
        except requests.RequestException as error:
            raise transport_error(request, error, sent=_requests_error_was_sent(error)) from None
        return ApiResponse(answer.status_code, dict(answer.headers), answer.content)

    async def _asend_once(self, settings: ClientSettings, request: ApiRequest) -> ApiResponse:
        import httpx

        try:
            uses_tls = settings.base_url.startswith("https://")
            answer = await arequest(uses_tls, request_arguments(settings, request))
        except httpx.UnsupportedProtocol as error:
            raise Blip2InputError(f"connection host is not an http(s) URL: {error}") from None
        except httpx.HTTPError as error:
            raise transport_error(request, error, sent=_httpx_error_was_sent(error)) from None
        # items(), one pass: dict(headers) looks each name up again, scanning every header.
        return ApiResponse(answer.status_code, dict(answer.headers.items()), answer.content)


def _parse(response: ApiResponse, prediction_id: str) -> Prediction:
    return parse_prediction(response.json(), prediction_id=prediction_id)


def _requests_error_was_sent(error: requests.RequestException) -> bool:
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    if isinstance(error, requests.ConnectTimeout):
        return False
    if isinstance(error, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return False
    if isinstance(error, requests.ConnectionError) and not isinstance(error, requests.ReadTimeout):
        reason = getattr(error.args[0], "reason", None) if error.args else None
        return not isinstance(reason, (NewConnectionError, ConnectTimeoutError))
    return True


def _httpx_error_was_sent(error: Exception) -> bool:
    import httpx

    return not isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
