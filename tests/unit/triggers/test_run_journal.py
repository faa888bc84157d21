"""
The run trigger's journal in XCom: every change stored before its call returns, concurrent
changes sharing writes.

Starts: nothing (an XCom in memory whose writes take a while, as a triggerer's round trip does).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from airflow_provider_blip2.client.models import PredictionOutcome
from airflow_provider_blip2.triggers import run_journal
from airflow_provider_blip2.triggers.run_journal import XCOM_KEY, RunJournal

TASK_INSTANCE = SimpleNamespace(dag_id="dag", task_id="batch", run_id="run", map_index=-1)


class SlowXCom:
    """XCom in memory; each write takes ``delay`` seconds and stores the value as sent."""

    delay: ClassVar[float] = 0.05
    stored: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    async def aset(cls, key: str, value: Any, **where: Any) -> None:
        assert key == XCOM_KEY and where["task_id"] == "batch"
        sent = json.loads(json.dumps(value))
        await asyncio.sleep(cls.delay)
        cls.stored.append(sent)

    @classmethod
    async def aget_one(cls, *, key: str, **where: Any) -> Any:
        return cls.stored[-1] if cls.stored else None


@pytest.fixture(autouse=True)
def _slow_xcom(monkeypatch: pytest.MonkeyPatch) -> None:
    SlowXCom.stored = []
    monkeypatch.setattr(run_journal, "_xcom", lambda: SlowXCom)


async def test_a_start_is_stored_before_the_call_returns() -> None:
    journal = RunJournal("chunk-1", TASK_INSTANCE)
    await journal.start("0")
    assert SlowXCom.stored[-1]["started"] == ["0"]
    await journal.finish("0", PredictionOutcome(PredictionOutcome.SUCCESS, output="a cat"))
    assert SlowXCom.stored[-1]["finished"]["0"]["output"] == "a cat"
    assert journal.writes == 2


async def test_concurrent_changes_share_writes_and_each_is_stored_when_its_call_returns() -> None:
    journal = RunJournal("chunk-1", TASK_INSTANCE)

    async def lane(index: str) -> None:
        await journal.start(index)
        assert index in SlowXCom.stored[-1]["started"]  # stored before the run would be sent
        await journal.finish(index, PredictionOutcome(PredictionOutcome.SUCCESS, output=index))
        assert index in SlowXCom.stored[-1]["finished"]

    await asyncio.gather(*(lane(str(i)) for i in range(10)))
    # 20 changes: the first write carries one start, the next the nine made meanwhile, and so on.
    assert journal.writes <= 4, journal.writes
    reloaded = RunJournal("chunk-1", TASK_INSTANCE)
    await reloaded.load()
    assert sorted(reloaded.finished) == sorted(str(i) for i in range(10))
    assert reloaded.interrupted() == []


async def test_without_a_task_instance_nothing_is_written() -> None:
    journal = RunJournal("chunk-1")
    await journal.start("0")
    assert SlowXCom.stored == [] and journal.writes == 0
