"""
System tests in a production-shaped deployment: PostgreSQL metadata database, LocalExecutor with 8
slots, two triggerers, a Redis server, and the API emulator at the API's real limits and speed (60
requests a minute, 10 in flight, 2 s per prediction, ``retry_after`` in the body only, 2 % of the
reads answered 5xx). Many mapped deferrable predictions run at once and a triggerer dies.

Needs the Debian packages ``postgresql`` and ``redis-server`` (``make system-packages`` installs
them as root). Without them the tests are skipped when not root, and fail as root.

Starts: PostgreSQL, Redis, an Airflow API server, scheduler (LocalExecutor, 8 slots), DAG processor
and two triggerers, the emulator and a file server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.deployment import AirflowDeployment
from scripts.production import (
    DAG_ID,
    POOL,
    POOL_DAG_ID,
    SCALE_DAG_ID,
    SHARED_REQUESTS_PER_MINUTE,
    SHARED_SCALE_DAG_ID,
    ProductionStack,
    missing_reason,
    production_stack,
)
from scripts.sandbox import AirflowSandbox

pytestmark = pytest.mark.timeout(900)
IMAGES = 12
ALL_TRIGGERERS = {"triggerer-1", "triggerer-2"}


def require_system_packages() -> None:
    """Skip without PostgreSQL or Redis when not root; as root they must be there."""
    reason = missing_reason()
    if reason is None:
        return
    if os.geteuid() != 0:
        pytest.skip(f"{reason}; not root, so make system-packages could not install it")
    pytest.fail(f"{reason}, although running as root: run `make system-packages`")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    require_system_packages()
    with production_stack(tmp_path_factory.mktemp("production")) as running:
        yield running


@pytest.fixture
def fresh(stack: ProductionStack) -> ProductionStack:
    """The stack with the emulator's ledger cleared, at the real speed, both triggerers running."""
    stack.emulator.reset()
    stack.emulator.config.latency = 2.0
    stack.emulator.config.requests_per_minute = 60
    flush_redis(stack)
    for name in stack.deployment.triggerers:
        if not stack.deployment.running(name):
            stack.deployment.start(name)
    stack.deployment.wait_for(
        lambda: stack.deployment.alive_triggerers() >= ALL_TRIGGERERS, timeout=120, what="both triggerers"
    )
    return stack


def flush_redis(stack: ProductionStack) -> None:
    """Forget the shared budget's counts of earlier tests."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=stack.redis.port)
    client.flushall()
    client.close()


def run_to_the_end(stack: ProductionStack, images: list[str], *, kill_after_deferred: int = 0) -> str:
    """
    Run the mapped DAG over ``images``; with ``kill_after_deferred``, SIGKILL the triggerer holding
    the most deferred tasks once that many are deferred. Return the run id.
    """
    deployment = stack.deployment
    run_id = deployment.trigger(DAG_ID, {"images": images})
    if kill_after_deferred:
        victim = deployment.wait_for(
            lambda: busiest_triggerer(stack, run_id, kill_after_deferred),
            timeout=180,
            what=f"{kill_after_deferred} deferred tasks in a triggerer",
        )
        deployment.kill(victim)
        survivors = ALL_TRIGGERERS - {victim}
        deployment.wait_for(
            lambda: deployment.alive_triggerers() == survivors,
            timeout=60,
            what=f"{victim} to count as dead",
        )
    state = deployment.wait_for_run(DAG_ID, run_id, timeout=480)
    assert state == "success", stack.explain(dag_id=DAG_ID, run_id=run_id)
    return run_id


def busiest_triggerer(stack: ProductionStack, run_id: str, at_least: int) -> str | None:
    """The triggerer running the most of the run's deferred tasks, once ``at_least`` are deferred."""
    held = stack.deployment.deferred_by_triggerer(DAG_ID, run_id)
    held.pop("", None)
    if sum(held.values()) < at_least:
        return None
    return max(held, key=lambda name: held[name])


def assert_every_task_succeeded_and_one_create_per_image(
    stack: ProductionStack, run_id: str, images: list[str]
) -> None:
    summary = stack.deployment.run_summary(DAG_ID, run_id)
    assert summary.states == {"success": len(images) + 1}, summary
    assert len([key for key in summary.try_numbers if key.startswith("caption[")]) == len(images)
    creates = stack.creates_per_image(images)
    assert set(creates.values()) == {1}, creates
    assert stack.emulator.ledger()["creates"] == len(images)


def test_mapped_deferrable_predictions_succeed_with_two_triggerers(fresh: ProductionStack) -> None:
    images = fresh.images("mapped", IMAGES)
    run_id = run_to_the_end(fresh, images)

    assert_every_task_succeeded_and_one_create_per_image(fresh, run_id, images)
    assert fresh.deployment.alive_triggerers() >= ALL_TRIGGERERS
    assert all(fresh.deployment.running(name) for name in ALL_TRIGGERERS)
    ledger = fresh.emulator.ledger()
    assert ledger["statuses"]["success"] == len(images)
    assert ledger["statuses"]["cancelled"] == 0
    logs = "".join(
        p.read_text(errors="replace") for p in fresh.deployment.written_files() if p.suffix == ".log"
    )
    assert "objects of this triggerer's heap out of the garbage collector's full passes" in logs


def test_a_killed_triggerer_hands_its_triggers_to_the_other(fresh: ProductionStack) -> None:
    fresh.emulator.config.latency = 20.0  # long enough for the handover to happen mid-prediction
    images = fresh.images("killed", 10)  # all in flight at once: none waits for a free slot
    run_id = run_to_the_end(fresh, images, kill_after_deferred=6)

    assert_every_task_succeeded_and_one_create_per_image(fresh, run_id, images)
    assert fresh.emulator.ledger()["statuses"]["cancelled"] == 0


def test_a_paused_triggerer_counts_as_dead_until_it_is_resumed(fresh: ProductionStack) -> None:
    deployment = fresh.deployment
    deployment.pause("triggerer-2")
    try:
        deployment.wait_for(
            lambda: deployment.alive_triggerers() == {"triggerer-1"},
            timeout=45,
            what="the paused triggerer to count as dead",
        )
        assert deployment.running("triggerer-2")
    finally:
        deployment.resume("triggerer-2")
    deployment.wait_for(
        lambda: deployment.alive_triggerers() >= ALL_TRIGGERERS, timeout=45, what="the resumed triggerer"
    )


def test_two_triggerers_on_sqlite_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SKIP LOCKED"):
        AirflowDeployment(AirflowSandbox(tmp_path), triggerers=2)


def test_the_metadata_database_is_postgresql(stack: ProductionStack) -> None:
    env = stack.deployment.sandbox.env()
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith(
        "postgresql+psycopg2://airflow:airflow@127.0.0.1:"
    )
    assert not stack.deployment.sandbox.database.exists()


# --------------------------------------------------------------------------------------------------
# Mapped tasks and a batch at once, at a rate limit they exceed together
# --------------------------------------------------------------------------------------------------
MAPPED = 8
BATCH = 8


def run_mapped_and_batch(
    stack: ProductionStack, dag_id: str, tmp_path: Path, *, batch: int = BATCH
) -> tuple[str, list[str]]:
    """Run ``dag_id`` over MAPPED mapped tasks and a batch of ``batch`` images; return the run and images."""
    mapped, batch_images = stack.images(f"{dag_id}-m", MAPPED), stack.images(f"{dag_id}-b", batch)
    conf = {"images": mapped, "batch_images": batch_images, "output_uri": str(tmp_path / "batch.jsonl")}
    run_id = stack.deployment.trigger(dag_id, conf)
    state = stack.deployment.wait_for_run(dag_id, run_id, timeout=600)
    assert state == "success", stack.explain(dag_id=dag_id, run_id=run_id)
    summary = stack.deployment.run_summary(dag_id, run_id)
    assert summary.states == {"success": MAPPED + 2}, summary
    lines = [json.loads(line) for line in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["success"] * batch
    creates = stack.creates_per_image(mapped + batch_images)
    assert set(creates.values()) == {1}, creates
    assert stack.emulator.ledger()["creates"] == MAPPED + batch
    return run_id, mapped + batch_images


def share_of_429(stack: ProductionStack) -> float:
    ledger = stack.emulator.ledger()
    return ledger["responses_429"] / max(1, sum(ledger["requests"].values()))


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

    The batch's 40 synchronous runs go 10 at a time as its process's own budget of 60 allows: more
    than the API's 30 within the first minute.
    """
    fresh.emulator.config.requests_per_minute = SHARED_REQUESTS_PER_MINUTE
    run_mapped_and_batch(fresh, SCALE_DAG_ID, tmp_path, batch=40)
    ledger = fresh.emulator.ledger()
    assert ledger["responses_429"] > 0, ledger  # the limit was really exceeded


# --------------------------------------------------------------------------------------------------
# A stalled triggerer, and a pool that counts deferred tasks
# --------------------------------------------------------------------------------------------------
def test_a_stalled_triggerer_cancels_nothing_when_it_wakes(fresh: ProductionStack) -> None:
    """SIGSTOP past the heartbeat: its triggers move to the other; on SIGCONT it lets them go."""
    deployment = fresh.deployment
    fresh.emulator.config.latency = 30.0  # still running after the handover
    images = fresh.images("stalled", 10)
    run_id = deployment.trigger(DAG_ID, {"images": images})
    victim = deployment.wait_for(
        lambda: busiest_triggerer(fresh, run_id, 6), timeout=180, what="6 deferred tasks in a triggerer"
    )
    deployment.pause(victim)
    try:
        deployment.wait_for(
            lambda: deployment.alive_triggerers() == ALL_TRIGGERERS - {victim},
            timeout=60,
            what=f"{victim} to count as dead",
        )
        deployment.wait_for(
            lambda: victim not in deployment.deferred_by_triggerer(DAG_ID, run_id),
            timeout=90,
            what="its triggers to move to the other triggerer",
        )
    finally:
        deployment.resume(victim)
    state = deployment.wait_for_run(DAG_ID, run_id, timeout=480)
    assert state == "success", fresh.explain(dag_id=DAG_ID, run_id=run_id)
    assert_every_task_succeeded_and_one_create_per_image(fresh, run_id, images)
    ledger = fresh.emulator.ledger()
    assert ledger["statuses"]["cancelled"] == 0
    assert ledger["requests"].get("cancel", 0) == 0


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


# --------------------------------------------------------------------------------------------------
# The synchronous run: a triggerer killed while a batch's runs are under way, and a refusal
# --------------------------------------------------------------------------------------------------
def batch_summary(stack: ProductionStack, dag_id: str, run_id: str) -> dict[str, object]:
    """The batch task's summary (its XCom ``return_value``)."""
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
    return dict(stack.deployment.api("GET", path)["value"])


def test_a_killed_triggerer_sends_again_only_the_runs_under_way(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """The run trigger's journal in XCom survives its triggerer: the other one resumes the chunk."""
    deployment = fresh.deployment
    fresh.emulator.config.latency = 4.0
    images = fresh.images("sync-killed", 30)
    conf = {"images": [], "batch_images": images, "output_uri": str(tmp_path / "batch.jsonl")}
    run_id = deployment.trigger(SHARED_SCALE_DAG_ID, conf)
    victim = deployment.wait_for(
        lambda: next(iter(deployment.deferred_by_triggerer(SHARED_SCALE_DAG_ID, run_id).keys() - {""}), None),
        timeout=180,
        what="the batch deferred to a triggerer",
    )
    deployment.wait_for(lambda: fresh.emulator.ledger()["runs"] >= 12, timeout=120, what="runs under way")
    deployment.kill(victim)
    state = deployment.wait_for_run(SHARED_SCALE_DAG_ID, run_id, timeout=600)
    assert state == "success", fresh.explain(dag_id=SHARED_SCALE_DAG_ID, run_id=run_id)
    summary = batch_summary(fresh, SHARED_SCALE_DAG_ID, run_id)
    ledger = fresh.emulator.ledger()
    rerun = int(summary["ambiguous"])  # type: ignore[call-overload]
    # Killed with a second wave of 4 s runs under way: those, and only those, were sent again. Each
    # counts as ambiguous, though one recorded as started may have died before it was sent.
    assert summary["succeeded"] == 30 and 1 <= rerun <= 10, summary
    assert 30 < ledger["creates"] <= 30 + rerun and ledger["runs"] == ledger["creates"], ledger


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


# --------------------------------------------------------------------------------------------------
# Images no URL reaches: a service that fetches nothing but its own uploads
# --------------------------------------------------------------------------------------------------
UPLOADS_DAG_ID = "system_blip2_production_uploads"


def test_images_no_url_reaches_are_uploaded_by_mapped_tasks_and_a_batch(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """40 mapped uploads of http images only workers reach, and a batch over the same as file:// paths."""
    fresh.emulator.config.fetch_only_uploads = True
    try:
        mapped = fresh.images("uploaded", 40)
        files = [f"file://{fresh.images_dir / url.rsplit('/', 1)[1]}" for url in mapped]
        conf = {"images": mapped, "batch_images": files, "output_uri": str(tmp_path / "batch.jsonl")}
        run_id = fresh.deployment.trigger(UPLOADS_DAG_ID, conf)
        state = fresh.deployment.wait_for_run(UPLOADS_DAG_ID, run_id, timeout=900)
        assert state == "success", fresh.explain(dag_id=UPLOADS_DAG_ID, run_id=run_id)
        summary = fresh.deployment.run_summary(UPLOADS_DAG_ID, run_id)
        assert summary.states == {"success": 40 + 2}, summary
        lines = [json.loads(line) for line in (tmp_path / "batch.jsonl").read_text().splitlines()]
        assert [line["status"] for line in lines] == ["success"] * 40
        ledger = fresh.emulator.ledger()
        assert ledger["creates"] == 80 and ledger["uploads"]["puts"] == 80, ledger
        assert ledger["uploads"]["reads"] == 80 and ledger["uploads"]["puts_refused"] == 0
        assert ledger["uploads"]["max_retention_s"] <= 86400
        task_logs = [p for p in fresh.deployment.written_files() if f"dag_id={UPLOADS_DAG_ID}" in str(p)]
        logs = "\n".join(path.read_text(errors="replace") for path in task_logs if path.is_file())
        assert task_logs and "Uploaded" in logs, task_logs
        assert "/_storage/uploads/" not in logs and "X-Amz-Signature" not in logs  # no presigned URL
    finally:
        fresh.emulator.config.fetch_only_uploads = False
