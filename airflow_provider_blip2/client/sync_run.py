"""
Whether a prediction runs synchronously (one request) or is created and polled (two or more).

The API's synchronous run (``POST /v1/prediction/run``) is enabled per model and may be turned on
or off at any time, so it is found out at run time: in ``auto`` mode the first prediction tries it
(the probe) while the others wait for its answer; the answer is remembered for
:data:`REMEMBER_SECONDS` in the connection's notes (the process's, or the deployment's with a Redis
budget): a refusal (HTTP 400 "not enabled for this model") sends every prediction the
create-and-poll way until the note expires, with one log line and no failure. ``run`` and ``poll``
force either way (the connection's ``sync_run`` field).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_blip2.client.notes import Notes
from airflow_provider_blip2.client.settings import SYNC_RUN_ALWAYS, SYNC_RUN_AUTO, SYNC_RUN_NEVER

#: Seconds what was found out (offered or refused) is remembered.
REMEMBER_SECONDS = 3600.0
#: Seconds a probe may take before another prediction may probe instead (its process may have died).
PROBE_SECONDS = 120.0
#: Seconds between two looks at the note while another prediction probes.
PROBE_WAIT = 0.2

OFFERED = "offered"
REFUSED = "refused"
PROBING = "probing"

RUN = "run"
POLL = "poll"
PROBE = "probe"
WAIT = "wait"


def next_step(mode: str, note: str | None) -> str:
    """
    What a prediction does, by the mode and the note: ``run``, ``poll``, ``probe`` or ``wait``.

    :param mode: The connection's ``sync_run``: ``auto``, ``run`` or ``poll``.
    :param note: What the connection's notes say: ``offered``, ``refused``, ``probing`` or nothing.
    """
    if mode == SYNC_RUN_NEVER:
        return POLL
    if mode == SYNC_RUN_ALWAYS or note == OFFERED:
        return RUN
    if note == REFUSED:
        return POLL
    return WAIT if note == PROBING else PROBE


@dataclass
class SyncRunChoice:
    """
    The one rule of whether the next prediction of a connection runs synchronously.

    :param mode: The connection's ``sync_run``: ``auto``, ``run`` or ``poll``.
    :param notes: The connection's notes (its budget's).
    :param model: The model slug (the note is the model's).
    :param log: Where a refusal is reported.
    :param remember_for: Seconds an answer is remembered.
    """

    mode: str
    notes: Notes
    model: str
    log: logging.Logger | Any
    remember_for: float = field(default=REMEMBER_SECONDS, kw_only=True)

    @property
    def name(self) -> str:
        """The note's name: the model's."""
        return f"sync_run:{self.model}"

    @property
    def may_run(self) -> bool:
        """Whether the synchronous run may be used at all (the mode is not ``poll``)."""
        return self.mode != SYNC_RUN_NEVER

    def worth_trying(self) -> bool:
        """Whether the next predictions should go the synchronous way, as far as is known now (no wait)."""
        if self.mode != SYNC_RUN_AUTO:
            return self.mode == SYNC_RUN_ALWAYS
        return self.notes.recall(self.name) != REFUSED

    def decide(self) -> bool:
        """Whether the next prediction runs synchronously; waits while another one probes."""
        give_up_at = time.monotonic() + PROBE_SECONDS
        while True:
            step = next_step(self.mode, self.notes.recall(self.name))
            if step == PROBE and self.notes.remember(self.name, PROBING, PROBE_SECONDS, only_if_absent=True):
                return True
            if step in (RUN, POLL):
                return step == RUN
            if time.monotonic() > give_up_at:
                return False
            time.sleep(PROBE_WAIT)

    async def adecide(self) -> bool:
        """:meth:`decide` without blocking the event loop."""
        give_up_at = time.monotonic() + PROBE_SECONDS
        while True:
            step = next_step(self.mode, await self.notes.arecall(self.name))
            if step == PROBE and await self.notes.aremember(
                self.name, PROBING, PROBE_SECONDS, only_if_absent=True
            ):
                return True
            if step in (RUN, POLL):
                return step == RUN
            if time.monotonic() > give_up_at:
                return False
            await asyncio.sleep(PROBE_WAIT)

    def answered(self, *, offered: bool | None) -> None:
        """
        Remember what a synchronous run's answer said.

        :param offered: True for an answer of the endpoint, False for a refusal, ``None`` when
            nothing can be told (a failure before any answer): the next prediction probes again.
        """
        if offered is None:
            self._forget_probe()
        elif self.mode == SYNC_RUN_AUTO:
            self.notes.remember(self.name, OFFERED if offered else REFUSED, self.remember_for)
        if offered is False:
            self._report_refusal()

    async def aanswered(self, *, offered: bool | None) -> None:
        """:meth:`answered` without blocking the event loop."""
        if offered is None:
            if await self.notes.arecall(self.name) == PROBING:
                await self.notes.aforget(self.name)
        elif self.mode == SYNC_RUN_AUTO:
            await self.notes.aremember(self.name, OFFERED if offered else REFUSED, self.remember_for)
        if offered is False:
            self._report_refusal()

    def _forget_probe(self) -> None:
        if self.notes.recall(self.name) == PROBING:
            self.notes.forget(self.name)

    def _report_refusal(self) -> None:
        self.log.warning(
            "The API has no synchronous run for model %r (it answered 400): predictions are created "
            "and polled for the next %.0f minutes (set the connection's sync_run to poll to skip the check)",
            self.model,
            self.remember_for / 60,
        )
