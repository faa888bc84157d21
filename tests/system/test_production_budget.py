"""
System tests in a production-shaped deployment: one request budget for many processes (in Redis,
and without it), a pool that counts deferred tasks, a refused synchronous run, and images no URL
reaches.
PostgreSQL metadata database, LocalExecutor with 8 slots, two triggerers, a Redis server, and the
API emulator at the API's real limits and speed (60 requests a minute, 10 in flight, 2 s per
prediction, ``retry_after`` in the body only, 2 % of the reads answered 5xx).

Needs the Debian packages ``postgresql`` and ``redis-server`` (``make system-packages`` installs
them as root). Without them the tests are skipped when not root, and fail as root.

Starts: PostgreSQL, Redis, an Airflow API server, scheduler (LocalExecutor, 8 slots), DAG processor
and two triggerers, the emulator and a file server (one deployment for both production modules).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.production import (
    POOL,
    POOL_DAG_ID,
    SCALE_DAG_ID,
    SHARED_REQUESTS_PER_MINUTE,
    SHARED_SCALE_DAG_ID,
    ProductionStack,
)
from tests.system.production import (
    UPLOADS_DAG_ID,
    batch_summary,
    run_mapped_and_batch,
    share_of_429,
)

pytestmark = pytest.mark.timeout(900)

#: The images of each half of the uploads test.
UPLOADED = 16


def test_mapped_tasks_and_a_batch_share_one_budget_in_redis(fresh: ProductionStack, tmp_path: Path) -> None:
    """Eight workers and two triggerers, one API key: with Redis they stay within its limit."""
    fresh.emulator.config.requests_per_minute = SHARED_REQUESTS_PER_MINUTE
    run_mapped_and_batch(fresh, SHARED_SCALE_DAG_ID, tmp_path)
    assert share_of_429(fresh) <= 0.02, fresh.emulator.ledger()
    assert fresh.emulator.ledger()["peak_in_flight"] <= 10


def test_without_redis_every_task_still_succeeds_and_creates_once(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """Each process believes it has 60 requests a minute where the API allows 30: 429s, no failure.

    The batch's 30 synchronous runs go 10 at a time as its process's own budget of 60 allows: with
    the mapped tasks' creates and reads, more than the API's 30 within the first minute.
    """
    fresh.emulator.config.requests_per_minute = SHARED_REQUESTS_PER_MINUTE
    run_mapped_and_batch(fresh, SCALE_DAG_ID, tmp_path, batch=30)
    ledger = fresh.emulator.ledger()
    assert ledger["responses_429"] > 0, ledger  # the limit was really exceeded


def test_a_pool_counting_deferred_tasks_caps_predictions_in_flight(fresh: ProductionStack) -> None:
    """Without Redis, an Airflow pool with include_deferred caps the deployment's predictions."""
    deployment = fresh.deployment
    deployment.api("POST", "/pools", json={"name": POOL, "slots": 3, "include_deferred": True})
    try:
        fresh.emulator.config.latency = 4.0
        images = fresh.images("pooled", 6)
        run_id = deployment.trigger(POOL_DAG_ID, {"images": images})
        state = deployment.wait_for_run(POOL_DAG_ID, run_id, timeout=480)
        assert state == "success", fresh.explain(dag_id=POOL_DAG_ID, run_id=run_id)
        summary = deployment.run_summary(POOL_DAG_ID, run_id)
        assert summary.states == {"success": len(images) + 1}, summary
        ledger = fresh.emulator.ledger()
        assert ledger["creates"] == len(images)
        assert ledger["peak_in_flight"] == 3  # the pool's slots, though 8 workers could run more
    finally:
        deployment.api("DELETE", f"/pools/{POOL}")


def test_a_refused_synchronous_run_is_asked_once_by_the_whole_deployment(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """With the budget in Redis, the refusal one batch met is known to the next one's processes."""
    fresh.emulator.config.sync_run = False
    try:
        for number in range(2):
            images = fresh.images(f"sync-refused-{number}", 6)
            conf = {"images": [], "batch_images": images, "output_uri": str(tmp_path / f"b{number}.jsonl")}
            run_id = fresh.deployment.trigger(SHARED_SCALE_DAG_ID, conf)
            state = fresh.deployment.wait_for_run(SHARED_SCALE_DAG_ID, run_id, timeout=600)
            assert state == "success", fresh.explain(dag_id=SHARED_SCALE_DAG_ID, run_id=run_id)
            assert batch_summary(fresh, SHARED_SCALE_DAG_ID, run_id)["succeeded"] == 6
        ledger = fresh.emulator.ledger()
        assert ledger["requests"]["run"] == 1 and ledger["creates"] == 12, ledger
    finally:
        fresh.emulator.config.sync_run = True


def test_images_no_url_reaches_are_uploaded_by_mapped_tasks_and_a_batch(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """Mapped uploads of http images only workers reach, and a batch over the same as file:// paths.

    Their 80 requests (a presign, a create and a read each mapped image; a presign and a run each
    batch item) are more than the API's 60 a minute, here counted in a token bucket (60 at once,
    then one a second), so the budget paces the last 20 by it. ``benchmarks/uploads.py`` runs 40 of
    each against a sliding window.
    """
    fresh.emulator.config.fetch_only_uploads = True
    fresh.emulator.config.rate_limit = "bucket"
    try:
        mapped = fresh.images("uploaded", UPLOADED)
        files = [f"file://{fresh.images_dir / url.rsplit('/', 1)[1]}" for url in mapped]
        conf = {"images": mapped, "batch_images": files, "output_uri": str(tmp_path / "batch.jsonl")}
        run_id = fresh.deployment.trigger(UPLOADS_DAG_ID, conf)
        state = fresh.deployment.wait_for_run(UPLOADS_DAG_ID, run_id, timeout=900)
        assert state == "success", fresh.explain(dag_id=UPLOADS_DAG_ID, run_id=run_id)
        summary = fresh.deployment.run_summary(UPLOADS_DAG_ID, run_id)
        assert summary.states == {"success": UPLOADED + 2}, summary
        lines = [json.loads(line) for line in (tmp_path / "batch.jsonl").read_text().splitlines()]
        assert [line["status"] for line in lines] == ["success"] * UPLOADED
        ledger = fresh.emulator.ledger()
        # The batch's runs sent again after a triggerer handover are counted ambiguous.
        ambiguous = int(batch_summary(fresh, UPLOADS_DAG_ID, run_id)["ambiguous"])  # type: ignore[call-overload]
        assert 2 * UPLOADED <= ledger["creates"] <= 2 * UPLOADED + ambiguous, ledger
        assert ledger["uploads"]["puts"] == 2 * UPLOADED, ledger
        assert 2 * UPLOADED <= ledger["uploads"]["reads"] <= 2 * UPLOADED + ambiguous
        assert ledger["uploads"]["puts_refused"] == 0
        assert ledger["uploads"]["max_retention_s"] <= 86400
        task_logs = [p for p in fresh.deployment.written_files() if f"dag_id={UPLOADS_DAG_ID}" in str(p)]
        logs = "\n".join(path.read_text(errors="replace") for path in task_logs if path.is_file())
        assert task_logs and "Uploaded" in logs, task_logs
        assert "/_storage/uploads/" not in logs and "X-Amz-Signature" not in logs  # no presigned URL
    finally:
        fresh.emulator.config.fetch_only_uploads = False
