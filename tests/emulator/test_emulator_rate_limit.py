"""
The emulator's three rate limits: a sliding window, a token bucket (``--rate-limit bucket``) and a
fixed window (``--rate-limit fixed``).

Starts: the emulator over HTTP on loopback.
"""

from __future__ import annotations

import time

import httpx
import pytest

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args
from airflow_provider_blip2.emulator.state import RateLimiter

KEY = "emulator-key"


def test_the_bucket_refills_one_request_an_interval_where_the_window_waits_for_its_oldest() -> None:
    bucket, window = RateLimiter(), RateLimiter()
    for _ in range(3):
        assert bucket.acquire("k", 0.0, 3, 60.0, "bucket") is None
        assert window.acquire("k", 0.0, 3, 60.0) is None
    assert bucket.acquire("k", 0.0, 3, 60.0, "bucket") == pytest.approx(20.0)
    assert window.acquire("k", 0.0, 3, 60.0) == pytest.approx(60.0)
    assert bucket.acquire("k", 20.0, 3, 60.0, "bucket") is None
    assert bucket.acquire("k", 20.0, 3, 60.0, "bucket") == pytest.approx(20.0)
    assert window.acquire("k", 20.0, 3, 60.0) == pytest.approx(40.0)
    assert bucket.acquire("k", 200.0, 3, 60.0, "bucket") is None  # full again: three at once
    assert bucket.acquire("k", 200.0, 3, 60.0, "bucket") is None
    assert bucket.acquire("k", 200.0, 3, 60.0, "bucket") is None
    assert bucket.acquire("k", 200.0, 3, 60.0, "bucket") is not None


def test_a_fixed_window_starts_afresh_at_each_multiple_of_its_length() -> None:
    fixed = RateLimiter()
    for _ in range(3):
        assert fixed.acquire("k", 118.0, 3, 60.0, "fixed") is None
    assert fixed.acquire("k", 119.0, 3, 60.0, "fixed") == pytest.approx(1.0)  # until 120 s
    assert fixed.acquire("other", 119.0, 3, 60.0, "fixed") is None  # one count per key
    for _ in range(3):  # a new window: three more within 2 s of the last three
        assert fixed.acquire("k", 120.0, 3, 60.0, "fixed") is None
    assert fixed.acquire("k", 179.5, 3, 60.0, "fixed") == pytest.approx(0.5)
    fixed.clear()
    assert fixed.acquire("k", 179.5, 3, 60.0, "fixed") is None


def test_a_bucket_over_http_admits_one_more_each_interval_and_says_how_long_to_wait() -> None:
    # 6 requests per 1.2 s: a token every 0.2 s.
    server = EmulatorServer(
        EmulatorConfig(time_scale=0.02, requests_per_minute=6, rate_limit="bucket")
    ).start()
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as http:
            codes = [http.get("/v1/model", params={"slug": "blip-2"}).status_code for _ in range(7)]
            limited = http.get("/v1/model", params={"slug": "blip-2"})
            wait = limited.json()["retry_after"]
            time.sleep(wait)
            after = http.get("/v1/model", params={"slug": "blip-2"}).status_code
        assert codes[:6] == [200] * 6 and codes[6] == 429
        assert limited.status_code == 429 and 0 < wait <= 1.0
        assert after == 200
        assert server.ledger()["responses_429"] == 2
    finally:
        server.stop()


def test_the_command_line_chooses_the_rate_limit() -> None:
    assert config_from_args(build_parser().parse_args([])).rate_limit == "window"
    assert config_from_args(build_parser().parse_args(["--rate-limit", "bucket"])).rate_limit == "bucket"
    assert config_from_args(build_parser().parse_args(["--rate-limit", "fixed"])).rate_limit == "fixed"
    with pytest.raises(ValueError, match="rate_limit must be one of window, bucket, fixed"):
        EmulatorConfig(rate_limit="leaky")
