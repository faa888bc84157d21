"""The durable progress of a batch in a key-value store kept across deferrals and task retries."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from airflow_provider_blip2.batch.items import BatchItem
from airflow_provider_blip2.batch.state import BatchState
from airflow_provider_blip2.client.models import PredictionOutcome


class KeyValueStore(Protocol):
    """What the journal needs of its storage: JSON values by key, kept across tries."""

    def get(self, key: str, default: Any = None) -> Any:
        """Return the stored value or ``default``."""

    def set(self, key: str, value: Any) -> None:
        """Store a JSON value."""


class BatchJournal:
    """
    The durable progress of one batch, in a :class:`KeyValueStore`.

    Layout: ``items`` (written once), ``base`` (a compacted snapshot), ``parts`` (a count) and
    ``part/<n>``: every worker cycle writes one part, and rewrites it after each prediction it
    creates, so at most the create in progress can be lost when a worker dies. Results of
    predictions are written with the next write (or :meth:`flush`): until then a lost result is read
    again from the API, whose id is stored. Results without a prediction (an image that could not
    be submitted) are written at once, or a retry would submit them again. Parts are folded into
    ``base`` every :attr:`COMPACT_EVERY` cycles, so loading costs a bounded number of reads.

    :param store: Where to keep it.
    :param prefix: Key prefix.
    """

    COMPACT_EVERY = 16

    def __init__(self, store: KeyValueStore, prefix: str = "blip2_batch") -> None:
        self.store = store
        self.prefix = prefix
        self._part_number: int | None = None
        self._part_counted = False
        self._dirty = False
        self._part: dict[str, Any] = {"created": {}, "finished": {}}
        #: Told of every result recorded (the task's metrics).
        self.on_finished: Callable[[PredictionOutcome], None] | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def load(self) -> BatchState | None:
        """The stored progress, or ``None`` when this batch has not started."""
        header = self.store.get(self._key("items"))
        if not header:
            return None
        state = BatchState(
            items=[BatchItem.from_json(item) for item in header["items"]],
            started_at=float(header["started_at"]),
            fingerprints=dict(header.get("fingerprints") or {}),
            unit_cost=header.get("unit_cost"),
        )
        for index, (cost, result) in (header.get("cached") or {}).items():
            state.cached[int(index)] = cost
            state.finished[int(index)] = PredictionOutcome.from_json(result)
        state.merge(self.store.get(self._key("base")) or {})
        for number in range(int(self.store.get(self._key("parts")) or 0)):
            state.merge(self.store.get(self._key(f"part/{number}")) or {})
        return state

    def start(
        self,
        items: list[BatchItem],
        *,
        now: float | None = None,
        cached: Mapping[int, tuple[float | None, PredictionOutcome]] | None = None,
        fingerprints: Mapping[str, str] | None = None,
        unit_cost: float | None = None,
    ) -> BatchState:
        """
        Store a new batch's items, with the results the cache gave, and return its progress.

        :param items: The batch's items.
        :param now: Start time (Unix).
        :param cached: Item index -> (recorded cost, result) of the items the result cache answers.
        :param fingerprints: Image -> fingerprint, with a result cache.
        :param unit_cost: What a prediction is taken to cost, when known (from the cache).
        """
        cached = dict(cached or {})
        state = BatchState(
            items=items,
            started_at=now or time.time(),
            fingerprints=dict(fingerprints or {}),
            unit_cost=unit_cost,
        )
        for index, (cost, result) in cached.items():
            state.cached[index] = cost
            state.finished[index] = result
        header: dict[str, Any] = {"items": [item.to_json() for item in items], "started_at": state.started_at}
        if cached:
            header["cached"] = {str(i): [cost, result.to_json()] for i, (cost, result) in cached.items()}
        if fingerprints:
            header["fingerprints"] = dict(fingerprints)
        if unit_cost is not None:
            header["unit_cost"] = unit_cost
        self.store.set(self._key("items"), header)
        return state

    def begin_cycle(self, state: BatchState) -> None:
        """
        Open the part this worker cycle writes to, compacting earlier parts when there are many.

        :param state: The progress loaded by :meth:`load` (or from :meth:`start`).
        """
        parts = int(self.store.get(self._key("parts")) or 0)
        if parts >= self.COMPACT_EVERY:
            # Snapshot first: if the worker dies before ``parts`` is reset, merging again is harmless.
            self.store.set(self._key("base"), state.to_part())
            self.store.set(self._key("parts"), 0)
            parts = 0
        self._part_number = parts
        self._part_counted = False
        self._dirty = False
        self._part = {"created": {}, "finished": {}}

    def _write_part(self) -> None:
        if self._part_number is None:
            raise RuntimeError("begin_cycle() must be called before recording progress")
        self.store.set(self._key(f"part/{self._part_number}"), self._part)
        self._dirty = False
        if not self._part_counted:
            self.store.set(self._key("parts"), self._part_number + 1)
            self._part_counted = True

    def record_attempt(self, state: BatchState, index: int, try_number: int | None) -> None:
        """
        Count a prediction of an item about to be submitted; written with its result or its id.

        :param state: The progress, updated in place.
        :param index: The item.
        :param try_number: The task's try.
        """
        numbers = state.attempts.get(index)
        if not numbers:
            numbers = [None] * state.attempts_of(index)  # from a journal that did not count them
        state.attempts[index] = [*numbers, try_number]
        self._part.setdefault("attempts", {})[str(index)] = list(state.attempts[index])
        self._dirty = True

    def forget_attempt(self, state: BatchState, index: int) -> None:
        """
        Take back an item's last attempt: it was handed over but never sent.

        :param state: The progress, updated in place.
        :param index: The item.
        """
        numbers = state.attempts.get(index)
        if numbers:
            state.attempts[index] = numbers[:-1]
            self._part.setdefault("attempts", {})[str(index)] = list(state.attempts[index])
            self._dirty = True

    def record_created(self, state: BatchState, index: int, prediction_id: str, deadline: float) -> None:
        """
        Record a new prediction (before anything else happens to it).

        :param state: The progress, updated in place.
        :param index: The item.
        :param prediction_id: The prediction created for it.
        :param deadline: Unix time after which it is cancelled.
        """
        state.created[index] = (prediction_id, deadline)
        self._part["created"][str(index)] = [prediction_id, deadline]
        self._write_part()

    def record_finished(self, state: BatchState, results: Mapping[int, PredictionOutcome]) -> None:
        """
        Record results of ended items.

        :param state: The progress, updated in place.
        :param results: Item index -> result.
        """
        for index, result in results.items():
            if self.on_finished is not None:
                self.on_finished(result)
            state.finished[index] = result
            self._part["finished"][str(index)] = result.to_json()
            self._dirty = True
        if any(result.prediction_id is None for result in results.values()):
            self._write_part()

    def record_upload(self, state: BatchState, image: str, copy: list[Any]) -> None:
        """
        Record an image's uploaded copy (written with the next write, before its prediction is).

        :param state: The progress, updated in place.
        :param image: The image's key.
        :param copy: ``[sealed public URL, expiry]``.
        """
        state.uploads[image] = list(copy)
        self._part.setdefault("uploads", {})[image] = list(copy)
        self._dirty = True

    def record_ambiguous(self, state: BatchState, index: int) -> None:
        """
        Count a prediction of an item that may have been created and paid without an answer.

        :param state: The progress, updated in place.
        :param index: The item.
        """
        state.ambiguous[index] = state.ambiguous.get(index, 0) + 1
        self._part.setdefault("ambiguous", {})[str(index)] = state.ambiguous[index]
        self._dirty = True

    def release(self, state: BatchState, indexes: Sequence[int]) -> None:
        """
        Forget items' predictions and results, so that they are predicted again.

        Their attempts are kept, and the cost of the released results is added to what the items
        spent. Written at once.

        :param state: The progress, updated in place.
        :param indexes: The items.
        """
        if not indexes:
            return
        for index in indexes:
            if not state.attempts.get(index) and state.attempts_of(index):
                # A journal that did not count attempts: keep the one this item had.
                state.attempts[index] = [None]
                self._part.setdefault("attempts", {})[str(index)] = [None]
            state.created.pop(index, None)
            result = state.finished.pop(index, None)
            if result is not None and result.cost:
                state.spent[index] = round(state.spent.get(index, 0.0) + result.cost, 9)
                self._part.setdefault("spent", {})[str(index)] = state.spent[index]
            self._part.setdefault("released", []).append(index)
            self._part["created"].pop(str(index), None)
            self._part["finished"].pop(str(index), None)
        self._write_part()

    def flush(self) -> None:
        """Write results recorded since the last write (before deferring or finishing)."""
        if self._dirty:
            self._write_part()
