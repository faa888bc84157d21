"""
The production-shaped deployment on CeleryExecutor: two Celery workers whose broker is the Redis
server that also keeps the budget, PostgreSQL, two triggerers, and the API emulator at its real
speed.

Every task runs in a process of one of two Celery workers, and the deferred ones in one of two
triggerers: one API key's budget in Redis is what keeps them all within its limits.

Starts: PostgreSQL, Redis (broker and budget), an Airflow API server, scheduler, DAG processor, two
triggerers and two Celery workers, and the emulator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.production import (
    SHARED_REQUESTS_PER_MINUTE,
    SHARED_SCALE_DAG_ID,
    ProductionSettings,
    ProductionStack,
    production_stack,
)
from tests.system.production import require_system_packages, run_mapped_and_batch, share_of_429

pytestmark = pytest.mark.timeout(900)
WORKERS = ("worker-1", "worker-2")


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    require_system_packages()
    settings = ProductionSettings(celery_workers=len(WORKERS), requests_per_minute=SHARED_REQUESTS_PER_MINUTE)
    with production_stack(tmp_path_factory.mktemp("celery"), settings) as running:
        running.deployment.wait_for(
            lambda: running.deployment.alive_triggerers() >= {"triggerer-1", "triggerer-2"},
            timeout=120,
            what="both triggerers",
        )
        yield running


def test_the_tasks_run_on_celery_workers(celery_stack: ProductionStack) -> None:
    env = celery_stack.deployment.sandbox.env()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == f"redis://127.0.0.1:{celery_stack.redis.port}/1"
    assert all(celery_stack.deployment.running(name) for name in WORKERS)


def test_two_celery_workers_and_two_triggerers_share_one_budget_in_redis(
    celery_stack: ProductionStack, tmp_path: Path
) -> None:
    """Mapped tasks and a batch at once, at a limit they exceed together: no 429 to speak of."""
    run_id, _ = run_mapped_and_batch(celery_stack, SHARED_SCALE_DAG_ID, tmp_path)

    ledger = celery_stack.emulator.ledger()
    assert share_of_429(celery_stack) <= 0.02, ledger
    assert ledger["peak_in_flight"] <= 10, ledger
    assert ledger["statuses"]["cancelled"] == 0, ledger
    instances = celery_stack.deployment.task_instances(SHARED_SCALE_DAG_ID, run_id)
    ran_on = Counter(str(ti["hostname"]) for ti in instances)
    assert set(ran_on) == set(WORKERS), ran_on  # both workers ran tasks, nothing else did
