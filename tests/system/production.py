"""
What the system tests in the production-shaped deployment share: the check for PostgreSQL and
Redis, runs of its DAGs to the end, and the checks of one create per image.

The deployment itself (fixtures ``stack``, one per test module, and ``fresh``) is in
``tests/system/conftest.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.production import (
    DAG_ID,
    ProductionStack,
    missing_reason,
)

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
    assert_one_create_per_image_but_the_batch_s_ambiguous(stack, dag_id, run_id, mapped, batch_images)
    return run_id, mapped + batch_images


def assert_one_create_per_image_but_the_batch_s_ambiguous(
    stack: ProductionStack, dag_id: str, run_id: str, mapped: list[str], batch_images: list[str]
) -> None:
    """
    Every image created once, but for the batch's synchronous runs sent again and counted ambiguous.

    A triggerer counted dead while a chunk's runs are under way (its heartbeat late on a loaded
    machine) hands the chunk to the other one, which sends those runs again and counts each as
    ambiguous: the batch's summary then accounts for every extra create. A mapped task's trigger
    that moves reads its prediction again and never creates one.
    """
    creates = stack.creates_per_image(mapped + batch_images)
    ambiguous = int(batch_summary(stack, dag_id, run_id)["ambiguous"])  # type: ignore[call-overload]
    mapped_creates = stack.creates_per_image(mapped)
    assert set(mapped_creates.values()) == {1}, creates
    assert min(creates.values()) == 1 and max(creates.values()) <= 2, creates
    extra = sum(creates.values()) - len(creates)
    assert extra <= ambiguous, (creates, ambiguous)
    assert stack.emulator.ledger()["creates"] == len(mapped) + len(batch_images) + extra


def share_of_429(stack: ProductionStack) -> float:
    """
    The share of the requests answered 429, but for the deployment's one probe of a window.

    With ``rate_limit_shape`` at ``auto``, the budget sends one request past a full window to learn
    whether the limit refills; against the emulator's sliding window that probe is answered 429 and
    the lesson ``window`` is noted in Redis. That one 429 is back-pressure the design pays once an
    hour, so it is not counted; any other 429 is.
    """
    ledger = stack.emulator.ledger()
    probes = stack.rate_limit_lessons().count("window")
    return max(0, ledger["responses_429"] - probes) / max(1, sum(ledger["requests"].values()))


# --------------------------------------------------------------------------------------------------
# The synchronous run: a triggerer killed while a batch's runs are under way, and a refusal
# --------------------------------------------------------------------------------------------------
def batch_summary(stack: ProductionStack, dag_id: str, run_id: str) -> dict[str, object]:
    """The batch task's summary (its XCom ``return_value``)."""
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
    return dict(stack.deployment.api("GET", path)["value"])


# --------------------------------------------------------------------------------------------------
# Images no URL reaches: a service that fetches nothing but its own uploads
# --------------------------------------------------------------------------------------------------
UPLOADS_DAG_ID = "system_blip2_production_uploads"


def wait_to_the_end(stack: ProductionStack, dag_id: str, run_id: str, *, timeout: float) -> str:
    """The run's end state; a run that does not end in time fails with what the deployment logged."""
    try:
        return stack.deployment.wait_for_run(dag_id, run_id, timeout=timeout)
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{stack.explain(dag_id=dag_id, run_id=run_id)}") from error
