"""
The hook's synchronous run and the learned timing of first reads, against the emulator over real
HTTP on loopback (with a local file server for the images). Starts no Airflow process.

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_blip2.client.errors import Blip2AmbiguousCreateError, Blip2SyncRunUnavailableError
from airflow_provider_blip2.client.models import PredictionStatus
from airflow_provider_blip2.client.timing import FirstReadTiming
from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from tests.conftest import connection_json

pytestmark = pytest.mark.usefixtures("fresh_budgets")


@pytest.fixture
def hook_for(
    start_emulator: Callable[..., EmulatorServer], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    def start(**overrides: Any) -> tuple[Blip2Hook, EmulatorServer]:
        server = start_emulator(**overrides)
        monkeypatch.setenv("AIRFLOW_CONN_BLIP2_DEFAULT", connection_json(server.url))
        return Blip2Hook(), server

    return start


def test_a_synchronous_run_is_one_request_and_gives_its_slot_back(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, server = hook_for()
    inputs = hook.prediction_input(image_url("chelsea.jpg"), caption=True)
    prediction = hook.run_prediction(inputs, end_time=time.time() + 60)
    assert prediction.status is PredictionStatus.SUCCEEDED and prediction.output
    assert hook.budget().in_flight == 0
    assert server.ledger()["requests"] == {"run": 1}
    assert hook.sync_run_choice().worth_trying()


def test_the_async_run_shares_the_sync_path(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, server = hook_for()
    inputs = hook.prediction_input(image_url("coffee.png"), question="Is there a cup?")

    async def run() -> Any:
        return await hook.arun_prediction(inputs, end_time=time.time() + 60)

    prediction = asyncio.run(run())
    assert prediction.status is PredictionStatus.SUCCEEDED
    assert hook.budget().in_flight == 0 and server.ledger()["runs"] == 1


def test_a_refusal_is_raised_remembered_and_creates_nothing(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, server = hook_for(sync_run=False)
    inputs = hook.prediction_input(image_url("chelsea.jpg"), caption=True)
    with pytest.raises(Blip2SyncRunUnavailableError):
        hook.run_prediction(inputs, end_time=time.time() + 60)
    assert not hook.sync_run_choice().worth_trying() and not hook.sync_run_choice().decide()
    assert hook.budget().in_flight == 0 and server.ledger()["creates"] == 0


def test_a_run_still_running_keeps_its_slot_until_it_is_read_ended(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, _ = hook_for(latency=20.0, sync_run_max_wait=0.0)  # 1 s predictions; the run answers at once
    prediction = hook.run_prediction(
        hook.prediction_input(image_url("chelsea.jpg"), caption=True), end_time=time.time() + 60
    )
    assert not prediction.status.is_terminal and hook.budget().in_flight == 1
    outcome = hook.wait_for_prediction(prediction.id, poll_interval=0.1, timeout=30)
    assert outcome.succeeded and hook.budget().in_flight == 0


def test_a_dropped_run_is_an_ambiguous_create_never_resent(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, server = hook_for(fault_drop=1.0, fault_endpoints=("run",))
    with pytest.raises(Blip2AmbiguousCreateError, match="was not resent"):
        hook.run_prediction(
            hook.prediction_input(image_url("chelsea.jpg"), caption=True), end_time=time.time() + 60
        )
    assert server.ledger()["requests"]["run"] == 1 and hook.budget().in_flight == 0


def test_first_reads_learn_when_the_connection_s_predictions_end(
    hook_for: Callable[..., Any], image_url: Callable[[str], str]
) -> None:
    hook, server = hook_for(latency=8.0)  # 0.4 s predictions at the time scale
    poll_interval = 0.1
    for n in range(30):
        prediction_id = hook.submit_prediction(
            hook.prediction_input(image_url(f"chelsea.jpg?n={n}"), caption=True)
        )
        outcome = hook.poll_prediction(
            prediction_id, poll_interval=poll_interval, end_time=time.time() + 30, created_at=time.time()
        )
        assert outcome is not None and outcome.succeeded
    reads = server.ledger()["requests"]["get"]
    learned = FirstReadTiming(hook.budget().notes, "blip-2", poll_interval).delay()
    assert learned >= 0.35  # near the service's 0.4 s, from a first guess of one poll interval
    # A fixed first read at the poll interval would read each about four times (120 reads).
    assert reads <= 30 + 12
