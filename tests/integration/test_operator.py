"""
Tests of Blip2PredictionOperator in a real Airflow, and of its reattach-on-retry logic.

The DAG tests write one DAG file whose independent tasks each cover one scenario, and run it once
with ``airflow dags test`` in a subprocess with a throwaway ``AIRFLOW_HOME`` (SQLite): the test
process may already have imported Airflow with another configuration, so an in-process
``dag.test()`` could not get a metadata DB of its own. ``dags test`` runs deferred triggers inline
and retries failed tries. Every task talks to an emulator of its own (one connection each), so each
ledger belongs to one task.

Starts: the emulator over HTTP on loopback, a local file server for the images, and `airflow dags
test` processes (SQLite).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from airflow.providers.common.compat.sdk import AirflowException, TaskDeferred

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from airflow_provider_blip2.links.blip2 import Blip2PredictionLink
from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator
from airflow_provider_blip2.triggers.blip2 import Blip2PredictionTrigger
from scripts.sandbox import AirflowSandbox
from tests.batch_driver import _first_payload
from tests.conftest import API_KEY, TIME_SCALE, connection_json, requires_airflow_3_3
from tests.lineage import OPENLINEAGE, dataset_names, file_transport_env, read_events

DAG_ID = "blip2_operator_scenarios"
SIGNATURE = "X-Amz-Signature=0c9e7a51d2b4f6a8"
# The mapped images are signed differently: no other task may have masked their URLs already.
MAPPED_SIGNATURE = "X-Amz-Signature=3d8f1b6e90ac2477"
# Emulated latencies before the 0.05 time scale: 2 -> 0.1 s, 40 -> 2 s, 2000 -> 100 s.
LATENCY = {
    "sync": 2.0,
    "deferred": 2.0,
    "mapped": 2.0,
    "templated": 2.0,
    "invalid": 2.0,
    "failed_sync": 2.0,
    "failed_deferred": 2.0,
    "timeout_sync": 2000.0,
    "timeout_deferred": 2000.0,
    # The first tries of the other tasks run between retry_sync's two tries (about 15 s on a loaded
    # machine): 24 s keeps its prediction running until the retry. retry_deferred runs after it, alone,
    # so its retry comes at once.
    "retry_sync": 480.0,
    "retry_deferred": 40.0,
    "batch": 2.0,
}
MAPPED_IMAGES = ["chelsea.jpg", "coffee.png", "rocket.webp"]
# How the UI (Airflow 3's API server, Airflow 2's webserver) reads a task instance's extra links.
UI_LINKS = """
import json, sys
from airflow.models.serialized_dag import SerializedDagModel
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
from sqlalchemy import select

dag_id, name = sys.argv[1:]
links = {}
with create_session() as session:
    dag = SerializedDagModel.get_dag(dag_id, session=session)
    if dag is None:  # Airflow 2's `dags test` stores none: serialize the DAG as its DAG processor does
        from airflow.models.dagbag import DagBag
        from airflow.serialization.serialized_objects import SerializedDAG

        found = DagBag(include_examples=False).get_dag(dag_id)
        dag = SerializedDAG.from_dict(SerializedDAG.to_dict(found))
    for ti in session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_id)):
        task = dag.get_task(ti.task_id)
        if name in task.extra_links:
            key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
            links[key] = task.get_extra_links(ti, name)
print(json.dumps(links))
"""

DAG_TEMPLATE = '''
from __future__ import annotations

import datetime

import pendulum

from airflow.providers.common.compat.sdk import DAG, AirflowException
from airflow_provider_blip2.links.blip2 import Blip2PredictionLink
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator

IMAGES = {images!r}
SIGNED = "?{signature}"


def signed(name):
    return IMAGES + "/" + name + SIGNED


class LinkAtResume(Blip2PredictionOperator):
    """Reads its extra link first thing when it resumes: the link was pushed before it deferred."""

    def execute_complete(self, context, event):
        ti = context["ti"]
        ti.xcom_push(key="link_at_resume", value=Blip2PredictionLink().get_link(self, ti_key=ti))
        return super().execute_complete(context, event)


class CrashAfterSubmit(Blip2PredictionOperator):
    """Its first try dies right after the prediction was created and its id stored."""

    def poll_until_complete(self, external_id, context):
        if context["ti"].try_number == 1:
            raise AirflowException("simulated worker crash after submitting " + str(external_id))
        return super().poll_until_complete(external_id, context)


with DAG(
    dag_id="{dag_id}",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={{"image": signed("astronaut.jpg"), "question": "Who is this?"}},
    default_args={{"poll_interval": 0.1}},
) as dag:
    Blip2PredictionOperator(
        task_id="sync", blip2_conn_id="bl_sync", image=signed("chelsea.jpg"), caption=True, deferrable=False
    )
    LinkAtResume(
        task_id="deferred",
        blip2_conn_id="bl_deferred",
        image=signed("coffee.png"),
        question="Is there a cup?",
        deferrable=True,
        defer_after=0,
    )
    LinkAtResume.partial(
        task_id="mapped", blip2_conn_id="bl_mapped", caption=True, deferrable=True, defer_after=0
    ).expand(image=[IMAGES + "/" + name + "?{mapped_signature}" for name in {mapped!r}])
    Blip2PredictionOperator(
        task_id="templated",
        blip2_conn_id="bl_templated",
        image="{{{{ params.image }}}}",
        question="{{{{ params.question }}}}",
        context="Question: {{{{ dag.dag_id }}}}? Answer: a dag.",
        deferrable=False,
    )
    Blip2PredictionOperator(
        task_id="invalid",
        blip2_conn_id="bl_invalid",
        image=signed("chelsea.jpg"),
        caption=True,
        question="What is this?",
        retries=2,
        retry_delay=datetime.timedelta(0),
    )
    Blip2PredictionOperator(
        task_id="failed_sync", blip2_conn_id="bl_failed_sync", image=signed("missing.jpg"), deferrable=False
    )
    Blip2PredictionOperator(
        task_id="failed_deferred",
        blip2_conn_id="bl_failed_deferred",
        image=signed("missing.jpg"),
        deferrable=True,
        defer_after=0,
    )
    Blip2PredictionOperator(
        task_id="timeout_sync",
        blip2_conn_id="bl_timeout_sync",
        image=signed("chelsea.jpg"),
        timeout=1,
        poll_interval=0.2,
        deferrable=False,
    )
    Blip2PredictionOperator(
        task_id="timeout_deferred",
        blip2_conn_id="bl_timeout_deferred",
        image=signed("chelsea.jpg"),
        timeout=1,
        poll_interval=0.2,
        deferrable=True,
        defer_after=0,
    )
    retry_sync = CrashAfterSubmit(
        task_id="retry_sync",
        blip2_conn_id="bl_retry_sync",
        image=signed("coffee.png"),
        caption=True,
        retries=1,
        retry_delay=datetime.timedelta(0),
        deferrable=False,
    )
    retry_deferred = CrashAfterSubmit(
        task_id="retry_deferred",
        blip2_conn_id="bl_retry_deferred",
        image=signed("rocket.webp"),
        caption=True,
        retries=1,
        retry_delay=datetime.timedelta(0),
        deferrable=True,
        defer_after=0,
    )
    retry_sync >> retry_deferred
    Blip2BatchPredictionOperator(
        task_id="batch",
        blip2_conn_id="bl_batch",
        images=[signed("chelsea.jpg"), signed("coffee.png")],
        output_uri={batch_output!r},
        caption=True,
        deferrable=True,
        defer_after=0,
    )
'''


@dataclass
class DagRunResult:
    """One ``airflow dags test`` run of the scenario DAG."""

    sandbox: AirflowSandbox
    emulators: dict[str, EmulatorServer]
    image_server: str
    returncode: int
    output: str
    conf: dict[str, Any]
    lineage_file: Path
    batch_output: Path

    def state(self, task_id: str) -> str:
        return self.sandbox.task_states(DAG_ID)[task_id]

    def xcom(self, task_id: str, key: str = "return_value") -> list[Any]:
        return self.sandbox.xcom(DAG_ID, task_id, key)

    def ledger(self, task_id: str) -> dict[str, Any]:
        return self.emulators[task_id].ledger()

    def predictions(self, task_id: str) -> dict[str, Any]:
        """The emulator's predictions of a task, by id."""
        return dict(self.emulators[task_id].app.emulator.predictions)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.sandbox.database) as db:
            return db.execute(sql, params).fetchall()

    @cached_property
    def links(self) -> dict[str, str | None]:
        """The "BLIP-2 prediction" link of every task instance, as the UI reads it (serialized DAG)."""
        result = subprocess.run(
            [sys.executable, "-c", UI_LINKS, DAG_ID, Blip2PredictionLink.name],
            env=self.sandbox.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def lineage_events(self, task_id: str) -> list[dict[str, Any]]:
        """The OpenLineage COMPLETE events the listener wrote for a task, by map index."""
        return read_events(self.lineage_file, f"{DAG_ID}.{task_id}")

    def task_log(self, task_id: str) -> str:
        """The lines ``dags test`` printed while running the task (every try and map index)."""
        sections, current = [], None
        for line in self.output.splitlines():
            started = re.search(r"\[DAG TEST\] starting task_id=(\S+)", line)
            if started:
                current = started.group(1)
            if current == task_id:
                sections.append(line)
            if re.search(r"\[DAG TEST\] end task task_id=(\S+)", line):
                current = None
        return "\n".join(sections)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory: pytest.TempPathFactory, image_server: str) -> Iterator[DagRunResult]:
    """Run the scenario DAG once; every test of this module checks one task of that run."""
    base = tmp_path_factory.mktemp("airflow")
    dags = base / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").write_text(
        DAG_TEMPLATE.format(
            images=image_server,
            signature=SIGNATURE,
            mapped_signature=MAPPED_SIGNATURE,
            dag_id=DAG_ID,
            mapped=MAPPED_IMAGES,
            batch_output=str(base / "batch" / "captions.jsonl"),
        ).lstrip()
    )
    emulators = {
        task_id: EmulatorServer(
            EmulatorConfig(api_keys=(API_KEY,), time_scale=TIME_SCALE, latency=latency)
        ).start()
        for task_id, latency in LATENCY.items()
    }
    # With the openlineage provider installed, its listener writes every event to a file in the home.
    lineage_file = base / "home" / "lineage.jsonl"
    try:
        sandbox = AirflowSandbox(
            base / "home",
            dags_folder=dags,
            connections={
                f"bl_{task_id}": json.loads(connection_json(server.url))
                for task_id, server in emulators.items()
            },
            extra_env=file_transport_env(lineage_file),
        )
        sandbox.migrate()
        conf = {"image": f"{image_server}/rocket.webp?{SIGNATURE}", "question": "Is this a rocket?"}
        result = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "--conf", json.dumps(conf)],
            env=sandbox.env(),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        (base / "dags_test.log").write_text(result.stdout + "\n" + result.stderr)
        yield DagRunResult(
            sandbox=sandbox,
            emulators=emulators,
            image_server=image_server,
            returncode=result.returncode,
            output=result.stdout + "\n" + result.stderr,
            conf=conf,
            lineage_file=lineage_file,
            batch_output=base / "batch" / "captions.jsonl",
        )
    finally:
        for server in emulators.values():
            server.stop()


def test_the_run_ran_every_scenario(dag_run: DagRunResult) -> None:
    states = dag_run.sandbox.task_states(DAG_ID)
    expected_failures = {"invalid", "failed_sync", "failed_deferred", "timeout_sync", "timeout_deferred"}
    failed = {task for task, state in states.items() if state == "failed"}
    assert failed == expected_failures, dag_run.output[-5000:]
    assert all(state == "success" for task, state in states.items() if task not in expected_failures)
    assert dag_run.returncode != 0  # some tasks failed on purpose: the run failed
    assert "Traceback" not in dag_run.task_log("sync")


# ---- successful predictions ----------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["sync", "deferred"])
def test_the_output_is_the_return_value_and_the_id_is_pushed(dag_run: DagRunResult, task_id: str) -> None:
    assert dag_run.state(task_id) == "success"
    [prediction_id] = dag_run.xcom(task_id, "prediction_id")
    predictions = dag_run.predictions(task_id)
    assert list(predictions) == [prediction_id]
    prediction = predictions[prediction_id]
    assert prediction.status == "success"
    assert dag_run.xcom(task_id) == [prediction.output]
    assert isinstance(prediction.output, str) and prediction.output
    # What the API reported is pushed beside the id, and logged.
    assert dag_run.xcom(task_id, "cost") == [prediction.cost] and prediction.cost > 0
    assert dag_run.xcom(task_id, "predict_time") == [prediction.predict_time]
    assert f"cost {prediction.cost}" in dag_run.task_log(task_id)
    ledger = dag_run.ledger(task_id)
    assert ledger["creates"] == 1
    assert ledger["requests"]["create"] == 1


def test_sync_and_deferrable_paths_differ_only_in_where_they_wait(dag_run: DagRunResult) -> None:
    assert "Deferring; waiting for prediction" in dag_run.task_log("deferred")
    assert "running trigger in line" in dag_run.task_log("deferred")
    assert "Deferring" not in dag_run.task_log("sync")
    assert dag_run.predictions("sync")[dag_run.xcom("sync", "prediction_id")[0]].input["caption"] is True
    deferred = dag_run.predictions("deferred")[dag_run.xcom("deferred", "prediction_id")[0]]
    assert deferred.input["question"] == "Is there a cup?"


def test_mapped_over_three_images(dag_run: DagRunResult) -> None:
    states = dag_run.sandbox.task_states(DAG_ID)
    assert [states[f"mapped[{index}]"] for index in range(3)] == ["success"] * 3
    ids = dag_run.xcom("mapped", "prediction_id")
    outputs = dag_run.xcom("mapped")
    assert len(ids) == len(set(ids)) == 3
    predictions = dag_run.predictions("mapped")
    assert sorted(predictions) == sorted(ids)
    # XComs are ordered by map index, like the expanded images.
    for name, prediction_id, output in zip(MAPPED_IMAGES, ids, outputs, strict=True):
        assert predictions[prediction_id].model_input.image_name == name
        assert predictions[prediction_id].output == output
    assert dag_run.ledger("mapped")["creates_by_input"] == {f"{name}|caption": 1 for name in MAPPED_IMAGES}


def test_templated_fields_are_rendered_from_params(dag_run: DagRunResult) -> None:
    assert dag_run.state("templated") == "success"
    [prediction] = dag_run.predictions("templated").values()
    # The run's conf overrides the DAG's default params.
    assert prediction.input["image"] == dag_run.conf["image"]
    assert prediction.input["question"] == "Is this a rocket?"
    assert prediction.input["context"] == f"Question: {DAG_ID}? Answer: a dag."
    assert dag_run.xcom("templated") == [prediction.output]
    [(rendered,)] = dag_run.query(
        "SELECT rendered_fields FROM rendered_task_instance_fields WHERE dag_id = ? AND task_id = ?",
        DAG_ID,
        "templated",
    )
    fields = json.loads(rendered)
    assert fields["question"] == "Is this a rocket?"
    assert fields["context"] == f"Question: {DAG_ID}? Answer: a dag."


# ---- failures ------------------------------------------------------------------------------------------


def test_invalid_input_fails_without_any_request(dag_run: DagRunResult) -> None:
    assert dag_run.state("invalid") == "failed"
    ledger = dag_run.ledger("invalid")
    assert ledger["requests"] == {}
    assert ledger["creates"] == 0
    log = dag_run.task_log("invalid")
    assert "Invalid BLIP-2 input for task invalid" in log
    assert "caption=True" in log and "question=" in log
    # AirflowFailException: no retry although retries=2.
    [(try_number,)] = dag_run.query(
        "SELECT try_number FROM task_instance WHERE dag_id = ? AND task_id = ?", DAG_ID, "invalid"
    )
    assert try_number == 1


@pytest.mark.parametrize("task_id", ["failed_sync", "failed_deferred"])
def test_a_failed_prediction_fails_the_task_with_its_error_code(dag_run: DagRunResult, task_id: str) -> None:
    assert dag_run.state(task_id) == "failed"
    [prediction] = dag_run.predictions(task_id).values()
    assert prediction.status == "error"
    assert dag_run.ledger(task_id)["creates"] == 1
    log = dag_run.task_log(task_id)
    pattern = rf"prediction {prediction.id} ended error \[INPUT_DOWNLOAD_ERROR\]"
    assert re.search(pattern, log, re.IGNORECASE), log[-3000:]
    assert dag_run.xcom(task_id) == []


@pytest.mark.parametrize("task_id", ["timeout_sync", "timeout_deferred"])
def test_a_timeout_cancels_the_prediction_and_fails_the_task(dag_run: DagRunResult, task_id: str) -> None:
    assert dag_run.state(task_id) == "failed"
    ledger = dag_run.ledger(task_id)
    assert ledger["creates"] == 1
    assert ledger["requests"].get("cancel", 0) >= 1
    assert ledger["statuses"]["cancelled"] == 1
    assert ledger["in_flight"] == 0
    [prediction] = dag_run.predictions(task_id).values()
    assert prediction.status == "cancelled"
    log = dag_run.task_log(task_id)
    assert "cancelled" in log
    assert prediction.id in log


# ---- retries -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["retry_sync", "retry_deferred"])
@requires_airflow_3_3
def test_a_retry_reattaches_to_the_first_tries_prediction(dag_run: DagRunResult, task_id: str) -> None:
    assert dag_run.state(task_id) == "success"
    [(try_number,)] = dag_run.query(
        "SELECT try_number FROM task_instance WHERE dag_id = ? AND task_id = ?", DAG_ID, task_id
    )
    assert try_number == 2
    log = dag_run.task_log(task_id)
    assert "simulated worker crash after submitting" in log
    # The retry reattaches to the prediction, running or (on a slow machine) already ended.
    assert "Reconnecting to existing job" in log or "Job already completed successfully" in log
    ledger = dag_run.ledger(task_id)
    assert ledger["creates"] == 1
    assert ledger["requests"]["create"] == 1
    [prediction] = dag_run.predictions(task_id).values()
    assert dag_run.xcom(task_id) == [prediction.output]
    # The retried try still tells downstream tasks which prediction it used.
    assert dag_run.xcom(task_id, "prediction_id") == [prediction.id]
    [(stored,)] = dag_run.query(
        "SELECT value FROM task_state_store WHERE dag_id = ? AND task_id = ? AND key = ?",
        DAG_ID,
        task_id,
        "blip2_prediction_id",
    )
    assert prediction.id in str(stored)


# ---- secrets -------------------------------------------------------------------------------------------


def test_the_api_key_is_in_no_file_airflow_wrote(dag_run: DagRunResult) -> None:
    contents = dag_run.sandbox.written_contents()
    assert dag_run.sandbox.database in contents
    key = API_KEY.encode()
    # Positive control: the search sees what the run stored (an XCom value).
    prediction_id = dag_run.xcom("sync", "prediction_id")[0]
    assert any(prediction_id.encode() in data for data in contents.values())
    assert [path for path, data in contents.items() if key in data] == []
    assert API_KEY not in dag_run.output


def test_image_urls_are_masked_in_rendered_fields(dag_run: DagRunResult) -> None:
    rows = dag_run.query(
        "SELECT task_id, map_index, rendered_fields FROM rendered_task_instance_fields WHERE dag_id = ?",
        DAG_ID,
    )
    rendered = {(task_id, map_index): json.loads(fields) for task_id, map_index, fields in rows}
    assert {task_id for task_id, _ in rendered} >= {"sync", "deferred", "mapped", "templated", "invalid"}
    assert {index for task_id, index in rendered if task_id == "mapped"} == {0, 1, 2}
    for (task_id, _), fields in rendered.items():
        assert fields["images" if task_id == "batch" else "image"] in ("***", ["***", "***"])
    text = json.dumps([row[2] for row in rows])
    assert dag_run.image_server not in text
    assert SIGNATURE not in text and MAPPED_SIGNATURE not in text
    # Presigned query strings never reach the task logs either.
    assert SIGNATURE not in dag_run.output and MAPPED_SIGNATURE not in dag_run.output


# ---- the extra link ------------------------------------------------------------------------------------


def _api_urls(dag_run: DagRunResult, task_id: str, prediction_id: str) -> dict[str, str]:
    """The prediction's ``urls`` as the API answers them to a read."""
    server = dag_run.emulators[task_id]
    answer = requests.get(
        f"{server.url}/v1/prediction/{prediction_id}", headers={"X-API-Key": API_KEY}, timeout=10
    )
    answer.raise_for_status()
    return dict(answer.json()["urls"])


@pytest.mark.parametrize(
    "task_id", ["sync", "deferred", "failed_sync", "failed_deferred", "timeout_deferred"]
)
def test_the_extra_link_opens_the_tasks_prediction(dag_run: DagRunResult, task_id: str) -> None:
    [prediction_id] = dag_run.xcom(task_id, "prediction_id")
    url = _api_urls(dag_run, task_id, prediction_id)["get"]
    assert url == f"{dag_run.emulators[task_id].url}/v1/prediction/{prediction_id}"
    assert dag_run.xcom(task_id, "prediction_url") == [url]
    assert dag_run.links[task_id] == url


def test_the_link_is_pushed_before_deferring_and_read_back_on_resume(dag_run: DagRunResult) -> None:
    [prediction_id] = dag_run.xcom("deferred", "prediction_id")
    # The resumed task read its link through Blip2PredictionLink.get_link before doing anything else.
    assert dag_run.xcom("deferred", "link_at_resume") == [
        _api_urls(dag_run, "deferred", prediction_id)["get"]
    ]


def test_each_mapped_task_instance_links_to_its_own_prediction(dag_run: DagRunResult) -> None:
    ids = dag_run.xcom("mapped", "prediction_id")
    expected = [_api_urls(dag_run, "mapped", prediction_id)["get"] for prediction_id in ids]
    assert len(set(expected)) == len(MAPPED_IMAGES)
    assert [dag_run.links[f"mapped[{index}]"] for index in range(len(MAPPED_IMAGES))] == expected
    assert dag_run.xcom("mapped", "link_at_resume") == expected


@requires_airflow_3_3
def test_a_retry_that_reattaches_links_to_the_first_tries_prediction(dag_run: DagRunResult) -> None:
    [prediction] = dag_run.predictions("retry_deferred").values()
    assert dag_run.links["retry_deferred"] == _api_urls(dag_run, "retry_deferred", prediction.id)["get"]


def test_no_link_without_a_prediction_and_no_secret_in_any(dag_run: DagRunResult) -> None:
    links = dag_run.links
    assert not links["invalid"]  # refused before any create
    assert "batch" not in links  # a batch has no link: its predictions are in its output lines
    text = json.dumps(links)
    assert API_KEY not in text and SIGNATURE not in text and MAPPED_SIGNATURE not in text
    assert all(
        link.startswith(tuple(server.url for server in dag_run.emulators.values()))
        for link in links.values()
        if link
    )


# ---- lineage -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not OPENLINEAGE, reason="needs the openlineage provider")
def test_openlineage_events_name_the_images_and_the_predictions(dag_run: DagRunResult) -> None:
    for task_id, image in (("sync", "chelsea.jpg"), ("deferred", "coffee.png"), ("templated", "rocket.webp")):
        [event] = dag_run.lineage_events(task_id)
        assert dataset_names(event["inputs"]) == [(dag_run.image_server, f"/{image}")], task_id
        assert event["outputs"] == []
        [prediction_id] = dag_run.xcom(task_id, "prediction_id")
        assert event["run"]["facets"]["externalQuery"]["externalQueryId"] == prediction_id
        assert event["run"]["facets"]["externalQuery"]["source"] == "eachlabs"
    mapped = dag_run.lineage_events("mapped")
    assert [dataset_names(event["inputs"]) for event in mapped] == [
        [(dag_run.image_server, f"/{name}")] for name in MAPPED_IMAGES
    ]
    ids = [event["run"]["facets"]["externalQuery"]["externalQueryId"] for event in mapped]
    assert ids == dag_run.xcom("mapped", "prediction_id")
    # A failed task reports the same: the listener falls back to the facets on complete.
    [failed] = read_events(dag_run.lineage_file, f"{DAG_ID}.failed_sync", "FAIL")
    assert dataset_names(failed["inputs"]) == [(dag_run.image_server, "/missing.jpg")]
    [prediction_id] = dag_run.predictions("failed_sync")
    assert failed["run"]["facets"]["externalQuery"]["externalQueryId"] == prediction_id


@pytest.mark.skipif(not OPENLINEAGE, reason="needs the openlineage provider")
def test_openlineage_events_name_the_batch_output_and_its_rows(dag_run: DagRunResult) -> None:
    [event] = dag_run.lineage_events("batch")
    assert dataset_names(event["inputs"]) == [(dag_run.image_server, "/")]
    [output] = event["outputs"]
    assert (output["namespace"], output["name"]) == ("file", str(dag_run.batch_output))
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == 2
    assert len(dag_run.batch_output.read_text().splitlines()) == 2
    text = dag_run.lineage_file.read_text()
    assert API_KEY not in text
    # No signed URL in what the operators report. (The openlineage provider's own "airflow" run facet
    # does copy the DAG run's conf, which here holds a signed URL: pass s3:// or gs:// URIs in a conf.)
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    ours = json.dumps([(e["inputs"], e["outputs"], e["run"]["facets"].get("externalQuery")) for e in events])
    assert dag_run.image_server in ours
    assert SIGNATURE not in ours and MAPPED_SIGNATURE not in ours and "?" not in ours


@pytest.mark.skipif(OPENLINEAGE, reason="checks a deployment without the openlineage provider")
def test_without_openlineage_the_run_reports_no_lineage(dag_run: DagRunResult) -> None:
    assert not dag_run.lineage_file.exists()
    assert dag_run.state("batch") == "success" and dag_run.state("sync") == "success"
    assert "openlineage" not in dag_run.output.lower()


# ---- execute() with a task state store, against the emulator -------------------------------------------


class FakeTI:
    """The parts of a runtime task instance the operator and the mixin use."""

    stats_tags: dict[str, str] = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class DictStateStore:
    """A dict-backed ``task_state_store`` that survives between tries."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sets: list[tuple[str, Any]] = []

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        self.sets.append((key, value))
        self.data[key] = value


def _operator(image: str, **kwargs: Any) -> Blip2PredictionOperator:
    kwargs.setdefault("poll_interval", 0.05)
    return Blip2PredictionOperator(task_id="caption", image=image, caption=True, **kwargs)


def _execute(operator: Blip2PredictionOperator, store: DictStateStore) -> tuple[Any, FakeTI]:
    ti = FakeTI()
    return operator.execute(cast(Any, {"ti": ti, "task_state_store": store})), ti


@requires_airflow_3_3
def test_execute_stores_the_id_and_a_second_try_reattaches(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    store = DictStateStore()
    output, ti = _execute(_operator(image_url("chelsea.jpg")), store)

    prediction_id = ti.xcom["prediction_id"]
    assert store.data == {"blip2_prediction_id": prediction_id}
    assert output == emulator.app.emulator.predictions[prediction_id].output
    assert emulator.ledger()["creates"] == 1

    again, ti_retry = _execute(_operator(image_url("chelsea.jpg")), store)

    assert again == output
    prediction = emulator.app.emulator.predictions[prediction_id]
    assert ti_retry.xcom == {
        "prediction_id": prediction_id,
        "prediction_url": ti.xcom["prediction_url"],
        "cost": prediction.cost,
        "predict_time": prediction.predict_time,
    }
    assert emulator.ledger()["creates"] == 1
    assert emulator.ledger()["requests"]["create"] == 1


@requires_airflow_3_3
def test_execute_reattaches_to_a_running_prediction(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
) -> None:
    server = connect(latency=20.0)  # 1 s
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    prediction_id = Blip2Hook().create_prediction(image_url("coffee.png"), caption=True)
    store = DictStateStore()
    store.data["blip2_prediction_id"] = prediction_id  # stored by a try that then died

    started = time.monotonic()
    output, ti = _execute(_operator(image_url("coffee.png")), store)

    assert time.monotonic() - started > 0.3  # it waited for the running prediction
    assert output == server.app.emulator.predictions[prediction_id].output
    assert server.ledger()["creates"] == 1
    assert store.sets == []
    assert ti.xcom.get("prediction_id") == prediction_id


@requires_airflow_3_3
def test_a_deferrable_prediction_that_ends_within_defer_after_completes_on_the_worker(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str]
) -> None:
    server = connect(latency=10.0)  # 0.5 s
    operator = _operator(image_url("chelsea.jpg"), deferrable=True, defer_after=5.0, poll_interval=1.0)

    output, ti = _execute(operator, DictStateStore())  # no TaskDeferred

    assert output == server.app.emulator.predictions[ti.xcom["prediction_id"]].output
    requests = server.ledger()["requests"]
    assert requests["create"] == 1
    assert 1 <= requests["get"] <= 2  # a read a poll interval after the create finds it ended


@requires_airflow_3_3
def test_a_deferrable_prediction_still_running_after_defer_after_defers_with_its_deadline(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str]
) -> None:
    server = connect(latency=400.0)  # 20 s
    operator = _operator(
        image_url("coffee.png"), deferrable=True, defer_after=1.5, poll_interval=0.2, timeout=30
    )
    started = time.time()

    with pytest.raises(TaskDeferred) as deferred:
        _execute(operator, DictStateStore())

    assert server.ledger()["requests"]["get"] >= 2  # it polled on the worker first
    trigger = deferred.value.trigger
    assert isinstance(trigger, Blip2PredictionTrigger)
    # The deadline was set when the wait began, on the worker: deferring does not extend it.
    assert started < trigger.end_time - operator.timeout < started + 0.5


@requires_airflow_3_3
def test_a_deferrable_retry_defers_on_the_stored_prediction(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
) -> None:
    server = connect(latency=400.0)
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    prediction_id = Blip2Hook().create_prediction(image_url("coffee.png"), caption=True)
    store = DictStateStore()
    store.data["blip2_prediction_id"] = prediction_id

    with pytest.raises(TaskDeferred) as deferred:
        _execute(_operator(image_url("coffee.png"), deferrable=True, defer_after=0, timeout=30), store)

    trigger = deferred.value.trigger
    assert isinstance(trigger, Blip2PredictionTrigger)
    assert trigger.prediction_id == prediction_id
    assert server.ledger()["creates"] == 1


@requires_airflow_3_3
def test_a_stored_failed_prediction_leads_to_a_fresh_create(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    store = DictStateStore()
    with pytest.raises(AirflowException, match="INPUT_DOWNLOAD_ERROR"):
        _execute(_operator(image_url("missing.jpg")), store)
    failed_id = store.data["blip2_prediction_id"]
    assert emulator.app.emulator.predictions[failed_id].status == "error"

    # The image is fixed (e.g. uploaded) and the task retried.
    output, ti = _execute(_operator(image_url("chelsea.jpg")), store)

    new_id = ti.xcom["prediction_id"]
    assert new_id != failed_id
    assert store.data["blip2_prediction_id"] == new_id
    assert output == emulator.app.emulator.predictions[new_id].output
    assert emulator.ledger()["creates"] == 2


def test_invalid_input_makes_no_request_and_names_the_field(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException

    operator = Blip2PredictionOperator(
        task_id="ask", image=image_url("chelsea.jpg"), caption=True, question="What is this?"
    )
    with pytest.raises(AirflowFailException, match=r"question='What is this\?'.*caption=True"):
        _execute(operator, DictStateStore())
    assert emulator.ledger()["requests"] == {}


# ---- a retryable service error is created again within the try -----------------------------------------


def test_a_deferred_prediction_ended_retryable_is_created_again_in_the_same_try(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
) -> None:
    server = connect(fault_provider_failed=1.0)
    operator = _operator(image_url("chelsea.jpg"), deferrable=True, defer_after=0, timeout=30)
    store, ti = DictStateStore(), FakeTI()
    context = cast(Any, {"ti": ti, "task_state_store": store})

    with pytest.raises(TaskDeferred) as first:
        operator.execute(context)
    failed = asyncio.run(_first_payload(first.value.trigger))
    assert failed["status"] == "error" and failed["error_code"] == "PROVIDER_FAILED" and failed["retryable"]
    server.config.fault_provider_failed = 0.0  # the provider recovered
    with pytest.raises(TaskDeferred) as second:
        operator.execute_complete(context, failed, **(first.value.kwargs or {}))
    assert second.value.kwargs == {"attempt": 2, "spent": 0.0}
    new_id = second.value.trigger.prediction_id
    assert new_id != failed["prediction_id"] and ti.xcom["prediction_id"] == new_id
    if operator.durable:  # Airflow 3.3+: a retry of the task reattaches to the new prediction
        assert store.data["blip2_prediction_id"] == new_id
    succeeded = asyncio.run(_first_payload(second.value.trigger))
    output = operator.execute_complete(context, succeeded, **second.value.kwargs)
    assert output == server.app.emulator.predictions[new_id].output
    assert ti.xcom["cost"] == pytest.approx(0.0011) and ti.xcom["predict_time"] > 0
    assert server.ledger()["creates"] == 2


@pytest.mark.parametrize(("max_attempts", "creates"), [(3, 3), (1, 1)])
def test_retryable_errors_are_created_again_up_to_max_attempts(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    max_attempts: int,
    creates: int,
) -> None:
    server = connect(fault_provider_failed=1.0)
    with pytest.raises(AirflowException, match=r"ended error \[PROVIDER_FAILED\]"):
        _execute(_operator(image_url("coffee.png"), max_attempts=max_attempts), DictStateStore())
    assert server.ledger()["creates"] == creates


def test_a_permanent_failure_is_not_created_again(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    with pytest.raises(AirflowException, match="INPUT_DOWNLOAD_ERROR"):
        _execute(_operator(image_url("missing.jpg"), max_attempts=3), DictStateStore())
    assert emulator.ledger()["creates"] == 1
    with pytest.raises(ValueError, match="max_attempts"):
        _operator(image_url("missing.jpg"), max_attempts=0)


def test_the_link_is_in_xcom_before_the_task_defers(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
) -> None:
    server = connect(latency=400.0)
    ti = FakeTI()
    operator = _operator(image_url("coffee.png"), deferrable=True, defer_after=0, timeout=30)
    with pytest.raises(TaskDeferred):
        operator.execute(cast(Any, {"ti": ti, "task_state_store": DictStateStore()}))
    prediction_id = ti.xcom["prediction_id"]
    answer = requests.get(
        f"{server.url}/v1/prediction/{prediction_id}", headers={"X-API-Key": API_KEY}, timeout=10
    ).json()
    assert answer["status"] != "success"  # still running: the task deferred with the link already pushed
    assert ti.xcom["prediction_url"] == answer["urls"]["get"]
    assert server.ledger()["requests"] == {"create": 1, "get": 1}  # the link cost no request


def test_lineage_of_a_finished_prediction_with_or_without_openlineage(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    operator = _operator(image_url("chelsea.jpg") + f"?{SIGNATURE}")
    _, ti = _execute(operator, DictStateStore())
    lineage = operator.get_openlineage_facets_on_complete(ti)
    if not OPENLINEAGE:
        assert lineage is None
        assert "airflow.providers.openlineage" not in sys.modules
        return
    assert lineage is not None
    origin, _ = image_url("chelsea.jpg").rsplit("/", 1)
    assert [(dataset.namespace, dataset.name) for dataset in lineage.inputs] == [(origin, "/chelsea.jpg")]
    assert lineage.outputs == []
    assert lineage.run_facets["externalQuery"].externalQueryId == ti.xcom["prediction_id"]
    assert SIGNATURE not in repr(lineage)
