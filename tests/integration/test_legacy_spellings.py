"""
The client against the API's other documented spellings (emulator ``spelling="legacy"``): 201 on
create, statuses ``completed``/``failed``/``canceled``, empty ``{}`` error bodies and 429s that
carry the wait only as the body's ``retry_after``.

Starts: the emulator over HTTP on loopback (legacy spellings), a local file server for the images,
and `airflow dags test` processes (SQLite).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from airflow_provider_blip2.client.errors import Blip2AuthenticationError, Blip2NotFoundError
from airflow_provider_blip2.client.models import PredictionStatus
from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from scripts.sandbox import AirflowSandbox
from tests.conftest import API_KEY, FAST_RETRIES, connection_json

POLL = 0.02
StartEmulator = Callable[..., EmulatorServer]
ImageUrl = Callable[[str], str]


@pytest.fixture
def legacy(start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    server = start_emulator(spelling="legacy")
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url))
    return server


def test_the_emulator_really_speaks_the_legacy_spellings(legacy: EmulatorServer, image_url: ImageUrl) -> None:
    headers = {"X-API-Key": API_KEY}
    body = {"model": "blip-2", "version": "0.0.1", "input": {"image": image_url("chelsea.jpg")}}
    created = httpx.post(f"{legacy.url}/v1/prediction/", json=body, headers=headers)
    assert created.status_code == 201
    unauthorised = httpx.get(f"{legacy.url}/v1/prediction/x", headers={"X-API-Key": "wrong-key"})
    assert unauthorised.status_code == 401 and unauthorised.json() == {}


def test_success_is_read_from_completed(legacy: EmulatorServer, image_url: ImageUrl) -> None:
    hook = Blip2Hook(retry_policy=FAST_RETRIES)
    outcome = hook.run(image_url("chelsea.jpg"), caption=True, poll_interval=POLL, timeout=30)
    prediction = hook.get_prediction(str(outcome.prediction_id))
    assert prediction.raw_status == "completed"
    assert prediction.status is PredictionStatus.SUCCEEDED
    assert outcome.succeeded
    assert outcome.output and outcome.output.startswith("[emulated]")


def test_failure_is_read_from_failed(legacy: EmulatorServer, image_url: ImageUrl) -> None:
    hook = Blip2Hook(retry_policy=FAST_RETRIES)
    prediction_id = hook.create_prediction(image_url("missing.jpg"), caption=True)
    outcome = hook.wait_for_prediction(prediction_id, poll_interval=POLL, timeout=30)
    prediction = hook.get_prediction(prediction_id)
    assert (prediction.raw_status, prediction.status) == ("failed", PredictionStatus.FAILED)
    assert (outcome.status, outcome.error_code) == ("error", "INPUT_DOWNLOAD_ERROR")


def test_cancel_is_read_from_canceled(
    start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch, image_url: ImageUrl
) -> None:
    server = start_emulator(spelling="legacy", latency=100.0)
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url))
    hook = Blip2Hook(retry_policy=FAST_RETRIES)
    prediction_id = hook.create_prediction(image_url("chelsea.jpg"), caption=True)
    hook.cancel_prediction(prediction_id)
    prediction = hook.get_prediction(prediction_id)
    assert (prediction.raw_status, prediction.status) == ("canceled", PredictionStatus.CANCELLED)


def test_empty_error_bodies_still_map_by_status_code(
    start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_emulator(spelling="legacy")
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url, api_key="wrong-key"))
    with pytest.raises(Blip2AuthenticationError, match="API key"):
        Blip2Hook(retry_policy=FAST_RETRIES).get_prediction("0000")
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url))
    with pytest.raises(Blip2NotFoundError):
        Blip2Hook(retry_policy=FAST_RETRIES).get_prediction("0000")
    assert server.ledger()["requests"]["get"] == 2  # neither was retried


def test_body_retry_after_is_honoured(
    start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch, image_url: ImageUrl
) -> None:
    # The client's budget is opened wide so the emulator's limit (3 requests per 0.6 s) answers 429s.
    server = start_emulator(spelling="legacy", requests_per_minute=3, time_scale=0.01)
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url, requests_per_minute=10_000))
    hook = Blip2Hook(retry_policy=FAST_RETRIES)
    ids = [hook.create_prediction(image_url("chelsea.jpg"), caption=True) for _ in range(6)]
    ledger = server.ledger()
    assert len(set(ids)) == 6 and ledger["creates"] == 6
    assert ledger["responses_429"] >= 1


def test_example_dag_against_the_legacy_spellings(
    tmp_path: Path, legacy: EmulatorServer, image_url: ImageUrl
) -> None:
    sandbox = AirflowSandbox(
        tmp_path / "home", connections={"blip2_default": json.loads(connection_json(legacy.url))}
    )
    sandbox.migrate()
    images = ["chelsea.jpg", "coffee.png"]
    sandbox.dags_test("example_blip2_caption", conf={"image_urls": [image_url(n) for n in images]})
    assert set(sandbox.task_states("example_blip2_caption").values()) == {"success"}
    (rows,) = sandbox.xcom("example_blip2_caption", "report")
    assert [row["image"] for row in rows] == images
    assert legacy.ledger()["creates"] == 2 * len(images)
    shutil.rmtree(tmp_path / "home")
