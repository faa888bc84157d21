"""
The batch operator's synchronous runs, in process, against the emulator over real HTTP on loopback
(offering ``/v1/prediction/run`` or answering it 400) and a local file server for the images.

The operator runs the way Airflow drives it (``tests/batch_driver.py``): deferrals, triggers rebuilt
from their kwargs, triggerer restarts, task retries. A triggerer's XCom is a dict (``FakeXCom``).

Starts: the emulator over HTTP on loopback, a local file server for the images, a local S3 (moto);
Airflow's task runner in process, no Airflow process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.operators.batch.run import PLACEHOLDER_PREFIX
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator
from airflow_provider_blip2.triggers import run_journal
from tests.batch_driver import DictStore, FakeTaskInstance, FakeXCom, run_batch, run_tries
from tests.conftest import TIME_SCALE, connection_json


@pytest.fixture(autouse=True)
def _fresh_xcom(fresh_budgets: None) -> None:
    """Each test finds out afresh whether the emulator offers the synchronous run."""
    FakeXCom.values.clear()


@pytest.fixture
def offer(
    start_emulator: Callable[..., EmulatorServer], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., EmulatorServer]:
    """
    Start an emulator (``sync_run`` on unless told) and point ``blip2_default`` at it, at its limits.

    ``rate_limit_shape`` goes to the connection, every other override to the emulator.
    """

    def start(rate_limit_shape: str = "auto", **overrides: Any) -> EmulatorServer:
        server = start_emulator(**overrides)
        conn = connection_json(
            server.url, requests_per_minute=60, rate_window=60 * TIME_SCALE, rate_limit_shape=rate_limit_shape
        )
        monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", conn)
        return server

    return start


def _batch(images: list[str], output: Path, **kwargs: Any) -> Blip2BatchPredictionOperator:
    settings: dict[str, Any] = {"caption": True, "deferrable": True, "poll_interval": 0.1, "timeout": 60}
    settings.update(kwargs)
    return Blip2BatchPredictionOperator(task_id="batch", images=images, output_uri=str(output), **settings)


def _lines(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def _images(image_url: Callable[[str], str], count: int) -> list[str]:
    names = ("astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp")
    # Distinct URLs without a query (a query may be a signature: those are created and polled).
    return [image_url(f"{names[n % 4]}#{n}") for n in range(count)]


def test_an_offered_synchronous_run_costs_one_request_a_prediction(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer()
    images = _images(image_url, 24)
    summary, deferrals = run_batch(_batch(images, tmp_path / "r.jsonl"), DictStore())
    assert (summary["total"], summary["succeeded"], summary["ambiguous"]) == (24, 24, 0)
    ledger = emulator.ledger()
    assert ledger["requests"].get("run") == 24 and ledger["creates"] == 24
    assert "create" not in ledger["requests"]
    assert ledger["requests"].get("get") == 1  # the chunk's cost, read once
    assert ledger["responses_429"] == 0 and ledger["peak_in_flight"] <= 10
    assert deferrals == 1  # one chunk of at most a window's requests
    lines = _lines(tmp_path / "r.jsonl")
    assert all(line["status"] == "success" and line["output"] and line["prediction_id"] for line in lines)
    assert [line["attempts"] for line in lines] == [1] * 24
    price = emulator.config.cost_per_prediction
    assert [line["cost"] for line in lines] == [price] * 24
    assert summary["cost"] == pytest.approx(24 * price)


def test_a_batch_of_several_windows_reads_the_cost_once_and_fills_each_chunk_to_the_window(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    """The first chunk leaves room in its window for the read that prices it; the next ones need none."""
    emulator = offer(rate_limit_shape="window")
    images = _images(image_url, 130)
    summary, deferrals = run_batch(_batch(images, tmp_path / "r.jsonl"), DictStore())
    assert (summary["succeeded"], summary["ambiguous"]) == (130, 0)
    ledger = emulator.ledger()
    assert ledger["requests"] == {"run": 130, "get": 1}, ledger  # one read for the whole batch
    assert ledger["responses_429"] == 0
    assert deferrals == 3  # 59 runs and the read, then 60, then 11
    price = emulator.config.cost_per_prediction
    assert [line["cost"] for line in _lines(tmp_path / "r.jsonl")] == [price] * 130
    assert summary["cost"] == pytest.approx(130 * price)


@pytest.mark.parametrize("limiter", ["window", "bucket"])
def test_a_batch_past_a_full_window_probes_the_limiter_once(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path, limiter: str
) -> None:
    """At the connection's default shape: one probe, and one 429 only from a limiter that does not refill."""
    emulator = offer(rate_limit=limiter)
    images = _images(image_url, 130)
    summary, _ = run_batch(_batch(images, tmp_path / "r.jsonl"), DictStore())
    assert (summary["succeeded"], summary["failed"], summary["ambiguous"]) == (130, 0, 0)
    ledger = emulator.ledger()
    refused = 1 if limiter == "window" else 0
    assert ledger["responses_429"] == refused
    assert (ledger["runs"], ledger["requests"]["run"]) == (130, 130 + refused)
    assert ledger["creates"] == 130  # the refused probe created nothing, and nothing was sent twice


def test_a_refused_run_falls_back_to_create_and_poll_once_per_process(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer(sync_run=False)
    images = _images(image_url, 12)
    for run in range(2):
        summary, _ = run_batch(_batch(images, tmp_path / f"r{run}.jsonl"), DictStore())
        assert (summary["succeeded"], summary["failed"]) == (12, 0)
    ledger = emulator.ledger()
    assert ledger["requests"]["run"] == 1  # the refusal is remembered: the second batch never asks
    assert ledger["creates"] == 24 and ledger["responses_429"] == 0
    assert all(line["status"] == "success" for line in _lines(tmp_path / "r1.jsonl"))


def test_a_refusal_while_a_batch_runs_sends_the_rest_the_create_and_poll_way(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer()
    images = _images(image_url, 15)

    def refuse_from_the_second_chunk(cycle: int) -> None:
        if cycle == 2:
            emulator.config.sync_run = False

    # 5 requests a window: a first chunk of 4 items and the read that prices them, then chunks of 5.
    operator = _batch(images, tmp_path / "r.jsonl", requests_per_minute=5)
    summary, _ = run_batch(operator, DictStore(), interrupt=lambda cycle: refuse_from_the_second_chunk(cycle))
    assert (summary["succeeded"], summary["failed"]) == (15, 0)
    ledger = emulator.ledger()
    # One chunk ran; the second chunk's runs sent before the first refusal came back were refused too.
    assert ledger["runs"] == 4 and 1 <= ledger["requests"]["run"] - 4 <= 5
    assert ledger["creates"] == 15 and ledger["requests"]["create"] == 11


def test_a_dropped_run_is_ambiguous_never_resent_in_the_try_and_predicted_again_by_the_next(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer(fault_drop=0.3, fault_endpoints=("run",), seed=7)
    images = _images(image_url, 20)
    store = DictStore()
    summary, failures = run_tries(lambda: _batch(images, tmp_path / "r.jsonl"), store, retries=3)
    ledger = emulator.ledger()
    drops = ledger["drops_injected"]
    assert drops > 0 and len(failures) >= 1  # the first try ended with ambiguous items
    assert summary["ambiguous"] == drops and summary["succeeded"] == 20
    # Each ambiguous run was created (and paid) once more by a later try, nothing else twice.
    assert ledger["creates"] == 20 + drops
    lines = _lines(tmp_path / "r.jsonl")
    assert sum(line["attempts"] for line in lines) == 20 + drops


def test_a_triggerer_restart_runs_again_only_what_was_running_and_counts_it_ambiguous(
    offer: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emulator = offer(latency=20.0)  # 1 s a prediction at the time scale
    monkeypatch.setattr(run_journal, "_xcom", lambda: FakeXCom)
    monkeypatch.setattr("airflow_provider_blip2.triggers.blip2.BATCH_DEFERRAL_SETTLE_SECONDS", 0.0)
    images = _images(image_url, 30)
    ti = SimpleNamespace(dag_id="dag", task_id="batch", run_id="run", map_index=-1)
    summary, _ = run_batch(
        _batch(images, tmp_path / "r.jsonl"),
        DictStore(),
        interrupt=lambda cycle: 1.5 if cycle == 1 else None,
        trigger_ti=ti,
    )
    ledger = emulator.ledger()
    rerun = summary["ambiguous"]
    assert 1 <= rerun <= 10  # at most the runs in flight at the restart
    assert summary["succeeded"] == 30 and ledger["creates"] == 30 + rerun
    lines = _lines(tmp_path / "r.jsonl")
    assert sum(line["attempts"] for line in lines) == 30  # a rerun is the same attempt, sent again


def test_a_new_try_counts_the_runs_a_dead_try_left_unanswered_as_ambiguous(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer()
    images = _images(image_url, 6)
    store = DictStore()
    operator = _batch(images, tmp_path / "r.jsonl")
    with pytest.raises(TaskDeferred):
        operator.execute(
            cast(Any, {"ti": FakeTaskInstance(try_number=1, max_tries=1), "task_state_store": store})
        )
    assert any(PLACEHOLDER_PREFIX in json.dumps(value) for value in store.values.values())
    # The try died with its chunk (the task was killed): the next try starts from the store.
    summary, _ = run_batch(
        _batch(images, tmp_path / "r.jsonl"), store, ti=FakeTaskInstance(try_number=2, max_tries=1)
    )
    assert (summary["succeeded"], summary["ambiguous"]) == (6, 6)
    assert emulator.ledger()["creates"] == 6  # the dead try's runs were never sent here


def test_a_batch_that_does_not_defer_runs_its_chunks_on_the_worker(
    offer: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = offer()
    images = _images(image_url, 8)
    operator = _batch(images, tmp_path / "r.jsonl", deferrable=False)
    summary = operator.execute(cast(Any, {"ti": FakeTaskInstance(), "task_state_store": DictStore()}))
    assert summary["succeeded"] == 8
    assert emulator.ledger()["requests"]["run"] == 8


def test_a_connection_that_says_poll_never_runs_synchronously(
    start_emulator: Callable[..., EmulatorServer],
    monkeypatch: pytest.MonkeyPatch,
    image_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    emulator = start_emulator()
    conn = connection_json(emulator.url, requests_per_minute=60, rate_window=60 * TIME_SCALE, sync_run="poll")
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", conn)
    summary, _ = run_batch(_batch(_images(image_url, 6), tmp_path / "r.jsonl"), DictStore())
    assert summary["succeeded"] == 6
    assert "run" not in emulator.ledger()["requests"]


def test_the_run_trigger_carries_no_signed_url_and_signs_s3_images_itself(
    offer: Callable[..., EmulatorServer], s3_connection: Any, image_dir: Path, tmp_path: Path
) -> None:
    emulator = offer()
    s3_connection.create_bucket("runs")
    for name in ("chelsea.jpg", "coffee.png"):
        s3_connection.put_object("runs", f"in/{name}", (image_dir / name).read_bytes())
    images = ["s3://runs/in/chelsea.jpg", "s3://runs/in/coffee.png"]
    operator = _batch(images, tmp_path / "r.jsonl")
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(cast(Any, {"ti": FakeTaskInstance(), "task_state_store": DictStore()}))
    classpath, kwargs = deferred.value.trigger.serialize()
    assert classpath.endswith("Blip2BatchRunTrigger")
    text = json.dumps(kwargs)
    assert "X-Amz" not in text and "Signature" not in text
    assert sorted(kwargs["images"].values()) == images
    summary, _ = run_batch(_batch(images, tmp_path / "r.jsonl"), DictStore())
    assert summary["succeeded"] == 2 and emulator.ledger()["requests"]["run"] == 2
    assert "X-Amz" not in (tmp_path / "r.jsonl").read_text()
