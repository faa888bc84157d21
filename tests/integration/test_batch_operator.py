"""
The batch operator and trigger in process, against the emulator and the local S3/GCS servers.

The operator runs the way Airflow drives it (see ``tests/batch_driver.py``). Full Airflow runs are
in ``test_example_dags.py`` and the system tests. These tests cover the create-and-poll path (the
connection's ``sync_run`` is ``poll``, as for a model that refuses the synchronous run); the
synchronous runs are in ``test_batch_sync_run.py``. Starts the emulator over real HTTP on loopback,
a file server for the images, and the local S3 and GCS servers.

Starts: the emulator over HTTP on loopback, a local file server for the images, a local S3 (moto), a
local GCS (gcp-storage-emulator), and `airflow dags test` processes (SQLite).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException, TaskDeferred

from airflow_provider_blip2.batch import (
    BatchItem,
    BatchJournal,
    image_key,
)
from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from airflow_provider_blip2.operators.batch.tries import open_journal
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator
from airflow_provider_blip2.triggers.blip2 import Blip2BatchPredictionTrigger
from scripts.sandbox import AirflowSandbox
from tests.batch_driver import DictStore, FakeTaskInstance, _first_payload, run_batch, run_tries
from tests.conftest import API_KEY, TIME_SCALE, connection_json, requires_airflow_3_3
from tests.lineage import OPENLINEAGE, lineage_names


@pytest.fixture
def batch_connection(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """``blip2_default`` with the emulator's own limits (60 per time-scaled minute, 10 in flight)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLIP2_DEFAULT",
        connection_json(emulator.url, requests_per_minute=60, rate_window=60 * TIME_SCALE, sync_run="poll"),
    )
    return emulator


@pytest.fixture
def connection_extra() -> dict[str, Any]:
    """These tests create and poll (the synchronous run has tests of its own)."""
    return {"sync_run": "poll"}


def test_batch_captions_a_list_deferring_between_rounds(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    images = [image_url(name) for name in ("astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp")] * 1
    images += [image_url(f"chelsea.jpg?copy={n}") for n in range(8)]
    output = tmp_path / "out" / "captions.jsonl"
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(output),
        caption=True,
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    store = DictStore()
    summary, deferrals = run_batch(operator, store)
    assert summary["total"] == 12 and summary["succeeded"] == 12 and summary["failed"] == 0
    assert summary["output_uri"] == str(output)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["image"] for line in lines] == [image_key(image) for image in images]
    assert all(
        line["image"].startswith(image.split("?")[0]) for line, image in zip(lines, images, strict=True)
    )
    assert all(line["status"] == "success" and line["output"] for line in lines)
    ledger = batch_connection.ledger()
    assert ledger["creates"] == 12
    assert ledger["peak_in_flight"] <= 10
    assert ledger["responses_429"] == 0
    assert deferrals >= 2  # 12 images and 10 slots: at least two rounds
    assert store.values == {}  # a finished batch forgets its progress
    lineage = lineage_names(operator.get_openlineage_facets_on_complete(FakeTaskInstance()))
    if OPENLINEAGE:
        origin = image_url("").rstrip("/")
        assert lineage == {"inputs": [(origin, "/")], "outputs": [("file", str(output), 12)]}
    else:
        assert lineage is None


def test_a_deferrable_batch_whose_predictions_end_soon_runs_on_the_worker_without_deferring(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = connect(latency=10.0)  # 0.5 s per prediction at the time scale
    images = [image_url(f"chelsea.jpg?n={n}") for n in range(25)]
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        deferrable=True,
        defer_after=5.0,
        poll_interval=1.0,
    )
    summary, deferrals = run_batch(operator, DictStore())
    assert summary["succeeded"] == 25
    assert deferrals == 0  # every wait for a free slot was shorter than defer_after
    ledger = emulator.ledger()
    assert ledger["creates"] == 25 and ledger["peak_in_flight"] <= 10
    # About one read each, a poll interval after its create (a loaded machine may slow a few).
    assert 25 <= ledger["requests"]["get"] <= 30


def test_a_deferrable_batch_defers_when_nothing_ends_within_defer_after(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = connect(latency=60.0)  # 3 s per prediction at the time scale
    images = [image_url(f"coffee.png?n={n}") for n in range(3)]
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        deferrable=True,
        defer_after=0.5,
        poll_interval=0.2,
    )
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(cast(Any, {"ti": FakeTaskInstance(), "task_state_store": DictStore()}))
    reads_on_the_worker = emulator.ledger()["requests"]["get"]
    assert reads_on_the_worker >= 3  # it polled here first
    trigger = deferred.value.trigger
    assert isinstance(trigger, Blip2BatchPredictionTrigger)
    assert trigger.return_by is None and trigger.not_before is not None
    # The trigger reads each prediction a poll interval after the worker's last read of it, not
    # a poll interval after its create (its deadline less the timeout).
    for prediction_id, deadline in trigger.predictions.items():
        assert trigger.poll_from[prediction_id] > deadline - operator.timeout + 2 * operator.poll_interval
    summary, deferrals = run_batch(operator, DictStore())
    assert summary["succeeded"] == 3 and deferrals == 1


def test_batch_resumes_after_trigger_teardowns_without_duplicate_creates(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    emulator = connect(latency=20.0)  # 1 s per prediction at the time scale
    images = [image_url(f"coffee.png?n={n}") for n in range(15)]
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        questions={"cup": "Is there a cup?", "dog": "Is there a dog?"},
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    summary, _ = run_batch(operator, DictStore(), interrupt=lambda cycle: 0.5)
    assert summary["total"] == 30 and summary["succeeded"] == 30
    assert emulator.ledger()["creates"] == 30


def test_batch_retry_reuses_created_predictions_and_results(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    images = [image_url(f"rocket.webp?n={n}") for n in range(12)]
    store = DictStore()

    class DiesAfterFirstRound(Blip2BatchPredictionOperator):
        def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
            open_journal(self, context)  # the worker dies before recording anything
            raise RuntimeError("worker lost")

    first = DiesAfterFirstRound(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    with pytest.raises(RuntimeError, match="worker lost"):
        run_batch(first, store)
    assert batch_connection.ledger()["creates"] == 10
    retry = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    summary, _ = run_batch(retry, store)
    assert summary["succeeded"] == 12
    assert batch_connection.ledger()["creates"] == 12


def test_batch_records_broken_images_and_fails_over_the_ratio(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    images = [
        image_url("chelsea.jpg"),
        image_url("not-an-image.jpg"),
        image_url("missing.jpg"),
        image_url("coffee.png"),
    ]
    output = tmp_path / "r.jsonl"
    tolerant = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(output),
        caption=True,
        max_failed_ratio=0.5,
        deferrable=False,
        poll_interval=0.1,
    )
    summary, deferrals = run_batch(tolerant, DictStore())
    assert deferrals == 0  # deferrable=False waits on the worker
    assert (summary["succeeded"], summary["failed"]) == (2, 2)
    lines = {
        json.loads(line)["image"].rsplit("/", 1)[1]: json.loads(line)
        for line in output.read_text().splitlines()
    }
    assert lines["not-an-image.jpg"]["status"] == "error" and lines["not-an-image.jpg"]["error"]
    assert lines["missing.jpg"]["status"] == "error"
    assert lines["chelsea.jpg"]["status"] == "success"

    strict = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(output),
        caption=True,
        deferrable=False,
        poll_interval=0.1,
    )
    output.unlink()
    with pytest.raises(AirflowFailException, match=r"2 of 4 predictions failed.*max_failed_ratio=0"):
        run_batch(strict, DictStore())
    assert len(output.read_text().splitlines()) == 4  # the results are written before failing
    if OPENLINEAGE:  # a failed batch still reports what it wrote
        lineage = lineage_names(strict.get_openlineage_facets_on_complete(FakeTaskInstance()))
        assert lineage is not None and lineage["outputs"] == [("file", str(output), 4)]


def test_batch_prediction_timeout_is_cancelled_and_recorded(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    emulator = connect(latency=2000.0)
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=[image_url("chelsea.jpg")],
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        max_failed_ratio=1.0,
        timeout=0.5,
        poll_interval=0.1,
        deferrable=True,
        defer_after=0,
    )
    summary, _ = run_batch(operator, DictStore())
    assert summary["failed"] == 1
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert line["status"] == "timeout" and "cancelled" in line["error"]
    assert emulator.ledger()["requests"]["cancel"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": ["ftp://h/a.jpg"]}, "is not an https://"),
        ({"images": ["https://h/a.jpg"], "temperature": 3}, "temperature"),
        ({"images": ["https://h/a.jpg"], "questions": {}}, "questions is empty"),
    ],
)
def test_batch_bad_input_fails_before_any_create(
    batch_connection: EmulatorServer, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    operator = Blip2BatchPredictionOperator(task_id="batch", output_uri=str(tmp_path / "r.jsonl"), **kwargs)
    with pytest.raises(AirflowFailException, match=message):
        run_batch(operator, DictStore())
    assert batch_connection.ledger()["creates"] == 0
    if OPENLINEAGE:  # nothing was written: no output in the lineage
        lineage = lineage_names(operator.get_openlineage_facets_on_complete(FakeTaskInstance()))
        assert lineage is not None and lineage["outputs"] == []


def test_batch_trigger_serializes_no_secrets_and_waits_for_resume_after(
    batch_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    hook = Blip2Hook()
    ids = [
        hook.create_prediction(image_url("chelsea.jpg?X-Amz-Signature=feedbeef"), caption=True)
        for _ in range(4)
    ]
    deadline = time.time() + 60
    trigger = Blip2BatchPredictionTrigger(
        predictions=dict.fromkeys(ids, deadline),
        blip2_conn_id="blip2_default",
        poll_interval=0.05,
        resume_after=2,
        recent_requests=hook.budget().recent_requests(),
    )
    _, kwargs = trigger.serialize()
    text = json.dumps(kwargs) + repr(trigger)
    assert "feedbeef" not in text and "test-api-key" not in text
    payload = asyncio.run(_first_payload(trigger))
    assert 2 <= len(payload["finished"]) <= 4
    assert set(payload["finished"]) <= set(ids)
    assert all(result["status"] == "success" and result["output"] for result in payload["finished"].values())
    assert "feedbeef" not in json.dumps(payload)
    assert payload["recent_requests"] and all(isinstance(t, float) for t in payload["recent_requests"])


def test_batch_trigger_in_a_triggerer_keeps_polling_until_the_deferral_settles(
    batch_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    # Each return to the worker goes through the scheduler, and an event too soon after the deferral
    # can be failed by a stale executor event (apache/airflow#67287): the event waits for
    # not_before, and hands back every prediction that ended meanwhile rather than the first one.
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    hook = Blip2Hook()
    ids = [hook.create_prediction(image_url(f"coffee.png?n={n}"), caption=True) for n in range(4)]
    for in_triggerer in (True, False):
        not_before = time.time() + 1.5
        trigger = Blip2BatchPredictionTrigger(
            predictions=dict.fromkeys(ids, time.time() + 60),
            blip2_conn_id="blip2_default",
            poll_interval=0.05,
            resume_after=1,
            not_before=not_before,
        )
        if in_triggerer:
            trigger.task_instance = SimpleNamespace(  # type: ignore[assignment]
                dag_id="d", run_id="r", task_id="t", map_index=-1
            )
        started = time.time()
        payload = asyncio.run(_first_payload(trigger))
        if in_triggerer:
            assert time.time() >= not_before - 0.01
            assert set(payload["finished"]) == set(ids)  # all four ended within the settle
        else:
            # Inline, the first reads that find predictions ended come back at once: the four were
            # due together, read together, and had all ended.
            assert set(payload["finished"]) == set(ids)
            assert time.time() - started < 1.5


# ------------------------------------------------------------------------------------------------
# Images in S3 and GCS (local servers, real connections, real signing)
# ------------------------------------------------------------------------------------------------

SAMPLES = ["astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp"]


def test_batch_over_an_s3_prefix_writes_results_to_s3(
    batch_connection: EmulatorServer, s3_connection: Any, image_dir: Path
) -> None:
    s3_connection.create_bucket("uploads")
    for name in SAMPLES:
        s3_connection.put_object(
            "uploads", f"2026-11-27/user-{name[0]}/{name}", (image_dir / name).read_bytes()
        )
    s3_connection.put_object("uploads", "2026-11-27/readme.txt", b"not an image")
    s3_connection.put_object("uploads", "2026-11-28/later.jpg", (image_dir / "chelsea.jpg").read_bytes())
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images="s3://uploads/2026-11-27/",
        questions={"cat": "Is there a cat?", "cup": "Is there a cup?"},
        output_uri="s3://uploads/moderation/2026-11-27.jsonl",
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    summary, _ = run_batch(operator, DictStore())
    assert (summary["total"], summary["succeeded"], summary["images"]) == (8, 8, 4)
    body = (
        s3_connection.client().get_object(Bucket="uploads", Key="moderation/2026-11-27.jsonl")["Body"].read()
    )
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["image"] for line in lines[::2]] == sorted(
        f"s3://uploads/2026-11-27/user-{name[0]}/{name}" for name in SAMPLES
    )
    assert "X-Amz-Signature" not in body.decode()
    assert batch_connection.ledger()["creates"] == 8
    if OPENLINEAGE:
        assert lineage_names(operator.get_openlineage_facets_on_complete(FakeTaskInstance())) == {
            "inputs": [("s3://uploads", "2026-11-27")],
            "outputs": [("s3://uploads", "moderation/2026-11-27.jsonl", 8)],
        }


def test_batch_over_a_gcs_prefix_writes_results_to_gcs(
    batch_connection: EmulatorServer, gcs_connection: Any, image_dir: Path
) -> None:
    gcs_connection.create_bucket("catalogue")
    for name in SAMPLES:
        gcs_connection.put_object("catalogue", f"products/{name}", (image_dir / name).read_bytes())
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images="gs://catalogue/products/",
        caption=True,
        output_uri="gs://catalogue/alt-text/captions.jsonl",
        deferrable=False,
        poll_interval=0.1,
    )
    summary, _ = run_batch(operator, DictStore())
    assert (summary["total"], summary["succeeded"]) == (4, 4)
    from airflow_provider_blip2.storage import ObjectStorage

    lines = ObjectStorage().read_bytes("gs://catalogue/alt-text/captions.jsonl").decode().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [
        f"gs://catalogue/products/{name}" for name in SAMPLES
    ]
    assert all(json.loads(line)["output"].startswith("[emulated]") for line in lines)
    if OPENLINEAGE:
        assert lineage_names(operator.get_openlineage_facets_on_complete(FakeTaskInstance())) == {
            "inputs": [("gs://catalogue", "products")],
            "outputs": [("gs://catalogue", "alt-text/captions.jsonl", 4)],
        }


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["s3://uploads/a.jpg", "s3://uploads/gone.jpg"], "s3://uploads/gone.jpg"),
        ("s3://no-such-bucket/day/", "no-such-bucket"),
        (["s3://no-such-bucket/a.jpg"], "no-such-bucket"),
    ],
)
def test_batch_missing_objects_fail_before_any_create(
    batch_connection: EmulatorServer,
    s3_connection: Any,
    image_dir: Path,
    tmp_path: Path,
    images: Any,
    message: str,
) -> None:
    s3_connection.create_bucket("uploads")
    s3_connection.put_object("uploads", "a.jpg", (image_dir / "chelsea.jpg").read_bytes())
    operator = Blip2BatchPredictionOperator(
        task_id="batch", images=images, output_uri=str(tmp_path / "r"), caption=True
    )
    with pytest.raises(AirflowFailException, match=message):
        run_batch(operator, DictStore())
    assert batch_connection.ledger()["creates"] == 0


def test_single_operator_signs_s3_and_gcs_images(
    batch_connection: EmulatorServer, s3_connection: Any, gcs_connection: Any, image_dir: Path
) -> None:
    from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator

    s3_connection.create_bucket("photos")
    s3_connection.put_object("photos", "cat.jpg", (image_dir / "chelsea.jpg").read_bytes())
    gcs_connection.create_bucket("photos")
    gcs_connection.put_object("photos", "cup.png", (image_dir / "coffee.png").read_bytes())
    for image in ("s3://photos/cat.jpg", "gs://photos/cup.png"):
        operator = Blip2PredictionOperator(
            task_id="one", image=image, caption=True, deferrable=False, poll_interval=0.1
        )
        context: Any = {"ti": FakeTaskInstance(), "task_state_store": DictStore()}
        assert str(operator.execute(context)).startswith("[emulated]")
    assert batch_connection.ledger()["creates"] == 2
    missing = Blip2PredictionOperator(
        task_id="one", image="s3://photos/dog.jpg", caption=True, deferrable=False
    )
    with pytest.raises(AirflowFailException, match=r"s3://photos/dog\.jpg"):
        missing.execute({"ti": FakeTaskInstance(), "task_state_store": DictStore()})  # type: ignore[typeddict-item]
    assert batch_connection.ledger()["creates"] == 2


def test_batch_keeps_no_signed_url_in_its_progress(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    images = [image_url(f"chelsea.jpg?X-Amz-Signature=5ec7e7{n:02d}") for n in range(3)]
    store = DictStore()

    class StopsAfterFirstRound(Blip2BatchPredictionOperator):
        def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
            raise RuntimeError("stop")

    operator = StopsAfterFirstRound(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        poll_interval=0.1,
        deferrable=True,
        defer_after=0,
    )
    with pytest.raises(RuntimeError, match="stop"):
        run_batch(operator, store)
    assert store.values and "5ec7e7" not in json.dumps(store.values)
    summary, _ = run_batch(
        Blip2BatchPredictionOperator(
            task_id="batch",
            images=images,
            output_uri=str(tmp_path / "r.jsonl"),
            caption=True,
            poll_interval=0.1,
        ),
        store,
    )
    assert summary["succeeded"] == 3 and batch_connection.ledger()["creates"] == 3
    assert "5ec7e7" not in (tmp_path / "r.jsonl").read_text()
    changed = Blip2BatchPredictionOperator(
        task_id="batch", images=images[:1], output_uri=str(tmp_path / "r.jsonl"), caption=True
    )
    store.values.clear()
    BatchJournal(store).start([BatchItem(image_key(images[2]), "caption", "")])
    with pytest.raises(AirflowFailException, match="images no longer holds the URL"):
        run_batch(changed, store)


def test_batch_predicts_again_what_a_killed_trigger_cancelled(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    emulator = connect(latency=200.0)  # 10 s at the time scale: still running when killed
    images = [image_url(f"coffee.png?n={n}") for n in range(3)]
    store = DictStore()
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        poll_interval=0.1,
        deferrable=True,
        defer_after=0,
    )
    context: Any = {"ti": FakeTaskInstance(), "task_state_store": store}
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    asyncio.run(deferred.value.trigger.on_kill())  # a user cleared the deferred task
    assert emulator.ledger()["requests"]["cancel"] == 3
    emulator.config.latency = 2.0
    summary, _ = run_batch(
        Blip2BatchPredictionOperator(
            task_id="batch",
            images=images,
            output_uri=str(tmp_path / "r.jsonl"),
            caption=True,
            poll_interval=0.1,
        ),
        store,
    )
    assert (summary["succeeded"], summary["failed"]) == (3, 0)
    assert emulator.ledger()["creates"] == 6


def test_batch_refuses_an_output_bucket_that_does_not_exist(
    batch_connection: EmulatorServer, s3_connection: Any, image_url: Callable[[str], str]
) -> None:
    operator = Blip2BatchPredictionOperator(
        task_id="batch", images=[image_url("chelsea.jpg")], output_uri="s3://no-reports/r.jsonl", caption=True
    )
    with pytest.raises(AirflowFailException, match="no-reports"):
        run_batch(operator, DictStore())
    assert batch_connection.ledger()["creates"] == 0


def test_batch_expands_prefixes_in_a_list(
    batch_connection: EmulatorServer, s3_connection: Any, image_dir: Path, tmp_path: Path
) -> None:
    s3_connection.create_bucket("mixed")
    for name in SAMPLES:
        s3_connection.put_object("mixed", f"day/{name}", (image_dir / name).read_bytes())
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=["s3://mixed/day/", "s3://mixed/day/chelsea.jpg"],
        output_uri=str(tmp_path / "r.jsonl"),
        question="Is there a cat?",
        poll_interval=0.1,
        deferrable=True,
        defer_after=0,
    )
    summary, _ = run_batch(operator, DictStore())
    assert (summary["total"], summary["succeeded"]) == (4, 4)
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [line["image"] for line in lines] == [f"s3://mixed/day/{name}" for name in SAMPLES]
    assert {line["question"] for line in lines} == {"Is there a cat?"}


def test_batch_before_airflow_3_3_keeps_its_journal_in_xcom(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    images = [image_url(name) for name in SAMPLES] + [image_url(f"chelsea.jpg?n={n}") for n in range(10)]
    operator = Blip2BatchPredictionOperator(
        task_id="batch",
        images=images,
        output_uri=str(tmp_path / "r.jsonl"),
        caption=True,
        poll_interval=0.1,
        deferrable=True,
        defer_after=0,
    )
    ti = FakeTaskInstance()
    summary, deferrals = run_batch(operator, None, ti=ti)
    assert (summary["total"], summary["succeeded"]) == (14, 14) and deferrals >= 2
    assert any(key.startswith("blip2_batch/part/") for key in ti.xcom)
    assert batch_connection.ledger()["creates"] == 14


def test_an_https_batch_imports_no_cloud_library(
    batch_connection: EmulatorServer, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    """An https-only DAG never loads boto3, the Google libraries or OpenLineage, installed or not."""
    import os
    import subprocess
    import sys

    script = f"""
import sys, json
from tests.batch_driver import DictStore, run_batch
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator
operator = Blip2BatchPredictionOperator(
    task_id="batch", images={[image_url("chelsea.jpg"), image_url("coffee.png")]!r},
    output_uri={str(tmp_path / "r.jsonl")!r}, caption=True, poll_interval=0.1, deferrable=True,
    defer_after=0,
)
summary, _ = run_batch(operator, DictStore())
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("boto3", "botocore", "aiobotocore", "openlineage")
               or m.startswith(("google.cloud.storage", "google.auth", "airflow.providers.amazon.aws.hooks",
                                "airflow.providers.google.cloud.hooks",
                                "airflow.providers.openlineage.extractors")))
print(json.dumps({{"succeeded": summary["succeeded"], "heavy": heavy}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"succeeded": 2, "heavy": []}


# ------------------------------------------------------------------------------------------------
# Retries: transient failures are predicted again, permanent ones kept
# ------------------------------------------------------------------------------------------------

RETRY_QUESTIONS = {"cat": "Is there a cat?", "cup": "Is there a cup?"}
MISSING = "gone-404.png"


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A file server of 60 small images with distinct names, ``upload-00.png`` to ``upload-59.png``."""
    from PIL import Image

    directory = tmp_path_factory.mktemp("uploads")
    for n in range(60):
        Image.new("RGB", (48, 32), (n * 4, 120, 200 - n * 3)).save(directory / f"upload-{n:02d}.png")
    with serve_directory(directory) as base_url:
        yield base_url


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_retried_batch(
    lines: list[dict[str, Any]], ledger: dict[str, Any], summary: dict[str, Any]
) -> None:
    """Every readable image succeeded, the missing one was predicted once per question."""
    missing = [line for line in lines if line["image"].endswith(MISSING)]
    assert [line["status"] for line in missing] == ["error"] * len(RETRY_QUESTIONS)
    assert all("could not download" in line["error"] and line["attempts"] == 1 for line in missing)
    others = [line for line in lines if not line["image"].endswith(MISSING)]
    assert {line["status"] for line in others} == {"success"}
    assert all(line["output"] and line["cost"] == pytest.approx(0.0011) for line in others)
    # Every attempt an output line counts is a create the service saw, item by item.
    by_input = ledger["creates_by_input"]
    for line in lines:
        assert by_input[f"{line['image'].rsplit('/', 1)[1]}|{line['question']}"] == line["attempts"], line
    assert summary["attempts"] == sum(line["attempts"] for line in lines) == ledger["creates"]
    # One create per item, plus one for each ambiguous create and each prediction the service ended
    # with a retryable error (a prediction that was both counts once).
    items = len(lines)
    assert ledger["creates"] <= items + ledger["created_5xx_injected"] + ledger["provider_failed_injected"]
    assert ledger["created_5xx_injected"] > 0 and ledger["provider_failed_injected"] > 0
    assert summary["retried"] == sum(line["attempts"] > 1 for line in lines) > 0
    assert summary["statuses"] == {"error": len(missing), "success": len(others)}
    assert summary["cost"] == pytest.approx(0.0011 * len(others))


def test_task_retries_predict_again_what_failed_transiently_and_keep_the_rest(
    connect: Callable[..., EmulatorServer],
    uploads: str,
    tmp_path: Path,
) -> None:
    # Seed 15 at these rates (faults drawn per image, question and create): 5 ambiguous creates and
    # 6 retryable errors among 12 images; some items fail in two tries, none in three.
    emulator = connect(fault_provider_failed=0.2, fault_created_5xx=0.2, seed=15)
    images = [f"{uploads}/upload-{n:02d}.png" for n in range(12)] + [f"{uploads}/{MISSING}"]
    output = tmp_path / "r.jsonl"
    store = DictStore()

    def batch(**kwargs: Any) -> Blip2BatchPredictionOperator:
        return Blip2BatchPredictionOperator(
            task_id="batch",
            images=images,
            questions=RETRY_QUESTIONS,
            output_uri=str(output),
            max_failed_ratio=0.1,
            deferrable=True,
            defer_after=0,
            poll_interval=0.1,
            **kwargs,
        )

    summary, failures = run_tries(batch, store, retries=2)
    assert len(failures) == 2  # the first two tries ended with failures a new try can fix
    assert "ambiguous" in str(failures[0]) and "the next try predicts them again" in str(failures[0])
    ledger = emulator.ledger()
    _check_retried_batch(_lines(output), ledger, summary)
    assert ledger["creates"] == 37  # 26 items, 5 ambiguous creates, 6 retryable errors

    # Clearing the finished task: nothing a new try can fix is left, so nothing is created.
    assert store.values  # kept: the batch has failures
    cleared, _ = run_batch(batch(), store, ti=FakeTaskInstance(try_number=4, max_tries=4))
    assert emulator.ledger()["creates"] == 37 and cleared["succeeded"] == 24
    # With retry_failures="all" a clear predicts again the permanent failures, and only them.
    again, _ = run_batch(batch(retry_failures="all"), store, ti=FakeTaskInstance(try_number=5, max_tries=4))
    assert emulator.ledger()["creates_by_input"][f"{MISSING}|Is there a cat?"] == 2
    assert emulator.ledger()["creates"] == 39 and again["succeeded"] == 24 and again["attempts"] == 39


def test_retry_failures_none_keeps_every_failure_and_max_attempts_1_creates_nothing_again(
    connect: Callable[..., EmulatorServer],
    uploads: str,
    tmp_path: Path,
) -> None:
    emulator = connect(fault_provider_failed=1.0, fault_created_5xx=0.0)
    output = tmp_path / "r.jsonl"

    def batch() -> Blip2BatchPredictionOperator:
        return Blip2BatchPredictionOperator(
            task_id="batch",
            images=[f"{uploads}/upload-{n:02d}.png" for n in range(3)],
            caption=True,
            output_uri=str(output),
            retry_failures="none",
            max_attempts=1,
            max_failed_ratio=1.0,
            poll_interval=0.1,
        )

    summary, failures = run_tries(batch, DictStore(), retries=2)
    assert failures == []  # nothing for a retry to do: the first try succeeds with its failures
    assert summary["statuses"] == {"error": 3} and summary["attempts"] == 3
    assert {line["attempts"] for line in _lines(output)} == {1}
    assert emulator.ledger()["creates"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retry_failures": "some"}, "retry_failures must be one of"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"defer_after": -1}, "defer_after must be a number of seconds, 0 or more"),
    ],
)
def test_retry_parameters_are_checked_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Blip2BatchPredictionOperator(task_id="b", images=["https://h/a.jpg"], output_uri="r", **kwargs)
    if "retry_failures" not in kwargs:  # the batch's alone
        with pytest.raises(ValueError, match=message):
            Blip2PredictionOperator(task_id="p", image="https://h/a.jpg", **kwargs)


RETRY_DAG = """
import datetime

import pendulum
from airflow.providers.common.compat.sdk import DAG
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator

with DAG(
    dag_id="blip2_batch_retries",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    Blip2BatchPredictionOperator(
        task_id="moderate",
        images={images!r},
        questions={questions!r},
        output_uri={output!r},
        max_failed_ratio=0.02,
        retries=2,
        retry_delay=datetime.timedelta(0),
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
"""


@requires_airflow_3_3
def test_a_60_image_batch_with_retries_2_ends_with_every_readable_image_succeeded(
    uploads: str, tmp_path: Path
) -> None:
    """
    Real Airflow task retries (``airflow dags test``, the task state store) against faults.

    60 images and a missing one, 2 questions; the emulator answers 8 % of the creates 500 after
    creating them and ends 8 % of the predictions with a retryable PROVIDER_FAILED. With seed 1 the
    faults hit 14 creates and 12 predictions, and some items fail in two tries: the third try ends
    the batch with every readable image answered.
    """
    images = [f"{uploads}/upload-{n:02d}.png" for n in range(60)] + [f"{uploads}/{MISSING}"]
    output = tmp_path / "answers.jsonl"
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "retries.py").write_text(
        RETRY_DAG.format(images=images, questions=RETRY_QUESTIONS, output=str(output))
    )
    config = EmulatorConfig(
        api_keys=(API_KEY,),
        time_scale=TIME_SCALE,
        seed=1,
        fault_provider_failed=0.08,
        fault_created_5xx=0.08,
        requests_per_minute=600,
        max_in_flight=20,
    )
    with EmulatorServer(config) as emulator:
        connection = connection_json(
            emulator.url, requests_per_minute=600, rate_window=60 * TIME_SCALE, max_concurrency=20
        )
        sandbox = AirflowSandbox(
            tmp_path / "home", dags_folder=dags, connections={"blip2_default": json.loads(connection)}
        )
        sandbox.migrate()
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", "blip2_batch_retries"],
            env=sandbox.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        log = result.stdout + result.stderr
        ledger = emulator.ledger()
    assert sandbox.task_states("blip2_batch_retries") == {"moderate": "success"}, log[-5000:]
    [(try_number,)] = sandbox._query(
        "SELECT try_number FROM task_instance WHERE dag_id = ? AND task_id = ?",
        ("blip2_batch_retries", "moderate"),
    )
    assert try_number == 3
    assert "predictions failed in a way a new try can fix" in log
    assert "This try predicts again" in log
    [summary] = sandbox.xcom("blip2_batch_retries", "moderate")
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (122, 120, 2)
    _check_retried_batch(_lines(output), ledger, summary)
    assert ledger["creates"] == 148  # 122 items, 14 ambiguous creates, 12 retryable errors
