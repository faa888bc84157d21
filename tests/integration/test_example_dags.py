"""
Every example DAG, end to end: a real `airflow dags test` against the emulator over loopback.

Starts: the emulator over HTTP on loopback, a local file server for the images, a local S3 (moto),
and `airflow dags test` processes (SQLite).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_blip2.emulator import EmulatorServer
from scripts.sandbox import EXAMPLE_DAGS, AirflowSandbox
from tests.conftest import API_KEY
from tests.lineage import OPENLINEAGE, dataset_names, file_transport_env, read_events

SAMPLES = ["astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp"]


def example_dag_ids() -> list[str]:
    """The dag ids declared in example_dags/*.py."""
    ids: list[str] = []
    for path in sorted(EXAMPLE_DAGS.glob("*.py")):
        ids += re.findall(r'dag_id="([^"]+)"', path.read_text())
    return ids


DAY = "2026-11-27"
NEXT_DAY = "2026-11-28"
#: The DAGs over object storage: the images each one expects in the local S3, and its run conf.
S3_SAMPLES = {
    "example_blip2_moderation": ("uploads-test", [f"uploads/{DAY}/{name}" for name in SAMPLES]),
    "example_blip2_alt_text": ("catalogue-test", [f"products/{name}" for name in SAMPLES]),
}
QUESTIONS = [
    "Does this image contain nudity? Answer yes or no.",
    "Does this image show violence or blood? Answer yes or no.",
    "Is there a weapon in this image? Answer yes or no.",
]
#: Scripted moderation answers: the rocket is taken for a weapon, the coffee answer is unclear.
MODERATION_ANSWERS = {
    "answers": [
        {
            "image": "rocket.webp",
            "question": "Is there a weapon in this image? Answer yes or no.",
            "output": "yes",
        },
        {
            "image": "coffee.png",
            "question": "Does this image contain nudity? Answer yes or no.",
            "output": "maybe",
        },
        *(
            {"image": name, "question": question, "output": "no"}
            for name in SAMPLES
            for question in QUESTIONS
        ),
    ]
}


#: The local moderation example's folder (the sample images) and where it writes its answers.
IMAGE_FOLDER = EXAMPLE_DAGS / "data"
LOCAL_OUTPUT = Path(tempfile.gettempdir()) / "blip2-example-local-moderation.jsonl"


def run_conf(dag_id: str, image_url: Callable[[str], str]) -> dict[str, Any]:
    """The conf each example DAG is run with."""
    confs: dict[str, dict[str, Any]] = {
        "example_blip2_caption": {"image_urls": [image_url(name) for name in SAMPLES]},
        "example_blip2_moderation": {
            "bucket": S3_SAMPLES["example_blip2_moderation"][0],
            "uploads": "uploads",
        },
        "example_blip2_alt_text": {
            "bucket": S3_SAMPLES["example_blip2_alt_text"][0],
            "catalogue": "products",
        },
        "example_blip2_local_moderation": {"folder": str(IMAGE_FOLDER), "output": str(LOCAL_OUTPUT)},
    }
    assert dag_id in confs, f"add a run conf for the new example DAG {dag_id}"
    return confs[dag_id]


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow home with a migrated database, copied by each test."""
    home = tmp_path_factory.mktemp("airflow-home-template")
    AirflowSandbox(home).migrate()
    return home


@pytest.fixture
def emulator(start_emulator: Callable[..., EmulatorServer], tmp_path: Path) -> EmulatorServer:
    """The emulator, with the scripted moderation answers."""
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(MODERATION_ANSWERS))
    return start_emulator(answers_file=str(answers))


@pytest.fixture
def storage_connections(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """``aws_default`` on the local S3, when the amazon provider and moto are installed."""
    try:
        local_s3 = request.getfixturevalue("s3_connection")
    except pytest.skip.Exception:
        return {}
    return {"aws_default": local_s3.connection()}


@pytest.fixture
def sandbox(
    migrated_home: Path,
    tmp_path: Path,
    emulator: EmulatorServer,
    storage_connections: dict[str, dict[str, Any]],
) -> Iterator[AirflowSandbox]:
    home = tmp_path / "airflow-home"
    shutil.copytree(migrated_home, home)
    connection = {
        "conn_type": "blip2",
        "host": emulator.url,
        "password": API_KEY,
        "extra": {"requests_per_minute": 1200},
    }
    yield AirflowSandbox(
        home,
        connections={"blip2_default": connection, **storage_connections},
        extra_env=file_transport_env(home / "lineage.jsonl"),
    )


def test_examples_are_found() -> None:
    assert "example_blip2_caption" in example_dag_ids()


@pytest.mark.parametrize("dag_id", example_dag_ids())
def test_example_dag_runs_end_to_end(
    dag_id: str,
    sandbox: AirflowSandbox,
    emulator: EmulatorServer,
    image_url: Callable[[str], str],
    image_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    conf = run_conf(dag_id, image_url)
    s3 = None
    if dag_id in S3_SAMPLES:
        s3 = request.getfixturevalue("s3_connection")
        bucket, keys = S3_SAMPLES[dag_id]
        s3.create_bucket(bucket)
        for key in keys:
            s3.put_object(bucket, key, (image_dir / key.rsplit("/", 1)[1]).read_bytes())
    sandbox.dags_test(dag_id, conf=conf, logical_date=DAY)

    states = sandbox.task_states(dag_id)
    assert states and set(states.values()) == {"success"}, states
    ledger = emulator.ledger()
    assert ledger["responses_429"] == 0
    if dag_id == "example_blip2_caption":
        assert ledger["creates"] == 2 * len(SAMPLES)
        (rows,) = sandbox.xcom(dag_id, "report")
        assert [row["image"] for row in rows] == SAMPLES
        assert all(row["caption"].startswith("[emulated]") for row in rows)
        assert all(row["answer"] in ("[emulated] yes", "[emulated] no") for row in rows)
        prediction_ids = sandbox.xcom(dag_id, "caption", key="prediction_id")
        assert len(set(prediction_ids)) == len(SAMPLES)
    if dag_id == "example_blip2_moderation":
        assert s3 is not None
        assert ledger["creates"] == 3 * len(SAMPLES)
        base = f"s3://uploads-test/uploads/{DAY}/"
        (flags,) = sandbox.xcom(dag_id, "flag")
        assert flags["flagged"] == {
            base + "coffee.png": ["nudity: needs review ('maybe')"],
            base + "rocket.webp": ["weapon"],
        }
        assert flags["clean"] == [base + "astronaut.jpg", base + "chelsea.jpg"]
        keys = s3.client().list_objects_v2(Bucket="uploads-test")["Contents"]
        written = {item["Key"] for item in keys}
        quarantined = {f"quarantine/uploads/{DAY}/coffee.png", f"quarantine/uploads/{DAY}/rocket.webp"}
        assert quarantined <= written
        assert f"quarantine/uploads/{DAY}/chelsea.jpg" not in written
        assert "moderation/cache.jsonl" in written
        report = json.loads(
            s3.client().get_object(Bucket="uploads-test", Key=f"moderation/{DAY}/report.json")["Body"].read()
        )
        assert report["flagged"] == flags["flagged"]
        # The night's numbers for the dashboards: predictions, statuses and what they cost.
        (summary,) = sandbox.xcom(dag_id, "moderate")
        assert report["cost"] == summary["cost"] == pytest.approx(0.0011 * 3 * len(SAMPLES))
        assert (report["predictions"], report["retried"]) == (3 * len(SAMPLES), 0)
        assert report["statuses"] == {"success": 3 * len(SAMPLES)}
        manifest_key = f"published/{DAY}/manifest.json"
        manifest = json.loads(s3.client().get_object(Bucket="uploads-test", Key=manifest_key)["Body"].read())
        assert manifest["images"] == flags["clean"] and manifest["held_back"] == 2
        assert (report["cached"], report["cost_saved"]) == (0, 0.0)
        if OPENLINEAGE:  # what the openlineage listener sent for the batch task
            [event] = read_events(sandbox.home / "lineage.jsonl", f"{dag_id}.moderate")
            assert dataset_names(event["inputs"]) == [("s3://uploads-test", "uploads")]
            [output] = event["outputs"]
            assert (output["namespace"], output["name"]) == (
                "s3://uploads-test",
                f"moderation/{DAY}/answers.jsonl",
            )
            assert output["outputFacets"]["outputStatistics"]["rowCount"] == 3 * len(SAMPLES)
        check_second_night(sandbox, emulator, dag_id, conf, flags)
    if dag_id == "example_blip2_local_moderation":
        assert ledger["uploads"]["presigns"] == ledger["uploads"]["puts"] == len(SAMPLES)
        assert ledger["uploads"]["reads"] == 3 * len(SAMPLES)  # every prediction read its uploaded copy
        (flags,) = sandbox.xcom(dag_id, "flag")
        assert flags == {
            # The emulator's answers follow the image's bytes and the question: the same on every run.
            "flagged": {
                "astronaut.jpg": ["violence"],
                "coffee.png": ["weapon"],
                "rocket.webp": ["nudity", "violence", "weapon"],
            },
            "checked": len(SAMPLES),
            "predictions": 3 * len(SAMPLES),
        }
    if dag_id == "example_blip2_alt_text":
        assert s3 is not None
        assert ledger["creates"] == len(SAMPLES)
        for name in SAMPLES:
            body = (
                s3.client().get_object(Bucket="catalogue-test", Key=f"products/{name}.alt.txt")["Body"].read()
            )
            assert body.decode().startswith("[emulated]")
        assert sandbox.xcom(dag_id, "write_alt_text") == [len(SAMPLES)]


def check_second_night(
    sandbox: AirflowSandbox, emulator: EmulatorServer, dag_id: str, conf: dict[str, Any], flags: Any
) -> None:
    """The next night over the same uploads: every answer from the cache, no create, the same flags."""
    creates = emulator.ledger()["creates"]
    sandbox.dags_test(dag_id, conf=conf, logical_date=NEXT_DAY)
    assert set(sandbox.task_states(dag_id).values()) == {"success"}
    assert emulator.ledger()["creates"] == creates
    (summary,) = sandbox.xcom(dag_id, "moderate")
    assert summary["output_uri"].endswith(f"moderation/{NEXT_DAY}/answers.jsonl")
    assert (summary["cached"], summary["cost"]) == (3 * len(SAMPLES), 0.0)
    assert summary["cost_saved"] == pytest.approx(0.0011 * 3 * len(SAMPLES))
    (again,) = sandbox.xcom(dag_id, "flag")
    assert (again["flagged"], again["clean"]) == (flags["flagged"], flags["clean"])
    assert again["cached"] == 3 * len(SAMPLES)


def test_api_key_appears_in_nothing_airflow_wrote(
    sandbox: AirflowSandbox, image_url: Callable[[str], str]
) -> None:
    result = sandbox.dags_test("example_blip2_caption", conf=run_conf("example_blip2_caption", image_url))
    assert "Prediction" in result.stdout + result.stderr  # the task logs are in the command's output
    contents = sandbox.written_contents()
    assert sandbox.database in contents
    leaks = [str(path) for path, data in contents.items() if API_KEY.encode() in data]
    if API_KEY in result.stdout + result.stderr:
        leaks.append("dags test output")
    assert leaks == []
