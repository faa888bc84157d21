"""
System tests in a production-shaped deployment: triggerers that die, stall or pause while mapped
predictions and a batch's synchronous runs are under way, and the metadata database.
PostgreSQL metadata database, LocalExecutor with 8 slots, two triggerers, a Redis server, and the
API emulator at the API's real limits and speed (60 requests a minute, 10 in flight, 2 s per
prediction, ``retry_after`` in the body only, 2 % of the reads answered 5xx).

Needs the Debian packages ``postgresql`` and ``redis-server`` (``make system-packages`` installs
them as root). Without them the tests are skipped when not root, and fail as root.

Starts: PostgreSQL, Redis, an Airflow API server, scheduler (LocalExecutor, 8 slots), DAG processor
and two triggerers, the emulator and a file server (one deployment for both production modules).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.deployment import AirflowDeployment
from scripts.production import (
    DAG_ID,
    SHARED_SCALE_DAG_ID,
    ProductionStack,
)
from scripts.sandbox import AirflowSandbox
from tests.system.production import (
    ALL_TRIGGERERS,
    IMAGES,
    assert_every_task_succeeded_and_one_create_per_image,
    batch_summary,
    busiest_triggerer,
    run_to_the_end,
    wait_to_the_end,
)

pytestmark = pytest.mark.timeout(900)

#: The batch of the killed-triggerer test of synchronous runs.
SYNC_KILLED = 20


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


def test_a_killed_triggerer_sends_again_only_the_runs_under_way(
    fresh: ProductionStack, tmp_path: Path
) -> None:
    """
    The run trigger's journal in XCom survives its triggerer: the other one resumes the chunk.

    20 images: the run that finds out whether the API offers synchronous runs, a wave of 10, then a
    wave of 9 under way at the kill and sent again, and the read of the cost: 30 requests, within the
    connection's 30 a minute, so the run waits no window out.
    """
    deployment = fresh.deployment
    fresh.emulator.config.latency = 4.0
    images = fresh.images("sync-killed", SYNC_KILLED)
    conf = {"images": [], "batch_images": images, "output_uri": str(tmp_path / "batch.jsonl")}
    run_id = deployment.trigger(SHARED_SCALE_DAG_ID, conf)
    victim = deployment.wait_for(
        lambda: next(iter(deployment.deferred_by_triggerer(SHARED_SCALE_DAG_ID, run_id).keys() - {""}), None),
        timeout=180,
        what="the batch deferred to a triggerer",
    )
    deployment.wait_for(lambda: fresh.emulator.ledger()["runs"] >= 12, timeout=120, what="runs under way")
    deployment.kill(victim)
    state = wait_to_the_end(fresh, SHARED_SCALE_DAG_ID, run_id, timeout=600)
    assert state == "success", fresh.explain(dag_id=SHARED_SCALE_DAG_ID, run_id=run_id)
    summary = batch_summary(fresh, SHARED_SCALE_DAG_ID, run_id)
    ledger = fresh.emulator.ledger()
    rerun = int(summary["ambiguous"])  # type: ignore[call-overload]
    # Killed with a second wave of 4 s runs under way: those, and only those, were sent again. Each
    # counts as ambiguous, though one recorded as started may have died before it was sent.
    assert summary["succeeded"] == SYNC_KILLED and 1 <= rerun <= 10, summary
    assert SYNC_KILLED < ledger["creates"] <= SYNC_KILLED + rerun, ledger
    assert ledger["runs"] == ledger["creates"], ledger
