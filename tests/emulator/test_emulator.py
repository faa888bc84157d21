"""
Tests of the Eachlabs API emulator, over real HTTP on loopback.

Starts: the emulator over HTTP on loopback, a local file server for the images, and the emulator's
command line in a process of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from PIL import Image

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, create_app, serve_directory
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args

KEY = "emulator-key"
HEADERS = {"X-API-Key": KEY}
FAST = 0.05  # time scale of most tests: a 2 s prediction takes 0.1 s
POLLING_BUDGET = 100_000  # requests per minute for tests that poll fast; the rate-limit tests set their own
TERMINAL = {"success", "error", "cancelled"}

ServerFactory = Callable[..., EmulatorServer]


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of small images and a file that is not an image."""
    directory = tmp_path_factory.mktemp("images")
    Image.new("RGB", (512, 342), (40, 160, 50)).save(directory / "green.png")
    Image.new("RGB", (300, 400), (30, 70, 220)).save(directory / "blue.jpg", quality=90)
    Image.new("RGB", (64, 64), (210, 30, 30)).save(directory / "red.webp")
    Image.new("RGB", (32, 32), (240, 220, 40)).save(directory / "yellow.gif")
    (directory / "notimage.png").write_bytes(b"this is not an image\n")
    return directory


@pytest.fixture(scope="module")
def files(image_dir: Path) -> Iterator[str]:
    """Base URL of a local file server of ``image_dir``."""
    with serve_directory(image_dir) as base_url:
        yield base_url


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """A factory of started emulator servers (fast time scale by default), stopped after the test."""
    servers: list[EmulatorServer] = []

    def factory(**overrides: Any) -> EmulatorServer:
        settings: dict[str, Any] = {"time_scale": FAST, "latency": 2.0, "requests_per_minute": POLLING_BUDGET}
        settings.update(overrides)
        server = EmulatorServer(EmulatorConfig(**settings)).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[EmulatorServer]:
    """One emulator with default limits and a fast time scale, shared by the tests of this module."""
    config = EmulatorConfig(time_scale=FAST, latency=2.0, requests_per_minute=POLLING_BUDGET)
    with EmulatorServer(config) as emulator:
        yield emulator


@pytest.fixture
def server(shared_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator, reset before the test; config changes of the test are undone after it."""
    saved = dataclasses.asdict(shared_server.config)
    shared_server.reset()
    yield shared_server
    for name, value in saved.items():
        setattr(shared_server.config, name, value)


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    """An httpx client of ``server`` sending the API key."""
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=10) as http:
        yield http


# ---- helpers ---------------------------------------------------------------------------------------


def create(http: httpx.Client, image: str, **inputs: Any) -> str:
    """Create a prediction and return its id."""
    response = http.post(
        "/v1/prediction/", json={"model": "blip-2", "version": "0.0.1", "input": {"image": image, **inputs}}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["predictionID"])


def wait_terminal(http: httpx.Client, prediction_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """Poll a prediction until it is terminal, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/v1/prediction/{prediction_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.01)
    raise AssertionError(f"prediction {prediction_id} not terminal after {timeout} s")


def predict(http: httpx.Client, image: str, **inputs: Any) -> dict[str, Any]:
    """Create a prediction and wait for its terminal state."""
    return wait_terminal(http, create(http, image, **inputs))


def is_uuid(value: str | None) -> bool:
    """Whether a value is a canonical uuid."""
    try:
        return str(uuid.UUID(str(value))) == value
    except ValueError:
        return False


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- model record and auth -------------------------------------------------------------------------


def test_model_record_accepts_both_auth_headers(server: EmulatorServer) -> None:
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        response = httpx.get(f"{server.url}/v1/model", params={"slug": "blip-2"}, headers=headers)
        assert response.status_code == 200
        assert is_uuid(response.headers["x-request-id"])
        record = response.json()
        assert record["slug"] == "blip-2"
        schema = record["request_schema"]
        assert schema["required"] == ["image"]
        properties = schema["properties"]
        assert properties["question"]["default"] == "What is this a picture of?"
        assert properties["caption"] == {**properties["caption"], "type": "boolean", "default": False}
        assert properties["temperature"]["minimum"] == 0.5
        assert properties["temperature"]["maximum"] == 1.0
        assert set(properties) == {
            "image",
            "caption",
            "question",
            "context",
            "use_nucleus_sampling",
            "temperature",
        }


def test_model_record_errors(client: httpx.Client) -> None:
    unknown = client.get("/v1/model", params={"slug": "gpt-9"})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "model not found"}
    missing = client.get("/v1/model")
    assert missing.status_code == 400
    assert "slug" in missing.json()["error"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"X-API-Key": "wrong"}, "invalid API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        ({"Authorization": f"Basic {KEY}"}, "invalid API key"),
    ],
)
def test_auth_errors(server: EmulatorServer, headers: dict[str, str], message: str) -> None:
    for method, path in (
        ("GET", "/v1/model?slug=blip-2"),
        ("POST", "/v1/prediction/"),
        ("GET", f"/v1/prediction/{uuid.uuid4()}"),
        ("POST", f"/v1/prediction/{uuid.uuid4()}/cancel"),
    ):
        response = httpx.request(method, server.url + path, headers=headers, json={"model": "blip-2"})
        assert response.status_code == 401, path
        assert response.json() == {"error": message}
        assert is_uuid(response.headers["x-request-id"])
    assert server.ledger()["responses_401"] == 4


def test_request_ids_are_unique(client: httpx.Client) -> None:
    ids = {client.get("/v1/model", params={"slug": "blip-2"}).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


# ---- create validation -----------------------------------------------------------------------------


def test_create_with_and_without_trailing_slash(client: httpx.Client, files: str) -> None:
    for path in ("/v1/prediction/", "/v1/prediction"):
        response = client.post(path, json={"model": "blip-2", "input": {"image": f"{files}/green.png"}})
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "success"
        assert body["message"] == "Prediction created successfully"
        assert is_uuid(body["predictionID"])
        assert is_uuid(response.headers["x-request-id"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": {"image": "http://127.0.0.1/a.png"}}, "model"),
        ({"model": "blip-2"}, "input"),
        ({"model": "blip-2", "input": "http://127.0.0.1/a.png"}, "input"),
        ({"model": "blip-2", "input": {}}, "input.image"),
        ({"model": "blip-2", "input": {"image": 42}}, "input.image"),
        ({"model": "blip-2", "input": {"image": "file:///etc/passwd"}}, "input.image"),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "caption": "yes"}},
            "input.caption",
        ),
        ({"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "question": 5}}, "input.question"),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "context": ["q"]}},
            "input.context",
        ),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "use_nucleus_sampling": 1}},
            "input.use_nucleus_sampling",
        ),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "temperature": 0.2}},
            "input.temperature",
        ),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "temperature": "hot"}},
            "input.temperature",
        ),
        (
            {"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "temperature": True}},
            "input.temperature",
        ),
        ({"model": "blip-2", "input": {"image": "http://127.0.0.1/a.png", "prompt": "x"}}, "input.prompt"),
    ],
)
def test_create_rejects_invalid_input(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/prediction/", json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["status"] == "error"
    assert field in payload["error"]
    assert client.get("/_emulator/ledger").json()["creates"] == 0


def test_create_unknown_model_and_malformed_json(client: httpx.Client) -> None:
    unknown = client.post(
        "/v1/prediction/", json={"model": "blip-3", "input": {"image": "http://127.0.0.1/a.png"}}
    )
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "model not found"}
    for raw in (b'{"model": "blip-2", ', b"", b"\xff\xfe"):
        malformed = client.post("/v1/prediction/", content=raw, headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422
        assert "malformed JSON" in malformed.json()["error"]
    not_object = client.post("/v1/prediction/", json=["blip-2"])
    assert not_object.status_code == 400


@pytest.mark.parametrize("temperature", ["1", 1, 0.5, "0.75"])
def test_create_accepts_numeric_temperature(client: httpx.Client, files: str, temperature: Any) -> None:
    inputs = {"image": f"{files}/green.png", "use_nucleus_sampling": True, "temperature": temperature}
    response = client.post("/v1/prediction/", json={"model": "blip-2", "version": "0.0.1", "input": inputs})
    assert response.status_code == 200


# ---- processing ------------------------------------------------------------------------------------


def test_status_progression_to_success(make_server: ServerFactory, files: str) -> None:
    server = make_server(time_scale=0.25)  # 0.5 s prediction, 0.05 s in "created"
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        prediction_id = create(http, f"{files}/green.png", caption=True)
        seen: list[str] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            response = http.get(f"/v1/prediction/{prediction_id}")
            assert response.status_code == 200, response.text
            body = response.json()
            if not seen or seen[-1] != body["status"]:
                seen.append(body["status"])
            if body["status"] in TERMINAL:
                break
            assert body["output"] is None
            assert body["metrics"] == {"predict_time": 0, "cost": 0}
            time.sleep(0.005)
    assert seen == ["created", "processing", "success"]
    assert body["id"] == prediction_id
    assert body["input"] == {"image": f"{files}/green.png", "caption": True}
    assert body["output"] == "[emulated] a landscape photo, mostly green, 512x342"
    assert 0.3 < body["metrics"]["predict_time"] < 2.0
    assert body["metrics"]["cost"] == pytest.approx(0.0011)
    assert body["urls"] == {
        "get": f"{server.url}/v1/prediction/{prediction_id}",
        "cancel": f"{server.url}/v1/prediction/{prediction_id}/cancel",
    }
    assert "green.png" in body["logs"]


def test_outputs_are_deterministic(client: httpx.Client, files: str, image_dir: Path) -> None:
    question = "Is there a dog in the picture?"
    first = predict(client, f"{files}/green.png", question=question)["output"]
    second = predict(client, f"{files}/green.png", question=question)["output"]
    assert first == second
    digest = hashlib.sha256((image_dir / "green.png").read_bytes() + question.encode()).digest()
    assert first == ("[emulated] yes" if digest[0] % 2 == 0 else "[emulated] no")

    default = predict(client, f"{files}/blue.jpg")["output"]
    assert default == "[emulated] mostly blue, 300x400 (question: What is this a picture of?)"
    colour = predict(client, f"{files}/red.webp", question="What color is the square?")["output"]
    assert colour == "[emulated] red"
    portrait = predict(client, f"{files}/blue.jpg", question="")["output"]
    assert portrait == "[emulated] a portrait photo, mostly blue, 300x400"
    with_context = predict(
        client, f"{files}/green.png", question="Where is it?", context="Question: what? Answer: grass."
    )
    assert with_context["output"] == "[emulated] mostly green, 512x342 (question: Where is it?)"
    assert "prompt: Question: what? Answer: grass. Question: Where is it? Answer:" in with_context["logs"]


def test_download_error_envelope(client: httpx.Client, files: str) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/gone.png"
    for url, name in ((f"{files}/missing.png", "missing.png"), (unreachable, "gone.png")):
        body = predict(client, url)
        assert body["status"] == "error"
        envelope = body["output"]
        assert envelope["error_code"] == "INPUT_DOWNLOAD_ERROR"
        assert envelope["classification"] == {"category": "input"}
        assert envelope["retryable"] is False
        assert name in envelope["error_message"]
        assert envelope["error"]
        assert "INPUT_DOWNLOAD_ERROR" in body["logs"]
        assert body["metrics"]["cost"] == 0


@pytest.mark.parametrize(
    ("name", "detail"), [("notimage.png", "not a decodable image"), ("yellow.gif", "GIF")]
)
def test_validation_error_envelope(client: httpx.Client, files: str, name: str, detail: str) -> None:
    body = predict(client, f"{files}/{name}")
    assert body["status"] == "error"
    envelope = body["output"]
    assert envelope["error_code"] == "INPUT_VALIDATION_ERROR"
    assert envelope["classification"] == {"category": "input"}
    assert envelope["retryable"] is False
    assert detail in envelope["error_message"]
    assert "INPUT_VALIDATION_ERROR" in body["logs"]


def test_image_size_cap(make_server: ServerFactory, files: str) -> None:
    server = make_server(max_image_bytes=200)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        body = predict(http, f"{files}/green.png")
    assert body["output"]["error_code"] == "INPUT_VALIDATION_ERROR"
    assert "200 bytes" in body["output"]["error_message"]


def test_redirects_are_followed(client: httpx.Client, files: str) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"{files}/green.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        body = predict(client, f"http://127.0.0.1:{httpd.server_address[1]}/photo.png", caption=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
    assert body["output"] == "[emulated] a landscape photo, mostly green, 512x342"


def test_presigned_query_string_is_never_echoed(
    client: httpx.Client, files: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"{files}/green.png?X-Amz-Signature=s3cr3t&X-Amz-Credential=k3y"
    body = predict(client, url, caption=True)
    assert body["status"] == "success"
    assert body["input"]["image"] == f"{files}/green.png"
    assert "s3cr3t" not in json.dumps(body)
    ledger = client.get("/_emulator/ledger").json()
    assert ledger["creates_by_input"] == {"green.png|caption": 1}
    assert "s3cr3t" not in json.dumps(ledger)
    failed = predict(client, f"{files}/nothing.png?sig=s3cr3t")
    assert "s3cr3t" not in json.dumps(failed)
    assert caplog.records  # debug logging of every logger (server thread included) was captured ...
    assert "s3cr3t" not in caplog.text  # ... and no line holds the query string


# ---- cancel and read -------------------------------------------------------------------------------


def test_cancel(make_server: ServerFactory, files: str) -> None:
    server = make_server(latency=10.0)  # 0.5 s
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        prediction_id = create(http, f"{files}/green.png")
        cancelled = http.post(f"/v1/prediction/{prediction_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "success"
        assert http.get(f"/v1/prediction/{prediction_id}").json()["status"] == "cancelled"
        time.sleep(0.6)  # past the latency: it must stay cancelled
        body = http.get(f"/v1/prediction/{prediction_id}").json()
        assert body["status"] == "cancelled"
        assert body["output"] is None
        again = http.post(f"/v1/prediction/{prediction_id}/cancel")
        assert again.status_code == 200
        assert "cancelled" in again.json()["message"]

        finished = predict(http, f"{files}/blue.jpg")
        noop = http.post(f"/v1/prediction/{finished['id']}/cancel")
        assert noop.status_code == 200
        assert http.get(f"/v1/prediction/{finished['id']}").json()["status"] == "success"

        unknown = http.post(f"/v1/prediction/{uuid.uuid4()}/cancel")
        assert unknown.status_code == 500
        assert "error" in unknown.json()
    assert server.ledger()["statuses"] == {"success": 1, "error": 0, "cancelled": 1}


def test_get_unknown_or_foreign_prediction(make_server: ServerFactory, files: str) -> None:
    server = make_server(api_keys=("key-a", "key-b"))
    with httpx.Client(base_url=server.url) as http:
        missing = http.get(f"/v1/prediction/{uuid.uuid4()}", headers={"X-API-Key": "key-a"})
        assert missing.status_code == 404
        assert missing.json() == {"error": "prediction not found"}
        created = http.post(
            "/v1/prediction",
            json={"model": "blip-2", "input": {"image": f"{files}/green.png"}},
            headers={"Authorization": "Bearer key-a"},
        )
        prediction_id = created.json()["predictionID"]
        assert http.get(f"/v1/prediction/{prediction_id}", headers={"X-API-Key": "key-b"}).status_code == 404
        assert http.get(f"/v1/prediction/{prediction_id}", headers={"X-API-Key": "key-a"}).status_code == 200


# ---- answers file ----------------------------------------------------------------------------------


def test_answers_file(make_server: ServerFactory, files: str, image_dir: Path, tmp_path: Path) -> None:
    green_sha = hashlib.sha256((image_dir / "green.png").read_bytes()).hexdigest()
    answers = {
        "answers": [
            {"image": green_sha, "question": "What is in the picture?", "output": "a meadow"},
            {"image": "blue.jpg", "question": "caption", "output": "a clear blue sky"},
            {"image": "blue.jpg", "question": "*", "output": "sky"},
            {
                "image": "red.webp",
                "error": {"error_code": "PROVIDER_FAILED", "error_message": "the provider fell over"},
            },
        ]
    }
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    server = make_server(answers_file=str(path))
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        by_sha = predict(http, f"{files}/green.png", question="what is in the picture?")
        assert by_sha["output"] == "a meadow"
        other_question = predict(http, f"{files}/green.png", question="Where is it?")
        assert other_question["output"].startswith("[emulated]")
        assert predict(http, f"{files}/blue.jpg", caption=True)["output"] == "a clear blue sky"
        assert predict(http, f"{files}/blue.jpg?sig=x", question="Anything?")["output"] == "sky"
        failed = predict(http, f"{files}/red.webp", question="Is it red?")
    assert failed["status"] == "error"
    assert failed["output"]["error_code"] == "PROVIDER_FAILED"
    assert failed["output"]["error_message"] == "the provider fell over"
    assert failed["output"]["retryable"] is False
    assert set(failed["output"]) == {"error", "error_code", "error_message", "classification", "retryable"}


def test_invalid_answers_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "answers.json"
    path.write_text(json.dumps({"answers": [{"image": "a.png"}]}))
    with pytest.raises(ValueError, match="output"):
        create_app(EmulatorConfig(answers_file=str(path)))


# ---- limits ----------------------------------------------------------------------------------------


def test_rate_limit_decimal_retry_after(make_server: ServerFactory) -> None:
    server = make_server(requests_per_minute=3, time_scale=0.01)  # window of 0.6 s
    assert server.ledger()["first_admitted_at"] is None
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        before = time.time()
        for _ in range(3):
            assert http.get("/v1/model", params={"slug": "blip-2"}).status_code == 200
        admitted = server.ledger()
        limited = http.get(f"/v1/prediction/{uuid.uuid4()}")
        assert limited.status_code == 429
        header = limited.headers["retry-after"]
        body = limited.json()
        assert body["error"] == "too many requests"
        assert float(header) == body["retry_after"]
        assert 0 < body["retry_after"] <= 0.6
        assert "." in header
        assert server.ledger()["last_admitted_at"] == admitted["last_admitted_at"]  # a 429 is not admitted
        time.sleep(body["retry_after"])
        assert http.get("/v1/model", params={"slug": "blip-2"}).status_code == 200
    ledger = server.ledger()
    assert before <= admitted["first_admitted_at"] <= admitted["last_admitted_at"]
    assert ledger["first_admitted_at"] == admitted["first_admitted_at"]
    assert ledger["last_admitted_at"] - admitted["last_admitted_at"] >= body["retry_after"]
    assert ledger["responses_429"] == 1
    assert ledger["requests"] == {"model": 4, "get": 1}
    assert [endpoint for _, endpoint in ledger["admitted"]] == ["model"] * 4  # each admitted, the 429 not
    assert ledger["admitted"][0][0] == pytest.approx(ledger["first_admitted_at"], abs=0.001)


def test_rate_limit_whole_seconds_and_creates_nothing(make_server: ServerFactory, files: str) -> None:
    server = make_server(requests_per_minute=1, time_scale=1.0)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        assert http.get("/v1/model", params={"slug": "blip-2"}).status_code == 200
        limited = http.post(
            "/v1/prediction/", json={"model": "blip-2", "input": {"image": f"{files}/green.png"}}
        )
    assert limited.status_code == 429
    assert limited.headers["retry-after"] in {"59", "60"}
    assert limited.json()["retry_after"] == int(limited.headers["retry-after"])
    assert server.ledger()["creates"] == 0


def test_rate_limit_is_per_key(make_server: ServerFactory) -> None:
    server = make_server(api_keys=("key-a", "key-b"), requests_per_minute=2)
    with httpx.Client(base_url=server.url) as http:
        codes = [
            http.get("/v1/model?slug=blip-2", headers={"X-API-Key": "key-a"}).status_code for _ in range(3)
        ]
        other = http.get("/v1/model?slug=blip-2", headers={"X-API-Key": "key-b"}).status_code
    assert codes == [200, 200, 429]
    assert other == 200


def test_in_flight_limit(make_server: ServerFactory, files: str) -> None:
    server = make_server(max_in_flight=2, latency=10.0)  # predictions last 0.5 s
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        first = create(http, f"{files}/green.png")
        create(http, f"{files}/blue.jpg")
        limited = http.post(
            "/v1/prediction/", json={"model": "blip-2", "input": {"image": f"{files}/red.webp"}}
        )
        assert limited.status_code == 429
        assert 0 < float(limited.headers["retry-after"]) <= 0.5
        assert limited.json()["retry_after"] == float(limited.headers["retry-after"])
        assert server.ledger()["in_flight"] == 2
        http.post(f"/v1/prediction/{first}/cancel")
        third = create(http, f"{files}/red.webp")
        wait_terminal(http, third)
    ledger = server.ledger()
    assert ledger["creates"] == 3
    assert ledger["peak_in_flight"] == 2
    assert ledger["responses_429"] == 1


# ---- faults ----------------------------------------------------------------------------------------


def test_fault_5xx(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_5xx=1.0)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        responses = [
            http.post("/v1/prediction/", json={"model": "blip-2", "input": {"image": f"{files}/green.png"}})
            for _ in range(8)
        ]
    for response in responses:
        assert response.status_code in {500, 502, 503}
        assert response.json() in ({}, {"error": "internal server error"})
        assert is_uuid(response.headers["x-request-id"])
    ledger = server.ledger()
    assert ledger["creates"] == 0
    assert ledger["responses_5xx_injected"] == 8


def test_fault_429(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_429=1.0)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        response = http.post(
            "/v1/prediction/", json={"model": "blip-2", "input": {"image": f"{files}/green.png"}}
        )
    assert response.status_code == 429
    assert float(response.headers["retry-after"]) == pytest.approx(FAST)
    assert response.json()["retry_after"] == pytest.approx(FAST)
    ledger = server.ledger()
    assert ledger["creates"] == 0
    assert ledger["responses_429"] == ledger["responses_429_injected"] == 1


def test_fault_slow(make_server: ServerFactory) -> None:
    server = make_server(fault_slow=1.0, slow_seconds=4.0)  # 0.2 s at time scale 0.05
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        started = time.monotonic()
        response = http.get("/v1/model", params={"slug": "blip-2"})
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert 0.2 <= elapsed < 2.0
        server.config.fault_slow = 0.0
        started = time.monotonic()
        http.get("/v1/model", params={"slug": "blip-2"})
        assert time.monotonic() - started < 0.15
    assert server.ledger()["slow_injected"] == 1


def test_fault_drop_surfaces_as_connection_error(server: EmulatorServer, files: str) -> None:
    server.config.fault_drop = 1.0
    model_url = f"{server.url}/v1/model?slug=blip-2"
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(model_url, headers=HEADERS, timeout=5)
    with pytest.raises(httpx.TransportError):
        httpx.get(model_url, headers=HEADERS, timeout=5)
    with requests.Session() as session, pytest.raises(requests.exceptions.ConnectionError):
        session.get(f"{server.url}/v1/prediction/{uuid.uuid4()}", headers=HEADERS, timeout=5)

    body = {"model": "blip-2", "input": {"image": f"{files}/green.png", "caption": True}}
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"{server.url}/v1/prediction/", json=body, headers=HEADERS, timeout=5)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{server.url}/v1/prediction/", json=body, headers=HEADERS, timeout=5)
    ledger = server.ledger()
    assert ledger["drops_injected"] == 5
    assert ledger["creates"] == 2  # dropped creates still created their prediction
    assert ledger["creates_by_input"] == {"green.png|caption": 2}

    server.config.fault_drop = 0.0
    deadline = time.monotonic() + 5
    while server.ledger()["statuses"]["success"] < 2:
        assert time.monotonic() < deadline, "the dropped creates never finished"
        time.sleep(0.01)
    assert requests.get(model_url, headers=HEADERS, timeout=5).status_code == 200


def test_fault_provider_failed_ends_readable_images_with_a_retryable_envelope(
    make_server: ServerFactory, files: str
) -> None:
    server = make_server(fault_provider_failed=1.0)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        failed = predict(http, f"{files}/green.png")
        unreadable = predict(http, f"{files}/missing.png")
    assert failed["status"] == "error"
    assert failed["output"]["error_code"] == "PROVIDER_FAILED"
    assert failed["output"]["retryable"] is True
    assert failed["output"]["classification"] == {"category": "provider"}
    assert failed["metrics"]["cost"] == 0
    # An image the service cannot read still fails as such: the fault hits the model run only.
    assert unreadable["output"]["error_code"] == "INPUT_DOWNLOAD_ERROR"
    assert unreadable["output"]["retryable"] is False
    ledger = server.ledger()
    assert ledger["provider_failed_injected"] == 1
    assert ledger["statuses"]["error"] == 2


def test_fault_created_5xx_answers_500_after_creating(make_server: ServerFactory, files: str) -> None:
    server = make_server(fault_created_5xx=1.0)
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        response = http.post(
            "/v1/prediction/", json={"model": "blip-2", "input": {"image": f"{files}/green.png"}}
        )
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}
        [prediction] = server.app.emulator.predictions.values()
        body = wait_terminal(http, prediction.id)
    assert body["status"] == "success"  # it ran and was billed, unknown to the client
    ledger = server.ledger()
    assert ledger["creates"] == 1
    assert ledger["created_5xx_injected"] == 1
    assert ledger["responses_5xx_injected"] == 0


def test_prediction_faults_are_seeded_apart_from_request_faults(
    make_server: ServerFactory, files: str
) -> None:
    def run(**config: Any) -> tuple[list[int], list[int], int]:
        server = make_server(seed=3, fault_5xx=0.3, fault_endpoints=("create", "model"), **config)
        with httpx.Client(base_url=server.url, headers=HEADERS) as http:
            body = {"model": "blip-2", "input": {"image": f"{files}/green.png"}}
            creates = [http.post("/v1/prediction/", json=body).status_code for _ in range(8)]
        return creates, _fault_codes(server, 12), server.ledger()["created_5xx_injected"]

    creates, reads, injected = run(fault_created_5xx=0.5)
    assert 0 < injected < 8 and 500 in creates
    assert run(fault_created_5xx=0.5) == (creates, reads, injected)  # the same seed, the same faults
    # The request faults of a seed are the same with or without the prediction faults.
    assert run()[1] == reads


def _fault_codes(server: EmulatorServer, count: int) -> list[int]:
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        return [http.get("/v1/model", params={"slug": "blip-2"}).status_code for _ in range(count)]


def test_faults_are_seeded(make_server: ServerFactory) -> None:
    first = _fault_codes(make_server(seed=7, fault_5xx=0.5), 24)
    same_seed = make_server(seed=7, fault_5xx=0.5)
    assert _fault_codes(same_seed, 24) == first
    assert {200} < set(first)
    same_seed.reset()  # re-seeds
    assert _fault_codes(same_seed, 24) == first
    assert _fault_codes(make_server(seed=8, fault_5xx=0.5), 24) != first


def test_fault_probabilities_change_at_run_time(server: EmulatorServer) -> None:
    assert _fault_codes(server, 2) == [200, 200]
    server.config.fault_5xx = 1.0
    assert all(code >= 500 for code in _fault_codes(server, 3))
    server.config.fault_5xx = 0.0
    assert _fault_codes(server, 2) == [200, 200]


# ---- time scale, ledger, lifecycle -----------------------------------------------------------------


def _time_to_terminal(server: EmulatorServer, image: str) -> tuple[float, float]:
    """Seconds from the create to the first terminal read, and the prediction's own ``predict_time``."""
    with httpx.Client(base_url=server.url, headers=HEADERS) as http:
        started = time.monotonic()
        body = wait_terminal(http, create(http, image))
        return time.monotonic() - started, float(body["metrics"]["predict_time"])


def test_time_scale_speeds_up_predictions(make_server: ServerFactory, files: str) -> None:
    fast_wall, fast = _time_to_terminal(make_server(time_scale=0.05), f"{files}/green.png")
    slow_wall, slow = _time_to_terminal(make_server(time_scale=0.5), f"{files}/green.png")
    # A 2 s prediction cannot end before its scaled time (0.1 s and 1 s). How much later it ends is
    # the machine's, so the scales are far apart: the fast one's predict_time (its processing, part
    # of the scaled time) would have to be late by most of a second to pass the slow one's.
    assert fast_wall >= 0.1 and slow_wall >= 1.0
    assert fast < slow


def test_ledger_and_reset(server: EmulatorServer, client: httpx.Client, files: str) -> None:
    predict(client, f"{files}/green.png", caption=True)
    predict(client, f"{files}/green.png", question="Is it green?")
    predict(client, f"{files}/missing.png", question="")
    client.get("/v1/model", params={"slug": "blip-2"})
    client.post(f"/v1/prediction/{uuid.uuid4()}/cancel")
    ledger = server.ledger()
    assert ledger == client.get("/_emulator/ledger").json()
    assert ledger["creates"] == 3
    assert ledger["creates_by_input"] == {
        "green.png|caption": 1,
        "green.png|Is it green?": 1,
        "missing.png|caption": 1,
    }
    assert ledger["requests"]["create"] == 3
    assert ledger["requests"]["model"] == 1
    assert ledger["requests"]["cancel"] == 1
    assert ledger["requests"]["get"] >= 3
    assert ledger["statuses"] == {"success": 2, "error": 1, "cancelled": 0}
    assert ledger["in_flight"] == 0
    assert ledger["peak_in_flight"] == 1
    assert ledger["responses_by_status"]["500"] == 1
    assert ledger["responses_5xx_injected"] == 0

    prediction_id = create(client, f"{files}/green.png")
    server.reset()
    cleared = server.ledger()
    assert cleared["creates"] == 0
    assert cleared["requests"] == {}
    assert cleared["statuses"] == {"success": 0, "error": 0, "cancelled": 0}
    assert client.get(f"/v1/prediction/{prediction_id}").status_code == 404

    create(client, f"{files}/green.png")
    reset = client.post("/_emulator/reset")
    assert reset.status_code == 200
    assert client.get("/_emulator/ledger").json()["creates"] == 0


def test_reset_clears_rate_windows(make_server: ServerFactory) -> None:
    server = make_server(requests_per_minute=1, time_scale=1.0)
    assert _fault_codes(server, 2) == [200, 429]
    server.reset()
    assert _fault_codes(server, 1) == [200]


def test_server_lifecycle(files: str) -> None:
    server = EmulatorServer(EmulatorConfig(time_scale=FAST, latency=100.0), port=0)  # 5 s predictions
    for _ in range(2):  # start, stop, start again
        with server:
            assert server.url.startswith("http://127.0.0.1:")
            assert not server.url.endswith("/")
            with pytest.raises(RuntimeError):
                server.start()
            with httpx.Client(base_url=server.url, headers=HEADERS) as http:
                prediction_id = create(http, f"{files}/green.png")
        assert not server.running
        stopped = server.app.emulator.predictions[prediction_id]
        assert stopped.status == "error"
        assert stopped.output["retryable"] is True
    assert server.ledger()["creates"] == 2
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{free_port()}/v1/model", timeout=2)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="fault_5xx"):
        EmulatorConfig(fault_5xx=1.5)
    with pytest.raises(ValueError, match="fault_created_5xx"):
        EmulatorConfig(fault_created_5xx=-0.1)
    with pytest.raises(ValueError, match="time_scale"):
        EmulatorConfig(time_scale=0)
    with pytest.raises(ValueError, match="api_keys"):
        EmulatorConfig(api_keys=())


def test_serve_directory_ignores_query_strings(files: str, image_dir: Path) -> None:
    response = requests.get(f"{files}/green.png?X-Amz-Signature=abc", timeout=5)
    assert response.status_code == 200
    assert response.content == (image_dir / "green.png").read_bytes()


# ---- command line ----------------------------------------------------------------------------------


def test_cli_arguments() -> None:
    defaults = build_parser().parse_args([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8765)
    assert config_from_args(defaults).api_keys == ("emulator-key",)
    args = build_parser().parse_args(
        [
            *(
                "--api-key",
                "a",
                "--api-key",
                "b",
                "--time-scale",
                "0.5",
                "--fault-drop",
                "0.25",
                "--seed",
                "3",
            ),
            *("--fault-provider-failed", "0.1", "--fault-created-5xx", "0.2"),
        ]
    )
    config = config_from_args(args)
    assert (config.fault_provider_failed, config.fault_created_5xx) == (0.1, 0.2)
    assert config.api_keys == ("a", "b")
    assert config.time_scale == 0.5
    assert config.fault_drop == 0.25
    assert config.seed == 3


def test_cli_serves(tmp_path: Path) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "airflow_provider_blip2.emulator",
        "--port",
        str(port),
        "--api-key",
        "cli-key",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}/v1/model?slug=blip-2",
                    headers={"X-API-Key": "cli-key"},
                    timeout=2,
                )
                break
            except httpx.TransportError:
                assert process.poll() is None, "the emulator exited"
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.05)
        assert response.status_code == 200
        assert response.json()["slug"] == "blip-2"
    finally:
        process.terminate()
        process.wait(10)
