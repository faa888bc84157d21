"""
Images no URL reaches, through the upload endpoint: both operators in process, the way Airflow
drives them, against the emulator over real HTTP on loopback running as a service that fetches no
image URL but its own uploaded copies (``fetch_only_uploads``), a local file server that only the
worker reaches, and the local S3 server.

Starts: the emulator over HTTP on loopback (also fetching only its own uploads), a local file server
for the images; Airflow's task runner in process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException, TaskDeferred

from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator
from airflow_provider_blip2.operators.uploads import UPLOAD_STATE_KEY
from tests.batch_driver import DictStore, FakeTaskInstance, run_batch, run_tries
from tests.conftest import TIME_SCALE, connection_json

pytestmark = pytest.mark.usefixtures("fresh_budgets")

SAMPLES = ("astronaut.jpg", "chelsea.jpg", "coffee.png", "rocket.webp")


@pytest.fixture
def private(
    start_emulator: Callable[..., EmulatorServer], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., EmulatorServer]:
    """An emulator that reaches no image URL but its own uploads, at its limits; ``blip2_default`` to it."""

    def start(**overrides: Any) -> EmulatorServer:
        server = start_emulator(fetch_only_uploads=True, **overrides)
        conn = connection_json(server.url, requests_per_minute=60, rate_window=60 * TIME_SCALE)
        monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", conn)
        return server

    return start


def _context(store: DictStore | None = None) -> Any:
    return cast(
        Any, {"ti": FakeTaskInstance(), "task_state_store": store if store is not None else DictStore()}
    )


def _single(image: str, **kwargs: Any) -> Blip2PredictionOperator:
    settings: dict[str, Any] = {"caption": True, "deferrable": False, "poll_interval": 0.1, "timeout": 60}
    settings.update(kwargs)
    return Blip2PredictionOperator(task_id="one", image=image, **settings)


def test_a_local_file_is_uploaded_and_predicted_by_a_service_that_reaches_no_url(
    private: Callable[..., EmulatorServer], image_dir: Path
) -> None:
    emulator = private()
    output = _single(str(image_dir / "chelsea.jpg")).execute(_context())
    assert str(output).startswith("[emulated]")
    uploads = emulator.ledger()["uploads"]
    assert (uploads["presigns"], uploads["puts"], uploads["reads"]) == (1, 1, 1)
    assert uploads["max_retention_s"] <= 86400  # the timeout plus a margin, far below 180 days
    assert emulator.ledger()["requests"] == {"presign": 1, "create": 1, "get": 1}


def test_an_http_image_only_the_worker_reaches_is_uploaded_with_image_transfer_upload(
    private: Callable[..., EmulatorServer], image_url: Callable[[str], str]
) -> None:
    emulator = private()
    assert str(_single(image_url("coffee.png"), image_transfer="upload").execute(_context())).startswith(
        "[emulated]"
    )
    assert emulator.ledger()["uploads"]["puts"] == 1
    with pytest.raises(AirflowException, match=r"INPUT_DOWNLOAD_ERROR|could not download"):
        _single(image_url("coffee.png")).execute(_context())  # as a URL, the service cannot reach it


def test_a_missing_or_foreign_local_file_fails_fast_naming_the_field(
    private: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path
) -> None:
    emulator = private()
    with pytest.raises(AirflowFailException, match=r"image: '.*nowhere\.jpg' does not exist"):
        _single(str(tmp_path / "nowhere.jpg")).execute(_context())
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(AirflowFailException, match="is not a jpeg, png, webp or gif image"):
        _single(f"file://{text}").execute(_context())
    with pytest.raises(AirflowFailException, match="image_transfer='upload'"):
        _single(str(image_dir / "chelsea.jpg"), image_transfer="url").execute(_context())
    assert emulator.ledger()["requests"] == {}  # nothing was sent


def test_a_new_try_reuses_a_kept_copy_and_uploads_again_once_it_may_be_gone(
    private: Callable[..., EmulatorServer], image_dir: Path
) -> None:
    emulator = private()
    store = DictStore()
    image = str(image_dir / "rocket.webp")
    _single(image).execute(_context(store))
    kept = store.values[UPLOAD_STATE_KEY]
    assert "/_storage/files/" not in json.dumps(kept)  # sealed, not in the clear
    store.values.pop("blip2_prediction_id", None)  # the next try must predict again
    _single(image).execute(_context(store))
    assert emulator.ledger()["uploads"]["presigns"] == 1  # the copy is kept: reused
    store.values[UPLOAD_STATE_KEY]["copy"][1] = 0.0  # its retention has passed
    store.values.pop("blip2_prediction_id", None)
    _single(image).execute(_context(store))
    assert emulator.ledger()["uploads"]["presigns"] == 2


def test_a_put_refused_for_its_signature_is_presigned_once_more_then_fails_clearly(
    private: Callable[..., EmulatorServer], image_dir: Path
) -> None:
    emulator = private(refuse_puts=1)
    assert str(_single(str(image_dir / "chelsea.jpg")).execute(_context())).startswith("[emulated]")
    assert emulator.ledger()["uploads"]["presigns"] == 2 and emulator.ledger()["uploads"]["puts"] == 1
    emulator.config.refuse_puts = 3  # two more refusals: the retry fails too
    with pytest.raises(AirflowException, match=r"refused \(HTTP 403\).*twice"):
        _single(str(image_dir / "coffee.png")).execute(_context())


def _batch(images: Any, output: Path, **kwargs: Any) -> Blip2BatchPredictionOperator:
    settings: dict[str, Any] = {"deferrable": True, "poll_interval": 0.1, "timeout": 60}
    settings.update(kwargs)
    if "questions" not in settings:
        settings["caption"] = True
    return Blip2BatchPredictionOperator(task_id="batch", images=images, output_uri=str(output), **settings)


def _local_copies(image_dir: Path, directory: Path, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        name = SAMPLES[n % len(SAMPLES)]
        target = directory / f"{n:03d}-{name}"
        target.write_bytes((image_dir / name).read_bytes())
        paths.append(f"file://{target}")
    return paths


def test_a_deferrable_batch_over_file_uris_uploads_each_image_once_and_runs_it(
    private: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path
) -> None:
    emulator = private()
    images = _local_copies(image_dir, tmp_path / "in", 12)
    operator = _batch(images, tmp_path / "r.jsonl", questions={"cat": "Is there a cat?", "cup": "A cup?"})
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(_context())
    kwargs = json.dumps(deferred.value.trigger.serialize()[1])
    assert "/_storage/" not in kwargs and "X-Amz" not in kwargs  # every copy's URL is sealed
    summary, _ = run_batch(
        _batch(images, tmp_path / "r.jsonl", questions={"cat": "Is there a cat?", "cup": "A cup?"}),
        DictStore(),
    )
    assert (summary["total"], summary["succeeded"]) == (24, 24)
    ledger = emulator.ledger()
    assert ledger["uploads"]["puts"] == 12 + 12  # the first execute's chunk, then the whole run
    assert ledger["uploads"]["max_retention_s"] <= 86400
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {line["image"] for line in lines} == set(images)
    assert "/_storage/" not in (tmp_path / "r.jsonl").read_text()


def test_a_batch_over_a_local_directory_records_an_unreadable_upload_like_a_download_failure(
    private: Callable[..., EmulatorServer], image_dir: Path, image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = private()
    _local_copies(image_dir, tmp_path / "folder", 3)
    (tmp_path / "folder" / "readme.txt").write_text("not listed")
    images = [str(tmp_path / "folder"), image_url("missing.jpg")]
    summary, _ = run_batch(
        _batch(images, tmp_path / "r.jsonl", image_transfer="upload", max_failed_ratio=0.5), DictStore()
    )
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 3, 1)
    failed = [
        json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines() if '"error"' in line
    ]
    assert any("missing.jpg" in str(line["error"]) and "HTTP 404" in str(line["error"]) for line in failed)
    assert emulator.ledger()["uploads"]["puts"] == 3


def test_a_batch_with_a_missing_local_file_fails_before_any_request(
    private: Callable[..., EmulatorServer], tmp_path: Path
) -> None:
    emulator = private()
    with pytest.raises(AirflowFailException, match=r"images: '.*gone\.png' does not exist"):
        run_batch(_batch([str(tmp_path / "gone.png")], tmp_path / "r.jsonl"), DictStore())
    assert emulator.ledger()["requests"] == {}


def test_a_retried_batch_reuses_the_copies_of_the_items_it_predicts_again(
    private: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path
) -> None:
    emulator = private(fault_drop=0.2, fault_endpoints=("run",), seed=7)
    images = _local_copies(image_dir, tmp_path / "in", 10)
    summary, failures = run_tries(lambda: _batch(images, tmp_path / "r.jsonl"), DictStore(), retries=3)
    assert summary["succeeded"] == 10 and failures  # ambiguous runs, predicted again by later tries
    assert emulator.ledger()["uploads"]["presigns"] == 10  # each image uploaded once, over every try
