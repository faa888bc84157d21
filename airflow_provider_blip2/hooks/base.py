"""
The connection side of the BLIP-2 hook: settings, the request budget and the two transports.

:class:`Blip2ConnectionHook` reads the ``blip2`` connection on first use (never in ``__init__``),
builds the budget its calls are paced by, and holds the only two places that do HTTP: ``requests``
on workers, ``httpx`` in triggers. Every decision (retries, errors, wire format) is the client
package's; :class:`~airflow_provider_blip2.hooks.blip2.Blip2Hook` adds the API's calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import tenacity
from airflow.providers.common.compat.sdk import BaseHook
from requests.adapters import HTTPAdapter

from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.budget import Budget, budget_for, wait_async, wait_sync
from airflow_provider_blip2.client.errors import (
    Blip2AmbiguousCreateError,
    Blip2AuthenticationError,
    Blip2Error,
    Blip2InputError,
    Blip2NotFoundError,
    Blip2TransportError,
)
from airflow_provider_blip2.client.rate_shape import Answer
from airflow_provider_blip2.client.redis_scope import (
    BudgetScope,
    RedisParams,
    account_scope_name,
    redis_params,
)
from airflow_provider_blip2.client.retry import TEST_CONNECTION_RETRY_POLICY, RetryPolicy, final_error
from airflow_provider_blip2.client.settings import (
    DEFAULT_BASE_URL,
    ClientSettings,
)
from airflow_provider_blip2.client.shared_budget import shared_budget_for
from airflow_provider_blip2.client.uploads import Blip2UploadError
from airflow_provider_blip2.client.wire import (
    ApiRequest,
    ApiResponse,
    check_response,
    get_model_request,
    get_prediction_request,
    parse_model_response,
    request_arguments,
    transport_error,
)
from airflow_provider_blip2.hooks.event_loop import aconnection, arequest
from airflow_provider_blip2.metrics import Blip2Metrics

#: Seconds an image upload's PUT may take at least (files go up to 100 MB).
UPLOAD_TIMEOUT = 300.0
# An id no prediction has: reading it tells a valid key (404) from an invalid one (401).
_PROBE_PREDICTION_ID = "00000000-0000-4000-8000-000000000000"


class Blip2ConnectionHook(BaseHook):
    """
    A ``blip2`` connection's settings, request budget and HTTP transports.

    :param blip2_conn_id: The Airflow connection of type ``blip2``.
    :param retry_policy: How failed requests are retried; the default suits the public API.
    :param requests_per_minute: This hook's own request budget instead of the connection's.
    :param max_concurrency: This hook's own limit of predictions in flight instead of the connection's.
    :param metrics: Where its 429 answers, creates and ambiguous creates are counted (tagged with
        the task that uses it); untagged by default.
    """

    default_conn_name = "blip2_default"

    def __init__(
        self,
        blip2_conn_id: str = "blip2_default",
        *,
        retry_policy: RetryPolicy | None = None,
        requests_per_minute: int | None = None,
        max_concurrency: int | None = None,
        metrics: Blip2Metrics | None = None,
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
        self.metrics = metrics or Blip2Metrics()

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
            settings.rate_limit_shape,
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
        return shared_budget_for(scopes, redis, fallback=local, log=self.log)

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
            granted = wait_sync(budget.reserve_request)
            status = None
            try:
                response = self._send_once(settings, request)
                status = response.status_code
            finally:
                self._answered(budget, status, budget.request_done(Answer.of(granted, status)))
            return check_response(request, response)

        arguments = self.retry_policy.tenacity_arguments(request, self.log, patient_until=patient_until)
        retrying = tenacity.Retrying(**arguments)
        with self._final_errors(request, retrying):
            return retrying(attempt)

    async def _asend(self, request: ApiRequest, *, patient_until: float | None = None) -> ApiResponse:
        settings = await self.aget_settings()
        budget = await self.abudget()

        async def attempt() -> ApiResponse:
            granted = await wait_async(budget.areserve_request)
            status = None
            try:
                response = await self._asend_once(settings, request)
                status = response.status_code
            finally:
                self._answered(budget, status, await budget.arequest_done(Answer.of(granted, status)))
            return check_response(request, response)

        arguments = self.retry_policy.tenacity_arguments(request, self.log, patient_until=patient_until)
        retrying = tenacity.AsyncRetrying(**arguments)
        with self._final_errors(request, retrying):
            return await retrying(attempt)

    def _answered(self, budget: Budget, status: int | None, lesson: str | None) -> None:
        """Count a 429 in the metrics, and log what an answer taught about the rate limit's shape."""
        if status == 429:
            self.metrics.rate_limited()
        if lesson is not None:
            self.log.info("%s", rate_shape.describe(lesson, budget.window))

    @contextlib.contextmanager
    def _final_errors(self, request: ApiRequest, retrying: tenacity.BaseRetrying) -> Iterator[None]:
        """
        Turn a request's last error into the one it ends with (:func:`final_error`), counting an
        ambiguous create, and reset ``retrying`` once it is done.
        """
        try:
            yield
        except Blip2Error as error:
            final = final_error(request, error)
            if isinstance(final, Blip2AmbiguousCreateError):
                self.metrics.ambiguous_create()
            raise final from error
        finally:
            # tenacity keeps its next actions, methods of the retrying object, in the object: a
            # reference cycle per request, which only the cyclic collector frees. In a triggerer,
            # hundreds of reads a second make that collector run its full, loop-stalling passes.
            retrying.iter_state.reset()

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

    def get_conn(self) -> requests.Session:
        """The HTTP session of the sync calls (retries are the hook's, not urllib3's)."""
        if self._session is None:
            self._session = requests.Session()
            self._session.mount("http://", HTTPAdapter(max_retries=0))
            self._session.mount("https://", HTTPAdapter(max_retries=0))
        return self._session

    def _put_file(self, url: str, headers: dict[str, str], path: Path) -> int:
        """
        PUT a file to a presigned URL (object storage, outside the API's budget); its status code.

        The file is streamed from disk, never read into memory whole. urllib3 does not retry it.

        :param url: The presigned URL (a secret: it is masked, and never in a message).
        :param headers: The headers it is signed for, with Content-Type and Content-Length.
        :param path: The file.
        """
        timeout = max(self.settings.request_timeout, UPLOAD_TIMEOUT)
        try:
            with path.open("rb") as stream:
                answer = self.get_conn().put(url, data=stream, headers=headers, timeout=timeout)
        except requests.RequestException as error:
            raise Blip2UploadError(f"image upload: {type(error).__name__} while sending the file") from None
        answer.close()
        return answer.status_code

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
