"""
What the processes using a connection remember about the service for a while: small notes.

A note is a short string under a name, kept for a number of seconds: whether the model offers the
synchronous run, and when a prediction is likely to have ended. :class:`LocalNotes` keeps them in
the process (every task and trigger of a worker or triggerer shares them, through the connection's
budget); :class:`SharedNotes` keeps them in the Redis of the shared budget, for every process of
the deployment, and falls back to the process's own notes while Redis cannot be reached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from airflow_provider_blip2.client import budget_scripts as scripts

if TYPE_CHECKING:
    from airflow_provider_blip2.client.shared_budget import SharedBudget


class Notes(Protocol):
    """Named notes that expire; the sync and async methods act on the same notes."""

    def recall(self, name: str) -> str | None:
        """The note's value, or ``None`` when there is none (or it expired)."""

    async def arecall(self, name: str) -> str | None:
        """:meth:`recall` without blocking the event loop."""

    def remember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """Keep a note for ``ttl`` seconds; with ``only_if_absent``, only if there is none (then True)."""

    async def aremember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """:meth:`remember` without blocking the event loop."""

    def forget(self, name: str) -> None:
        """Drop a note."""

    async def aforget(self, name: str) -> None:
        """:meth:`forget` without blocking the event loop."""


class LocalNotes:
    """
    Notes kept in this process, safe to use from threads and from the event loop.

    :param clock: Monotonic clock.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._notes: dict[str, tuple[str, float]] = {}

    def recall(self, name: str) -> str | None:
        """The note's value, or ``None``. :param name: the note."""
        with self._lock:
            value, expiry = self._notes.get(name, (None, 0.0))
            if value is not None and expiry <= self._clock():
                del self._notes[name]
                return None
            return value

    async def arecall(self, name: str) -> str | None:
        """:meth:`recall`; it never blocks. :param name: the note."""
        return self.recall(name)

    def remember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """
        Keep a note for ``ttl`` seconds.

        :param name: The note.
        :param value: Its value.
        :param ttl: Seconds it lasts.
        :param only_if_absent: Write only when there is no note of that name.
        """
        with self._lock:
            now = self._clock()
            current = self._notes.get(name)
            if only_if_absent and current is not None and current[1] > now:
                return False
            self._notes[name] = (value, now + ttl)
            return True

    async def aremember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """:meth:`remember`; it never blocks (same parameters)."""
        return self.remember(name, value, ttl, only_if_absent=only_if_absent)

    def forget(self, name: str) -> None:
        """Drop a note. :param name: the note."""
        with self._lock:
            self._notes.pop(name, None)

    async def aforget(self, name: str) -> None:
        """:meth:`forget`; it never blocks. :param name: the note."""
        self.forget(name)


class SharedNotes:
    """
    Notes kept in the Redis of a shared budget, under its account's keys, for every process.

    :param budget: The shared budget whose Redis (and whose fallback's notes) it uses.
    """

    def __init__(self, budget: SharedBudget) -> None:
        self.budget = budget

    @property
    def _local(self) -> LocalNotes:
        return self.budget.fallback.notes

    def recall(self, name: str) -> str | None:
        """The note's value, or ``None``. :param name: the note."""
        value = self.budget.script(scripts.RECALL_NOTE, "notes:", [name], _Missing(self._local, name))
        return _text(value)

    async def arecall(self, name: str) -> str | None:
        """:meth:`recall` without blocking the event loop. :param name: the note."""
        value = await self.budget.ascript(scripts.RECALL_NOTE, "notes:", [name], _Missing(self._local, name))
        return _text(value)

    def remember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """Keep a note for ``ttl`` seconds (see :meth:`LocalNotes.remember`)."""
        self._local.remember(name, value, ttl)
        args = [name, value, int(ttl * 1000), "1" if only_if_absent else "0", "0"]
        written = self.budget.script(scripts.REMEMBER_NOTE, "notes:", args, lambda: 1)
        return bool(int(written))

    async def aremember(self, name: str, value: str, ttl: float, *, only_if_absent: bool = False) -> bool:
        """:meth:`remember` without blocking the event loop."""
        self._local.remember(name, value, ttl)
        args = [name, value, int(ttl * 1000), "1" if only_if_absent else "0", "0"]
        written = await self.budget.ascript(scripts.REMEMBER_NOTE, "notes:", args, lambda: 1)
        return bool(int(written))

    def forget(self, name: str) -> None:
        """Drop a note. :param name: the note."""
        self._local.forget(name)
        self.budget.script(scripts.REMEMBER_NOTE, "notes:", [name, "", 0, "0", "1"], lambda: 1)

    async def aforget(self, name: str) -> None:
        """:meth:`forget` without blocking the event loop. :param name: the note."""
        self._local.forget(name)
        await self.budget.ascript(scripts.REMEMBER_NOTE, "notes:", [name, "", 0, "0", "1"], lambda: 1)


class _Missing:
    """The fallback of a recall while Redis is down: the process's own note."""

    def __init__(self, local: LocalNotes, name: str) -> None:
        self.local = local
        self.name = name

    def __call__(self) -> Any:
        return self.local.recall(self.name)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
