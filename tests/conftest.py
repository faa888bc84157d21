"""Shared fixtures: the API emulator and an image server on loopback, and a blip2 connection to them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import airflow
import pytest
from packaging.version import Version

from airflow_provider_blip2.client.retry import RetryPolicy
from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from airflow_provider_blip2.triggers import heap

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO_ROOT / "example_dags" / "data"
API_KEY = "test-api-key-4d1f0c"
FAST_RETRIES = RetryPolicy(max_attempts=6, max_elapsed=20.0, initial_wait=0.01, max_wait=0.2)
# Emulated time runs 20x faster: a 2 s prediction takes 0.1 s, the 60 s rate window 3 s.
TIME_SCALE = 0.05

os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
# The tests run triggers in this process as a triggerer would, which freezes the heap of the first
# process to run one: keep the test processes' heap as it is, as though it had been frozen already.
# tests/integration/test_trigger_heap.py runs the freeze in processes of its own.
heap._frozen = True

AIRFLOW_VERSION = Version(Version(airflow.__version__).base_version)
requires_airflow_3_3 = pytest.mark.skipif(
    Version("3.3") > AIRFLOW_VERSION, reason="task_state_store (retry reattach) arrived in Airflow 3.3"
)
requires_airflow_3 = pytest.mark.skipif(Version("3.0") > AIRFLOW_VERSION, reason="Airflow 3 behaviour")


#: The system tests of the production-shaped deployment: one deployment for all of them
#: (``tests/system/conftest.py``), on one worker.
PRODUCTION_TESTS = "tests/system/test_production_"


def run_scope(nodeid: str) -> str:
    """
    The scope a test runs in under ``make test``: the production-shaped system tests together, the
    other system tests together, every other module on its own.
    """
    if nodeid.startswith(PRODUCTION_TESTS):
        return "tests/system (production)"
    if nodeid.startswith("tests/system/"):
        return "tests/system"
    return nodeid.split("::", 1)[0]


def run_order(nodeid: str) -> int:
    """
    Where a test runs under ``make test``: the longest scopes first (the production-shaped tests,
    then the other system tests), and within the other system tests the Celery deployment last, so
    that it does not start while the production-shaped one does (both at once load the 2 cores
    enough to delay a triggerer's heartbeat past its health check).
    """
    if nodeid.startswith(PRODUCTION_TESTS):
        return 0
    if nodeid.startswith("tests/system/test_celery"):
        return 2
    return 1 if nodeid.startswith("tests/system/") else 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest scopes first (a stable sort: the order within each is kept)."""
    items.sort(key=lambda item: run_order(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """
    Under ``pytest -n 3`` (``make test``): the production-shaped system tests on one worker and
    the other system tests on another, both started first, each one test after another; the other
    modules, one module at a time, on whichever worker is free.

    The system tests start Airflow deployments, servers and a browser, each busy for a minute or
    more, mostly waiting on the API's limits, so a third worker runs the other modules meanwhile.
    Two production-shaped deployments at once slow every Airflow process on a 2-core machine, so
    there is one. Scopes start in collection order (:func:`run_order`), not by their number of tests.
    """
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class LongestScopesFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return run_scope(nodeid)

    return LongestScopesFirst(config, log)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample images, plus ``not-an-image.jpg`` (text bytes)."""
    directory = tmp_path_factory.mktemp("images")
    for path in SAMPLE_IMAGES.iterdir():
        if path.suffix in {".jpg", ".png", ".webp"}:
            shutil.copy(path, directory / path.name)
    (directory / "not-an-image.jpg").write_text("this is text, not a JPEG\n")
    return directory


@pytest.fixture(scope="session")
def image_server(image_dir: Path) -> Iterator[str]:
    """Base URL of a file server on 127.0.0.1 serving ``image_dir``."""
    with serve_directory(image_dir) as base_url:
        yield base_url


@pytest.fixture
def image_url(image_server: str) -> Callable[[str], str]:
    """``image_url("chelsea.jpg")`` -> the URL of a served image."""
    return lambda name: f"{image_server}/{name}"


@pytest.fixture
def fresh_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test starts with no process-wide budgets (a port may be reused by a later emulator)."""
    from airflow_provider_blip2.client import budget as budget_module

    monkeypatch.setattr(budget_module, "_BUDGETS", {})


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., EmulatorServer]]:
    """Start an emulator with config overrides; every one started is stopped after the test."""
    servers: list[EmulatorServer] = []

    def start(**overrides: Any) -> EmulatorServer:
        settings: dict[str, Any] = {"api_keys": (API_KEY,), "time_scale": TIME_SCALE}
        settings.update(overrides)
        server = EmulatorServer(EmulatorConfig(**settings))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def emulator(start_emulator: Callable[..., EmulatorServer]) -> EmulatorServer:
    """An emulator with the API's default limits, time-scaled."""
    return start_emulator()


def connection_json(
    url: str, *, api_key: str = API_KEY, requests_per_minute: int = 1200, **extra: Any
) -> str:
    """A ``blip2`` connection as ``AIRFLOW_CONN_*`` JSON.

    Pass ``requests_per_minute=60, rate_window=60 * TIME_SCALE`` for a budget equal to the
    time-scaled emulator's limit; the default 1200 per 60 s is looser than the emulator's 60 per 3 s.
    """
    return json.dumps(
        {
            "conn_type": "blip2",
            "host": url,
            "password": api_key,
            "extra": {"requests_per_minute": requests_per_minute, **extra},
        }
    )


@pytest.fixture
def connection_extra() -> dict[str, Any]:
    """Extra fields of the connection ``connect`` makes; a test module overrides it to pin some."""
    return {}


@pytest.fixture
def connect(
    start_emulator: Callable[..., EmulatorServer],
    monkeypatch: pytest.MonkeyPatch,
    connection_extra: dict[str, Any],
) -> Callable[..., EmulatorServer]:
    """Start an emulator with config overrides and point ``blip2_default`` at it."""

    def start(**overrides: Any) -> EmulatorServer:
        server = start_emulator(**overrides)
        monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url, **connection_extra))
        return server

    return start


@pytest.fixture
def blip2_connection(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """``blip2_default`` pointing at ``emulator``; returns the conn id.

    Its budget of 1200 requests per minute matches the emulator's 60 per 3 s window.
    """
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(emulator.url))
    return "blip2_default"


# --------------------------------------------------------------------------------------------------
# Object storage: a local S3 (moto) and a local GCS (gcp-storage-emulator), and connections to them
# --------------------------------------------------------------------------------------------------
# scripts.storage_servers and the cloud libraries are imported inside the fixtures only: the Airflow 2.11
# environment has neither the amazon/google providers nor the servers, and still imports this file.

TYPE_CHECKING = False
if TYPE_CHECKING:
    from scripts.storage_servers import LocalGcs, LocalS3


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    """A moto S3 server on 127.0.0.1 for the whole session; skips without moto or the amazon provider."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the storage-servers group)")
    pytest.importorskip("airflow.providers.amazon.aws.hooks.s3", reason="needs the amazon provider")
    from scripts.storage_servers import local_s3 as run_local_s3

    with run_local_s3() as server:
        yield server


@pytest.fixture(scope="session")
def local_gcs() -> Iterator[LocalGcs]:
    """A gcp-storage-emulator on 127.0.0.1 for the whole session; skips without it or the google provider."""
    pytest.importorskip("gcp_storage_emulator", reason="needs gcp-storage-emulator (storage-servers group)")
    pytest.importorskip("cryptography", reason="needs cryptography for the throwaway service-account key")
    pytest.importorskip("airflow.providers.google.cloud.hooks.gcs", reason="needs the google provider")
    from scripts.storage_servers import local_gcs as run_local_gcs

    with run_local_gcs() as server:
        yield server


@pytest.fixture
def s3_connection(local_s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> LocalS3:
    """``aws_default`` pointing at ``local_s3``, which is emptied first; returns the server."""
    local_s3.reset()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(local_s3.connection()))
    return local_s3


@pytest.fixture
def gcs_connection(local_gcs: LocalGcs, monkeypatch: pytest.MonkeyPatch) -> LocalGcs:
    """
    ``google_cloud_default`` (a throwaway service-account key) and ``STORAGE_EMULATOR_HOST`` pointing at
    ``local_gcs``, which is emptied first; returns the server.
    """
    local_gcs.reset()
    for name, value in local_gcs.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps(local_gcs.connection()))
    return local_gcs
