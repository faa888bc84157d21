"""
System tests in a production-shaped deployment: PostgreSQL metadata database, LocalExecutor with 8
slots, two triggerers, a Redis server, and the API emulator at the API's real limits and speed
(60 requests a minute, 10 in flight, 2 s per prediction, ``retry_after`` in the body only, 2 % of
the reads answered 5xx). Many mapped deferrable predictions run at once and a triggerer dies.

Needs the Debian packages ``postgresql`` and ``redis-server`` (``make system-packages`` installs them
as root). Without them the tests are skipped when not root, and fail as root.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.deployment import AirflowDeployment
from scripts.production import DAG_ID, ProductionStack, missing_reason, production_stack
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
    for name in stack.deployment.triggerers:
        if not stack.deployment.running(name):
            stack.deployment.start(name)
    stack.deployment.wait_for(
        lambda: stack.deployment.alive_triggerers() >= ALL_TRIGGERERS, timeout=120, what="both triggerers"
    )
    return stack


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
    assert state == "success", stack.explain()
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
