"""Configuration of the local Eachlabs API emulator."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_API_KEY = "emulator-key"
RATE_WINDOW_SECONDS = 60.0
INJECTED_RETRY_AFTER_SECONDS = 1.0
_FAULT_FIELDS = (
    "fault_5xx",
    "fault_429",
    "fault_slow",
    "fault_drop",
    "fault_provider_failed",
    "fault_created_5xx",
)


SPELLINGS = ("current", "legacy")
RETRY_AFTER_PLACES = ("both", "header", "body")
RATE_LIMITS = ("window", "bucket", "fixed")
ENDPOINTS = ("create", "run", "get", "cancel", "model", "presign")


@dataclass
class EmulatorConfig:
    """Settings of one emulator instance.

    The instance reads its config at request time, so tests may change e.g. the fault probabilities of a
    running server between phases.

    :param api_keys: accepted API keys (sent as ``X-API-Key: K`` or ``Authorization: Bearer K``).
    :param latency: seconds from create to terminal status, before ``time_scale``.
    :param latency_spread: how much each prediction's latency varies: drawn uniformly from
        ``latency * (1 - spread)`` to ``latency * (1 + spread)``, from the seed and the input (``0``,
        the default: every prediction takes ``latency``). A client that times its first read by the
        predictions it saw cannot then count on one fixed duration.
    :param time_scale: multiplies every duration: latency, the 60 s rate window, Retry-After values and
        slow-response delays. ``0.1`` runs ten times faster with the same ratios.
    :param requests_per_minute: requests (all endpoints) per API key allowed in a sliding window of
        ``60 s * time_scale``.
    :param rate_limit: how ``requests_per_minute`` is counted: ``window`` (a sliding window: at most
        that many admitted in any window) or ``bucket`` (a token bucket of that many tokens that wins
        one back every ``window / requests_per_minute``, the generic cell rate algorithm) or ``fixed``
        (a fixed window: that many in each window counted from a multiple of its length on the
        server's clock, then none until the next one starts, whatever came just before it).
    :param max_in_flight: predictions of one API key that may be non-terminal at once.
    :param answers_file: optional path of a JSON answers file with canned outputs and errors.
    :param seed: seed of the fault injection random generator.
    :param fault_5xx: probability that a request is answered 500/502/503 without acting.
    :param fault_429: probability that a request is answered 429 without acting.
    :param fault_slow: probability that a request is delayed by ``slow_seconds * time_scale``.
    :param fault_drop: probability that the connection is dropped without a response (a create is
        dropped after the prediction was created).
    :param fault_provider_failed: probability that a prediction of a readable image ends with status
        ``error`` and a retryable envelope (``PROVIDER_FAILED``, ``retryable: true``), as when the
        model provider fails; drawn per created prediction.
    :param fault_created_5xx: probability that a create is answered 500 after the prediction was
        created (an ambiguous create: the prediction runs, unknown to the client).
    :param slow_seconds: delay of a slow fault, before ``time_scale``.
    :param max_image_bytes: largest image the emulator downloads.
    :param download_timeout: timeout in seconds of the image download (real time, not scaled).
    :param spelling: ``current`` answers as the current docs say; ``legacy`` uses the other
        spellings the API's docs and SDKs show: 201 on create, statuses ``completed``, ``failed`` and
        ``canceled``, empty ``{}`` error bodies, and 429s with only a body ``retry_after``.
    :param cost_per_prediction: ``metrics.cost`` reported by a successful prediction.
    :param retry_after_in: where a 429 says how long to wait: ``both`` (a ``Retry-After`` header and
        a body ``retry_after``), ``header`` only or ``body`` only. ``spelling="legacy"`` always
        answers with the body only.
    :param sync_run: serve ``POST /v1/prediction/run`` (the synchronous run); when off it answers 400
        as the service does for a model without synchronous execution.
    :param sync_run_max_wait: seconds (before ``time_scale``) a synchronous run waits for its
        prediction to end; then it answers with the prediction still ``processing``.
    :param fetch_only_uploads: download no image URL but the emulator's own uploaded copies (a
        service on a network that reaches nothing else): any other image fails with
        ``INPUT_DOWNLOAD_ERROR``.
    :param refuse_puts: answer this many upload PUTs first with a 403 signature error, whatever
        they send (a signature the storage no longer accepts).
    :param fault_endpoints: the endpoints that injected faults hit (``create``, ``get``, ``cancel``,
        ``model``); empty means all. ``("get",)`` fails reads only. Requests of other endpoints draw
        the same random numbers, so a seed gives the same sequence whatever this is.
        ``fault_created_5xx`` hits creates unless the list leaves ``create`` out;
        ``fault_provider_failed`` is no request fault and applies whatever the list.

    The faults of requests (``fault_5xx`` to ``fault_drop``) are drawn per request in sequence.
    Those of created predictions (``fault_provider_failed``, ``fault_created_5xx``) are drawn from
    the seed, the input (image file name and question) and how many predictions of that input were
    created before: the same items get the same faults whatever the order of the creates, and
    adding either leaves the sequence of the request faults as it was.
    """

    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    latency: float = 2.0
    latency_spread: float = 0.0
    time_scale: float = 1.0
    requests_per_minute: int = 60
    rate_limit: str = "window"
    max_in_flight: int = 10
    answers_file: str | None = None
    seed: int = 0
    fault_5xx: float = 0.0
    fault_429: float = 0.0
    fault_slow: float = 0.0
    fault_drop: float = 0.0
    fault_provider_failed: float = 0.0
    fault_created_5xx: float = 0.0
    slow_seconds: float = 5.0
    max_image_bytes: int = 50 * 1024 * 1024
    download_timeout: float = 30.0
    cost_per_prediction: float = 0.0011
    spelling: str = "current"
    retry_after_in: str = "both"
    fault_endpoints: tuple[str, ...] = ()
    sync_run: bool = True
    sync_run_max_wait: float = 60.0
    fetch_only_uploads: bool = False
    refuse_puts: int = 0

    def __post_init__(self) -> None:
        """Normalise and validate the settings.

        :raises ValueError: when a setting is out of range.
        """
        if isinstance(self.api_keys, str):
            self.api_keys = (self.api_keys,)
        self.api_keys = tuple(self.api_keys)
        if not self.api_keys or any(not key for key in self.api_keys):
            raise ValueError("api_keys must hold at least one non-empty key")
        if not math.isfinite(self.time_scale) or self.time_scale <= 0:
            raise ValueError("time_scale must be a positive number")
        for name in ("latency", "slow_seconds", "download_timeout", "sync_run_max_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0.0 <= self.latency_spread <= 1.0:
            raise ValueError(f"latency_spread must lie in [0, 1], got {self.latency_spread!r}")
        for name in ("requests_per_minute", "max_in_flight", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.spelling not in SPELLINGS:
            raise ValueError(f"spelling must be one of {', '.join(SPELLINGS)}, got {self.spelling!r}")
        if self.rate_limit not in RATE_LIMITS:
            raise ValueError(f"rate_limit must be one of {', '.join(RATE_LIMITS)}, got {self.rate_limit!r}")
        if self.retry_after_in not in RETRY_AFTER_PLACES:
            raise ValueError(
                f"retry_after_in must be one of {', '.join(RETRY_AFTER_PLACES)}, got {self.retry_after_in!r}"
            )
        self.validate_faults()

    @property
    def legacy(self) -> bool:
        """Whether answers use the API's older spellings."""
        return self.spelling == "legacy"

    def validate_faults(self) -> None:
        """Check that every fault probability lies in [0, 1] and the fault endpoints exist.

        :raises ValueError: when one does not.
        """
        for name in _FAULT_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if isinstance(self.fault_endpoints, str):
            self.fault_endpoints = (self.fault_endpoints,)
        self.fault_endpoints = tuple(self.fault_endpoints)
        unknown = sorted(set(self.fault_endpoints) - set(ENDPOINTS))
        if unknown:
            raise ValueError(f"fault_endpoints must be among {', '.join(ENDPOINTS)}, got {unknown}")

    def faults_hit(self, endpoint: str) -> bool:
        """Whether injected faults apply to an endpoint.

        :param endpoint: the endpoint label (``create``, ``run``, ``get``, ``cancel`` or ``model``).
        """
        return not self.fault_endpoints or endpoint in self.fault_endpoints

    def scaled(self, seconds: float) -> float:
        """Return a duration multiplied by the time scale.

        :param seconds: the unscaled duration.
        """
        return seconds * self.time_scale

    @property
    def rate_window(self) -> float:
        """Length in seconds of the sliding rate-limit window (scaled)."""
        return self.scaled(RATE_WINDOW_SECONDS)

    @property
    def scaled_latency(self) -> float:
        """Seconds from create to terminal status (scaled), without the spread."""
        return self.scaled(self.latency)

    def latency_of(self, draw: float) -> float:
        """One prediction's seconds from create to terminal status (scaled), with the spread.

        :param draw: a uniform draw in [0, 1).
        """
        return self.scaled_latency * (1.0 + self.latency_spread * (2.0 * draw - 1.0))
