"""Every example DAG, end to end: a real `airflow dags test` against the emulator over loopback."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_blip2.emulator import EmulatorServer
from scripts.sandbox import EXAMPLE_DAGS, AirflowSandbox
from tests.conftest import API_KEY

SAMPLES = ["astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp"]


def example_dag_ids() -> list[str]:
    """The dag ids declared in example_dags/*.py."""
    ids: list[str] = []
    for path in sorted(EXAMPLE_DAGS.glob("*.py")):
        ids += re.findall(r'dag_id="([^"]+)"', path.read_text())
    return ids


def run_conf(dag_id: str, image_url: Callable[[str], str]) -> dict[str, Any]:
    """The conf each example DAG is run with."""
    confs = {"example_blip2_caption": {"image_urls": [image_url(name) for name in SAMPLES]}}
    assert dag_id in confs, f"add a run conf for the new example DAG {dag_id}"
    return confs[dag_id]


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Airflow home with a migrated database, copied by each test."""
    home = tmp_path_factory.mktemp("airflow-home-template")
    AirflowSandbox(home).migrate()
    return home


@pytest.fixture
def sandbox(migrated_home: Path, tmp_path: Path, emulator: EmulatorServer) -> Iterator[AirflowSandbox]:
    home = tmp_path / "airflow-home"
    shutil.copytree(migrated_home, home)
    connection = {
        "conn_type": "blip2",
        "host": emulator.url,
        "password": API_KEY,
        "extra": {"requests_per_minute": 1200},
    }
    yield AirflowSandbox(home, connections={"blip2_default": connection})


def test_examples_are_found() -> None:
    assert "example_blip2_caption" in example_dag_ids()


@pytest.mark.parametrize("dag_id", example_dag_ids())
def test_example_dag_runs_end_to_end(
    dag_id: str, sandbox: AirflowSandbox, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    conf = run_conf(dag_id, image_url)
    sandbox.dags_test(dag_id, conf=conf)

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


def test_api_key_appears_in_nothing_airflow_wrote(
    sandbox: AirflowSandbox, image_url: Callable[[str], str]
) -> None:
    result = sandbox.dags_test("example_blip2_caption", conf=run_conf("example_blip2_caption", image_url))
    assert "Prediction" in result.stdout + result.stderr  # the task logs are in the command's output
    files = sandbox.written_files()
    assert sandbox.database in files
    leaks = [str(path) for path in files if API_KEY.encode() in path.read_bytes()]
    if API_KEY in result.stdout + result.stderr:
        leaks.append("dags test output")
    assert leaks == []
