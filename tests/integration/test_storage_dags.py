"""
S3 and GCS images in a real Airflow (`airflow dags test`), and no signed URL in anything Airflow
wrote.

One DAG: a deferrable batch over a GCS prefix, and single predictions of an ``s3://`` and a
``gs://`` image (deferred and on the worker). The local S3 and GCS servers, the emulator and
Airflow's subprocess talk over loopback through real connections; the emulator downloads every
signed URL.

Starts: the emulator over HTTP on loopback, a local S3 (moto), a local GCS (gcp-storage-emulator),
and `airflow dags test` processes (SQLite).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_blip2.emulator import EmulatorServer
from scripts.sandbox import AirflowSandbox
from tests.conftest import API_KEY, TIME_SCALE

DAG_ID = "blip2_storage_scenarios"
SAMPLES = ["astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp"]
#: What a signed URL's signature looks like, for S3 (SigV4) and GCS (V4).
SIGNATURE = re.compile(rb"X-(?:Amz|Goog)-Signature=[0-9a-f]{16,}")

DAG_FILE = """
import pendulum
from airflow.providers.common.compat.sdk import DAG
from airflow_provider_blip2.operators.blip2 import (
    Blip2BatchPredictionOperator,
    Blip2PredictionOperator,
)

START = pendulum.datetime(2026, 1, 1, tz="UTC")
with DAG(dag_id="{dag_id}", schedule=None, start_date=START, catchup=False):
    Blip2BatchPredictionOperator(
        task_id="gcs_batch",
        images="gs://photos/{{{{ ds }}}}/",
        questions={{"cat": "Is there a cat?", "cup": "Is there a cup?"}},
        output_uri="gs://photos/answers/{{{{ ds }}}}.jsonl",
        deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    Blip2PredictionOperator(
        task_id="s3_deferred", image="s3://photos/chelsea.jpg", caption=True, deferrable=True,
        defer_after=0,
        poll_interval=0.1,
    )
    Blip2PredictionOperator(
        task_id="gs_worker",
        image="gs://photos/2026-11-27/coffee.png",
        question="Is there a cup?",
        deferrable=False,
        poll_interval=0.1,
    )
"""


@pytest.fixture
def sandbox(
    tmp_path: Path, emulator: EmulatorServer, s3_connection: Any, gcs_connection: Any, image_dir: Path
) -> AirflowSandbox:
    s3_connection.create_bucket("photos")
    s3_connection.put_object("photos", "chelsea.jpg", (image_dir / "chelsea.jpg").read_bytes())
    gcs_connection.create_bucket("photos")
    for name in SAMPLES:
        gcs_connection.put_object("photos", f"2026-11-27/{name}", (image_dir / name).read_bytes())
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "storage_dag.py").write_text(DAG_FILE.format(dag_id=DAG_ID))
    blip2 = {
        "conn_type": "blip2",
        "host": emulator.url,
        "password": API_KEY,
        "extra": {"requests_per_minute": 60, "rate_window": 60 * TIME_SCALE},
    }
    return AirflowSandbox(
        tmp_path / "home",
        dags_folder=dags,
        connections={
            "blip2_default": blip2,
            "aws_default": s3_connection.connection(),
            "google_cloud_default": gcs_connection.connection(),
        },
        extra_env=gcs_connection.env(),
    )


def test_s3_and_gcs_images_in_airflow_leave_no_signed_url_behind(
    sandbox: AirflowSandbox, emulator: EmulatorServer
) -> None:
    sandbox.migrate()
    result = sandbox.dags_test(DAG_ID, logical_date="2026-11-27")

    assert set(sandbox.task_states(DAG_ID).values()) == {"success"}, sandbox.task_states(DAG_ID)
    (summary,) = sandbox.xcom(DAG_ID, "gcs_batch")
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (8, 8, 0)
    assert summary["output_uri"] == "gs://photos/answers/2026-11-27.jsonl"
    assert sandbox.xcom(DAG_ID, "s3_deferred")[0].startswith("[emulated]")
    assert sandbox.xcom(DAG_ID, "gs_worker")[0] in ("[emulated] yes", "[emulated] no")
    assert emulator.ledger()["creates"] == 10
    assert emulator.ledger()["statuses"]["success"] == 10  # every signed URL downloaded

    from airflow_provider_blip2.storage import ObjectStorage

    lines = ObjectStorage().read_bytes(summary["output_uri"]).decode().splitlines()
    assert {json.loads(line)["image"] for line in lines} == {f"gs://photos/2026-11-27/{n}" for n in SAMPLES}

    # The signed URLs reached the emulator, and nothing Airflow wrote (logs, database, rendered
    # fields, XCom, trigger rows) nor its output holds one.
    output = (result.stdout + result.stderr).encode()
    assert b"Created BLIP-2 prediction" in output
    leaks = [str(path) for path, data in sandbox.written_contents().items() if SIGNATURE.search(data)]
    if SIGNATURE.search(output):
        leaks.append("dags test output")
    assert leaks == []


def test_signature_pattern_matches_real_signed_urls(s3_connection: Any, gcs_connection: Any) -> None:
    """The leak search above would see a signed URL if one were written."""
    from airflow_provider_blip2.storage import ObjectStorage

    s3_connection.create_bucket("signed")
    s3_connection.put_object("signed", "k.jpg", b"x")
    gcs_connection.create_bucket("signed")
    gcs_connection.put_object("signed", "k.jpg", b"x")
    storage = ObjectStorage()
    for uri in ("s3://signed/k.jpg", "gs://signed/k.jpg"):
        assert SIGNATURE.search(storage.signed_url(uri, expires_in=60).encode())


@pytest.fixture(autouse=True)
def _no_leftover_home(tmp_path: Path) -> Any:
    yield
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
