"""
The emulator's uploads (presign, the signed PUT, the served copy), over real HTTP on loopback, and
its private-network mode that fetches no image URL but its own uploads (with a local file server for
an image only the client reaches).

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory

HEADERS = {"X-API-Key": "emulator-key"}


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path: Path = tmp_path_factory.mktemp("uploads") / "green.png"
    Image.new("RGB", (40, 30), (40, 160, 50)).save(path)
    return path.read_bytes()


@pytest.fixture
def start() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def factory(**overrides: Any) -> EmulatorServer:
        settings: dict[str, Any] = {"time_scale": 0.05, "latency": 2.0, "requests_per_minute": 100_000}
        settings.update(overrides)
        servers.append(EmulatorServer(EmulatorConfig(**settings)).start())
        return servers[-1]

    yield factory
    for server in servers:
        server.stop()


def _presign(server: EmulatorServer, **body: Any) -> requests.Response:
    payload = {"content_type": "image/png", "file_type": "image", **body}
    return requests.post(f"{server.url}/v1/upload/presign", json=payload, headers=HEADERS, timeout=10)


def _put(upload: dict[str, Any], data: bytes, **headers: str) -> requests.Response:
    sent = {**upload["required_headers"], "Content-Type": "image/png", **headers}
    return requests.put(upload["presigned_url"], data=data, headers=sent, timeout=10)


def test_an_upload_is_presigned_put_and_served_until_its_retention_ends(
    start: Callable[..., EmulatorServer], png: bytes
) -> None:
    server = start(time_scale=0.01)
    answer = _presign(server, expires_in_seconds=120)
    assert answer.status_code == 200
    upload = answer.json()
    assert set(upload) == {"id", "presigned_url", "public_url", "expires_at", "required_headers"}
    assert upload["required_headers"]["x-amz-meta-file-id"] == upload["id"]
    assert _put(upload, png).status_code == 200
    served = requests.get(upload["public_url"], timeout=10)
    assert (served.status_code, served.content, served.headers["content-type"]) == (200, png, "image/png")
    time.sleep(1.3)  # 120 s at the 0.01 time scale
    assert requests.get(upload["public_url"], timeout=10).status_code == 404
    ledger = server.ledger()
    assert ledger["requests"]["presign"] == 1 and ledger["uploads"]["max_retention_s"] == 120


@pytest.mark.parametrize(
    "change",
    [
        {"x-amz-meta-file-id": "another"},
        {"x-amz-meta-source": ""},
        {"Content-Type": "image/jpeg"},
    ],
)
def test_a_put_without_the_signed_headers_is_refused(
    start: Callable[..., EmulatorServer], png: bytes, change: dict[str, str]
) -> None:
    server = start()
    upload = _presign(server).json()
    refused = _put(upload, png, **change)
    assert refused.status_code == 403 and "SignatureDoesNotMatch" in refused.text
    tampered = dict(upload, presigned_url=upload["presigned_url"].replace("Signature=", "Signature=0"))
    assert _put(tampered, png).status_code == 403
    assert server.ledger()["uploads"]["puts_refused"] == 2


def test_a_presign_checks_its_body(start: Callable[..., EmulatorServer]) -> None:
    server = start()
    assert _presign(server, content_type="text/plain").status_code == 400
    assert _presign(server, expires_in_seconds=30).status_code == 400
    assert _presign(server, expires_in_seconds=400 * 86400).status_code == 400
    assert requests.post(f"{server.url}/v1/upload/presign", json={}, timeout=10).status_code == 401


def test_a_private_service_predicts_its_uploads_and_nothing_else(
    start: Callable[..., EmulatorServer], png: bytes, tmp_path: Path
) -> None:
    server = start(fetch_only_uploads=True)
    (tmp_path / "green.png").write_bytes(png)
    upload = _presign(server).json()
    assert _put(upload, png).status_code == 200
    with serve_directory(tmp_path) as files:
        for image, status in ((upload["public_url"], "success"), (f"{files}/green.png", "error")):
            body = {"model": "blip-2", "input": {"image": image, "caption": True}}
            answer = requests.post(
                f"{server.url}/v1/prediction/run", json=body, headers=HEADERS, timeout=30
            ).json()
            assert answer["status"] == status, answer
    assert "reaches no image URL" in answer["error"]
    assert server.ledger()["uploads"]["reads"] == 1
