"""Hook for the BLIP-2 model served by the Eachlabs prediction API."""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import requests
import tenacity
from airflow.providers.common.compat.sdk import BaseHook
from requests.adapters import HTTPAdapter

from airflow_provider_blip2.protocol import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MODEL,
    DEFAULT_MODEL_VERSION,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_REQUESTS_PER_MINUTE,
    ApiRequest,
    ApiResponse,
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Blip2PredictionTimeoutError,
    Blip2ServerError,
    Blip2TransportError,
    ClientSettings,
    Prediction,
    PredictionInput,
    RequestBudget,
    RetryPolicy,
    ambiguous_create_error,
    auth_headers,
    budget_for,
    build_create_body,
    build_prediction_input,
    cancel_prediction_request,
    create_prediction_request,
    error_for_response,
    get_model_request,
    get_prediction_request,
    parse_create_response,
    parse_model_response,
    parse_prediction,
)

if TYPE_CHECKING:
    import httpx

# An id no prediction has: reading it tells a valid key (404) from an invalid one (401).
_PROBE_PREDICTION_ID = "00000000-0000-4000-8000-000000000000"
# "Test connection" answers within seconds rather than retrying for minutes.
TEST_CONNECTION_RETRY_POLICY = RetryPolicy(max_attempts=2, max_elapsed=10.0, initial_wait=0.5, max_wait=2.0)


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
        self._session: requests.Session | None = None
        self._async_client: httpx.AsyncClient | None = None

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

        return {
            "model": StringField(lazy_gettext("Model"), widget=BS3TextFieldWidget(), default=DEFAULT_MODEL),
            "model_version": StringField(
                lazy_gettext("Model version"), widget=BS3TextFieldWidget(), default=DEFAULT_MODEL_VERSION
            ),
            "request_timeout": IntegerField(
                lazy_gettext("Request timeout (s)"),
                widget=BS3TextFieldWidget(),
                validators=[Optional(), NumberRange(min=1)],
                default=int(DEFAULT_REQUEST_TIMEOUT),
            ),
            "requests_per_minute": IntegerField(
                lazy_gettext("Requests per minute"),
                widget=BS3TextFieldWidget(),
                validators=[Optional(), NumberRange(min=1)],
                default=DEFAULT_REQUESTS_PER_MINUTE,
            ),
            "max_concurrency": IntegerField(
                lazy_gettext("Max predictions in flight"),
                widget=BS3TextFieldWidget(),
                validators=[Optional(), NumberRange(min=1)],
                default=DEFAULT_MAX_CONCURRENCY,
            ),
        }

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Hidden, relabelled and pre-filled fields of the connection form in the Airflow 2 UI."""
        from airflow_provider_blip2.get_provider_info import UI_FIELD_BEHAVIOUR

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
        """The connection's settings, read (synchronously) on first use."""
        if self._settings is None:
            conn = self.get_connection(self.blip2_conn_id)
            self._settings = self._with_own_limits(
                ClientSettings.from_connection_values(
                    host=conn.host, password=conn.password, extra=conn.extra_dejson
                )
            )
        return self._settings

    async def aget_settings(self) -> ClientSettings:
        """The connection's settings, resolved without blocking the event loop."""
        if self._settings is None:
            from airflow.providers.common.compat.connection import (
                get_async_connection,
                get_async_extra_dejson,
            )

            conn = await get_async_connection(self.blip2_conn_id, hook=self)
            extra = await get_async_extra_dejson(conn)
            self._settings = self._with_own_limits(
                ClientSettings.from_connection_values(host=conn.host, password=conn.password, extra=extra)
            )
        return self._settings

    def _with_own_limits(self, settings: ClientSettings) -> ClientSettings:
        return settings.with_limits(
            requests_per_minute=self.requests_per_minute, max_concurrency=self.max_concurrency
        )

    def budget(self) -> RequestBudget:
        """The request budget this hook's calls are paced by (shared per connection in a process)."""
        return self._budget(self.settings)

    async def abudget(self) -> RequestBudget:
        """:meth:`budget`, resolving the connection without blocking the event loop."""
        return self._budget(await self.aget_settings())

    def _budget(self, settings: ClientSettings) -> RequestBudget:
        own_limits = self.requests_per_minute is not None or self.max_concurrency is not None
        return budget_for(
            f"{self.blip2_conn_id}[{settings.requests_per_minute}/{settings.max_concurrency}]"
            if own_limits
            else self.blip2_conn_id,
            settings.base_url,
            settings.requests_per_minute,
            settings.max_concurrency,
            settings.rate_window,
        )

    # ----------------------------------------------------------------------------------------------
    # Sync API
    # ----------------------------------------------------------------------------------------------
    def create_prediction(
        self,
        image: str,
        *,
        question: str | None = None,
        context: str | None = None,
        caption: bool = False,
        temperature: float | str = 1.0,
        use_nucleus_sampling: bool = False,
    ) -> str:
        """
        Validate the inputs, create a prediction and return its id.

        Waits for the connection's budget first (requests per minute, predictions in flight). A
        create that fails after it was sent is never resent: it raises
        :class:`~airflow_provider_blip2.protocol.Blip2AmbiguousCreateError`.

        :param image: http(s) URL of the image.
        :param question: Question to ask; ``None`` asks "What is this a picture of?".
        :param context: Earlier Q&A prepended to the prompt.
        :param caption: Caption the image instead of answering a question.
        :param temperature: 0.5 to 1.0, used with nucleus sampling.
        :param use_nucleus_sampling: Sample instead of beam search.
        """
        return self.submit_prediction(
            build_prediction_input(
                image,
                question=question,
                context=context,
                caption=caption,
                temperature=temperature,
                use_nucleus_sampling=use_nucleus_sampling,
            )
        )

    def submit_prediction(self, inputs: PredictionInput) -> str:
        """
        Create a prediction from already validated inputs and return its id.

        :param inputs: From :func:`~airflow_provider_blip2.protocol.build_prediction_input`.
        """
        settings = self.settings
        budget = self._budget(settings)
        _wait_sync(budget.reserve_prediction)
        prediction_id: str | None = None
        try:
            body = build_create_body(inputs, model=settings.model, version=settings.model_version)
            prediction_id = parse_create_response(self._send(create_prediction_request(body)))
        finally:
            budget.prediction_created(prediction_id)
        self.log.info("Created BLIP-2 prediction %s (%s)", prediction_id, inputs.describe())
        return prediction_id

    def get_prediction(self, prediction_id: str) -> Prediction:
        """
        Read a prediction.

        :param prediction_id: The prediction id.
        """
        response = self._send(get_prediction_request(prediction_id))
        prediction = parse_prediction(response.json(), prediction_id=prediction_id)
        if prediction.status.is_terminal:
            self._budget(self.settings).prediction_finished(prediction_id)
        return prediction

    def cancel_prediction(self, prediction_id: str) -> None:
        """
        Ask the API to cancel a prediction (best effort; an unknown id may answer 500).

        :param prediction_id: The prediction id.
        """
        self._send(cancel_prediction_request(prediction_id))
        self._budget(self.settings).prediction_finished(prediction_id)
        self.log.info("Cancelled BLIP-2 prediction %s", prediction_id)

    def wait_for_prediction(
        self, prediction_id: str, *, poll_interval: float = 2.0, timeout: float = 600.0
    ) -> Prediction:
        """
        Poll a prediction until it is terminal and return it, whatever its final status.

        :param prediction_id: The prediction id.
        :param poll_interval: Seconds between polls.
        :param timeout: Seconds to wait in all.
        :raises Blip2PredictionTimeoutError: when it is still running after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            # The first read waits too: a prediction takes about 2 s, and every read spends budget.
            time.sleep(max(0.0, min(poll_interval, deadline - time.monotonic())))
            prediction = self.get_prediction(prediction_id)
            if prediction.status.is_terminal:
                return prediction
            if deadline - time.monotonic() <= 0:
                raise Blip2PredictionTimeoutError(
                    f"prediction {prediction_id} still {prediction.raw_status} after {timeout:g} s",
                    prediction_id=prediction_id,
                )

    def run(
        self, image: str, *, poll_interval: float = 2.0, timeout: float = 600.0, **inputs: Any
    ) -> Prediction:
        """
        Create a prediction, wait for it and return it; raise if it did not succeed.

        :param image: http(s) URL of the image.
        :param poll_interval: Seconds between polls.
        :param timeout: Seconds to wait for the result.
        :param inputs: ``question``, ``context``, ``caption``, ``temperature``, ``use_nucleus_sampling``.
        """
        prediction_id = self.create_prediction(image, **inputs)
        prediction = self.wait_for_prediction(prediction_id, poll_interval=poll_interval, timeout=timeout)
        return prediction.raise_for_status()

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
        response = await self._asend(get_prediction_request(prediction_id))
        prediction = parse_prediction(response.json(), prediction_id=prediction_id)
        if prediction.status.is_terminal:
            self._budget(await self.aget_settings()).prediction_finished(prediction_id)
        return prediction

    async def acancel_prediction(self, prediction_id: str) -> None:
        """
        Ask the API to cancel a prediction, without blocking the event loop.

        :param prediction_id: The prediction id.
        """
        await self._asend(cancel_prediction_request(prediction_id))
        self._budget(await self.aget_settings()).prediction_finished(prediction_id)
        self.log.info("Cancelled BLIP-2 prediction %s", prediction_id)

    async def aclose(self) -> None:
        """Close the async HTTP client, if one was opened."""
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    def close(self) -> None:
        """Close the sync HTTP session, if one was opened."""
        if self._session is not None:
            self._session.close()
            self._session = None

    # ----------------------------------------------------------------------------------------------
    # Transports: the only two places that do HTTP; everything else is in the protocol module.
    # ----------------------------------------------------------------------------------------------
    def _send(self, request: ApiRequest) -> ApiResponse:
        settings = self.settings
        budget = self._budget(settings)

        def attempt() -> ApiResponse:
            _wait_sync(budget.reserve_request)
            try:
                response = self._send_once(settings, request)
            finally:
                budget.request_done()
            return _checked(request, response)

        try:
            return tenacity.Retrying(**self._retry_arguments(request))(attempt)
        except Blip2Error as error:
            raise _final_error(request, error) from error

    async def _asend(self, request: ApiRequest) -> ApiResponse:
        settings = await self.aget_settings()
        budget = self._budget(settings)

        async def attempt() -> ApiResponse:
            await _wait_async(budget.reserve_request)
            try:
                response = await self._asend_once(settings, request)
            finally:
                budget.request_done()
            return _checked(request, response)

        try:
            return await tenacity.AsyncRetrying(**self._retry_arguments(request))(attempt)
        except Blip2Error as error:
            raise _final_error(request, error) from error

    def get_conn(self) -> requests.Session:
        """The HTTP session of the sync calls (retries are the hook's, not urllib3's)."""
        if self._session is None:
            self._session = requests.Session()
            self._session.mount("http://", HTTPAdapter(max_retries=0))
            self._session.mount("https://", HTTPAdapter(max_retries=0))
        return self._session

    def _send_once(self, settings: ClientSettings, request: ApiRequest) -> ApiResponse:
        try:
            answer = self.get_conn().request(**_request_arguments(settings, request))
        except requests.RequestException as error:
            raise _transport_error(request, error, sent=_requests_error_was_sent(error)) from None
        return ApiResponse(answer.status_code, dict(answer.headers), answer.content)

    async def _asend_once(self, settings: ClientSettings, request: ApiRequest) -> ApiResponse:
        import httpx

        if self._async_client is None:
            # Building a TLS context reads the CA bundle from disk: do it once, off the event loop, and
            # only for https (httpx builds one even for plain-http clients unless told not to).
            uses_tls = settings.base_url.startswith("https://")
            tls: ssl.SSLContext | bool = await asyncio.to_thread(_shared_ssl_context) if uses_tls else False
            self._async_client = httpx.AsyncClient(verify=tls, follow_redirects=False)
        try:
            answer = await self._async_client.request(**_request_arguments(settings, request))
        except httpx.UnsupportedProtocol as error:
            raise Blip2InputError(f"connection host is not an http(s) URL: {error}") from None
        except httpx.HTTPError as error:
            raise _transport_error(request, error, sent=_httpx_error_was_sent(error)) from None
        return ApiResponse(answer.status_code, dict(answer.headers), answer.content)

    def _retry_arguments(self, request: ApiRequest) -> dict[str, Any]:
        policy = self.retry_policy

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return policy.wait_seconds(error, state.attempt_number)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self.log.warning(
                "BLIP-2 %s failed (attempt %d of %d), retrying in %.1f s: %s",
                request.label,
                state.attempt_number,
                policy.max_attempts,
                state.upcoming_sleep,
                error,
            )

        return {
            "retry": tenacity.retry_if_exception(lambda error: policy.should_retry(error, request)),
            "stop": tenacity.stop_after_attempt(policy.max_attempts)
            | tenacity.stop_after_delay(policy.max_elapsed),
            "wait": wait,
            "before_sleep": before_sleep,
            "reraise": True,
        }


def _request_arguments(settings: ClientSettings, request: ApiRequest) -> dict[str, Any]:
    """Keyword arguments of one request, the same for ``requests`` and ``httpx``."""
    return {
        "method": request.method,
        "url": settings.base_url + request.path,
        "params": request.params or None,
        "json": request.json_body,
        "headers": auth_headers(settings.api_key),
        "timeout": settings.request_timeout,
    }


def _checked(request: ApiRequest, response: ApiResponse) -> ApiResponse:
    error = error_for_response(response, context=f"BLIP-2 {request.label}")
    if error is not None:
        raise error
    return response


def _final_error(request: ApiRequest, error: Blip2Error) -> Blip2Error:
    """A create that failed after it was sent is ambiguous; everything else is raised as it is."""
    sent_transport_failure = isinstance(error, Blip2TransportError) and error.sent
    if request.creates and (sent_transport_failure or isinstance(error, Blip2ServerError)):
        return ambiguous_create_error(error)
    return error


def _transport_error(request: ApiRequest, error: Exception, *, sent: bool) -> Blip2TransportError:
    stage = "after the request was sent" if sent else "before the request was sent"
    return Blip2TransportError(f"BLIP-2 {request.label}: {type(error).__name__} {stage}: {error}", sent=sent)


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


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    """One TLS context per process: building one reads the CA bundle from disk."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _wait_sync(reserve: Callable[[], float]) -> None:
    while (delay := reserve()) > 0:
        time.sleep(delay)


async def _wait_async(reserve: Callable[[], float]) -> None:
    # The budget is shared with threads, so an asyncio.Event cannot signal it: sleep the wait it names.
    while (delay := reserve()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay)
