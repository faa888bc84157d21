"""
The client-side request budget: requests per minute and predictions in flight, per connection.

One :class:`RequestBudget` per connection and process (from :func:`budget_for`) is shared by the
threads of a worker and the event loop of a triggerer; :class:`~.shared_budget.SharedBudget` counts
the same limits in Redis for a whole deployment. Neither blocks by itself: the reserve methods say
how long to wait, and :func:`wait_sync` / :func:`wait_async` sleep that long. Both slow their pace
(:class:`Pace`) after a 429 they did not expect, and recover it gradually.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.notes import LocalNotes, Notes
from airflow_provider_blip2.client.pace import Pace
from airflow_provider_blip2.client.rate_shape import Answer


class Budget(Protocol):
    """What the hook needs of a budget, local (:class:`RequestBudget`) or shared (Redis)."""

    @property
    def requests_per_minute(self) -> int:
        """Requests allowed in any window."""

    @property
    def max_concurrency(self) -> int:
        """Predictions allowed in flight."""

    @property
    def window(self) -> float:
        """Seconds of the window ``requests_per_minute`` counts over."""

    def reserve_request(self) -> float:
        """Take a request slot and return 0, or return the seconds to wait before asking again."""

    async def areserve_request(self) -> float:
        """:meth:`reserve_request` without blocking the event loop."""

    def request_done(self, answer: Answer | None = None) -> str | None:
        """
        Mark a reserved request answered or failed.

        :param answer: How it was answered (see :mod:`~.rate_shape`); ``None``: not a 429, and
            within the window.
        :return: The rate limit's shape this answer has just taught, or ``None``.
        """

    async def arequest_done(self, answer: Answer | None = None) -> str | None:
        """:meth:`request_done` without blocking the event loop."""

    @property
    def notes(self) -> Notes:
        """What the processes sharing this budget remember about the service (:mod:`~.notes`)."""

    def reserve_prediction(self) -> float:
        """Take a slot for a prediction about to be created; 0, or seconds to wait."""

    async def areserve_prediction(self, slot: str | None = None) -> float:
        """
        :meth:`reserve_prediction` without blocking the event loop.

        :param slot: A name for the slot, unique in the deployment, so that another process can free
            it (:meth:`aprediction_finished`) if this one dies before it answers; ``None``: anonymous.
        """

    def prediction_created(self, prediction_id: str | None) -> None:
        """Turn a reserved slot into a tracked prediction (``None`` when the create failed)."""

    async def aprediction_created(self, prediction_id: str | None) -> None:
        """:meth:`prediction_created` without blocking the event loop."""

    def prediction_finished(self, prediction_id: str) -> None:
        """Free the slot of a prediction seen finished."""

    async def aprediction_finished(self, prediction_id: str) -> None:
        """:meth:`prediction_finished` without blocking the event loop."""

    @property
    def in_flight(self) -> int:
        """Predictions counted against ``max_concurrency``."""

    def recent_requests(self) -> list[float]:
        """Unix times of this process's requests that still count (for a handover)."""

    def note_requests(self, unix_times: Sequence[float]) -> None:
        """Count requests another process made, from its :meth:`recent_requests`."""


class RequestBudget:
    """
    Requests-per-minute and predictions-in-flight limits shared by every client in a process.

    It never blocks by itself: :meth:`reserve_request` and :meth:`reserve_prediction` return how long
    to wait (0 when granted), so threads sleep and coroutines ``await asyncio.sleep`` on the same
    shared state. Get instances from :func:`budget_for`, one per connection.

    A request counts from the moment it is reserved; once :meth:`request_done` is called it counts
    until ``window`` seconds after it finished. The server counts it from its arrival, which lies
    between the two, so the client's window always covers the server's and never provokes a 429.
    Past a full window it goes only as ``rate_limit_shape`` allows (:mod:`~.rate_shape`).

    :param requests_per_minute: Requests allowed in any sliding window of ``window`` seconds.
    :param max_concurrency: Predictions created by this process and not yet seen finished.
    :param window: Window length in seconds.
    :param in_flight_ttl: Seconds after which an unfinished prediction stops counting (a safety net).
    :param clock: Monotonic clock.
    :param pace: How much of ``requests_per_minute`` it uses after unexpected 429s.
    :param rate_limit_shape: ``auto``, ``window`` or ``bucket`` (:mod:`~.rate_shape`).
    """

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrency: int,
        *,
        window: float = 60.0,
        in_flight_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        pace: Pace | None = None,
        rate_limit_shape: str = rate_shape.SHAPE_AUTO,
    ):
        self.requests_per_minute = requests_per_minute
        self.max_concurrency = max_concurrency
        self.window = window
        self.in_flight_ttl = in_flight_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._finished_requests: deque[float] = deque()
        self._open_requests = 0
        self._in_flight: dict[str, float] = {}
        self._pending_slots = 0
        self.pace = pace or Pace(clock=clock)
        self.notes = LocalNotes(clock)
        self.rate_limit_shape = rate_limit_shape
        self._tat = -float("inf")
        self._probe_open = False
        #: When each request still in the window was sent: the probe goes only when the API's
        #: window is surely full (the requests that were sent within it and answered fill it).
        self._sent: deque[float] = deque()

    def reserve_request(self) -> float:
        """
        Take a request slot and return 0 or less, or return the seconds to wait before asking again.

        A grant past a full window is :data:`~.rate_shape.PROBE_GRANTED` or
        :data:`~.rate_shape.BUCKET_GRANTED`: pass it to :meth:`request_done`.
        """
        with self._lock:
            now = self._clock()
            finished = self._finished_requests
            while finished and finished[0] <= now - self.window:
                finished.popleft()
            limit = self.pace.limit(self.requests_per_minute)
            while self._sent and self._sent[0] <= now - self.window:
                self._sent.popleft()
            granted = 0.0
            if len(finished) + self._open_requests >= limit:
                surplus = len(finished) + self._open_requests - limit
                wait = 0.05 if surplus >= len(finished) else max(0.001, finished[surplus] + self.window - now)
                granted = self._past_window(now, limit, wait)
            if granted <= 0:
                self._open_requests += 1
                self._sent.append(now)
            return granted

    def _past_window(self, now: float, limit: int, wait: float) -> float:
        """What a full window's request gets: the window's ``wait``, or a grant the shape allows."""
        shape = rate_shape.shape_in_use(self.rate_limit_shape, self.notes.recall(rate_shape.NOTE))
        if shape == rate_shape.SHAPE_WINDOW:
            return wait
        bucket = rate_shape.bucket_wait(self._tat, now, self._open_requests, limit, self.window)
        if bucket > 0:
            return min(wait, max(0.001, bucket))
        if shape == rate_shape.SHAPE_BUCKET:
            return rate_shape.BUCKET_GRANTED
        if self._probe_open or len(self._sent) - self._open_requests < limit:
            return min(wait, rate_shape.PROBE_WAIT)
        self._probe_open = True
        return rate_shape.PROBE_GRANTED

    async def areserve_request(self) -> float:
        """:meth:`reserve_request`; it never blocks."""
        return self.reserve_request()

    def request_done(self, answer: Answer | None = None) -> str | None:
        """
        Mark a reserved request finished (answered or failed): it counts for ``window`` from now.

        :param answer: How it was answered; ``None``: not a 429, and within the window. A 429 slows
            the pace down, unless the request went past a full window: then it teaches the
            limiter's shape (see :mod:`~.rate_shape`).
        :return: The rate limit's shape this answer has just taught, or ``None``.
        """
        answer = answer or Answer()
        lesson = answer.lesson(self.rate_limit_shape)
        with self._lock:
            now = self._clock()
            self._open_requests = max(0, self._open_requests - 1)
            self._finished_requests.append(now)
            limit = self.pace.limit(self.requests_per_minute)
            self._tat = rate_shape.after_answer(self._tat, now, limit, self.window)
            if lesson is not None:  # noted before the probe is over: no second probe in between
                self.notes.remember(rate_shape.NOTE, lesson, rate_shape.REMEMBER_SECONDS)
            if answer.probe:
                self._probe_open = False
            if not answer.past_window:
                self.pace.answered(rate_limited=answer.rate_limited)
        return lesson

    async def arequest_done(self, answer: Answer | None = None) -> str | None:
        """:meth:`request_done`; it never blocks."""
        return self.request_done(answer)

    def reserve_prediction(self) -> float:
        """Take a slot for a prediction about to be created; 0, or seconds to wait before asking again."""
        with self._lock:
            now = self._clock()
            for key, expiry in list(self._in_flight.items()):
                if expiry <= now:
                    del self._in_flight[key]
            if len(self._in_flight) + self._pending_slots < self.max_concurrency:
                self._pending_slots += 1
                return 0.0
            return 0.05

    async def areserve_prediction(self, slot: str | None = None) -> float:
        """:meth:`reserve_prediction`; it never blocks (a slot of this process dies with it: no name)."""
        return self.reserve_prediction()

    def prediction_created(self, prediction_id: str | None) -> None:
        """Turn a reserved slot into a tracked prediction (``None`` when the create failed)."""
        with self._lock:
            self._pending_slots = max(0, self._pending_slots - 1)
            if prediction_id:
                self._in_flight[prediction_id] = self._clock() + self.in_flight_ttl

    async def aprediction_created(self, prediction_id: str | None) -> None:
        """:meth:`prediction_created`; it never blocks."""
        self.prediction_created(prediction_id)

    def prediction_finished(self, prediction_id: str) -> None:
        """Free the slot of a prediction seen finished or handed to another process."""
        with self._lock:
            self._in_flight.pop(prediction_id, None)

    async def aprediction_finished(self, prediction_id: str) -> None:
        """:meth:`prediction_finished`; it never blocks."""
        self.prediction_finished(prediction_id)

    @property
    def in_flight(self) -> int:
        """Predictions currently counted against ``max_concurrency``."""
        with self._lock:
            return len(self._in_flight) + self._pending_slots

    def recent_requests(self) -> list[float]:
        """
        Unix times of the requests that still count against the window (open ones count as now).

        Hand them to the next process that works for the same job (worker -> triggerer and back),
        which passes them to :meth:`note_requests`, so a handover does not start with a full window.
        """
        with self._lock:
            now = self._clock()
            offset = time.time() - now
            times = [t + offset for t in self._finished_requests if t > now - self.window]
            return sorted(round(t, 3) for t in times + [now + offset] * self._open_requests)

    def note_requests(self, unix_times: Sequence[float]) -> None:
        """
        Count requests another process made (from its :meth:`recent_requests`) against the window.

        Times this budget already counts (the same process on both sides) are not added twice.

        :param unix_times: Unix times of the requests.
        """
        with self._lock:
            now = self._clock()
            offset = time.time() - now
            unmatched = list(self._finished_requests)
            added = []
            for unix_time in unix_times:
                moment = float(unix_time) - offset
                if moment <= now - self.window:
                    continue
                twin = next((k for k in unmatched if abs(moment - k) < 0.005), None)
                if twin is None:
                    added.append(moment)
                else:
                    unmatched.remove(twin)
            self._finished_requests = deque(sorted([*self._finished_requests, *added]))
            limit = self.pace.limit(self.requests_per_minute)
            for moment in sorted(added):
                self._tat = rate_shape.after_answer(self._tat, moment, limit, self.window)


_BUDGETS: dict[tuple[str, str], RequestBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def budget_for(
    key: str,
    base_url: str,
    requests_per_minute: int,
    max_concurrency: int,
    window: float = 60.0,
    rate_limit_shape: str = rate_shape.SHAPE_AUTO,
) -> RequestBudget:
    """
    Return the process-wide budget of a connection, creating it on first use.

    Limits changed in the connection take effect on the existing budget.

    :param key: The connection id.
    :param base_url: The API base URL (one budget per connection and server).
    :param requests_per_minute: Requests allowed per 60 s.
    :param max_concurrency: Predictions in flight allowed.
    :param window: Seconds ``requests_per_minute`` counts over.
    :param rate_limit_shape: ``auto``, ``window`` or ``bucket`` (:mod:`~.rate_shape`).
    """
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get((key, base_url))
        if budget is None:
            budget = _BUDGETS[(key, base_url)] = RequestBudget(requests_per_minute, max_concurrency)
        budget.requests_per_minute = requests_per_minute
        budget.max_concurrency = max_concurrency
        budget.window = window
        budget.rate_limit_shape = rate_limit_shape
        return budget


def wait_sync(reserve: Callable[[], float]) -> float:
    """
    Sleep until ``reserve`` grants a slot (returns 0 or less); return the grant.

    :param reserve: :meth:`RequestBudget.reserve_request` or :meth:`RequestBudget.reserve_prediction`.
    """
    while (delay := reserve()) > 0:
        time.sleep(delay)
    return delay


async def wait_async(reserve: Callable[[], Awaitable[float]]) -> float:
    """
    :func:`wait_sync` for coroutines.

    :param reserve: :meth:`Budget.areserve_request`.
    """
    # The budget is shared with threads and processes, so no asyncio.Event can signal it: sleep the
    # wait it names.
    while (delay := await reserve()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay)
    return delay
