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
from dataclasses import dataclass, field
from typing import Protocol

from airflow_provider_blip2.client.notes import LocalNotes, Notes


@dataclass(kw_only=True)
class Pace:
    """
    How much of its request rate a budget uses: cut after an unexpected 429, recovered step by step.

    A 429 that the budget let through means that something else spends the same API key (another
    process without a shared budget, another deployment): the budget halves its rate at most once
    per ``cooldown`` seconds, down to ``floor``, then wins back ``step`` of it per request answered
    without a 429, as additive-increase, multiplicative-decrease congestion control does.

    :param floor: The smallest share of the rate it keeps.
    :param step: Share of the rate won back per request answered without a 429.
    :param cooldown: Seconds in which several 429s count as one (they come in bursts).
    :param clock: Monotonic clock.
    """

    floor: float = 0.1
    step: float = 0.02
    cooldown: float = 2.0
    clock: Callable[[], float] = time.monotonic
    share: float = field(default=1.0, init=False)
    _last_cut: float = field(default=-float("inf"), init=False, repr=False)

    def limit(self, requests_per_minute: int) -> int:
        """The requests per window this pace allows: at least 1."""
        return max(1, int(requests_per_minute * self.share))

    def answered(self, *, rate_limited: bool) -> None:
        """
        Take one answer into account.

        :param rate_limited: Whether it was a 429.
        """
        now = self.clock()
        if rate_limited:
            if now - self._last_cut >= self.cooldown:
                self.share = max(self.floor, self.share / 2)
                self._last_cut = now
        else:
            self.share = min(1.0, self.share + self.step)


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

    def request_done(self, *, rate_limited: bool = False) -> None:
        """Mark a reserved request answered or failed; ``rate_limited`` when it was a 429."""

    async def arequest_done(self, *, rate_limited: bool = False) -> None:
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

    :param requests_per_minute: Requests allowed in any sliding window of ``window`` seconds.
    :param max_concurrency: Predictions created by this process and not yet seen finished.
    :param window: Window length in seconds.
    :param in_flight_ttl: Seconds after which an unfinished prediction stops counting (a safety net).
    :param clock: Monotonic clock.
    :param pace: How much of ``requests_per_minute`` it uses after unexpected 429s.
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

    def reserve_request(self) -> float:
        """Take a request slot and return 0, or return the seconds to wait before asking again."""
        with self._lock:
            now = self._clock()
            finished = self._finished_requests
            while finished and finished[0] <= now - self.window:
                finished.popleft()
            limit = self.pace.limit(self.requests_per_minute)
            if len(finished) + self._open_requests < limit:
                self._open_requests += 1
                return 0.0
            surplus = len(finished) + self._open_requests - limit
            if surplus >= len(finished):
                return 0.05
            return max(0.001, finished[surplus] + self.window - now)

    async def areserve_request(self) -> float:
        """:meth:`reserve_request`; it never blocks."""
        return self.reserve_request()

    def request_done(self, *, rate_limited: bool = False) -> None:
        """
        Mark a reserved request finished (answered or failed): it counts for ``window`` from now.

        :param rate_limited: Whether the server answered 429 (the pace slows down).
        """
        with self._lock:
            self._open_requests = max(0, self._open_requests - 1)
            self._finished_requests.append(self._clock())
            self.pace.answered(rate_limited=rate_limited)

    async def arequest_done(self, *, rate_limited: bool = False) -> None:
        """:meth:`request_done`; it never blocks."""
        self.request_done(rate_limited=rate_limited)

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


_BUDGETS: dict[tuple[str, str], RequestBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def budget_for(
    key: str, base_url: str, requests_per_minute: int, max_concurrency: int, window: float = 60.0
) -> RequestBudget:
    """
    Return the process-wide budget of a connection, creating it on first use.

    Limits changed in the connection take effect on the existing budget.

    :param key: The connection id.
    :param base_url: The API base URL (one budget per connection and server).
    :param requests_per_minute: Requests allowed per 60 s.
    :param max_concurrency: Predictions in flight allowed.
    :param window: Seconds ``requests_per_minute`` counts over.
    """
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get((key, base_url))
        if budget is None:
            budget = _BUDGETS[(key, base_url)] = RequestBudget(requests_per_minute, max_concurrency)
        budget.requests_per_minute = requests_per_minute
        budget.max_concurrency = max_concurrency
        budget.window = window
        return budget


def wait_sync(reserve: Callable[[], float]) -> None:
    """
    Sleep until ``reserve`` grants a slot (returns 0).

    :param reserve: :meth:`RequestBudget.reserve_request` or :meth:`RequestBudget.reserve_prediction`.
    """
    while (delay := reserve()) > 0:
        time.sleep(delay)


async def wait_async(reserve: Callable[[], Awaitable[float]]) -> None:
    """
    :func:`wait_sync` for coroutines.

    :param reserve: :meth:`Budget.areserve_request`.
    """
    # The budget is shared with threads and processes, so no asyncio.Event can signal it: sleep the
    # wait it names.
    while (delay := await reserve()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay)
