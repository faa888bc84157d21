"""
Where the emulator's 429 answers carry their wait, and faults restricted to some endpoints.

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args

KEY = "emulator-key"
FAST = 0.05


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a small PNG on a local file server."""
    directory: Path = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (40, 160, 50)).save(directory / "green.png")
    with serve_directory(directory) as base_url:
        yield f"{base_url}/green.png"


def serve(**settings: Any) -> EmulatorServer:
    """A started emulator at a fast time scale."""
    return EmulatorServer(EmulatorConfig(time_scale=FAST, **settings)).start()


def create(http: httpx.Client, image: str) -> httpx.Response:
    return http.post("/v1/prediction/", json={"model": "blip-2", "input": {"image": image, "caption": True}})


def rate_limited(**settings: Any) -> httpx.Response:
    """The 429 answer of the second model read of an emulator allowing one request a minute."""
    server = serve(requests_per_minute=1, **settings)
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=10) as http:
            assert http.get("/v1/model", params={"slug": "blip-2"}).status_code == 200
            response = http.get("/v1/model", params={"slug": "blip-2"})
    finally:
        server.stop()
    assert response.status_code == 429
    return response


def test_by_default_a_429_carries_both_header_and_body() -> None:
    response = rate_limited()
    assert float(response.headers["retry-after"]) == response.json()["retry_after"]


def test_body_only_retry_after_keeps_the_current_spellings() -> None:
    response = rate_limited(retry_after_in="body")
    assert "retry-after" not in response.headers
    body = response.json()
    assert 0 < body["retry_after"] <= 3.0
    assert body["error"] == "too many requests"


def test_header_only_retry_after() -> None:
    response = rate_limited(retry_after_in="header")
    assert float(response.headers["retry-after"]) > 0
    assert "retry_after" not in response.json()


def test_legacy_spelling_answers_with_the_body_only_whatever_the_place() -> None:
    response = rate_limited(retry_after_in="header", spelling="legacy")
    assert "retry-after" not in response.headers
    assert set(response.json()) == {"retry_after"}


def test_injected_429_follows_the_place_too(image: str) -> None:
    server = serve(fault_429=1.0, retry_after_in="body")
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=10) as http:
            response = create(http, image)
    finally:
        server.stop()
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.json()["retry_after"] == pytest.approx(FAST)


def test_faults_restricted_to_reads_spare_creates(image: str) -> None:
    server = serve(fault_5xx=1.0, fault_endpoints=("get",))
    try:
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=10) as http:
            created = create(http, image)
            assert created.status_code == 200, created.text
            read = http.get(f"/v1/prediction/{created.json()['predictionID']}")
            model = http.get("/v1/model", params={"slug": "blip-2"})
        ledger = server.ledger()
    finally:
        server.stop()
    assert read.status_code in (500, 502, 503)
    assert model.status_code == 200
    assert ledger["creates"] == 1
    assert ledger["responses_5xx_injected"] == 1


def test_restricting_faults_keeps_the_seeded_sequence() -> None:
    every = EmulatorServer(EmulatorConfig(seed=7, fault_5xx=0.5)).app.emulator
    reads_only = EmulatorServer(EmulatorConfig(seed=7, fault_5xx=0.5, fault_endpoints=("get",))).app.emulator
    assert [every.draw_faults() for _ in range(20)] == [reads_only.draw_faults() for _ in range(20)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"retry_after_in": "footer"}, "retry_after_in must be one of both, header, body"),
        ({"fault_endpoints": ("get", "upload")}, "fault_endpoints must be among"),
    ],
)
def test_invalid_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmulatorConfig(**settings)


def test_a_single_endpoint_name_is_accepted() -> None:
    config = EmulatorConfig(fault_endpoints="get")  # type: ignore[arg-type]
    assert config.fault_endpoints == ("get",)
    assert config.faults_hit("get") and not config.faults_hit("create")
    assert EmulatorConfig().faults_hit("create")


def test_cli_options() -> None:
    defaults = config_from_args(build_parser().parse_args([]))
    assert (defaults.retry_after_in, defaults.fault_endpoints) == ("both", ())
    args = build_parser().parse_args(
        ["--retry-after-in", "body", "--fault-endpoint", "get", "--fault-endpoint", "cancel"]
    )
    config = config_from_args(args)
    assert config.retry_after_in == "body"
    assert config.fault_endpoints == ("get", "cancel")
