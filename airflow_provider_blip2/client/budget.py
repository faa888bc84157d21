"""
The client-side request budget: requests per minute and predictions in flight, per connection.

One :class:`RequestBudget` per connection and process (from :func:`budget_for`) is shared by the
threads of a worker and the event loop of a triggerer. It never blocks by itself: the reserve
methods say how long to wait, and :func:`wait_sync` / :func:`wait_async` sleep that long.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence


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
    """

    def __init__(
        self,
        requests_per_minute: int,
        max_concurrency: int,
        *,
        window: float = 60.0,
        in_flight_ttl: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
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

    def reserve_request(self) -> float:
        """Take a request slot and return 0, or return the seconds to wait before asking again."""
        with self._lock:
            now = self._clock()
            finished = self._finished_requests
            while finished and finished[0] <= now - self.window:
                finished.popleft()
            if len(finished) + self._open_requests < self.requests_per_minute:
                self._open_requests += 1
                return 0.0
            return max(0.001, finished[0] + self.window - now) if finished else 0.05

    def request_done(self) -> None:
        """Mark a reserved request finished (answered or failed): it counts for ``window`` from now."""
        with self._lock:
            self._open_requests = max(0, self._open_requests - 1)
            self._finished_requests.append(self._clock())

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

    def prediction_created(self, prediction_id: str | None) -> None:
        """Turn a reserved slot into a tracked prediction (``None`` when the create failed)."""
        with self._lock:
            self._pending_slots = max(0, self._pending_slots - 1)
            if prediction_id:
                self._in_flight[prediction_id] = self._clock() + self.in_flight_ttl

    def prediction_finished(self, prediction_id: str) -> None:
        """Free the slot of a prediction seen finished or handed to another process."""
        with self._lock:
            self._in_flight.pop(prediction_id, None)

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


async def wait_async(reserve: Callable[[], float]) -> None:
    """
    :func:`wait_sync` for coroutines.

    :param reserve: :meth:`RequestBudget.reserve_request` or :meth:`RequestBudget.reserve_prediction`.
    """
    # The budget is shared with threads, so an asyncio.Event cannot signal it: sleep the wait it names.
    while (delay := reserve()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(delay)
