"""
Tests of the emulator's synchronous run (``POST /v1/prediction/run``): they start the emulator over
real HTTP on loopback, with a local file server for the images, as ``test_emulator`` does.

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import requests

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args
from tests.emulator import test_emulator as base
from tests.emulator.test_emulator import FAST, HEADERS, ServerFactory, create, is_uuid, wait_terminal

# The fixtures of test_emulator: the image files, their file server and the emulator factory.
image_dir = base.image_dir
files = base.files
make_server = base.make_server

REFUSAL = "Synchronous execution is not enabled for model blip-2: create the prediction and poll it"


def run_body(image: str, **inputs: Any) -> dict[str, Any]:
    """The body of a synchronous run of one image."""
    return {"model": "blip-2", "version": "0.0.1", "input": {"image": image, **inputs}}


def run(
    server: EmulatorServer, image: str, path: str = "/v1/prediction/run", **inputs: Any
) -> httpx.Response:
    """Send a synchronous run and return its answer."""
    return httpx.post(f"{server.url}{path}", json=run_body(image, **inputs), headers=HEADERS, timeout=10)


def run_in_thread(server: EmulatorServer, image: str) -> tuple[threading.Thread, list[httpx.Response]]:
    """Send a synchronous run from a thread; its answer lands in the returned list."""
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(run(server, image, caption=True)))
    thread.start()
    return thread, answers


def wait_created(server: EmulatorServer, count: int = 1) -> list[str]:
    """Wait until the emulator holds ``count`` predictions and return their ids."""
    deadline = time.monotonic() + 2
    while len(server.app.emulator.predictions) < count:
        assert time.monotonic() < deadline, "the run created no prediction"
        time.sleep(0.005)
    return list(server.app.emulator.predictions)


# ---- answers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/prediction/run", "/v1/prediction/run/"])
def test_a_run_answers_when_the_prediction_has_ended(
    make_server: ServerFactory, files: str, path: str
) -> None:
    server = make_server()
    answer = run(server, f"{files}/green.png", path=path, caption=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"status", "message", "predictionID", "output", "error"}
    assert (body["status"], body["message"], body["error"]) == (
        "success",
        "Prediction completed successfully",
        "",
    )
    assert is_uuid(body["predictionID"])
    assert body["output"].startswith("[emulated]")
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        read = http.get(f"/v1/prediction/{body['predictionID']}").json()
    assert (read["status"], read["output"]) == ("success", body["output"])
    ledger = server.ledger()
    assert (ledger["runs"], ledger["creates"], ledger["requests"]) == (1, 1, {"run": 1, "get": 1})


def test_a_failed_run_says_why(make_server: ServerFactory, files: str) -> None:
    server = make_server()
    body = run(server, f"{files}/notimage.png", caption=True).json()
    assert (body["status"], body["message"]) == ("error", "Prediction failed")
    assert body["output"]["error_code"] == "INPUT_VALIDATION_ERROR"
    assert body["error"] == body["output"]["error_message"]
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        assert http.get(f"/v1/prediction/{body['predictionID']}").json()["output"] == body["output"]


def test_legacy_spelling_of_a_run(make_server: ServerFactory, files: str) -> None:
    body = run(make_server(spelling="legacy"), f"{files}/green.png", caption=True).json()
    assert (body["status"], body["error"]) == ("completed", "")


# ---- refusals and limits ---------------------------------------------------------------------------


def test_without_sync_run_it_answers_400_after_admission(make_server: ServerFactory, files: str) -> None:
    server = make_server(sync_run=False, requests_per_minute=2)
    unauthenticated = httpx.post(f"{server.url}/v1/prediction/run", json=run_body(f"{files}/green.png"))
    assert unauthenticated.status_code == 401
    refused = run(server, f"{files}/green.png", caption=True)
    assert refused.status_code == 400
    assert refused.json() == {"status": "error", "error": REFUSAL}
    run(server, f"{files}/green.png", caption=True)
    # the two refusals filled the window of two requests
    assert run(server, f"{files}/green.png", caption=True).status_code == 429
    ledger = server.ledger()
    assert (ledger["requests"]["run"], ledger["creates"], ledger["runs"]) == (4, 0, 0)
    assert ledger["responses_by_status"] == {"400": 2, "401": 1, "429": 1}


def test_an_invalid_input_answers_400_with_the_input_message(make_server: ServerFactory, files: str) -> None:
    server = make_server()
    answer = run(server, f"{files}/green.png", temperature=3)
    assert answer.status_code == 400
    assert "temperature" in answer.json()["error"]
    assert answer.json()["error"] != REFUSAL
    assert server.ledger()["creates"] == 0


def test_runs_count_against_the_predictions_in_flight(make_server: ServerFactory, files: str) -> None:
    server = make_server(latency=20.0, sync_run_max_wait=0.0, max_in_flight=1)  # 1 s predictions
    first = run(server, f"{files}/green.png", caption=True).json()
    assert first["status"] == "processing"
    refused = run(server, f"{files}/green.png", caption=True)
    assert refused.status_code == 429
    assert refused.json()["error"] == "too many predictions in flight (limit 1)"
    assert 0 < float(refused.headers["retry-after"]) <= 1.0
    assert server.ledger()["runs"] == 1


def test_a_run_past_its_wait_answers_processing_with_an_id_to_poll(
    make_server: ServerFactory, files: str
) -> None:
    server = make_server(latency=20.0, sync_run_max_wait=4.0)  # 1 s predictions, 0.2 s of waiting
    started = time.monotonic()
    body = run(server, f"{files}/green.png", caption=True).json()
    assert 0.2 <= time.monotonic() - started < 0.9
    assert body == {
        "status": "processing",
        "message": "Prediction is still running",
        "predictionID": body["predictionID"],
        "output": None,
        "error": "",
    }
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        read = wait_terminal(http, body["predictionID"])
    assert read["status"] == "success"
    assert read["output"].startswith("[emulated]")


def test_a_cancel_ends_the_wait(make_server: ServerFactory, files: str) -> None:
    server = make_server(latency=40.0)  # 2 s predictions; a run waits up to 3 s
    started = time.monotonic()
    thread, answers = run_in_thread(server, f"{files}/green.png")
    [prediction_id] = wait_created(server)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        assert http.post(f"/v1/prediction/{prediction_id}/cancel").status_code == 200
    thread.join(5)
    assert time.monotonic() - started < 1.5
    body = answers[0].json()
    assert (body["status"], body["message"], body["predictionID"]) == (
        "cancelled",
        "Prediction was cancelled",
        prediction_id,
    )
    assert body["output"] is None and body["error"]


def test_a_reset_ends_the_wait(make_server: ServerFactory, files: str) -> None:
    server = make_server(latency=40.0)
    started = time.monotonic()
    thread, answers = run_in_thread(server, f"{files}/green.png")
    wait_created(server)
    server.reset()
    thread.join(5)
    assert time.monotonic() - started < 1.5
    assert answers[0].json()["status"] == "processing"


def test_the_ledger_counts_runs_among_the_creates(make_server: ServerFactory, files: str) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        create(http, f"{files}/green.png", caption=True)
    run(server, f"{files}/green.png", caption=True)
    run(server, f"{files}/blue.jpg", question="What colour is it?")
    ledger = server.ledger()
    assert (ledger["creates"], ledger["runs"]) == (3, 2)
    assert (ledger["requests"]["create"], ledger["requests"]["run"]) == (1, 2)
    assert ledger["creates_by_input"] == {"green.png|caption": 2, "blue.jpg|What colour is it?": 1}


# ---- faults ----------------------------------------------------------------------------------------


def test_a_dropped_run_drops_after_its_prediction_ended(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_drop=1.0, fault_endpoints=("run",))
    body = run_body(f"{files}/green.png", caption=True)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"{server.url}/v1/prediction/run", json=body, headers=HEADERS, timeout=5)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/v1/prediction/run", json=body, headers=HEADERS, timeout=5)
    ledger = server.ledger()
    assert (ledger["drops_injected"], ledger["creates"], ledger["runs"]) == (2, 2, 2)
    assert ledger["statuses"]["success"] == 2  # both had ended before their connection was dropped
    assert ledger["in_flight"] == 0


def test_fault_created_5xx_answers_a_run_500_after_creating(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_created_5xx=1.0)
    answer = run(server, f"{files}/green.png", caption=True)
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal server error"}
    [prediction_id] = list(server.app.emulator.predictions)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        assert wait_terminal(http, prediction_id)["status"] == "success"  # it ran, unknown to the client
    ledger = server.ledger()
    assert (ledger["creates"], ledger["runs"], ledger["created_5xx_injected"]) == (1, 1, 1)


def test_request_faults_hit_a_run_as_a_create(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_5xx=1.0, fault_endpoints=("run",))
    assert run(server, f"{files}/green.png", caption=True).status_code in {500, 502, 503}
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        create(http, f"{files}/green.png")  # faults restricted to runs leave creates alone
    server.config.fault_5xx, server.config.fault_429 = 0.0, 1.0
    throttled = run(server, f"{files}/green.png", caption=True)
    assert throttled.status_code == 429
    assert float(throttled.headers["retry-after"]) == pytest.approx(FAST)
    ledger = server.ledger()
    assert (ledger["creates"], ledger["runs"]) == (1, 0)
    assert (ledger["responses_5xx_injected"], ledger["responses_429_injected"]) == (1, 1)


# ---- configuration ---------------------------------------------------------------------------------


def test_the_command_line_turns_the_synchronous_run_off() -> None:
    parser = build_parser()
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.sync_run, defaults.sync_run_max_wait) == (True, 60.0)
    config = config_from_args(
        parser.parse_args(["--no-sync-run", "--sync-run-max-wait", "5", "--fault-endpoint", "run"])
    )
    assert (config.sync_run, config.sync_run_max_wait, config.fault_endpoints) == (False, 5.0, ("run",))


def test_config_validation_of_the_synchronous_run() -> None:
    with pytest.raises(ValueError, match="sync_run_max_wait"):
        EmulatorConfig(sync_run_max_wait=-1.0)
