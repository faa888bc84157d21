"""
The journal of a chunk of synchronous runs: what was started, what ended, what is still running.

A trigger cannot reach the task state store (apache/airflow#73135), but it may read and write its
task instance's XCom, which lasts until the task's next try. :class:`RunJournal` keeps the chunk's
progress there under :data:`XCOM_KEY`, tagged with the chunk's id, and writes it before each run is
sent and after each ends. Inline (``dags test``, a worker running the trigger itself) or on an
Airflow without async XCom, it is kept in memory only: the operator's own journal then counts the
chunk's unfinished items as ambiguous if the process dies.

Each change is written before the call that made it returns (a run is sent only once its start is
stored), but concurrent changes share writes: a change made while a write is under way waits for
the next one, which carries every change made meanwhile (a group commit). One XCom write is a
round trip through the triggerer's supervisor to the API server; with a write per change, the
chunk's runs would go no faster than those writes, one after the other.
"""

from __future__ import annotations

import asyncio
from typing import Any

from airflow.triggers.base import BaseTrigger

from airflow_provider_blip2.client.models import PredictionOutcome

#: The XCom key of a chunk's journal.
XCOM_KEY = "blip2_batch_run"


class RunJournal:
    """
    The progress of one chunk of synchronous runs.

    :param chunk: The chunk's id: a journal of another chunk under the same key is not this one's.
    :param task_instance: Whose XCom keeps the journal, or ``None`` to keep it in memory.
    """

    def __init__(self, chunk: str, task_instance: Any = None) -> None:
        self.chunk = chunk
        self.task_instance = task_instance
        self.started: set[str] = set()
        self.finished: dict[str, PredictionOutcome] = {}
        self.in_flight: dict[str, tuple[str, float]] = {}
        self.writes = 0
        self._lock = asyncio.Lock()
        self._changes = 0
        self._written = 0

    @classmethod
    def for_trigger(cls, trigger: BaseTrigger) -> RunJournal:
        """
        The journal of a trigger's chunk: in its task instance's XCom when it runs in a triggerer.

        :param trigger: A trigger with a ``chunk`` attribute.
        """
        return cls(str(getattr(trigger, "chunk", "")), trigger.task_instance)

    async def load(self) -> None:
        """Read what an earlier run of the same chunk (before a triggerer restart) recorded."""
        value = await self._get()
        if not isinstance(value, dict) or value.get("chunk") != self.chunk:
            return
        self.started = {str(k) for k in value.get("started", [])}
        self.finished = {str(k): PredictionOutcome.from_json(v) for k, v in value.get("finished", {}).items()}
        self.in_flight = {str(k): (str(v[0]), float(v[1])) for k, v in value.get("running", {}).items()}

    def interrupted(self) -> list[str]:
        """Items started before a restart with no answer recorded: perhaps created, perhaps paid."""
        return sorted(k for k in self.started if k not in self.finished and k not in self.in_flight)

    async def start(self, index: str) -> None:
        """Record that a run is about to be sent. :param index: the item."""
        self.started.add(index)
        await self._save()

    async def unstart(self, index: str) -> None:
        """Record that a run created nothing (refused before any prediction). :param index: the item."""
        self.started.discard(index)
        await self._save()

    async def finish(self, index: str, outcome: PredictionOutcome) -> None:
        """
        Record how an item ended.

        :param index: The item.
        :param outcome: Its outcome.
        """
        self.finished[index] = outcome
        await self._save()

    async def running(self, index: str, prediction_id: str, deadline: float) -> None:
        """
        Record a prediction whose run answered before it ended.

        :param index: The item.
        :param prediction_id: The prediction, to be polled.
        :param deadline: Unix time after which it is reported as ``timeout``.
        """
        self.in_flight[index] = (prediction_id, deadline)
        await self._save()

    def to_json(self) -> dict[str, Any]:
        """The journal as stored."""
        return {
            "chunk": self.chunk,
            "started": sorted(self.started),
            "finished": {k: v.to_json() for k, v in self.finished.items()},
            "running": {k: list(v) for k, v in self.in_flight.items()},
        }

    async def save(self) -> None:
        """Write the journal (after changes made to it directly)."""
        await self._save()

    async def _save(self) -> None:
        """Return once a write that holds every change made so far has landed (see the module)."""
        if self.task_instance is None:
            return
        self._changes += 1
        wanted = self._changes
        async with self._lock:
            if self._written >= wanted:  # a write that began after this change has landed
                return
            xcom = _xcom()
            if xcom is None:
                return
            holds, value = self._changes, self.to_json()
            await xcom.aset(XCOM_KEY, value, **self._where())
            self._written = holds
            self.writes += 1

    async def _get(self) -> Any:
        xcom = _xcom() if self.task_instance is not None else None
        if xcom is None:
            return None
        return await xcom.aget_one(key=XCOM_KEY, **self._where())

    def _where(self) -> dict[str, Any]:
        ti = self.task_instance
        map_index = getattr(ti, "map_index", -1)
        return {
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": ti.run_id,
            "map_index": -1 if map_index is None else map_index,
        }


def _xcom() -> Any:
    """Airflow's XCom with async access (Airflow 3.1+), or ``None`` before."""
    try:
        from airflow.sdk.execution_time.xcom import XCom
    except ImportError:
        return None
    return XCom if hasattr(XCom, "aset") and hasattr(XCom, "aget_one") else None
