"""
Tests of Blip2PredictionTrigger: serialization, and run() / on_kill() against the API emulator.

Starts: the emulator over HTTP on loopback, a local file server for the images; the triggers run in
this process's event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred
from packaging.version import Version

try:
    from airflow.sdk import serde
    from airflow.sdk.module_loading import import_string
except ImportError:  # Airflow 2
    from airflow.serialization import serde  # type: ignore[no-redef,attr-defined]
    from airflow.utils.module_loading import import_string  # type: ignore[no-redef]
from airflow.triggers.base import TriggerEvent

from airflow_provider_blip2.client.polling import PERSISTENT_ERROR_LIMIT
from airflow_provider_blip2.client.retry import RetryPolicy
from airflow_provider_blip2.emulator import EmulatorServer
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator
from airflow_provider_blip2.triggers import blip2 as trigger_module
from airflow_provider_blip2.triggers.blip2 import DEFERRAL_SETTLE_SECONDS, Blip2PredictionTrigger
from tests.conftest import AIRFLOW_VERSION, API_KEY, FAST_RETRIES, connection_json, requires_airflow_3_3

CLASSPATH = "airflow_provider_blip2.triggers.blip2.Blip2PredictionTrigger"
# A presigned-looking query string: the signature must never leave the worker.
SIGNATURE = "X-Amz-Signature=5f2b9c0d6e1a7c3b"
# Emulated latencies (before the 0.05 time scale): 20 -> 1 s, 400 -> 20 s.
ONE_SECOND = 20.0
LONG = 400.0


# ---- helpers -----------------------------------------------------------------------------------------


def _hook(conn_id: str = "blip2_default") -> Blip2Hook:
    return Blip2Hook(conn_id, retry_policy=FAST_RETRIES)


def _create(url: str, **inputs: Any) -> str:
    """Create a prediction on the worker side (sync hook), as the operator does."""
    hook = _hook()
    try:
        return hook.create_prediction(url, **inputs)
    finally:
        hook.close()


def _trigger(
    prediction_id: str, *, poll_interval: float = 0.05, deadline: float = 30.0, conn_id: str = "blip2_default"
) -> Blip2PredictionTrigger:
    return Blip2PredictionTrigger(
        prediction_id=prediction_id,
        blip2_conn_id=conn_id,
        poll_interval=poll_interval,
        end_time=time.time() + deadline,
    )


async def _events(trigger: Blip2PredictionTrigger, timeout: float = 20.0) -> list[TriggerEvent]:
    """Every event run() yields, until the generator ends."""

    async def collect() -> list[TriggerEvent]:
        return [event async for event in trigger.run()]

    return await asyncio.wait_for(collect(), timeout)


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _gets(server: EmulatorServer) -> int:
    return int(server.ledger()["requests"].get("get", 0))


def _assert_no_secrets(payload: Any, image: str) -> None:
    text = json.dumps(payload)
    assert API_KEY not in text
    assert image.split("?", 1)[0] not in text
    assert SIGNATURE not in text
    assert "http://" not in text and "https://" not in text


def _stored_output(server: EmulatorServer, prediction_id: str) -> Any:
    return server.app.emulator.predictions[prediction_id].output


@pytest.fixture
def signed_url(image_url: Callable[[str], str]) -> Callable[[str], str]:
    """URL of a served image with a presigned-looking query string."""
    return lambda name: f"{image_url(name)}?{SIGNATURE}"


@pytest.fixture
def slow_connection(connect: Callable[..., EmulatorServer]) -> EmulatorServer:
    """An emulator whose predictions take 20 s, as ``blip2_default``."""
    return connect(latency=LONG)


# ---- serialization -----------------------------------------------------------------------------------


def test_serialize_round_trips_through_serde() -> None:
    trigger = Blip2PredictionTrigger(
        prediction_id="4b0f7d52-0a39-4e43-8a5e-0c2f44b6e9c1",
        blip2_conn_id="blip2_other",
        poll_interval=2,
        end_time=1_900_000_000.25,
        not_before=1_899_999_405,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert import_string(classpath) is Blip2PredictionTrigger
    assert kwargs == {
        "prediction_id": "4b0f7d52-0a39-4e43-8a5e-0c2f44b6e9c1",
        "blip2_conn_id": "blip2_other",
        "poll_interval": 2.0,
        "end_time": 1_900_000_000.25,
        "not_before": 1_899_999_405.0,
    }
    assert all(type(value) in (str, int, float, bool) for value in kwargs.values())

    # What the task runner does on defer(), then the triggerer on load (stored as JSON in between).
    encoded = json.loads(json.dumps(serde.serialize(kwargs)))
    decoded = serde.deserialize(encoded)
    assert decoded == kwargs
    assert isinstance(decoded, dict)
    rebuilt = import_string(classpath)(**decoded)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert (rebuilt.prediction_id, rebuilt.blip2_conn_id, rebuilt.poll_interval, rebuilt.end_time) == (
        trigger.prediction_id,
        trigger.blip2_conn_id,
        trigger.poll_interval,
        trigger.end_time,
    )


class _FakeTI:
    stats_tags: dict[str, str] = {}  # noqa: RUF012

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class _Store:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        self.data[key] = value


def test_trigger_built_by_operator_has_no_secret(
    blip2_connection: str, emulator: EmulatorServer, signed_url: Callable[[str], str]
) -> None:
    """The trigger the operator defers to carries only primitives: no key, no image URL."""
    image = signed_url("chelsea.jpg")
    operator = Blip2PredictionOperator(
        task_id="ask",
        image=image,
        question="Is there a cat?",
        deferrable=True,
        defer_after=0,
        poll_interval=0.5,
        timeout=90,
    )
    ti, store = _FakeTI(), _Store()
    started = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(cast(Any, {"ti": ti, "task_state_store": store}))
    trigger = deferred.value.trigger
    assert isinstance(trigger, Blip2PredictionTrigger)
    assert deferred.value.method_name == "execute_complete"
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert set(kwargs) == {"prediction_id", "blip2_conn_id", "poll_interval", "end_time", "not_before"}
    assert all(type(value) in (str, int, float, bool) for value in kwargs.values())
    # No event before the scheduler has seen the worker leave (apache/airflow#67287).
    assert started + DEFERRAL_SETTLE_SECONDS <= kwargs["not_before"] <= time.time() + DEFERRAL_SETTLE_SECONDS
    assert kwargs["prediction_id"] == ti.xcom["prediction_id"]
    if Version("3.3") <= AIRFLOW_VERSION:  # the task state store arrived in 3.3
        assert store.data["blip2_prediction_id"] == kwargs["prediction_id"]
    # The deadline is absolute and computed on the worker.
    assert started + 90 <= kwargs["end_time"] <= time.time() + 90
    for text in (json.dumps(kwargs), json.dumps(serde.serialize(kwargs)), repr(trigger)):
        _assert_no_secrets(text, image)
    assert emulator.ledger()["creates"] == 1


# ---- run(): one event per outcome --------------------------------------------------------------------


async def test_run_yields_one_success_event(
    blip2_connection: str, emulator: EmulatorServer, signed_url: Callable[[str], str]
) -> None:
    image = signed_url("chelsea.jpg")
    prediction_id = await asyncio.to_thread(_create, image, question="What animal is this?")
    trigger = _trigger(prediction_id)
    assert API_KEY not in repr(trigger) and SIGNATURE not in repr(trigger)

    events = await _events(trigger)

    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "success"
    assert payload["prediction_id"] == prediction_id
    assert isinstance(payload["output"], str) and payload["output"]
    assert payload["output"] == _stored_output(emulator, prediction_id)
    assert payload["error"] is None and payload["error_code"] is None
    assert isinstance(payload["predict_time"], float)
    _assert_no_secrets(payload, image)
    # The payload must survive the serde encoding the triggerer stores it with.
    assert serde.deserialize(json.loads(json.dumps(serde.serialize(payload)))) == payload
    assert emulator.ledger()["creates"] == 1


async def test_run_yields_one_error_event_for_a_missing_image(
    blip2_connection: str, emulator: EmulatorServer, signed_url: Callable[[str], str]
) -> None:
    image = signed_url("does-not-exist.jpg")
    prediction_id = await asyncio.to_thread(_create, image, caption=True)

    events = await _events(_trigger(prediction_id))

    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "error"
    assert payload["prediction_id"] == prediction_id
    assert payload["error_code"] == "INPUT_DOWNLOAD_ERROR"
    assert payload["output"] is None
    assert payload["error"]
    _assert_no_secrets(payload, image)


async def test_run_yields_one_cancelled_event_when_cancelled_through_the_hook(
    slow_connection: EmulatorServer, signed_url: Callable[[str], str]
) -> None:
    server = slow_connection
    image = signed_url("coffee.png")
    prediction_id = await asyncio.to_thread(_create, image)
    hook = Blip2Hook("blip2_default", retry_policy=FAST_RETRIES)

    task = asyncio.create_task(_events(_trigger(prediction_id)))
    try:
        await _wait_for(lambda: _gets(server) >= 2)
        assert not task.done()
        await hook.acancel_prediction(prediction_id)
        events = await asyncio.wait_for(task, 10)
    finally:
        await hook.aclose()
        task.cancel()

    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "cancelled"
    assert payload["prediction_id"] == prediction_id
    assert payload["output"] is None
    _assert_no_secrets(payload, image)
    assert server.ledger()["statuses"]["cancelled"] == 1


async def test_run_yields_timeout_at_once_when_the_deadline_has_passed(
    slow_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))
    gets_before = _gets(slow_connection)

    started = time.monotonic()
    events = await _events(_trigger(prediction_id, deadline=-5.0))

    assert time.monotonic() - started < 1.0
    assert [event.payload["status"] for event in events] == ["timeout"]
    assert events[0].payload["prediction_id"] == prediction_id
    assert events[0].payload["error"]
    assert _gets(slow_connection) == gets_before  # no poll after the deadline
    # The trigger never cancels: the operator's execute_complete does, on the worker.
    assert "cancel" not in slow_connection.ledger()["requests"]


async def test_run_yields_timeout_when_the_prediction_outlives_the_deadline(
    slow_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))

    started = time.monotonic()
    events = await _events(_trigger(prediction_id, poll_interval=0.1, deadline=0.6))
    elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 3.0
    assert len(events) == 1
    assert events[0].payload["status"] == "timeout"
    assert events[0].payload["output"] is None
    assert _gets(slow_connection) >= 2
    assert slow_connection.ledger()["in_flight"] == 1  # still running remotely


# ---- transient and persistent errors -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["fault_5xx", "fault_drop"])
async def test_transient_faults_while_polling_do_not_end_the_wait(
    fault: str, connect: Callable[..., EmulatorServer], image_url: Callable[[str], str]
) -> None:
    server = connect(latency=ONE_SECOND * 1.5)
    prediction_id = await asyncio.to_thread(_create, image_url("astronaut.jpg"), caption=True)

    task = asyncio.create_task(_events(_trigger(prediction_id, poll_interval=0.05), timeout=30))
    try:
        await _wait_for(lambda: _gets(server) >= 2)
        setattr(server.config, fault, 1.0)
        await asyncio.sleep(0.6)
        setattr(server.config, fault, 0.0)
        events = await asyncio.wait_for(task, 30)
    finally:
        task.cancel()

    ledger = server.ledger()
    injected = ledger["responses_5xx_injected"] if fault == "fault_5xx" else ledger["drops_injected"]
    assert injected >= 1
    assert len(events) == 1
    assert events[0].payload["status"] == "success"
    assert events[0].payload["output"] == _stored_output(server, prediction_id)
    assert ledger["creates"] == 1


async def test_poll_errors_that_exhaust_the_hook_retries_do_not_end_the_wait(
    connect: Callable[..., EmulatorServer],
    monkeypatch: pytest.MonkeyPatch,
    image_url: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a hook that gives up after 2 attempts, the 5xx errors reach the trigger's loop itself."""
    server = connect(latency=ONE_SECOND)
    prediction_id = await asyncio.to_thread(_create, image_url("rocket.webp"), caption=True)
    quick = RetryPolicy(max_attempts=2, max_elapsed=1.0, initial_wait=0.01, max_wait=0.02)
    monkeypatch.setattr(
        trigger_module, "trigger_hook", lambda trigger: Blip2Hook(trigger.blip2_conn_id, retry_policy=quick)
    )
    server.config.fault_5xx = 1.0

    task = asyncio.create_task(_events(_trigger(prediction_id, poll_interval=0.05)))
    try:
        await _wait_for(lambda: server.ledger()["responses_5xx_injected"] >= 10)
        assert not task.done()
        server.config.fault_5xx = 0.0
        events = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()

    assert [event.payload["status"] for event in events] == ["success"]
    # Each aget_prediction makes at most 2 attempts: 10 faults mean >= 5 failed polls survived.
    assert "will poll again" in capsys.readouterr().out


async def test_a_persistent_auth_error_ends_with_an_error_event(
    blip2_connection: str,
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    image_url: Callable[[str], str],
) -> None:
    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLIP2_WRONG_KEY", connection_json(emulator.url, api_key="not-the-right-key")
    )

    started = time.monotonic()
    events = await _events(
        _trigger(prediction_id, poll_interval=0.05, deadline=60, conn_id="blip2_wrong_key")
    )

    assert time.monotonic() - started < 5.0  # far from the 60 s deadline
    assert len(events) == 1
    payload = events[0].payload
    assert payload["status"] == "error"
    assert payload["prediction_id"] == prediction_id
    assert "401" in payload["error"] or "key" in payload["error"].lower()
    assert "not-the-right-key" not in json.dumps(payload)
    assert emulator.ledger()["responses_401"] == PERSISTENT_ERROR_LIMIT


async def test_an_unknown_prediction_ends_with_an_error_event(
    blip2_connection: str, emulator: EmulatorServer
) -> None:
    events = await _events(_trigger("7e0c1d9a-3f5b-4c2e-9a1d-2b6f8e4c0a11", deadline=60))

    assert [event.payload["status"] for event in events] == ["error"]
    assert emulator.ledger()["responses_by_status"]["404"] == PERSISTENT_ERROR_LIMIT


# ---- on_kill and triggerer restarts ------------------------------------------------------------------


async def test_on_kill_cancels_the_prediction(
    slow_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))
    trigger = _trigger(prediction_id)

    task = asyncio.create_task(_events(trigger))
    try:
        await _wait_for(lambda: _gets(slow_connection) >= 2)
        await trigger.on_kill()
        events = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()

    ledger = slow_connection.ledger()
    assert ledger["requests"]["cancel"] == 1
    assert ledger["statuses"]["cancelled"] == 1
    assert ledger["in_flight"] == 0
    prediction = await asyncio.to_thread(_hook().get_prediction, prediction_id)
    assert prediction.raw_status == "cancelled"
    assert [event.payload["status"] for event in events] == ["cancelled"]


async def test_on_kill_without_a_running_trigger_cancels_too(
    slow_connection: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    prediction_id = await asyncio.to_thread(_create, image_url("coffee.png"))

    await _trigger(prediction_id).on_kill()

    assert slow_connection.ledger()["requests"]["cancel"] == 1
    assert slow_connection.app.emulator.predictions[prediction_id].status == "cancelled"


async def test_in_a_triggerer_no_event_comes_before_not_before(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    """A triggerer sets task_instance; then the event waits for not_before. Inline, it does not."""
    for in_triggerer, hold in ((True, 1.5), (False, 0.0)):
        prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))
        trigger = Blip2PredictionTrigger(
            prediction_id=prediction_id,
            blip2_conn_id="blip2_default",
            poll_interval=0.05,
            end_time=time.time() + 30,
            not_before=time.time() + 1.5,
        )
        if in_triggerer:
            trigger.task_instance = SimpleNamespace(  # type: ignore[assignment]
                dag_id="d", run_id="r", task_id="t", map_index=-1
            )
        started = time.monotonic()
        events = await _events(trigger)
        elapsed = time.monotonic() - started
        assert [event.payload["status"] for event in events] == ["success"]
        assert hold <= elapsed < hold + 1.2, (in_triggerer, elapsed)


@requires_airflow_3_3
@pytest.mark.parametrize(
    ("map_index", "state", "cancels"),
    [
        (-1, "deferred", False),  # handed over to another triggerer (apache/airflow#73454)
        (3, "deferred", False),
        (-1, "failed", True),  # marked failed by a user
        (3, "success", True),
        (-1, None, True),  # cleared
    ],
)
async def test_on_kill_leaves_a_prediction_alone_while_the_task_is_still_deferred(
    slow_connection: EmulatorServer,
    image_url: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    map_index: int,
    state: str | None,
    cancels: bool,
) -> None:
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    prediction_id = await asyncio.to_thread(_create, image_url("coffee.png"))
    asked: list[dict[str, Any]] = []

    def get_task_states(**query: Any) -> dict[str, Any]:
        asked.append(query)
        key = "caption" if map_index < 0 else f"caption_{map_index}"
        return {"run_1": {key: state, "other_task": "failed"}}

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    trigger = _trigger(prediction_id)
    trigger.task_instance = SimpleNamespace(  # type: ignore[assignment]
        dag_id="dag_1", run_id="run_1", task_id="caption", map_index=map_index
    )

    await trigger.on_kill()

    assert asked == [
        {"dag_id": "dag_1", "task_ids": ["caption"], "run_ids": ["run_1"], "map_index": map_index}
    ]
    assert slow_connection.ledger()["requests"].get("cancel", 0) == (1 if cancels else 0)
    status = slow_connection.app.emulator.predictions[prediction_id].status
    assert (status == "cancelled") is cancels


async def test_a_triggerer_restart_reattaches_without_creating_anything(
    connect: Callable[..., EmulatorServer], image_url: Callable[[str], str]
) -> None:
    server = connect(latency=ONE_SECOND * 1.5)
    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))
    first = _trigger(prediction_id, poll_interval=0.05)
    classpath, kwargs = first.serialize()
    stored = json.dumps(serde.serialize(kwargs))  # what the metadata DB holds

    running = asyncio.create_task(_events(first))
    await _wait_for(lambda: _gets(server) >= 2)
    running.cancel()  # the triggerer goes away mid-poll
    with pytest.raises(asyncio.CancelledError):
        await running
    assert server.app.emulator.predictions[prediction_id].status not in ("success", "error", "cancelled")

    decoded = serde.deserialize(json.loads(stored))
    assert isinstance(decoded, dict)
    second = import_string(classpath)(**decoded)
    assert second.end_time == first.end_time  # the deadline did not restart
    events = await _events(second)

    ledger = server.ledger()
    assert ledger["creates"] == 1
    assert ledger["requests"]["create"] == 1
    assert "cancel" not in ledger["requests"]  # a restart must not cancel the prediction
    assert [event.payload["status"] for event in events] == ["success"]
    assert events[0].payload["output"] == _stored_output(server, prediction_id)


# ---- the connection is resolved asynchronously -------------------------------------------------------


@requires_airflow_3_3
async def test_the_connection_is_resolved_without_blocking_calls(
    blip2_connection: str,
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    image_url: Callable[[str], str],
) -> None:
    from airflow.sdk.definitions.connection import Connection

    prediction_id = await asyncio.to_thread(_create, image_url("chelsea.jpg"))

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a synchronous connection lookup ran inside the triggerer's event loop")

    monkeypatch.setattr(Blip2Hook, "get_connection", classmethod(forbidden))
    monkeypatch.setattr(Connection, "get", classmethod(forbidden))
    calls: list[str] = []
    original = Blip2Hook.aget_settings

    async def spy(self: Blip2Hook) -> Any:
        calls.append(self.blip2_conn_id)
        return await original(self)

    monkeypatch.setattr(Blip2Hook, "aget_settings", spy)
    monkeypatch.setattr(Blip2Hook, "settings", property(forbidden))
    monkeypatch.setattr(Connection, "extra_dejson", property(forbidden))

    events = await _events(_trigger(prediction_id))

    assert [event.payload["status"] for event in events] == ["success"]
    assert calls and set(calls) == {"blip2_default"}


async def test_run_does_not_block_the_event_loop(
    blip2_connection: str, emulator: EmulatorServer, image_url: Callable[[str], str]
) -> None:
    """Other coroutines keep running while the trigger resolves its connection and polls."""
    prediction_id = await asyncio.to_thread(_create, image_url("coffee.png"))
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    try:
        events = await _events(_trigger(prediction_id))
    finally:
        beat.cancel()

    assert [event.payload["status"] for event in events] == ["success"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    assert len(ticks) > 5
    assert max(gaps) < 0.2  # the triggerer warns about anything blocking longer
