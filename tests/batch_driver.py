"""
An in-process driver of the batch operator, the way Airflow drives it.

``execute`` until it defers, the trigger rebuilt from its serialized kwargs (as a triggerer does),
``execute_complete`` with the event, and so on. The task state store is a dict; a trigger given a
``task_instance`` keeps its XCom in :class:`FakeXCom` (a triggerer's XCom, which a test process has
no supervisor for).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any, ClassVar

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException, TaskDeferred
from airflow.triggers.base import BaseTrigger

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator


def trigger_class(classpath: str) -> type[BaseTrigger]:
    """The trigger class a serialized trigger names (one of the batch's two)."""
    import importlib

    module, _, name = classpath.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert name in ("Blip2BatchPredictionTrigger", "Blip2BatchRunTrigger"), classpath
    return cls  # type: ignore[no-any-return]


class FakeXCom:
    """XCom as a dict, with the async calls a trigger's run journal makes."""

    values: ClassVar[dict[tuple[Any, ...], Any]] = {}

    @classmethod
    async def aset(cls, key: str, value: Any, **where: Any) -> None:
        cls.values[(key, *sorted(where.items()))] = json.loads(json.dumps(value))

    @classmethod
    async def aget_one(cls, *, key: str, **where: Any) -> Any:
        return cls.values.get((key, *sorted(where.items())))


class DictStore:
    """A task state store in memory, counting writes."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        # Round-trip through JSON like the real store does.
        return json.loads(json.dumps(self.values[key])) if key in self.values else default

    def set(self, key: str, value: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))
        self.writes += 1

    def clear(self) -> None:
        self.values.clear()


class FakeTaskInstance:
    task_id = "batch"
    map_index = -1
    stats_tags: dict[str, str] = {}  # noqa: RUF012

    def __init__(self, *, try_number: int = 1, max_tries: int = 0) -> None:
        self.xcom: dict[str, Any] = {}
        self.try_number = try_number
        self.max_tries = max_tries

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int) -> Any:
        return self.xcom.get(key)


def run_batch(
    operator: Blip2BatchPredictionOperator,
    store: DictStore | None,
    *,
    interrupt: Callable[[int], float | None] = lambda cycle: None,
    ti: FakeTaskInstance | None = None,
    trigger_ti: Any = None,
) -> tuple[dict[str, Any], int]:
    """
    Drive a deferrable batch the way Airflow does; return its summary and the number of deferrals.

    ``interrupt(cycle)`` may return seconds after which that cycle's trigger is torn down (a
    triggerer restart); a new trigger is then built from the serialized kwargs and run again.
    ``trigger_ti`` is the task instance the triggers run for (a triggerer sets one; ``None`` runs
    them as ``dags test`` does).
    """
    # Without a store, the context is the one of Airflow before 3.3: the journal goes to XCom.
    context: dict[str, Any] = {"ti": ti or FakeTaskInstance()}
    if store is not None:
        context["task_state_store"] = store
    deferrals = 0
    try:
        return operator.execute(context), deferrals  # type: ignore[arg-type]
    except TaskDeferred as deferred:
        pending = deferred
    while True:
        deferrals += 1
        classpath, kwargs = pending.trigger.serialize()
        json.dumps(kwargs)  # primitives only
        make = _trigger_factory(trigger_class(classpath), kwargs, trigger_ti)
        event = asyncio.run(_run_trigger(make, interrupt(deferrals)))
        fresh = operator  # the same task object resumes; its state comes from the store
        try:
            return fresh.execute_complete(context, event), deferrals  # type: ignore[arg-type]
        except TaskDeferred as deferred:
            pending = deferred


def run_tries(
    make_operator: Callable[[], Blip2BatchPredictionOperator], store: DictStore, *, retries: int
) -> tuple[dict[str, Any], list[AirflowException]]:
    """
    Run a batch task's tries the way Airflow retries it: a new operator and a fresh XCom every
    try, the same task state store, ``try_number`` counting up to ``retries + 1`` (``max_tries``
    is ``retries``). Return the summary and the errors of the tries that failed.
    """
    failures: list[AirflowException] = []
    for try_number in range(1, retries + 2):
        ti = FakeTaskInstance(try_number=try_number, max_tries=retries)
        try:
            summary, _ = run_batch(make_operator(), store, ti=ti)
        except AirflowFailException:
            raise
        except AirflowException as error:
            failures.append(error)
            if try_number > retries:
                raise
            continue
        return summary, failures
    raise AssertionError("unreachable")


def _trigger_factory(cls: type[BaseTrigger], kwargs: dict[str, Any], ti: Any) -> Callable[[], BaseTrigger]:
    def make() -> BaseTrigger:
        trigger = cls(**kwargs)
        trigger.task_instance = ti
        return trigger

    return make


async def _run_trigger(make: Callable[[], BaseTrigger], tear_down_after: float | None) -> dict[str, Any]:
    if tear_down_after is not None:
        # Torn down mid-way: the triggerer then restarts it from the same kwargs.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_first_payload(make()), timeout=tear_down_after)
    return await _first_payload(make())


async def _first_payload(trigger: BaseTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("no event")
