"""
System tests: a real Airflow deployment (API server, scheduler with LocalExecutor, DAG processor,
triggerer) on loopback, against the API emulator. What `dags test` cannot show: the triggerer
holding the wait, a triggerer restart, a user marking a deferred task failed, a worker crash.

Starts: an Airflow API server, scheduler (LocalExecutor), DAG processor and triggerer on SQLite, the
emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from scripts.deployment import AirflowDeployment
from scripts.sandbox import AirflowSandbox
from tests.conftest import API_KEY, SAMPLE_IMAGES

DAGS = Path(__file__).parent / "dags"
pytestmark = pytest.mark.timeout(600)
DEFERRABLE = "system_blip2_deferrable"
ON_WORKER = "system_blip2_on_worker"
BATCH = "system_blip2_batch"
BATCH_ON_WORKER = "system_blip2_batch_on_worker"


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorConfig(api_keys=(API_KEY,), latency=2.0)) as server:
        yield server


@pytest.fixture(scope="module")
def image_server(emulator: EmulatorServer) -> Iterator[str]:
    with serve_directory(SAMPLE_IMAGES) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def image(image_server: str) -> str:
    return f"{image_server}/chelsea.jpg"


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, emulator: EmulatorServer
) -> Iterator[AirflowDeployment]:
    connection = {"conn_type": "blip2", "host": emulator.url, "password": API_KEY}
    sandbox = AirflowSandbox(
        tmp_path_factory.mktemp("system-home"),
        dags_folder=DAGS,
        connections={"blip2_default": connection},
        extra_env={
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        },
    )
    sandbox.migrate()
    deployment = AirflowDeployment(sandbox)
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
def fresh_emulator(emulator: EmulatorServer) -> EmulatorServer:
    emulator.reset()
    emulator.config.latency = 2.0
    return emulator


def explain(deployment: AirflowDeployment) -> str:
    return "\n".join(f"===== {name}\n{text[-4000:]}" for name, text in deployment.logs().items())


def test_deferred_prediction_succeeds_and_leaks_nothing(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image: str
) -> None:
    run_id = deployment.trigger(DEFERRABLE, {"image": image})
    deployment.wait_for_task_state(DEFERRABLE, run_id, "ask", {"deferred", "success", "failed"})
    assert deployment.wait_for_run(DEFERRABLE, run_id) == "success", explain(deployment)

    ledger = fresh_emulator.ledger()
    assert ledger["creates"] == 1
    assert ledger["responses_429"] == 0
    xcom = deployment.api(
        "GET", f"/dags/{DEFERRABLE}/dagRuns/{run_id}/taskInstances/ask/xcomEntries/return_value"
    )
    assert str(xcom["value"]).startswith("[emulated]")
    ti = deployment.task_instance(DEFERRABLE, run_id, "ask")
    assert image not in json.dumps(ti), "the rendered image URL must be masked"
    leaks = [
        str(path) for path, data in deployment.sandbox.written_contents().items() if API_KEY.encode() in data
    ]
    assert leaks == []


def test_triggerer_restart_does_not_create_again(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image: str
) -> None:
    fresh_emulator.config.latency = 12.0
    run_id = deployment.trigger(DEFERRABLE, {"image": image})
    deployment.wait_for_task_state(DEFERRABLE, run_id, "ask", {"deferred"})
    deployment.stop("triggerer")
    deployment.start("triggerer")

    assert deployment.wait_for_run(DEFERRABLE, run_id) == "success", explain(deployment)
    ledger = fresh_emulator.ledger()
    assert ledger["creates"] == 1
    assert ledger["statuses"]["success"] == 1


def test_marking_a_deferred_task_failed_cancels_the_prediction(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image: str
) -> None:
    fresh_emulator.config.latency = 120.0
    run_id = deployment.trigger(DEFERRABLE, {"image": image})
    deployment.wait_for_task_state(DEFERRABLE, run_id, "ask", {"deferred"})
    # Only a trigger that is running in the triggerer has anything to kill: wait for its first poll.
    deployment.wait_for(
        lambda: fresh_emulator.ledger()["requests"].get("get", 0) >= 1, timeout=60, what="the trigger's poll"
    )
    deployment.set_task_state(DEFERRABLE, run_id, "ask", "failed")

    deployment.wait_for(
        lambda: fresh_emulator.ledger()["statuses"]["cancelled"] == 1,
        timeout=60,
        what="the trigger's on_kill to cancel the prediction",
    )
    assert fresh_emulator.ledger()["creates"] == 1


def test_a_retry_after_a_worker_crash_reattaches_to_the_prediction(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image: str
) -> None:
    fresh_emulator.config.latency = 30.0
    run_id = deployment.trigger(ON_WORKER, {"image": image})
    deployment.wait_for(lambda: fresh_emulator.ledger()["creates"] == 1, timeout=120, what="the create")
    pid = deployment.wait_for(
        lambda: deployment.task_instance(ON_WORKER, run_id, "ask").get("pid"),
        timeout=30,
        what="the task's pid",
    )
    os.kill(int(pid), signal.SIGKILL)  # the task process dies mid-wait, as on an OOM kill

    assert deployment.wait_for_run(ON_WORKER, run_id, timeout=300) == "success", explain(deployment)
    ti = deployment.task_instance(ON_WORKER, run_id, "ask")
    assert ti["try_number"] == 2
    assert fresh_emulator.ledger()["creates"] == 1


def test_batch_survives_triggerer_restarts_without_creating_again(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image_server: str, tmp_path: Path
) -> None:
    fresh_emulator.config.latency = 6.0
    images = [f"{image_server}/coffee.png?n={n}" for n in range(14)]
    output = tmp_path / "captions.jsonl"
    run_id = deployment.trigger(BATCH, {"images": images, "output_uri": str(output)})
    for _ in range(2):  # restart the triggerer while it holds a round of predictions
        deployment.wait_for_task_state(BATCH, run_id, "batch", {"deferred"})
        deployment.wait_for(
            lambda: fresh_emulator.ledger()["requests"].get("get", 0) >= 1, timeout=60, what="a poll"
        )
        deployment.stop("triggerer")
        deployment.start("triggerer")

    assert deployment.wait_for_run(BATCH, run_id, timeout=300) == "success", explain(deployment)
    ledger = fresh_emulator.ledger()
    assert ledger["creates"] == len(images)
    assert ledger["statuses"]["success"] == len(images)
    assert len(output.read_text().splitlines()) == len(images)
    summary = deployment.api(
        "GET", f"/dags/{BATCH}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
    )
    assert summary["value"]["succeeded"] == len(images)


def test_batch_retry_after_a_worker_crash_pays_again_at_most_the_runs_under_way(
    deployment: AirflowDeployment, fresh_emulator: EmulatorServer, image_server: str, tmp_path: Path
) -> None:
    """The batch runs synchronously on the worker (the default); SIGKILL mid-chunk, then the retry.

    The runs under way die with the worker, their answers unread: the retry counts each as ambiguous
    and predicts it again. Nothing that had answered is sent again.
    """
    fresh_emulator.config.latency = 8.0
    images = [f"{image_server}/rocket.webp?n={n}" for n in range(14)]
    output = tmp_path / "captions.jsonl"
    run_id = deployment.trigger(BATCH_ON_WORKER, {"images": images, "output_uri": str(output)})
    deployment.wait_for(
        lambda: fresh_emulator.ledger()["creates"] >= 10, timeout=120, what="the first creates"
    )
    pid = deployment.wait_for(
        lambda: deployment.task_instance(BATCH_ON_WORKER, run_id, "batch").get("pid"),
        timeout=30,
        what="the task's pid",
    )
    os.kill(int(pid), signal.SIGKILL)
    created_before_the_kill = fresh_emulator.ledger()["creates"]

    assert deployment.wait_for_run(BATCH_ON_WORKER, run_id, timeout=300) == "success", explain(deployment)
    assert deployment.task_instance(BATCH_ON_WORKER, run_id, "batch")["try_number"] == 2
    ledger = fresh_emulator.ledger()
    assert ledger["requests"].get("run", 0) >= len(images)  # the synchronous run, not create + poll
    paid_twice = ledger["creates"] - len(images)
    assert 0 < paid_twice <= created_before_the_kill
    summary = deployment.api(
        "GET", f"/dags/{BATCH_ON_WORKER}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
    )["value"]
    assert paid_twice <= summary["ambiguous"] <= len(images)
    assert summary["succeeded"] == len(images)
    assert len(output.read_text().splitlines()) == len(images)


def test_the_ui_shows_the_blip2_connection_form(deployment: AirflowDeployment) -> None:
    metadata = httpx.get(f"{deployment.url}/ui/connections/hook_meta", timeout=30).json()
    [form] = [entry for entry in metadata if entry["connection_type"] == "blip2"]
    assert form["hook_name"] == "BLIP-2 (Eachlabs)"
    standard = form["standard_fields"]
    assert standard["password"]["title"] == "API Key"
    assert standard["host"]["placeholder"] == "https://api.eachlabs.ai"
    assert all(standard[name]["hidden"] for name in ("login", "url_schema", "port"))
    extra = form["extra_fields"]
    assert set(extra) >= {
        "model",
        "model_version",
        "request_timeout",
        "requests_per_minute",
        "max_concurrency",
    }
    assert extra["requests_per_minute"]["value"] == 60


def test_test_connection_in_the_ui_checks_the_key(
    deployment: AirflowDeployment, emulator: EmulatorServer
) -> None:
    body = {"connection_id": "blip2_probe", "conn_type": "blip2", "host": emulator.url, "password": API_KEY}
    good = deployment.api("POST", "/connections/test", json=body)
    assert good["status"] is True, good
    bad = deployment.api("POST", "/connections/test", json={**body, "password": "not-the-key"})
    assert bad["status"] is False and "API key" in bad["message"]
