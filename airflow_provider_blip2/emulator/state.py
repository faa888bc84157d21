"""In-memory state of the emulator: predictions, the ledger and the rate-limit windows."""

from __future__ import annotations

import asyncio
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_blip2.emulator.inputs import ModelInput, redact_url

STATUS_CREATED = "created"
STATUS_PROCESSING = "processing"
STATUS_SUCCESS = "success"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
TERMINAL_STATUSES = frozenset({STATUS_SUCCESS, STATUS_ERROR, STATUS_CANCELLED})
ADMITTED_KEPT = 20_000


@dataclass
class Prediction:
    """One prediction, owned by the API key that created it.

    :param id: the prediction id (a uuid4).
    :param api_key: the key that created it.
    :param input: the ``input`` object as the client sent it.
    :param model_input: the validated input.
    :param created_at: ``time.monotonic()`` at creation.
    :param latency: seconds (scaled) from creation to the terminal status.
    :param provider_fails: the ``fault_provider_failed`` fault was drawn for it: it ends with a
        retryable ``PROVIDER_FAILED`` error once its image was read.
    """

    id: str
    api_key: str
    input: dict[str, Any]
    model_input: ModelInput
    created_at: float
    latency: float = 0.0
    status: str = STATUS_CREATED
    output: Any = None
    logs: list[str] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    predict_time: float = 0.0
    cost: float = 0.0
    provider_fails: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def terminal(self) -> bool:
        """Whether the status is ``success``, ``error`` or ``cancelled``."""
        return self.status in TERMINAL_STATUSES

    def log(self, line: str) -> None:
        """Append a line to the prediction's logs.

        :param line: the line (must never hold a full URL with a query string).
        """
        self.logs.append(line)

    def finish(self, status: str, now: float, output: Any = None, cost: float = 0.0) -> None:
        """Move the prediction to a terminal status.

        :param status: the terminal status.
        :param now: ``time.monotonic()`` now.
        :param output: the output (a string on success, an error envelope on error).
        :param cost: the reported cost.
        """
        self.status = status
        self.output = output
        self.cost = cost
        self.finished_at = now
        self.ended.set()
        started = self.started_at if self.started_at is not None else now
        self.predict_time = round(max(0.0, now - started), 4)

    def public_input(self) -> dict[str, Any]:
        """Return the input as sent, with the image URL's query string removed.

        Presigned URLs carry credentials in their query string; the emulator never echoes them.
        """
        public = dict(self.input)
        if isinstance(public.get("image"), str):
            public["image"] = redact_url(public["image"])
        return public

    def to_json(self, base_url: str) -> dict[str, Any]:
        """Render the prediction as ``GET /v1/prediction/{id}`` answers it.

        :param base_url: scheme, host and port of the API, without trailing slash.
        """
        get_url = f"{base_url}/v1/prediction/{self.id}"
        return {
            "id": self.id,
            "input": self.public_input(),
            "status": self.status,
            "output": self.output if self.terminal else None,
            "logs": "\n".join(self.logs),
            "metrics": {"predict_time": self.predict_time, "cost": self.cost},
            "urls": {"get": get_url, "cancel": f"{get_url}/cancel"},
        }


@dataclass
class Ledger:
    """Counters of everything the emulator saw and did, for tests and benchmarks."""

    requests: Counter[str] = field(default_factory=Counter)
    responses_by_status: Counter[int] = field(default_factory=Counter)
    creates: int = 0
    runs: int = 0
    creates_by_input: Counter[str] = field(default_factory=Counter)
    responses_401: int = 0
    responses_429: int = 0
    responses_429_injected: int = 0
    responses_5xx_injected: int = 0
    drops_injected: int = 0
    slow_injected: int = 0
    provider_failed_injected: int = 0
    created_5xx_injected: int = 0
    peak_in_flight: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    first_admitted_at: float | None = None
    last_admitted_at: float | None = None
    admitted: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=ADMITTED_KEPT))

    def count_admitted(self, unix_time: float, label: str) -> None:
        """Note when a request passed the rate limit: the first and the last such moment, and each one.

        :param unix_time: now, as Unix time (comparable with other processes' clocks).
        :param label: the endpoint label counted in ``requests``.
        """
        if self.first_admitted_at is None:
            self.first_admitted_at = unix_time
        self.last_admitted_at = unix_time
        self.admitted.append((round(unix_time, 3), label))

    def count_response(self, status_code: int) -> None:
        """Count a response that was sent.

        :param status_code: its HTTP status.
        """
        self.responses_by_status[status_code] += 1
        if status_code == 401:
            self.responses_401 += 1
        elif status_code == 429:
            self.responses_429 += 1

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        """Return the ledger as the JSON of ``GET /_emulator/ledger``.

        :param in_flight: predictions not yet terminal now.
        """
        return {
            "requests": dict(self.requests),
            "responses_by_status": {str(code): n for code, n in sorted(self.responses_by_status.items())},
            "creates": self.creates,
            "runs": self.runs,
            "creates_by_input": dict(self.creates_by_input),
            "responses_401": self.responses_401,
            "responses_429": self.responses_429,
            "responses_429_injected": self.responses_429_injected,
            "responses_5xx_injected": self.responses_5xx_injected,
            "drops_injected": self.drops_injected,
            "slow_injected": self.slow_injected,
            "provider_failed_injected": self.provider_failed_injected,
            "created_5xx_injected": self.created_5xx_injected,
            "peak_in_flight": self.peak_in_flight,
            "first_admitted_at": self.first_admitted_at,
            "last_admitted_at": self.last_admitted_at,
            "admitted": [list(entry) for entry in self.admitted],
            "in_flight": in_flight,
            "statuses": {status: self.statuses[status] for status in sorted(TERMINAL_STATUSES)},
        }


class RateLimiter:
    """Request counter per API key: a sliding window, a token bucket (GCRA), or a fixed window.

    Only admitted requests occupy the window (or take a token), so a ``Retry-After`` it computes is
    exact: a client that waits that long gets a slot.
    """

    def __init__(self) -> None:
        self._windows: dict[str, deque[float]] = {}
        self._arrival_times: dict[str, float] = {}
        self._fixed: dict[str, tuple[float, int]] = {}

    def acquire(self, key: str, now: float, limit: int, window: float, shape: str = "window") -> float | None:
        """Admit a request, or tell how long until a slot frees.

        :param key: the API key.
        :param now: ``time.monotonic()`` now.
        :param limit: requests allowed in the window (the bucket's tokens).
        :param window: window length in seconds (the bucket refills ``limit`` tokens in it).
        :param shape: ``window``, ``bucket`` or ``fixed``.
        :return: None when admitted (and counted), else seconds until a request would be admitted.
        """
        if shape == "bucket":
            return self._take_token(key, now, limit, window)
        if shape == "fixed":
            return self._count_in_fixed_window(key, now, limit, window)
        stamps = self._windows.setdefault(key, deque())
        while stamps and stamps[0] <= now - window:
            stamps.popleft()
        if len(stamps) < limit:
            stamps.append(now)
            return None
        return stamps[-limit] + window - now

    def _take_token(self, key: str, now: float, limit: int, window: float) -> float | None:
        """The generic cell rate algorithm: one token per ``window / limit``, ``limit`` at most."""
        interval = window / limit
        arrival = max(self._arrival_times.get(key, now), now)
        earliest = arrival - (limit - 1) * interval
        if now < earliest:
            return earliest - now
        self._arrival_times[key] = arrival + interval
        return None

    def _count_in_fixed_window(self, key: str, now: float, limit: int, window: float) -> float | None:
        """A fixed window: ``limit`` requests in each ``[k * window, (k + 1) * window)``, then none."""
        start = math.floor(now / window) * window
        begun, count = self._fixed.get(key, (start, 0))
        count = count if begun == start else 0
        if count < limit:
            self._fixed[key] = (start, count + 1)
            return None
        return start + window - now

    def clear(self) -> None:
        """Forget every window and bucket."""
        self._windows.clear()
        self._arrival_times.clear()
        self._fixed.clear()
