"""
The connection's settings: the one source of their defaults, their form fields and their validation.

``get_provider_info`` (the Airflow 3 connection form) and the hook's Airflow 2 form widgets are both
built from :data:`CONNECTION_FIELDS`; :class:`ClientSettings` reads a connection with the same
defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.inputs import parse_seconds, redact_url
from airflow_provider_blip2.client.rate_shape import SHAPE_AUTO, SHAPE_MODES

DEFAULT_BASE_URL = "https://api.eachlabs.ai"
DEFAULT_MODEL = "blip-2"
DEFAULT_MODEL_VERSION = "0.0.1"
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_REQUESTS_PER_MINUTE = 60
DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_RATE_WINDOW = 60.0
#: How predictions are run: ``auto`` (the synchronous run where the model offers it, else create +
#: poll), ``run`` (always the synchronous run) or ``poll`` (always create + poll).
SYNC_RUN_AUTO = "auto"
SYNC_RUN_ALWAYS = "run"
SYNC_RUN_NEVER = "poll"
SYNC_RUN_MODES = (SYNC_RUN_AUTO, SYNC_RUN_ALWAYS, SYNC_RUN_NEVER)


@dataclass(frozen=True)
class ConnectionField:
    """
    One extra field of the ``blip2`` connection form.

    :param name: Key in the connection's extra.
    :param label: Label in the form.
    :param description: Help text under the field.
    :param type: JSON Schema type: ``string`` or ``integer``.
    :param default: Value used when the field is empty.
    :param minimum: Smallest allowed value (integers only).
    :param choices: The allowed values (strings only), shown as a choice in the form.
    """

    name: str
    label: str
    description: str
    type: str
    default: str | int | None
    minimum: int | None = None
    choices: tuple[str, ...] | None = None

    def to_provider_info(self) -> dict[str, Any]:
        """The field as ``connection-types[].conn-fields`` declares it."""
        schema: dict[str, Any] = {"type": [self.type, "null"], "default": self.default}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.choices is not None:
            schema["enum"] = [*self.choices, None]
        return {"label": self.label, "description": self.description, "schema": schema}


CONNECTION_FIELDS: tuple[ConnectionField, ...] = (
    ConnectionField("model", "Model", "Model slug on the Eachlabs API.", "string", DEFAULT_MODEL),
    ConnectionField(
        "model_version",
        "Model version",
        "Sent with every prediction; the API documents it as deprecated and ignores it.",
        "string",
        DEFAULT_MODEL_VERSION,
    ),
    ConnectionField(
        "request_timeout",
        "Request timeout (seconds)",
        "How long to wait for one HTTP answer.",
        "integer",
        int(DEFAULT_REQUEST_TIMEOUT),
        minimum=1,
    ),
    ConnectionField(
        "requests_per_minute",
        "Requests per minute",
        "Client-side budget of every task and trigger of one process, or of the whole deployment "
        "with a Redis connection (API limit: 60).",
        "integer",
        DEFAULT_REQUESTS_PER_MINUTE,
        minimum=1,
    ),
    ConnectionField(
        "max_concurrency",
        "Max predictions in flight",
        "Predictions kept running at once: by one process, or by the whole deployment with a "
        "Redis connection (API limit: 10).",
        "integer",
        DEFAULT_MAX_CONCURRENCY,
        minimum=1,
    ),
    ConnectionField(
        "sync_run",
        "Synchronous run",
        "auto: run each batch prediction with one request (POST /v1/prediction/run) where the model "
        "offers it, else create and poll (found out at run time, remembered for an hour); run: "
        "always the synchronous run; poll: always create and poll.",
        "string",
        SYNC_RUN_AUTO,
        choices=SYNC_RUN_MODES,
    ),
    ConnectionField(
        "rate_limit_shape",
        "Rate limit shape",
        "auto: keep to a sliding window of requests per minute, and go past a full one once the API "
        "has shown that its limit refills gradually (found out with one request, remembered for an "
        "hour); window: never past the window; bucket: the limit refills (a token bucket).",
        "string",
        SHAPE_AUTO,
        choices=SHAPE_MODES,
    ),
    ConnectionField(
        "redis_conn_id",
        "Redis connection id (shared budget)",
        "An Airflow Redis connection: every worker and triggerer then shares the requests per "
        "minute and the predictions in flight above. Empty: each process keeps its own budget.",
        "string",
        None,
    ),
)

#: Hidden, relabelled and pre-filled standard fields of the connection form. ``extra`` stays
#: visible: Airflow 2.11's form script sets up its JSON editor only on a visible extra, and without
#: that editor the form's Test button fails in the browser (for every type while BLIP-2 is the first).
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["login", "schema", "port"],
    "relabeling": {"host": "API base URL", "password": "API Key"},
    "placeholders": {"host": DEFAULT_BASE_URL, "password": "Eachlabs API key"},
}


def check_positive_number(name: str, value: Any, *, integer: bool = False) -> float:
    """
    Validate a positive setting such as ``request_timeout`` or ``requests_per_minute``.

    :param name: Setting name, for the message.
    :param value: The value, possibly a numeric string from the connection form.
    :param integer: Require a whole number.
    """
    number = parse_seconds(value)
    if number is None or number <= 0 or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise Blip2InputError(f"{name} must be {kind} greater than 0, got {value!r}")
    return number


def normalise_base_url(host: str | None) -> str:
    """
    Return the API base URL for a connection host.

    :param host: ``https://api.eachlabs.ai``, ``api.eachlabs.ai``, ``http://127.0.0.1:8765`` or empty.
    """
    value = (host or "").strip()
    if not value:
        return DEFAULT_BASE_URL
    if "://" not in value:
        value = f"https://{value}"
    value = value.rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Blip2InputError(
            f"connection host must be the API base URL such as {DEFAULT_BASE_URL}, got {redact_url(value)!r}"
        )
    return value


@dataclass(frozen=True)
class ClientSettings:
    """
    Everything the client needs from a connection, validated.

    :param base_url: API base URL, without a trailing slash.
    :param api_key: The API key.
    :param model: Model slug.
    :param model_version: Model version sent with creates.
    :param request_timeout: Seconds to wait for one HTTP answer.
    :param requests_per_minute: Client-side request budget per 60 s.
    :param max_concurrency: Client-side limit of predictions in flight.
    :param rate_window: Seconds of the window ``requests_per_minute`` counts over: 60, except
        against an emulator whose time is scaled (``time_scale * 60``).
    :param redis_conn_id: An Airflow Redis connection holding the deployment-wide budget, or
        ``None`` for a budget per process.
    :param sync_run: ``auto``, ``run`` or ``poll``: see :data:`SYNC_RUN_MODES`.
    :param rate_limit_shape: ``auto``, ``window`` or ``bucket``: see :mod:`~.rate_shape`.
    """

    base_url: str
    api_key: str = field(repr=False)
    model: str = DEFAULT_MODEL
    model_version: str = DEFAULT_MODEL_VERSION
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    requests_per_minute: int = DEFAULT_REQUESTS_PER_MINUTE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    rate_window: float = DEFAULT_RATE_WINDOW
    redis_conn_id: str | None = None
    sync_run: str = SYNC_RUN_AUTO
    rate_limit_shape: str = SHAPE_AUTO

    def with_limits(
        self, *, requests_per_minute: int | None = None, max_concurrency: int | None = None
    ) -> ClientSettings:
        """
        Return these settings with a task's own limits in place of the connection's.

        :param requests_per_minute: Requests per window, or ``None`` for the connection's.
        :param max_concurrency: Predictions in flight, or ``None`` for the connection's.
        """
        return replace(
            self,
            requests_per_minute=self.requests_per_minute
            if requests_per_minute is None
            else _positive_int("requests_per_minute", requests_per_minute),
            max_concurrency=self.max_concurrency
            if max_concurrency is None
            else _positive_int("max_concurrency", max_concurrency),
        )

    @classmethod
    def from_connection_values(
        cls, *, host: str | None, password: str | None, extra: Mapping[str, Any]
    ) -> ClientSettings:
        """
        Build settings from a connection's host, password and extra fields.

        :param host: Base URL; a bare host name gets ``https://``. Empty means the public API.
        :param password: The API key.
        :param extra: The connection's extra fields.
        """

        def value(name: str, default: Any) -> Any:
            return _extra_or_default(extra, name, default)

        return cls(
            base_url=normalise_base_url(host),
            api_key=password or "",
            model=str(extra.get("model") or DEFAULT_MODEL),
            model_version=str(extra.get("model_version") or DEFAULT_MODEL_VERSION),
            request_timeout=check_positive_number(
                "request_timeout", value("request_timeout", DEFAULT_REQUEST_TIMEOUT)
            ),
            requests_per_minute=_positive_int(
                "requests_per_minute", value("requests_per_minute", DEFAULT_REQUESTS_PER_MINUTE)
            ),
            max_concurrency=_positive_int(
                "max_concurrency", value("max_concurrency", DEFAULT_MAX_CONCURRENCY)
            ),
            rate_window=check_positive_number("rate_window", value("rate_window", DEFAULT_RATE_WINDOW)),
            redis_conn_id=str(extra.get("redis_conn_id") or "").strip() or None,
            sync_run=_choice("sync_run", extra.get("sync_run")),
            rate_limit_shape=_choice("rate_limit_shape", extra.get("rate_limit_shape")),
        )


def _choice(name: str, value: Any) -> str:
    """A choice field's value, lower-cased; its default when empty."""
    spec = next(each for each in CONNECTION_FIELDS if each.name == name)
    mode = str(value or spec.default).strip().lower()
    if spec.choices is not None and mode not in spec.choices:
        raise Blip2InputError(
            f"{name} must be one of {', '.join(spec.choices)} ({spec.description.split(';')[0]}), "
            f"got {value!r}: fix the blip2 connection's {spec.label} field"
        )
    return mode


def _positive_int(name: str, value: Any) -> int:
    return int(check_positive_number(name, value, integer=True))


def _extra_or_default(extra: Mapping[str, Any], name: str, default: Any) -> Any:
    """An extra field's value, or ``default`` when it is unset or empty; 0 is kept (and refused)."""
    value = extra.get(name)
    return default if value is None or value == "" else value
