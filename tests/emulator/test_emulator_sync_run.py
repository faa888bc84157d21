"""
The emulator's synchronous run (``POST /v1/prediction/run``), over real HTTP on loopback, with a
local file server for the images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args

KEY = "emulator-key"
HEADERS = {"X-API-Key": KEY}
FAST = 0.05  # a 2 s prediction takes 0.1 s


@pytest.fixture(scope="module")
def image_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    directory: Path = tmp_path_factory.mktemp("run-images")
    Image.new("RGB", (64, 48), (40, 160, 50)).save(directory / "green.png")
    (directory / "notimage.png").write_bytes(b"not an image\n")
    with serve_directory(directory) as base:
        yield lambda name: f"{base}/{name}"


@pytest.fixture
def start() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def factory(**overrides: Any) -> EmulatorServer:
        settings: dict[str, Any] = {"time_scale": FAST, "latency": 2.0, "requests_per_minute": 100_000}
        settings.update(overrides)
        servers.append(EmulatorServer(EmulatorConfig(**settings)).start())
        return servers[-1]

    yield factory
    for server in servers:
        server.stop()


def _run(server: EmulatorServer, image: str, **inputs: Any) -> requests.Response:
    body = {"model": "blip-2", "version": "0.0.1", "input": {"image": image, **inputs}}
    return requests.post(f"{server.url}/v1/prediction/run", json=body, headers=HEADERS, timeout=30)


def test_a_run_answers_when_the_prediction_has_ended(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    server = start()
    answer = _run(server, image_url("green.png"), caption=True)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"status", "message", "predictionID", "output", "error"}
    assert (body["status"], body["message"], body["error"]) == (
        "success",
        "Prediction completed successfully",
        "",
    )
    assert body["output"].startswith("[emulated]")
    read = requests.get(
        f"{server.url}/v1/prediction/{body['predictionID']}", headers=HEADERS, timeout=10
    ).json()
    assert (read["status"], read["output"]) == ("success", body["output"])
    ledger = server.ledger()
    assert (ledger["runs"], ledger["creates"], ledger["requests"]["run"]) == (1, 1, 1)


def test_a_failed_run_says_why(start: Callable[..., EmulatorServer], image_url: Any) -> None:
    body = _run(start(), image_url("notimage.png"), caption=True).json()
    assert body["status"] == "error" and body["error"] and body["predictionID"]


def test_without_sync_run_it_answers_400_and_counts_the_request(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    server = start(sync_run=False)
    answer = _run(server, image_url("green.png"), caption=True)
    assert answer.status_code == 400
    assert "Synchronous execution is not enabled" in answer.json()["error"]
    ledger = server.ledger()
    assert (ledger["requests"]["run"], ledger["creates"], ledger["runs"]) == (1, 0, 0)


def test_an_invalid_input_answers_400_with_the_input_message(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    answer = _run(start(), image_url("green.png"), temperature=3)
    assert answer.status_code == 400
    assert "temperature" in answer.json()["error"] and "Synchronous" not in answer.json()["error"]


def test_a_run_past_its_wait_answers_processing_with_an_id_to_poll(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    server = start(latency=20.0, sync_run_max_wait=4.0)  # 1 s predictions, 0.2 s of waiting
    body = _run(server, image_url("green.png"), caption=True).json()
    assert (body["status"], body["output"], body["message"]) == (
        "processing",
        None,
        "Prediction is still running",
    )
    url = f"{server.url}/v1/prediction/{body['predictionID']}"
    for _ in range(100):
        read = requests.get(url, headers=HEADERS, timeout=10).json()
        if read["status"] == "success":
            break
        import time

        time.sleep(0.05)
    assert read["status"] == "success"


def test_runs_count_against_the_predictions_in_flight(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    server = start(latency=20.0, sync_run_max_wait=0.0, max_in_flight=1)
    assert _run(server, image_url("green.png"), caption=True).json()["status"] in ("created", "processing")
    refused = _run(server, image_url("green.png"), caption=True)
    assert refused.status_code == 429 and "in flight" in refused.json()["error"]


def test_a_dropped_run_has_created_its_prediction(
    start: Callable[..., EmulatorServer], image_url: Any
) -> None:
    server = start(fault_drop=1.0, fault_endpoints=("run",))
    with pytest.raises(requests.ConnectionError):
        _run(server, image_url("green.png"), caption=True)
    ledger = server.ledger()
    assert (ledger["drops_injected"], ledger["creates"], ledger["runs"]) == (1, 1, 1)


def test_the_command_line_turns_the_synchronous_run_off() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args([])).sync_run is True
    config = config_from_args(parser.parse_args(["--no-sync-run", "--sync-run-max-wait", "5"]))
    assert (config.sync_run, config.sync_run_max_wait) == (False, 5.0)
