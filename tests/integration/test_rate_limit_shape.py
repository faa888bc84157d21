"""
The rate limit's shape, found out by hooks against the emulator's sliding window, token bucket and
fixed window.

Starts: the emulator over HTTP on loopback (its rate limit a sliding window, a token bucket or a fixed
window).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_blip2.client import rate_shape
from airflow_provider_blip2.client.budget import RequestBudget
from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from tests.conftest import FAST_RETRIES, connection_json

pytestmark = pytest.mark.usefixtures("fresh_budgets")

# 30 requests a 3 s window: a bucket wins one back every 0.1 s.
TIME_SCALE = 0.05
WINDOW = 60 * TIME_SCALE
LIMIT = 30
REQUESTS = 40


Connect = Callable[..., tuple[EmulatorServer, Blip2Hook]]


@pytest.fixture
def connect(
    start_emulator: Callable[..., EmulatorServer], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Connect]:
    """``connect(limiter, **extra)``: an emulator counting its limit so, and a hook of a connection to it."""
    hooks: list[Blip2Hook] = []

    def make(limiter: str = "window", **extra: Any) -> tuple[EmulatorServer, Blip2Hook]:
        server = start_emulator(time_scale=TIME_SCALE, requests_per_minute=LIMIT, rate_limit=limiter)
        monkeypatch.setenv(
            "AIRFLOW_CONN_BLIP2_SHAPE",
            connection_json(server.url, requests_per_minute=LIMIT, rate_window=WINDOW, **extra),
        )
        hooks.append(
            Blip2Hook("blip2_shape", retry_policy=dataclasses.replace(FAST_RETRIES, max_wait=WINDOW))
        )
        return server, hooks[-1]

    yield make
    for hook in hooks:
        hook.close()


def _send(hook: Blip2Hook, path: str, count: int, image: str = "") -> None:
    """``count`` API requests through the sync or the async transport."""
    if path == "sync":
        for _ in range(count):
            assert hook.get_model()["slug"] == "blip-2"
        return
    prediction_id = hook.create_prediction(image, caption=True)

    async def reads() -> None:
        for _ in range(count - 1):
            assert (await hook.aget_prediction(prediction_id)).id == prediction_id

    asyncio.run(reads())


def _printed(capsys: pytest.CaptureFixture[str]) -> str:
    """What the test printed: the hooks' log lines (Airflow's structured logging writes to stdout)."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def _most_in_one_window(admitted: list[list[Any]]) -> int:
    """The most requests the emulator admitted within ``WINDOW`` seconds of each other."""
    times = [entry[0] for entry in admitted]
    return max(sum(1 for other in times[i:] if other - start < WINDOW) for i, start in enumerate(times))


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_bucket_is_found_with_one_probe_and_then_used(
    connect: Connect,
    capsys: pytest.CaptureFixture[str],
    image_url: Callable[[str], str],
    path: str,
) -> None:
    server, hook = connect("bucket")
    _send(hook, path, REQUESTS, image_url("chelsea.jpg"))
    ledger = server.ledger()
    assert ledger["responses_429"] == 0
    assert sum(ledger["requests"].values()) == REQUESTS
    # More than a window's worth within one window: the budget went past it, as the bucket allows.
    assert _most_in_one_window(ledger["admitted"]) > LIMIT
    assert hook.budget().notes.recall(rate_shape.NOTE) == "bucket"
    assert _printed(capsys).count("refills gradually (a token bucket)") == 1


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_window_costs_one_429_then_is_kept(
    connect: Connect,
    capsys: pytest.CaptureFixture[str],
    image_url: Callable[[str], str],
    path: str,
) -> None:
    server, hook = connect("window")
    _send(hook, path, REQUESTS, image_url("chelsea.jpg"))
    _send(hook, path, 10, image_url("chelsea.jpg"))  # what was learnt is kept: no second probe
    ledger = server.ledger()
    assert ledger["responses_429"] == 1
    assert sum(ledger["requests"].values()) == REQUESTS + 10 + 1  # the probe, sent again when allowed
    assert _most_in_one_window(ledger["admitted"]) <= LIMIT
    assert hook.budget().notes.recall(rate_shape.NOTE) == "window"
    budget = hook.budget()
    assert isinstance(budget, RequestBudget) and budget.pace.share == 1.0  # a lesson, not a slowdown
    assert _printed(capsys).count("counts a sliding window") == 1


@pytest.mark.parametrize("limiter", ["window", "bucket"])
def test_a_connection_that_names_the_window_never_goes_past_it(
    connect: Connect,
    limiter: str,
) -> None:
    server, hook = connect(limiter, rate_limit_shape="window")
    _send(hook, "sync", REQUESTS)
    ledger = server.ledger()
    assert ledger["responses_429"] == 0
    assert _most_in_one_window(ledger["admitted"]) <= LIMIT
    assert hook.budget().notes.recall(rate_shape.NOTE) is None


def test_a_connection_that_names_the_bucket_goes_past_the_window_without_a_probe(
    connect: Connect,
) -> None:
    server, hook = connect("bucket", rate_limit_shape="bucket")
    _send(hook, "sync", REQUESTS)
    ledger = server.ledger()
    assert ledger["responses_429"] == 0
    assert _most_in_one_window(ledger["admitted"]) > LIMIT
    assert hook.budget().notes.recall(rate_shape.NOTE) is None


def _start_at(phase: float) -> None:
    """Sleep until ``phase`` seconds into one of the emulator's fixed windows (its monotonic clock)."""
    time.sleep((phase - time.monotonic()) % WINDOW)


@pytest.mark.parametrize("phase", [WINDOW - 0.1, 0.05], ids=["window-ending", "window-begun"])
def test_a_fixed_window_costs_at_most_two_429s_whatever_the_probe_meets(
    connect: Connect, phase: float
) -> None:
    """
    A limit counted in fixed windows admits the probe when a window has begun since the requests
    before it (they started as one was ending), and refuses it otherwise. Admitted, the budget paces
    by the bucket, which such a window refuses at most once before the budget learns the window;
    refused, it learns the window at once.
    """
    server, hook = connect("fixed")
    count = 2 * LIMIT + 10
    _start_at(phase)
    _send(hook, "sync", count)
    ledger = server.ledger()
    assert ledger["responses_429"] <= 2, ledger["responses_429"]
    assert sum(ledger["requests"].values()) == count + ledger["responses_429"]  # each 429 sent again
    lesson = hook.budget().notes.recall(rate_shape.NOTE)
    assert lesson == ("window" if ledger["responses_429"] else "bucket"), lesson
