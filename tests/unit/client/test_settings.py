"""
Unit tests of the client: the connection settings.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_blip2.client.budget import (
    RequestBudget,
)
from airflow_provider_blip2.client.errors import (
    Blip2InputError,
)
from airflow_provider_blip2.client.settings import (
    CONNECTION_FIELDS,
    DEFAULT_BASE_URL,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MODEL,
    DEFAULT_MODEL_VERSION,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_REQUESTS_PER_MINUTE,
    ClientSettings,
)
from airflow_provider_blip2.get_provider_info import CONN_FIELDS
from tests.unit.client.helpers import (
    FakeClock,
)


# --------------------------------------------------------------------------------------------------
# ClientSettings
# --------------------------------------------------------------------------------------------------
def test_settings_defaults() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="sekrit-api-key", extra={})
    assert settings == ClientSettings(
        base_url=DEFAULT_BASE_URL,
        api_key="sekrit-api-key",
        model=DEFAULT_MODEL,
        model_version=DEFAULT_MODEL_VERSION,
        request_timeout=DEFAULT_REQUEST_TIMEOUT,
        requests_per_minute=DEFAULT_REQUESTS_PER_MINUTE,
        max_concurrency=DEFAULT_MAX_CONCURRENCY,
        rate_window=60.0,
    )
    assert (settings.requests_per_minute, settings.max_concurrency) == (60, 10)
    assert "sekrit" not in repr(settings)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, DEFAULT_BASE_URL),
        ("", DEFAULT_BASE_URL),
        ("   ", DEFAULT_BASE_URL),
        ("api.eachlabs.ai", "https://api.eachlabs.ai"),
        ("api.eachlabs.ai/", "https://api.eachlabs.ai"),
        ("https://api.eachlabs.ai/", "https://api.eachlabs.ai"),
        ("https://api.eachlabs.ai///", "https://api.eachlabs.ai"),
        ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
        (" http://127.0.0.1:8765/ ", "http://127.0.0.1:8765"),
        ("https://proxy.example.com/eachlabs/", "https://proxy.example.com/eachlabs"),
    ],
)
def test_settings_base_url(host: str | None, expected: str) -> None:
    settings = ClientSettings.from_connection_values(host=host, password="k", extra={})
    assert settings.base_url == expected


@pytest.mark.parametrize("host", ["ftp://api.eachlabs.ai", "s3://bucket", "file:///etc/hosts"])
def test_settings_refuse_non_http_host(host: str) -> None:
    with pytest.raises(Blip2InputError, match="connection host"):
        ClientSettings.from_connection_values(host=host, password="k", extra={})


def test_settings_from_extra_strings() -> None:
    extra = {
        "model": "blip-2-custom",
        "model_version": "0.0.2",
        "request_timeout": "12.5",
        "requests_per_minute": "120",
        "max_concurrency": "3",
    }
    settings = ClientSettings.from_connection_values(host="h.example.com", password="k", extra=extra)
    assert settings.model == "blip-2-custom"
    assert settings.model_version == "0.0.2"
    assert settings.request_timeout == 12.5
    assert settings.requests_per_minute == 120
    assert isinstance(settings.requests_per_minute, int)
    assert settings.max_concurrency == 3
    assert isinstance(settings.max_concurrency, int)
    assert settings.rate_window == 60.0


def test_settings_rate_window() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={"rate_window": "3"})
    assert settings.rate_window == 3.0
    assert (
        ClientSettings.from_connection_values(host=None, password="k", extra={"rate_window": 0.6}).rate_window
        == 0.6
    )


@pytest.mark.parametrize("empty", [None, ""])
def test_settings_empty_extra_fields_mean_default(empty: Any) -> None:
    names = ("model", "request_timeout", "requests_per_minute", "max_concurrency", "rate_window")
    settings = ClientSettings.from_connection_values(
        host=None, password="k", extra={name: empty for name in names}
    )
    assert settings.rate_window == 60.0
    assert settings.model == DEFAULT_MODEL
    assert settings.request_timeout == DEFAULT_REQUEST_TIMEOUT
    assert settings.requests_per_minute == DEFAULT_REQUESTS_PER_MINUTE
    assert settings.max_concurrency == DEFAULT_MAX_CONCURRENCY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("requests_per_minute", 0),
        ("requests_per_minute", "0"),
        ("requests_per_minute", "abc"),
        ("requests_per_minute", -5),
        ("requests_per_minute", 1.5),
        ("requests_per_minute", "nan"),
        ("requests_per_minute", True),
        ("max_concurrency", 0),
        ("max_concurrency", "many"),
        ("max_concurrency", 2.5),
        ("request_timeout", 0),
        ("request_timeout", "-1"),
        ("request_timeout", "soon"),
        ("request_timeout", "inf"),
        ("rate_window", 0),
        ("rate_window", "-3"),
        ("rate_window", "a minute"),
    ],
)
def test_settings_invalid_values_name_the_field(name: str, value: Any) -> None:
    with pytest.raises(Blip2InputError) as caught:
        ClientSettings.from_connection_values(host=None, password="k", extra={name: value})
    message = str(caught.value)
    assert message.startswith(name)
    assert "greater than 0" in message
    assert repr(value) in message


def test_budget_hands_recent_requests_to_another_process() -> None:
    clock = FakeClock()
    worker = RequestBudget(3, 10, window=60.0, clock=clock)
    for _ in range(3):
        assert worker.reserve_request() == 0
        worker.request_done()
    handed = worker.recent_requests()
    assert len(handed) == 3
    triggerer = RequestBudget(3, 10, window=60.0, clock=FakeClock(clock.now))
    triggerer.note_requests(handed)
    assert triggerer.reserve_request() > 0  # the window is full across the handover
    # Noting the same requests twice (both sides in one process) does not count them twice.
    worker.note_requests(handed)
    assert len(worker.recent_requests()) == 3


def test_budget_forgets_handed_requests_older_than_the_window() -> None:
    import time

    budget = RequestBudget(1, 10, window=60.0)
    budget.note_requests([time.time() - 61.0])
    assert budget.reserve_request() == 0


def test_settings_with_own_limits() -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={})
    own = settings.with_limits(requests_per_minute=30, max_concurrency=None)
    assert (own.requests_per_minute, own.max_concurrency) == (30, settings.max_concurrency)
    with pytest.raises(Blip2InputError, match="max_concurrency"):
        settings.with_limits(max_concurrency=0)


def test_connection_fields_are_the_one_source_of_the_defaults() -> None:
    defaults = {field.name: field.default for field in CONNECTION_FIELDS}
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={})
    assert defaults == {
        "model": settings.model,
        "model_version": settings.model_version,
        "request_timeout": settings.request_timeout,
        "requests_per_minute": settings.requests_per_minute,
        "max_concurrency": settings.max_concurrency,
        "redis_conn_id": settings.redis_conn_id,
        "sync_run": settings.sync_run,
        "rate_limit_shape": settings.rate_limit_shape,
    }


@pytest.mark.parametrize("value", ["auto", "WINDOW", " bucket ", None, ""])
def test_rate_limit_shape_is_read_from_the_connection(value: str | None) -> None:
    extra = {"rate_limit_shape": value}
    settings = ClientSettings.from_connection_values(host=None, password="k", extra=extra)
    assert settings.rate_limit_shape == (str(value).strip().lower() if value else "auto")


def test_an_unknown_rate_limit_shape_names_the_field_and_the_choices() -> None:
    pattern = r"rate_limit_shape must be one of auto, window, bucket.*got 'leaky'.*Rate limit shape field"
    with pytest.raises(Blip2InputError, match=pattern):
        ClientSettings.from_connection_values(host=None, password="k", extra={"rate_limit_shape": "leaky"})


@pytest.mark.parametrize("value", ["auto", "RUN", " poll ", None, ""])
def test_sync_run_mode_is_read_from_the_connection(value: str | None) -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={"sync_run": value})
    assert settings.sync_run == (str(value).strip().lower() if value else "auto")


def test_an_unknown_sync_run_mode_names_the_field_and_the_choices() -> None:
    with pytest.raises(Blip2InputError, match=r"sync_run must be one of auto, run, poll.*got 'always'"):
        ClientSettings.from_connection_values(host=None, password="k", extra={"sync_run": "always"})
    assert {field.name: field.to_provider_info() for field in CONNECTION_FIELDS} == CONN_FIELDS
    assert CONN_FIELDS["requests_per_minute"]["schema"] == {
        "type": ["integer", "null"],
        "default": 60,
        "minimum": 1,
    }


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("", None), ("  ", None), (" redis_x ", "redis_x")]
)
def test_redis_conn_id_is_optional(value: str | None, expected: str | None) -> None:
    settings = ClientSettings.from_connection_values(host=None, password="k", extra={"redis_conn_id": value})
    assert settings.redis_conn_id == expected
