"""
The deployment-wide budget in a real Redis: shared windows and slots, expiry, fallback, processes.

Each ``SharedBudget`` built here stands for another process: they share nothing but Redis.

Starts: a local Redis server, the emulator over HTTP on loopback, and Python processes that share
the budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.budget import RequestBudget
from airflow_provider_blip2.client.rate_shape import Answer
from airflow_provider_blip2.client.redis_scope import BudgetScope, RedisParams, redis_params
from airflow_provider_blip2.client.shared_budget import SharedBudget
from airflow_provider_blip2.emulator import EmulatorServer
from scripts.ports import free_port
from scripts.redis_server import RedisServer, redis_missing_reason
from tests.conftest import API_KEY, REPO_ROOT, connection_json

pytestmark = pytest.mark.skipif(redis_missing_reason() is not None, reason=str(redis_missing_reason()))
LOG = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisParams:
    import redis as redis_py

    client = redis_py.Redis(host="127.0.0.1", port=redis_server.port)
    client.flushall()
    client.close()
    return redis_params("127.0.0.1", redis_server.port, None, None, {})


@pytest.fixture
def process_budget(redis: RedisParams) -> Callable[..., SharedBudget]:
    """``process_budget(rpm, mc)`` -> a budget as another process would build it."""

    def build(
        rpm: int = 60, mc: int = 10, *, window: float = 60.0, shape: str = "auto", **kwargs: Any
    ) -> SharedBudget:
        scopes = kwargs.pop("scopes", [BudgetScope("account", rpm, mc)])
        fallback = RequestBudget(rpm, mc, window=window, rate_limit_shape=shape)
        return SharedBudget(scopes, redis, fallback=fallback, log=LOG, **kwargs)

    return build


def test_processes_share_one_request_window(process_budget: Callable[..., SharedBudget]) -> None:
    first, second = (process_budget(rpm=5, window=1.0, shape="window") for _ in range(2))
    granted = [budget.reserve_request() for budget in (first, second, first, second, first)]
    assert granted == [0.0] * 5
    wait = second.reserve_request()
    assert 0 < wait <= 0.05  # every request still open: ask again soon
    for budget in (first, second, first, second, first):
        budget.request_done()
    wait = second.reserve_request()
    assert 0.9 < wait <= 1.0  # answered: each counts for a window from its answer
    time.sleep(wait)
    assert second.reserve_request() == 0.0
    assert first.fallback.reserve_request() == 0.0 and len(first.fallback._finished_requests) == 0


def test_processes_share_predictions_in_flight(process_budget: Callable[..., SharedBudget]) -> None:
    worker_a, worker_b, triggerer = process_budget(mc=2), process_budget(mc=2), process_budget(mc=2)
    assert worker_a.reserve_prediction() == 0.0
    worker_a.prediction_created("p1")
    assert worker_b.reserve_prediction() == 0.0
    worker_b.prediction_created("p2")
    assert worker_a.reserve_prediction() > 0  # two in flight in the deployment
    assert triggerer.in_flight == 2
    triggerer.prediction_finished("p1")  # read finished by the triggerer: the worker's slot is free
    assert worker_a.reserve_prediction() == 0.0
    worker_a.prediction_created(None)  # the create failed: its slot is released
    assert triggerer.in_flight == 1


def test_slots_of_a_crashed_process_expire(process_budget: Callable[..., SharedBudget]) -> None:
    ttl = 2.0  # long enough that the survivor's first ask comes before it on a loaded machine
    crashed = process_budget(mc=1, in_flight_ttl=ttl)
    assert crashed.reserve_prediction() == 0.0
    crashed.prediction_created("lost")  # and never seen finished: the worker died
    created = time.monotonic()
    survivor = process_budget(mc=1, in_flight_ttl=ttl)
    assert survivor.reserve_prediction() > 0
    time.sleep(max(0.0, created + ttl + 0.1 - time.monotonic()))
    assert survivor.reserve_prediction() == 0.0


def test_a_task_with_limits_of_its_own_is_capped_within_the_account(
    process_budget: Callable[..., SharedBudget],
) -> None:
    account = BudgetScope("account", 10, 10)
    batch = process_budget(scopes=[account, BudgetScope("account:2/10", 2, 10)])
    mapped = process_budget(scopes=[account])
    assert [batch.reserve_request(), batch.reserve_request()] == [0.0, 0.0]
    assert batch.reserve_request() > 0  # its own 2
    for _ in range(8):
        assert mapped.reserve_request() == 0.0  # the account's 10, two of them the batch's
    assert mapped.reserve_request() > 0


async def test_the_event_loop_path_shares_the_same_counts(
    process_budget: Callable[..., SharedBudget],
) -> None:
    worker, triggerer = process_budget(rpm=3, mc=1), process_budget(rpm=3, mc=1)
    assert worker.reserve_request() == 0.0
    assert await triggerer.areserve_request() == 0.0
    assert await triggerer.areserve_request() == 0.0
    assert worker.reserve_request() > 0
    await triggerer.arequest_done()
    assert worker.reserve_prediction() == 0.0
    worker.prediction_created("p")
    await triggerer.aprediction_finished("p")
    assert worker.in_flight == 0


def test_unreachable_redis_falls_back_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    fallback = RequestBudget(2, 1)
    unreachable = redis_params("127.0.0.1", free_port(), None, None, {})
    budget = SharedBudget([BudgetScope("account", 2, 1)], unreachable, fallback=fallback, log=LOG)
    with caplog.at_level(logging.WARNING):
        assert budget.reserve_request() == 0.0  # from the fallback, which now counts it
        assert budget.reserve_request() == 0.0
        assert budget.reserve_request() > 0
        assert budget.reserve_prediction() == 0.0
        budget.prediction_created("p")
        budget.request_done()
    assert fallback.in_flight == 1
    warnings = [record for record in caplog.records if "unreachable" in record.getMessage()]
    assert len(warnings) == 1
    assert "tries Redis again" in warnings[0].getMessage()


# --------------------------------------------------------------------------------------------------
# Separate processes against the emulator: the hook picks the shared budget from the connection
# --------------------------------------------------------------------------------------------------
CREATOR = """
import json, sys, time
from pathlib import Path
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from tests.conftest import FAST_RETRIES
hook = Blip2Hook(retry_policy=FAST_RETRIES)
barrier, index, count = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(barrier / index).touch()
while len(list(barrier.iterdir())) < count:  # start together: the budgets are tested when they overlap
    time.sleep(0.01)
outcomes = [
    hook.wait_for_prediction(hook.create_prediction(url, caption=True), poll_interval=0.05, timeout=60)
    for url in json.loads(sys.argv[1])
]
print(json.dumps([o.status for o in outcomes]))
"""
# Each process waits for its prediction before creating the next, as a task does: a process that
# created all of its predictions first could hold slots the others wait for, and they for its.


def run_processes(
    emulator: EmulatorServer, connection: str, images: list[list[str]], barrier: Path
) -> list[list[str]]:
    """Run one creating process per image list, all starting at once; return each one's outcome statuses.

    :param barrier: an empty directory; each process marks itself ready there and starts when all are.
    """
    env = {**os.environ, "AIRFLOW_CONN_BLIP2_DEFAULT": connection, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CREATOR, json.dumps(urls), str(barrier), str(index), str(len(images))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        for index, urls in enumerate(images)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("shared", "limiter"),
    [(True, "window"), (True, "bucket"), (False, "window")],
    ids=["redis", "redis-bucket", "per-process"],
)
def test_processes_with_a_shared_budget_draw_no_429(
    start_emulator: Callable[..., EmulatorServer],
    redis_server: RedisServer,
    redis: RedisParams,
    image_url: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    shared: bool,
    limiter: str,
    tmp_path: Path,
) -> None:
    # 20 requests per emulated minute (1.2 s here), 4 processes, each within the limit on its own.
    time_scale = 0.02
    server = start_emulator(time_scale=time_scale, requests_per_minute=20, latency=2.0, rate_limit=limiter)
    extra: dict[str, Any] = {"requests_per_minute": 20, "rate_window": 60 * time_scale}
    if shared:
        extra["redis_conn_id"] = "redis_budget"
        monkeypatch.setenv(
            "AIRFLOW_CONN_REDIS_BUDGET",
            json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": redis_server.port}),
        )
    images = [[image_url("chelsea.jpg") + f"?p={p}&n={n}" for n in range(4)] for p in range(4)]
    results = run_processes(server, connection_json(server.url, **extra), images, tmp_path)
    assert results == [["success"] * 4] * 4
    ledger = server.ledger()
    assert ledger["creates"] == 16
    if shared:
        # Against a window, the deployment's one probe past a full window may draw the one 429
        # that teaches every process to keep to the window; a bucket admits it and all that follow.
        assert ledger["responses_429"] <= (1 if limiter == "window" else 0)
    else:
        # Four budgets of 20 each against one limit of 20, spent at once: 32 requests within one window.
        assert ledger["responses_429"] > 0


def test_api_key_reaches_no_redis_key(redis_server: RedisServer, redis: RedisParams) -> None:
    import redis as redis_py

    from airflow_provider_blip2.client.redis_scope import account_scope_name

    name = account_scope_name("http://127.0.0.1:1", API_KEY)
    budget = SharedBudget([BudgetScope(name, 5, 5)], redis, fallback=RequestBudget(5, 5), log=LOG)
    assert budget.reserve_request() == 0.0
    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    keys = [str(key) for key in client.scan_iter("*")]
    assert keys and all(API_KEY not in key for key in keys)
    assert asyncio.run(budget.areserve_request()) == 0.0


def test_a_hook_with_redis_conn_id_shares_the_budget_and_survives_a_missing_connection(
    redis_server: RedisServer,
    redis: RedisParams,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import structlog.testing

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    monkeypatch.setenv(
        "AIRFLOW_CONN_REDIS_BUDGET",
        json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": redis_server.port}),
    )
    for conn_id, redis_conn_id in (("blip2_shared", "redis_budget"), ("blip2_orphan", "no_such_redis")):
        extra: dict[str, Any] = {
            "redis_conn_id": redis_conn_id,
            "requests_per_minute": 7,
            "max_concurrency": 3,
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection_json("http://127.0.0.1:1", **extra))
    shared = Blip2Hook("blip2_shared").budget()
    assert isinstance(shared, SharedBudget)
    assert (shared.requests_per_minute, shared.max_concurrency) == (7, 3)
    assert shared.reserve_request() == 0.0
    with structlog.testing.capture_logs() as logs:
        orphan = Blip2Hook("blip2_orphan").budget()
    assert isinstance(orphan, RequestBudget)  # its own, process-wide budget: the task goes on
    assert any("no_such_redis" in str(entry) for entry in logs), logs
    own = Blip2Hook("blip2_shared", requests_per_minute=2).budget()
    assert isinstance(own, SharedBudget)
    assert [scope.requests_per_minute for scope in own.scopes] == [7, 2]


def test_notes_are_shared_by_every_process_and_expire(process_budget: Callable[..., SharedBudget]) -> None:
    first, second = process_budget(), process_budget()
    assert first.notes.remember("sync_run:blip-2", "probing", 0.5, only_if_absent=True)
    assert not second.notes.remember("sync_run:blip-2", "probing", 0.5, only_if_absent=True)
    assert second.notes.recall("sync_run:blip-2") == "probing"
    first.notes.remember("sync_run:blip-2", "refused", 3600)
    assert second.notes.recall("sync_run:blip-2") == "refused"
    second.notes.forget("sync_run:blip-2")
    assert first.notes.recall("sync_run:blip-2") is None
    first.notes.remember("first_read:blip-2", "2.5", 0.2)
    time.sleep(0.3)
    assert second.notes.recall("first_read:blip-2") is None


def test_async_notes_and_slots_share_redis_with_the_sync_ones(
    process_budget: Callable[..., SharedBudget],
) -> None:
    worker, triggerer = process_budget(mc=1), process_budget(mc=1)

    async def in_the_triggerer() -> tuple[float, float, str | None]:
        granted = await triggerer.areserve_prediction()
        refused = await triggerer.areserve_prediction()
        await triggerer.aprediction_created(None)
        await triggerer.notes.aremember("sync_run:blip-2", "offered", 60)
        return granted, refused, await triggerer.notes.arecall("sync_run:blip-2")

    granted, refused, note = asyncio.run(in_the_triggerer())
    assert granted == 0.0 and refused > 0  # one slot in flight for the deployment
    assert note == "offered" and worker.notes.recall("sync_run:blip-2") == "offered"
    assert worker.reserve_prediction() == 0.0  # the run's slot was given back


def test_a_named_slot_of_a_dead_trigger_is_freed_by_the_one_that_resumes_its_chunk(
    process_budget: Callable[..., SharedBudget],
) -> None:
    """A killed triggerer's runs keep no slot for 15 minutes: the resuming trigger frees them by name."""
    dead, resuming = process_budget(mc=2), process_budget(mc=2)

    async def in_the_triggerers() -> tuple[float, float, float]:
        assert await dead.areserve_prediction("run:chunk:0") == 0.0
        assert await dead.areserve_prediction("run:chunk:1") == 0.0
        full = await resuming.areserve_prediction("run:chunk:0")  # the dead trigger never answered
        await resuming.aprediction_finished("run:chunk:0")
        await resuming.aprediction_finished("run:chunk:1")
        again = await resuming.areserve_prediction("run:chunk:0")
        second = await resuming.areserve_prediction("run:chunk:1")
        return full, again, second

    full, again, second = asyncio.run(in_the_triggerers())
    assert full > 0  # both slots of the deployment held by the dead trigger
    assert again == 0.0 and second == 0.0


def test_notes_fall_back_to_the_process_while_redis_is_down(redis_server: RedisServer) -> None:
    params = redis_params("127.0.0.1", free_port(), None, None, {})
    budget = SharedBudget([BudgetScope("account", 60, 10)], params, fallback=RequestBudget(60, 10), log=LOG)
    assert budget.notes.remember("sync_run:blip-2", "refused", 60)
    assert budget.notes.recall("sync_run:blip-2") == "refused"


def _fill_window(budget: SharedBudget, count: int) -> None:
    for _ in range(count):
        assert budget.reserve_request() == 0.0
        budget.request_done()


def _granted_within(budget: SharedBudget, seconds: float) -> float:
    """Ask until a grant (0 or less) comes, for at most ``seconds``; the grant."""
    deadline = time.monotonic() + seconds
    while (wait := budget.reserve_request()) > 0:
        assert time.monotonic() + wait < deadline, f"no grant within {seconds} s (wait {wait})"
        time.sleep(wait)
    return wait


def test_processes_share_one_probe_and_one_lesson_of_a_bucket(
    process_budget: Callable[..., SharedBudget],
) -> None:
    # 10 requests per 5 s window: a bucket wins a token back every 0.5 s.
    worker, triggerer = process_budget(rpm=10, window=5.0), process_budget(rpm=10, window=5.0)
    _fill_window(worker, 10)
    assert 0 < triggerer.reserve_request() <= 1.0  # the window is full, the bucket not yet refilled
    assert _granted_within(triggerer, 2.0) == rate_shape.PROBE_GRANTED
    assert 0 < worker.reserve_request() <= 1.0  # one probe for the deployment at a time
    assert triggerer.request_done(Answer(rate_shape.PROBE_GRANTED)) == "bucket"
    assert worker.notes.recall(rate_shape.NOTE) == "bucket"
    assert _granted_within(worker, 2.0) == rate_shape.BUCKET_GRANTED
    assert worker.request_done(Answer(rate_shape.BUCKET_GRANTED)) is None
    # Well within the window that is still full, one request per token and no more.
    start = time.monotonic()
    for budget in (triggerer, worker, triggerer):
        assert _granted_within(budget, 2.0) == rate_shape.BUCKET_GRANTED
        budget.request_done()
    assert 0.8 < time.monotonic() - start < 2.5


def test_a_probe_answered_429_keeps_the_whole_deployment_to_the_window(
    process_budget: Callable[..., SharedBudget],
) -> None:
    worker, triggerer = process_budget(rpm=10, window=5.0), process_budget(rpm=10, window=5.0)
    _fill_window(worker, 10)
    assert _granted_within(worker, 2.0) == rate_shape.PROBE_GRANTED
    assert worker.request_done(Answer(rate_shape.PROBE_GRANTED, rate_limited=True)) == "window"
    assert worker.pace.share == 1.0  # back-pressure that taught the shape, not another client
    assert triggerer.notes.recall(rate_shape.NOTE) == "window"
    assert triggerer.reserve_request() > 2.0  # the window's wait: no second probe


def test_an_inconclusive_probe_frees_the_deployments_probe(
    process_budget: Callable[..., SharedBudget],
) -> None:
    worker, triggerer = process_budget(rpm=10, window=5.0), process_budget(rpm=10, window=5.0)
    _fill_window(worker, 10)
    assert _granted_within(worker, 2.0) == rate_shape.PROBE_GRANTED
    assert worker.request_done(Answer(rate_shape.PROBE_GRANTED, conclusive=False)) is None
    assert _granted_within(triggerer, 2.0) == rate_shape.PROBE_GRANTED


@pytest.mark.parametrize("shape", ["window", "bucket"])
def test_a_named_shape_is_kept_in_redis(process_budget: Callable[..., SharedBudget], shape: str) -> None:
    budget = process_budget(rpm=10, window=5.0, shape=shape)
    _fill_window(budget, 10)
    if shape == "window":
        assert budget.reserve_request() > 3.0
    else:
        assert _granted_within(budget, 2.0) == rate_shape.BUCKET_GRANTED
        assert budget.request_done(Answer(rate_shape.BUCKET_GRANTED, rate_limited=True)) is None
        assert budget.notes.recall(rate_shape.NOTE) is None
