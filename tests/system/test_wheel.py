"""
The package as users get it: the wheel built from the sdist, installed in a fresh virtualenv.

Nothing of the checkout is importable there: the virtualenv runs from a temporary directory without
``PYTHONPATH``. Airflow discovers the installed provider, the installed ``blip2-emulator`` serves
the API, and an example DAG (copied on its own into a DAGs folder) runs with ``airflow dags test``.

Starts: a fresh virtualenv with the built wheel, `airflow dags test` processes (SQLite) there, the
emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from airflow_provider_blip2 import __version__
from scripts.ports import free_port
from scripts.processes import stop_process
from scripts.sandbox import EXAMPLE_DAGS, REPO_ROOT, AirflowSandbox
from tests.conftest import API_KEY, TIME_SCALE, requires_airflow_3

# The pins are Airflow 3's; the Airflow 2.11 run has its own tests of the same code.
pytestmark = requires_airflow_3

CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
DAG_ID = "example_blip2_caption"
IMAGES = ["chelsea.jpg", "coffee.png"]


def uv() -> str:
    """The ``uv`` the Makefile installs next to this interpreter, else one on ``PATH``."""
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    assert found, "uv is needed to build and install the wheel (the Makefile installs it in .venv)"
    return found


def clean_env() -> dict[str, str]:
    """This environment without the checkout on ``PYTHONPATH``, an active virtualenv or Airflow settings."""
    dropped = ("PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("AIRFLOW")}


def run(*command: str | Path, cwd: Path, timeout: float = 300) -> str:
    """Run a command in :func:`clean_env`; return its stdout, raise with its output when it fails."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from an sdist of the checkout (as ``make dist`` does)."""
    out = tmp_path_factory.mktemp("dist")
    run(uv(), "build", "--quiet", "--build-constraints", CONSTRAINTS, "--out-dir", out, REPO_ROOT, cwd=out)
    (sdist,) = out.glob("*.tar.gz")
    (built,) = out.glob("*.whl")
    assert built.name == f"airflow_provider_blip2-{__version__}-py3-none-any.whl"
    assert sdist.name == f"airflow_provider_blip2-{__version__}.tar.gz"
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel and its ``emulator`` extra installed, resolved within the pins."""
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    run(uv(), "venv", "--quiet", "--python", sys.executable, venv, cwd=root)
    requirement = f"airflow-provider-blip2[emulator] @ {wheel.as_uri()}"
    python = venv / "bin" / "python"
    run(uv(), "pip", "install", "--quiet", "--python", python, "-c", CONSTRAINTS, requirement, cwd=root)
    return venv


@pytest.fixture(scope="module")
def sandbox(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> AirflowSandbox:
    """A migrated Airflow home run by the virtualenv, whose DAGs folder holds one example DAG."""
    root = tmp_path_factory.mktemp("wheel-airflow")
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(EXAMPLE_DAGS / f"{DAG_ID}.py", dags)
    sandbox = AirflowSandbox(root / "home", dags_folder=dags, python=venv / "bin" / "python")
    sandbox.migrate()
    return sandbox


@pytest.fixture
def installed_emulator(venv: Path, tmp_path: Path) -> Iterator[str]:
    """The virtualenv's ``blip2-emulator`` on a free port, time-scaled; yields its URL."""
    port = free_port()
    command = [
        str(venv / "bin" / "blip2-emulator"), "--port", str(port), "--api-key", API_KEY,
        "--time-scale", str(TIME_SCALE), "--log-level", "warning",
    ]  # fmt: skip
    log = tmp_path / "emulator.log"
    with log.open("wb") as out:
        child = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            assert child.poll() is None, f"blip2-emulator exited {child.returncode}: {log.read_text()}"
            try:
                httpx.get(f"{url}/_emulator/ledger", timeout=2.0).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"blip2-emulator did not answer: {log.read_text()}"
                time.sleep(0.1)
        yield url
    finally:
        stop_process(child)


def test_the_virtualenv_imports_the_installed_package(venv: Path, tmp_path: Path) -> None:
    probe = (
        "import json, importlib.metadata as md, airflow_provider_blip2 as p; "
        "print(json.dumps({'file': p.__file__, 'version': md.version('airflow-provider-blip2')}))"
    )
    found = json.loads(run(venv / "bin" / "python", "-c", probe, cwd=tmp_path))
    module = Path(found["file"]).resolve()
    assert module.is_relative_to(venv.resolve()), module
    assert not module.is_relative_to(REPO_ROOT), module
    assert found["version"] == __version__
    assert (module.parent / "py.typed").is_file()
    assert (venv / "bin" / "blip2-emulator").is_file()


def test_airflow_discovers_the_installed_provider(sandbox: AirflowSandbox) -> None:
    providers = json.loads(sandbox.airflow("providers", "list", "-o", "json").stdout)
    (ours,) = [entry for entry in providers if entry["package_name"] == "airflow-provider-blip2"]
    assert ours["version"] == __version__
    assert ours["description"].startswith("Image captioning and visual question answering with BLIP-2")


def test_an_example_dag_runs_from_the_installed_wheel(
    sandbox: AirflowSandbox, installed_emulator: str, image_url: Callable[[str], str]
) -> None:
    sandbox.connections["blip2_default"] = {
        "conn_type": "blip2",
        "host": installed_emulator,
        "password": API_KEY,
        "extra": {"requests_per_minute": 1200},
    }
    sandbox.dags_test(DAG_ID, conf={"image_urls": [image_url(name) for name in IMAGES]})

    states = sandbox.task_states(DAG_ID)
    assert states and set(states.values()) == {"success"}, states
    assert len(states) == 2 + 2 * len(IMAGES)  # image_urls, report, and a caption and an answer per image
    (rows,) = sandbox.xcom(DAG_ID, "report")
    assert [row["image"] for row in rows] == IMAGES
    assert all(row["caption"].startswith("[emulated]") for row in rows)
    ledger = httpx.get(f"{installed_emulator}/_emulator/ledger", timeout=5.0).json()
    assert ledger["creates"] == 2 * len(IMAGES)
    assert ledger["responses_429"] == 0
