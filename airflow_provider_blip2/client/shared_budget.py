"""
The request budget of a whole deployment, counted in Redis.

Every process that uses a connection (workers and triggerers) counts its requests and its
predictions in flight in the same Redis sorted sets, atomically, through the Lua scripts below
(run with redis-py's ``register_script``, from threads and from the event loop alike). Redis's own
clock (``TIME``) orders the window, so the machines' clocks need not agree. Predictions in flight
expire from the count after ``in_flight_ttl``, so a crashed worker cannot leak slots.

When Redis cannot be reached the budget says so once, falls back to the process's own
:class:`~.budget.RequestBudget` and tries Redis again after ``retry_after`` seconds: a task never
fails because of it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from airflow_provider_blip2.client import budget_scripts as scripts
from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.budget import RequestBudget
from airflow_provider_blip2.client.notes import SharedNotes
from airflow_provider_blip2.client.pace import Pace
from airflow_provider_blip2.client.rate_shape import Answer
from airflow_provider_blip2.client.redis_scope import BudgetScope, RedisParams

#: Seconds an unanswered request counts, at most, before it is counted as answered.
OPEN_REQUEST_TTL = 300.0
#: Seconds a created prediction counts against ``max_concurrency`` unless it is seen finished.
IN_FLIGHT_TTL = 900.0
#: Seconds to wait before trying an unreachable Redis again.
RETRY_REDIS_AFTER = 30.0
#: Seconds a Redis command may take before the budget falls back (connect and read alike).
REDIS_TIMEOUT = 2.0

#: What the fallback answers a slot reservation with, told apart from Redis's 0 or 1.
_TOKEN_LOCAL = "local"


def _nothing() -> None:
    return None


class SharedBudget:
    """
    Requests per minute and predictions in flight of one API key, counted in Redis for every process.

    The first scope holds the account's limits (the connection's); a task with limits of its own
    adds a second scope that caps it further. Requests count as in :class:`RequestBudget`: from their
    reservation, until a window after they were answered, and past a full window as the fallback's
    ``rate_limit_shape`` allows, with one probe and one lesson for the deployment (see
    :mod:`~.rate_shape`). The pace of this process slows after a 429 it did not expect, as the local
    budget's does.

    :param scopes: The limits, account-wide first.
    :param redis: How to reach Redis.
    :param fallback: The process's own budget, used while Redis cannot be reached; its ``window``
        and ``rate_limit_shape`` are this budget's too.
    :param log: Where the fallback is reported, once per outage.
    :param in_flight_ttl: Seconds a created prediction counts unless seen finished.
    """

    def __init__(
        self,
        scopes: Sequence[BudgetScope],
        redis: RedisParams,
        *,
        fallback: RequestBudget,
        log: logging.Logger | Any,
        in_flight_ttl: float = IN_FLIGHT_TTL,
    ) -> None:
        self.scopes = list(scopes)
        self.redis = redis
        self.fallback = fallback
        self.log = log
        self.in_flight_ttl = in_flight_ttl
        self.pace = Pace()
        self._lock = threading.Lock()
        self._open_tokens: deque[str] = deque()
        self._slot_tokens: deque[str] = deque()
        self._down_until = 0.0
        self._outage_reported = False
        self._sync_client: Any = None
        self._async_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        #: What the deployment's processes remember about the service (see :mod:`~.notes`).
        self.notes = SharedNotes(self)

    @property
    def window(self) -> float:
        """Seconds of the request window: the fallback's, which the connection sets."""
        return self.fallback.window

    @property
    def requests_per_minute(self) -> int:
        """The tightest requests-per-minute limit of the scopes."""
        return min(scope.requests_per_minute for scope in self.scopes)

    @property
    def max_concurrency(self) -> int:
        """The tightest predictions-in-flight limit of the scopes."""
        return min(scope.max_concurrency for scope in self.scopes)

    # ----------------------------------------------------------------------------------------------
    # Requests
    # ----------------------------------------------------------------------------------------------
    def reserve_request(self) -> float:
        """Take a request slot in Redis and return 0, or the seconds to wait; see the module."""
        token = uuid.uuid4().hex
        wait = self._call(
            scripts.RESERVE_REQUEST, "requests", self._request_args(token), self.fallback.reserve_request
        )
        return self._reserved(token, wait)

    async def areserve_request(self) -> float:
        """:meth:`reserve_request` without blocking the event loop."""
        token = uuid.uuid4().hex
        args = self._request_args(token)
        wait = await self._acall(scripts.RESERVE_REQUEST, "requests", args, self.fallback.reserve_request)
        return self._reserved(token, wait)

    def request_done(self, answer: Answer | None = None) -> str | None:
        """
        Count a reserved request from now on (see :meth:`RequestBudget.request_done`).

        :param answer: How it was answered; ``None``: not a 429, and within the window.
        :return: The rate limit's shape this answer has just taught, or ``None``.
        """
        answer = answer or Answer()
        token = self._answered(answer)
        if token is None:
            return self.fallback.request_done(answer)
        lesson = self._lesson(answer)
        self._call(scripts.REQUEST_DONE, "requests", self._done_args(token, answer, lesson), _nothing)
        return lesson

    async def arequest_done(self, answer: Answer | None = None) -> str | None:
        """:meth:`request_done` without blocking the event loop."""
        answer = answer or Answer()
        token = self._answered(answer)
        if token is None:
            return self.fallback.request_done(answer)
        lesson = self._lesson(answer)
        await self._acall(scripts.REQUEST_DONE, "requests", self._done_args(token, answer, lesson), _nothing)
        return lesson

    # ----------------------------------------------------------------------------------------------
    # Predictions in flight (created on workers, which are synchronous)
    # ----------------------------------------------------------------------------------------------
    def reserve_prediction(self) -> float:
        """Take a slot for a prediction about to be created; 0, or seconds to wait."""
        token, args = self._slot_request()
        return self._slot_answer(
            token, self._call(scripts.RESERVE_SLOT, "in_flight", args, lambda: _TOKEN_LOCAL)
        )

    async def areserve_prediction(self, slot: str | None = None) -> float:
        """
        :meth:`reserve_prediction` without blocking the event loop (a trigger's synchronous runs).

        :param slot: The slot's name in Redis, so that the process that resumes a dead one's work can
            free it (:meth:`aprediction_finished`); ``None``: a random one.
        """
        token, args = self._slot_request(slot)
        granted = await self._acall(scripts.RESERVE_SLOT, "in_flight", args, lambda: _TOKEN_LOCAL)
        return self._slot_answer(token, granted)

    def _slot_request(self, slot: str | None = None) -> tuple[str, list[Any]]:
        """A new slot's token (``slot``, else a random one), and the reserve script's arguments for it."""
        token = slot or uuid.uuid4().hex
        return token, [token, self.in_flight_ttl, *(scope.max_concurrency for scope in self.scopes)]

    def _slot_answer(self, token: str, granted: Any) -> float:
        """What the reserve script's answer means: 0 (the slot is ``token``'s), or seconds to wait."""
        if granted == _TOKEN_LOCAL:
            return self.fallback.reserve_prediction()
        if not int(granted):
            return 0.25
        self._slot_tokens.append(token)
        return 0.0

    def prediction_created(self, prediction_id: str | None) -> None:
        """Turn a reserved slot into the prediction's (``None`` when the create failed)."""
        token = self._pop(self._slot_tokens)
        if token is None:
            self.fallback.prediction_created(prediction_id)
        else:
            args = [token, prediction_id or "", self.in_flight_ttl]
            self._call(scripts.SLOT_CREATED, "in_flight", args, _nothing)

    async def aprediction_created(self, prediction_id: str | None) -> None:
        """:meth:`prediction_created` without blocking the event loop."""
        token = self._pop(self._slot_tokens)
        if token is None:
            self.fallback.prediction_created(prediction_id)
        else:
            args = [token, prediction_id or "", self.in_flight_ttl]
            await self._acall(scripts.SLOT_CREATED, "in_flight", args, _nothing)

    def prediction_finished(self, prediction_id: str) -> None:
        """Free the slot of a prediction seen finished, whichever process created it."""
        self.fallback.prediction_finished(prediction_id)
        self._call(scripts.SLOT_FREED, "in_flight", [prediction_id], _nothing)

    async def aprediction_finished(self, prediction_id: str) -> None:
        """:meth:`prediction_finished` without blocking the event loop."""
        self.fallback.prediction_finished(prediction_id)
        await self._acall(scripts.SLOT_FREED, "in_flight", [prediction_id], _nothing)

    @property
    def in_flight(self) -> int:
        """Predictions counted in Redis against the account's ``max_concurrency``."""
        count = self._call(scripts.IN_FLIGHT, "in_flight", [], lambda: self.fallback.in_flight)
        return int(count)

    def recent_requests(self) -> list[float]:
        """Nothing to hand over while Redis counts every process's requests; else the fallback's."""
        return self.fallback.recent_requests()

    def note_requests(self, unix_times: Sequence[float]) -> None:
        """Count another process's requests in the fallback (Redis already counts them)."""
        self.fallback.note_requests(unix_times)

    # ----------------------------------------------------------------------------------------------
    # Redis
    # ----------------------------------------------------------------------------------------------
    def script(self, script: str, kind: str, args: list[Any], fallback: Callable[[], Any]) -> Any:
        """
        Run a Lua script on this budget's keys of ``kind``; ``fallback()`` while Redis is down.

        :param script: The script (:mod:`~.budget_scripts`).
        :param kind: The keys' suffix.
        :param args: Its ``ARGV``.
        :param fallback: What answers instead when Redis cannot be reached.
        """
        return self._call(script, kind, args, fallback)

    async def ascript(self, script: str, kind: str, args: list[Any], fallback: Callable[[], Any]) -> Any:
        """:meth:`script` without blocking the event loop (same parameters)."""
        return await self._acall(script, kind, args, fallback)

    def _call(self, script: str, kind: str, args: list[Any], fallback: Callable[[], Any]) -> Any:
        """Run a script on this budget's keys of ``kind``; ``fallback()`` while Redis is down."""
        if time.monotonic() < self._down_until:
            return fallback()
        try:
            return self._client().register_script(script)(keys=self._keys(kind), args=args)
        except Exception as error:
            return self._fell_back(error, fallback)

    async def _acall(self, script: str, kind: str, args: list[Any], fallback: Callable[[], Any]) -> Any:
        """:meth:`_call` without blocking the event loop."""
        if time.monotonic() < self._down_until:
            return fallback()
        try:
            return await self._aclient().register_script(script)(keys=self._keys(kind), args=args)
        except Exception as error:
            return self._fell_back(error, fallback)

    def _keys(self, kind: str) -> list[str]:
        keys = [f"blip2:budget:{scope.name}:{kind}" for scope in self.scopes]
        if kind == "requests":
            # The request scripts also keep each scope's bucket, the probe's lock, the lesson and
            # the account's send times.
            account = f"blip2:budget:{self.scopes[0].name}"
            keys += [f"blip2:budget:{scope.name}:bucket" for scope in self.scopes]
            keys += [f"{account}:probe", f"{account}:notes:{rate_shape.NOTE}", f"{account}:sent"]
        return keys

    def _limits(self) -> list[int]:
        """The scopes' requests per window, the account's at this process's pace."""
        limits = [self.pace.limit(self.scopes[0].requests_per_minute)]
        return limits + [scope.requests_per_minute for scope in self.scopes[1:]]

    def _request_args(self, token: str) -> list[Any]:
        return [token, self.window, OPEN_REQUEST_TTL, self.fallback.rate_limit_shape, *self._limits()]

    def _done_args(self, token: str, answer: Answer, lesson: str | None) -> list[Any]:
        ttl = int(rate_shape.REMEMBER_SECONDS * 1000)
        return [token, self.window, "1" if answer.probe else "0", lesson or "", ttl, *self._limits()]

    def _lesson(self, answer: Answer) -> str | None:
        """What an answer teaches (noted by the done script in Redis, and in this process's notes)."""
        lesson = answer.lesson(self.fallback.rate_limit_shape)
        if lesson is not None:
            self.fallback.notes.remember(rate_shape.NOTE, lesson, rate_shape.REMEMBER_SECONDS)
        return lesson

    def _reserved(self, token: str, wait: Any) -> float:
        """A reservation's answer: Redis's (then keep a granted token) or the fallback's float."""
        if isinstance(wait, float):
            return wait
        self._outage_reported = False
        seconds = float(wait)
        if seconds <= 0:
            self._open_tokens.append(token)
        return seconds

    def _answered(self, answer: Answer) -> str | None:
        """Note an answer in the pace; the token to mark done in Redis, or ``None`` (counted locally)."""
        if not answer.past_window:
            self.pace.answered(rate_limited=answer.rate_limited)
        return self._pop(self._open_tokens)

    def _fell_back(self, error: Exception, fallback: Callable[[], Any]) -> Any:
        """Note an unreachable Redis (logged once per outage) and answer from the fallback."""
        with self._lock:
            first, self._outage_reported = not self._outage_reported, True
            self._down_until = time.monotonic() + RETRY_REDIS_AFTER
            self._open_tokens.clear()
            self._slot_tokens.clear()
        if first:
            self.log.warning(
                "The shared BLIP-2 request budget in Redis is unreachable (%s: %s); this process "
                "paces itself on its own budget and tries Redis again in %.0f s",
                type(error).__name__,
                error,
                RETRY_REDIS_AFTER,
            )
        return fallback()

    def _pop(self, tokens: deque[str]) -> str | None:
        try:
            return tokens.popleft()
        except IndexError:
            return None

    def _client(self) -> Any:
        with self._lock:
            if self._sync_client is None:
                import redis

                self._sync_client = redis.Redis(**self._client_kwargs())
            return self._sync_client

    def _aclient(self) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            import redis.asyncio

            client = self._async_clients[loop] = redis.asyncio.Redis(**self._client_kwargs())
        return client

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            **self.redis.kwargs,
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
        }


_SHARED: dict[tuple[Any, ...], SharedBudget] = {}
_SHARED_LOCK = threading.Lock()


def shared_budget_for(
    scopes: Sequence[BudgetScope],
    redis: RedisParams,
    *,
    fallback: RequestBudget,
    log: logging.Logger | Any,
) -> SharedBudget:
    """
    The process's one :class:`SharedBudget` for these scopes and this Redis, created on first use.

    :param scopes: The limits, account-wide first.
    :param redis: How to reach Redis.
    :param fallback: The process's own budget (one per connection and limits), used while Redis
        cannot be reached; its window is this budget's.
    :param log: Where a fallback is reported.
    """
    key = (tuple(scopes), redis.key, fallback)
    with _SHARED_LOCK:
        budget = _SHARED.get(key)
        if budget is None:
            budget = _SHARED[key] = SharedBudget(scopes, redis, fallback=fallback, log=log)
        return budget
