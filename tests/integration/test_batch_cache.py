"""
The batch operator's result cache (``cache_uri``) and spending cap (``max_cost``), in process.

The operator runs the way Airflow drives it (``tests/batch_driver.py``) against the emulator over
real HTTP on loopback (the synchronous run offered, or ``poll``), on local files, a file server for
http(s) images, and the local S3 server.

Starts: the emulator over HTTP on loopback, a local file server for the images, a local S3 (moto);
Airflow's task runner in process, no Airflow process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator
from tests.batch_driver import DictStore, run_batch

COST = 0.0011  # the emulator's cost of a prediction


def _lines(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _folder(image_dir: Path, target: Path, count: int, start: int = 0) -> Path:
    """``count`` distinct image files (copies of the samples with one byte appended)."""
    target.mkdir(parents=True, exist_ok=True)
    samples = sorted(
        p for p in image_dir.iterdir() if p.suffix in (".jpg", ".png", ".webp") and "not-" not in p.name
    )
    for n in range(start, start + count):
        sample = samples[n % len(samples)]
        (target / f"img-{n:03d}{sample.suffix}").write_bytes(sample.read_bytes() + bytes([n % 256]))
    return target


def _batch(images: Any, output: Path, cache: Path | str, **kwargs: Any) -> Blip2BatchPredictionOperator:
    return Blip2BatchPredictionOperator(
        task_id="nightly",
        images=images,
        output_uri=str(output),
        cache_uri=str(cache),
        question="Is there a weapon?",
        deferrable=True,
        poll_interval=0.2,
        **kwargs,
    )


def test_a_second_run_over_unchanged_files_predicts_nothing_and_a_changed_file_again(
    connect: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path
) -> None:
    emulator = connect()
    folder = _folder(image_dir, tmp_path / "day", 6)
    cache = tmp_path / "cache" / "results.jsonl"
    first, _ = run_batch(_batch(str(folder), tmp_path / "run1.jsonl", cache), DictStore())
    assert first["succeeded"] == 6 and first["cached"] == 0
    assert emulator.ledger()["creates"] == 6
    header = json.loads(cache.read_text().splitlines()[0])
    assert header == {"format": "blip2-result-cache", "version": 1}

    second, _ = run_batch(_batch(str(folder), tmp_path / "run2.jsonl", cache), DictStore())
    assert emulator.ledger()["creates"] == 6  # nothing new
    assert second["cached"] == 6 and second["succeeded"] == 6 and second["cost"] == 0
    assert second["cost_saved"] == pytest.approx(6 * COST)  # as the API reported it
    lines = _lines(tmp_path / "run2.jsonl")
    assert all(line["cached"] and line["cost"] == 0 and line["attempts"] == 0 for line in lines)
    assert [line["output"] for line in lines] == [line["output"] for line in _lines(tmp_path / "run1.jsonl")]

    changed = sorted(folder.iterdir())[2]
    stat = changed.stat()
    changed.write_bytes(changed.read_bytes() + b"!")
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    added = _folder(image_dir, tmp_path / "more", 1, start=6).iterdir().__next__()
    shutil.move(added, folder / added.name)  # one new image
    third, _ = run_batch(_batch(str(folder), tmp_path / "run3.jsonl", cache), DictStore())
    assert emulator.ledger()["creates"] == 8
    assert third["cached"] == 5 and third["succeeded"] == 7
    fresh = {Path(line["image"]).name for line in _lines(tmp_path / "run3.jsonl") if not line["cached"]}
    assert fresh == {changed.name, added.name}
    assert len(cache.read_text().splitlines()) == 1 + 7  # one line per image: the changed one replaced


def test_other_inputs_miss_the_cache_and_failures_are_not_cached(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str], tmp_path: Path
) -> None:
    emulator = connect()
    images = [image_url("chelsea.jpg"), image_url("coffee.png"), image_url("missing.jpg")]
    cache = tmp_path / "c.jsonl"
    first, _ = run_batch(_batch(images, tmp_path / "1.jsonl", cache, max_failed_ratio=0.5), DictStore())
    assert (first["succeeded"], first["failed"]) == (2, 1)
    again, _ = run_batch(_batch(images, tmp_path / "2.jsonl", cache, max_failed_ratio=0.5), DictStore())
    assert again["cached"] == 2 and emulator.ledger()["creates"] == 4  # the failure is predicted again
    other = Blip2BatchPredictionOperator(
        task_id="nightly",
        images=images[:2],
        output_uri=str(tmp_path / "3.jsonl"),
        cache_uri=str(cache),
        question="Is there a cat?",
        deferrable=True,
    )
    summary, _ = run_batch(other, DictStore())
    assert summary["cached"] == 0 and emulator.ledger()["creates"] == 6


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"image": "a.jpg", "caption": "x"}\n', "is not a BLIP-2 result cache"),
        ('{"format": "blip2-result-cache", "version": 1}\n{"key": "k", "fin', "is corrupt"),
    ],
)
def test_a_corrupt_or_foreign_cache_fails_before_any_create(
    connect: Callable[..., EmulatorServer],
    image_url: Callable[[str], str],
    tmp_path: Path,
    content: str,
    words: str,
) -> None:
    emulator = connect()
    cache = tmp_path / "c.jsonl"
    cache.write_text(content)
    with pytest.raises(AirflowFailException) as error:
        run_batch(_batch([image_url("chelsea.jpg")], tmp_path / "o.jsonl", cache), DictStore())
    assert f"cache_uri {cache}" in str(error.value) and words in str(error.value)
    assert emulator.ledger()["creates"] == 0
    assert cache.read_text() == content  # left as it was


@pytest.mark.parametrize("sync_run", ["auto", "poll"])
def test_max_cost_stops_the_batch_writes_what_finished_and_the_next_run_goes_on(
    start_emulator: Callable[..., EmulatorServer],
    monkeypatch: pytest.MonkeyPatch,
    image_dir: Path,
    tmp_path: Path,
    sync_run: str,
) -> None:
    from tests.conftest import connection_json

    emulator = start_emulator()
    monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(emulator.url, sync_run=sync_run))
    cache = tmp_path / "c.jsonl"
    known = _folder(image_dir, tmp_path / "known", 3)
    run_batch(_batch(str(known), tmp_path / "0.jsonl", cache), DictStore())
    assert emulator.ledger()["creates"] == 3
    new = _folder(image_dir, tmp_path / "new", 20)
    with pytest.raises(AirflowFailException) as error:
        run_batch(_batch(str(new), tmp_path / "1.jsonl", cache, max_cost=5 * COST), DictStore())
    creates = emulator.ledger()["creates"] - 3
    assert 4 <= creates <= 5
    message = str(error.value)
    assert f"max_cost={5 * COST:g}" in message and f"{20 - creates} of 20 items are left" in message
    lines = _lines(tmp_path / "1.jsonl")
    assert sum(line["status"] == "success" for line in lines) == creates
    assert sum(line["status"] == "skipped" for line in lines) == 20 - creates
    # The next run with the same cache predicts only what is left.
    summary, _ = run_batch(_batch(str(new), tmp_path / "2.jsonl", cache), DictStore())
    assert summary["cached"] == creates and summary["succeeded"] == 20
    assert emulator.ledger()["creates"] - 3 == 20


def test_a_cache_on_s3_over_an_s3_prefix(
    connect: Callable[..., EmulatorServer], s3_connection: Any, image_dir: Path, tmp_path: Path
) -> None:
    emulator = connect()
    s3_connection.create_bucket("photos")
    for n, name in enumerate(("chelsea.jpg", "coffee.png", "rocket.webp")):
        s3_connection.put_object("photos", f"day/{n}-{name}", (image_dir / name).read_bytes())
    cache = "s3://photos/cache/results.jsonl"
    run_batch(_batch("s3://photos/day/", tmp_path / "1.jsonl", cache), DictStore())
    summary, _ = run_batch(_batch("s3://photos/day/", tmp_path / "2.jsonl", cache), DictStore())
    assert summary["cached"] == 3 and emulator.ledger()["creates"] == 3
    s3_connection.put_object("photos", "day/1-coffee.png", (image_dir / "astronaut.jpg").read_bytes())
    summary, _ = run_batch(_batch("s3://photos/day/", tmp_path / "3.jsonl", cache), DictStore())
    assert summary["cached"] == 2 and emulator.ledger()["creates"] == 4  # a new ETag


def test_cache_compact_keeps_only_this_runs_items(
    connect: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path
) -> None:
    connect()
    cache = tmp_path / "c.jsonl"
    run_batch(_batch(str(_folder(image_dir, tmp_path / "a", 4)), tmp_path / "1.jsonl", cache), DictStore())
    other = _folder(image_dir, tmp_path / "b", 2)
    run_batch(_batch(str(other), tmp_path / "2.jsonl", cache), DictStore())
    assert len(cache.read_text().splitlines()) == 1 + 6
    run_batch(_batch(str(other), tmp_path / "3.jsonl", cache, cache_compact=True), DictStore())
    assert len(cache.read_text().splitlines()) == 1 + 2
    shutil.rmtree(tmp_path / "a")
