"""
The bookkeeping of a batch of BLIP-2 predictions, independent of Airflow.

A batch is a fixed list of :class:`BatchItem` (one image and one question each). Its progress is a
:class:`BatchState`: which items have a prediction (and its deadline), which are finished with
an outcome (:class:`~airflow_provider_blip2.client.models.PredictionOutcome`), and how many times
each was predicted. :class:`BatchJournal` keeps that state in a key-value store that survives
deferrals and task retries (Airflow's task state store), append-only, so no created prediction is
forgotten and no finished result is lost. An item is predicted again only after it was released
(:meth:`BatchJournal.release`), as the retry rule of
:func:`~airflow_provider_blip2.client.models.failure_kind` decides.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.models import PredictionOutcome, predict_again_on_new_try

#: Label of the items of a batch that captions its images.
CAPTION_LABEL = "caption"
#: Label of the items of a batch that asks one question of every image.
QUESTION_LABEL = "question"


@dataclass(frozen=True)
class BatchItem:
    """
    One prediction of a batch: an image and what to ask of it.

    :param image: The image URI as the user gave it (``s3://``, ``gs://`` or ``https://``).
    :param label: Name of the question (``questions`` key, ``caption`` or ``question``).
    :param question: The question; ``None`` asks the API's default question, ``""`` captions.
    """

    image: str
    label: str
    question: str | None

    @property
    def captions(self) -> bool:
        """Whether this item captions its image (an empty question, as in the API)."""
        return self.question == ""

    def to_json(self) -> list[Any]:
        """Compact form for the journal."""
        return [self.image, self.label, self.question]

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> BatchItem:
        """Inverse of :meth:`to_json`."""
        return cls(str(value[0]), str(value[1]), None if value[2] is None else str(value[2]))


def image_key(uri: str) -> str:
    """
    How the journal and the results name an image: the URI, except for http(s) URLs with a query.

    Their query may be a signature: it is replaced by ``?<redacted {hash}>``, the hash (8 hex digits of
    the URL's SHA-256) telling apart URLs that differ only in their query.

    :param uri: The image URI as given.
    """
    if not uri.startswith(("http://", "https://")) or "?" not in uri:
        return uri
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return f"{uri.split('?', 1)[0]}?<redacted {digest}>"


def build_items(
    images: Sequence[str], *, questions: Mapping[str, str] | None, question: str | None, caption: bool
) -> list[BatchItem]:
    """
    Every (image, question) pair of a batch, image by image.

    :param images: Image URIs.
    :param questions: ``{"label": "question"}`` to ask several questions of every image.
    :param question: The one question to ask otherwise (``None``: the API's default question).
    :param caption: Caption every image instead.
    """
    if questions is not None:
        if not questions:
            raise Blip2InputError("questions is empty: give at least one {'label': 'question'}")
        if caption or question is not None:
            raise Blip2InputError("give either questions={...} or question/caption, not both")
        for label, text in questions.items():
            if not isinstance(text, str) or not text.strip():
                raise Blip2InputError(f"questions[{label!r}] must be a non-empty string, got {text!r}")
        return [BatchItem(image, str(label), text) for image in images for label, text in questions.items()]
    if caption or question == "":
        return [BatchItem(image, CAPTION_LABEL, "") for image in images]
    return [BatchItem(image, QUESTION_LABEL, question) for image in images]


@dataclass
class BatchState:
    """
    Progress of a batch.

    :param items: The batch's items, fixed when it started.
    :param started_at: Unix time the batch started (its first try).
    :param created: Item index -> ``(prediction_id, deadline)`` for every prediction created.
    :param finished: Item index -> result, for every item that ended.
    :param attempts: Item index -> the try number of each of its predictions (a create sent, or a
        submission that failed before it). Journals of earlier versions have none: an item with a
        prediction or a result then counts one attempt.
    :param spent: Item index -> the cost of its earlier predictions (those released to predict
        the item again), when the API reported one.
    :param ambiguous: Item index -> how many of its predictions may have been created (and paid)
        without an answer: creates that failed after they were sent, runs a restart interrupted.
    :param uploads: Image -> its uploaded copy (``[sealed public URL, expiry]``), for images sent
        through the upload endpoint; a later try reuses a copy while it is kept.
    """

    items: list[BatchItem]
    started_at: float
    created: dict[int, tuple[str, float]] = field(default_factory=dict)
    finished: dict[int, PredictionOutcome] = field(default_factory=dict)
    attempts: dict[int, list[int | None]] = field(default_factory=dict)
    spent: dict[int, float] = field(default_factory=dict)
    ambiguous: dict[int, int] = field(default_factory=dict)
    uploads: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def in_flight(self) -> dict[int, tuple[str, float]]:
        """Created predictions that have not ended."""
        return {index: value for index, value in self.created.items() if index not in self.finished}

    def pending(self) -> list[int]:
        """Items with no prediction and no result yet, in order."""
        return [i for i in range(len(self.items)) if i not in self.created and i not in self.finished]

    def index_of(self, prediction_id: str) -> int | None:
        """The item a prediction was created for."""
        for index, (created_id, _deadline) in self.created.items():
            if created_id == prediction_id:
                return index
        return None

    @property
    def done(self) -> bool:
        """Whether every item has a result."""
        return len(self.finished) == len(self.items)

    def failed_count(self) -> int:
        """Items that ended without an output."""
        return sum(result.failed for result in self.finished.values())

    def attempts_of(self, index: int) -> int:
        """How many times an item was predicted, over all tries."""
        recorded = self.attempts.get(index)
        if recorded:
            return len(recorded)
        return int(index in self.created or index in self.finished)

    def attempts_in_try(self, index: int, try_number: int | None) -> int:
        """How many times an item was predicted in one try (attempts of unknown tries count in it)."""
        recorded = self.attempts.get(index)
        if not recorded:
            return self.attempts_of(index)
        return sum(number is None or number == try_number for number in recorded)

    def cost_of(self, index: int) -> float | None:
        """What an item's predictions cost, over all attempts; ``None`` when the API reported nothing."""
        result = self.finished.get(index)
        candidates = (self.spent.get(index), result.cost if result else None)
        costs = [cost for cost in candidates if cost is not None]
        return round(sum(costs), 9) if costs else None

    def to_predict_again(self, retry_failures: str) -> list[int]:
        """
        The finished items a new try predicts again, in order.

        :param retry_failures: ``transient``, ``all`` or ``none`` (the operator's parameter).
        """
        return [
            index
            for index, result in sorted(self.finished.items())
            if predict_again_on_new_try(result, retry_failures)
        ]

    def merge(self, part: Mapping[str, Any]) -> None:
        """
        Apply one journal part.

        A part is ``{"released": [...], "attempts": {...}, "spent": {...}, "created": {...},
        "finished": {...}}``, applied in that order: a release precedes whatever the same part
        records for the item afterwards. Every value is the item's whole value, not a change, so
        merging a part again over a later state (after a compaction) is harmless.
        """
        for index in part.get("released", []):
            self.created.pop(int(index), None)
            self.finished.pop(int(index), None)
        for index, numbers in part.get("attempts", {}).items():
            self.attempts[int(index)] = [None if number is None else int(number) for number in numbers]
        for index, cost in part.get("spent", {}).items():
            self.spent[int(index)] = float(cost)
        for index, count in part.get("ambiguous", {}).items():
            self.ambiguous[int(index)] = int(count)
        for image, copy in part.get("uploads", {}).items():
            self.uploads[str(image)] = list(copy)
        for index, (prediction_id, deadline) in part.get("created", {}).items():
            self.created[int(index)] = (str(prediction_id), float(deadline))
        for index, result in part.get("finished", {}).items():
            self.finished[int(index)] = PredictionOutcome.from_json(result)

    def to_part(self) -> dict[str, Any]:
        """The whole progress as one journal part."""
        return {
            "attempts": {str(i): list(numbers) for i, numbers in self.attempts.items()},
            "spent": {str(i): cost for i, cost in self.spent.items()},
            "ambiguous": {str(i): count for i, count in self.ambiguous.items()},
            "uploads": dict(self.uploads),
            "created": {str(i): [pid, deadline] for i, (pid, deadline) in self.created.items()},
            "finished": {str(i): result.to_json() for i, result in self.finished.items()},
        }

    def result_lines(self) -> str:
        """One JSON line per item, in item order (the batch's output file)."""
        lines = []
        for index, item in enumerate(self.items):
            result = self.finished.get(index) or PredictionOutcome("error", error="no result")
            line = {
                "image": item.image,
                "label": item.label,
                "question": item.question or None,
                "output": result.output,
                "status": result.status,
                "error": result.error,
                "prediction_id": result.prediction_id,
                "predict_time": result.predict_time,
                "cost": self.cost_of(index),
                "attempts": self.attempts_of(index),
            }
            lines.append(json.dumps(line, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)

    def summary(self, output_uri: str, *, now: float | None = None) -> dict[str, Any]:
        """
        The batch's summary.

        ``total``, ``succeeded``, ``failed``, ``statuses`` (items by status), ``retried`` (items
        predicted more than once), ``attempts`` (predictions in all), ``ambiguous`` (predictions
        that may have been created and paid without an answer), ``cost`` (the sum of what the API
        reported), ``images``, ``output_uri`` and ``elapsed``.
        """
        failed = self.failed_count()
        statuses: dict[str, int] = {}
        for result in self.finished.values():
            statuses[result.status] = statuses.get(result.status, 0) + 1
        attempts = [self.attempts_of(index) for index in range(len(self.items))]
        costs = [cost for cost in map(self.cost_of, range(len(self.items))) if cost is not None]
        return {
            "total": len(self.items),
            "succeeded": len(self.finished) - failed,
            "failed": failed,
            "statuses": dict(sorted(statuses.items())),
            "retried": sum(count > 1 for count in attempts),
            "attempts": sum(attempts),
            "ambiguous": sum(self.ambiguous.values()),
            "cost": round(sum(costs), 6),
            "images": len({item.image for item in self.items}),
            "output_uri": output_uri,
            "elapsed": round((now or time.time()) - self.started_at, 3),
        }

    def progress_line(self, *, now: float | None = None) -> str:
        """``done/total``, failures, rate and ETA, for the task log."""
        done, total = len(self.finished), len(self.items)
        elapsed = max(1e-6, (now or time.time()) - self.started_at)
        rate = done / elapsed
        eta = "unknown" if rate == 0 else format_duration((total - done) / rate)
        return (
            f"{done}/{total} done ({self.failed_count()} failed, {len(self.in_flight)} in flight), "
            f"{rate * 60:.1f}/min, ETA {eta}"
        )


def format_duration(seconds: float) -> str:
    """``1h 02m 03s``, ``2m 03s`` or ``3s``."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def describe_failures(results: Sequence[PredictionOutcome]) -> str:
    """
    How results failed, most frequent first: ``"12 ambiguous, 3 error [PROVIDER_FAILED], 1 timeout"``.

    :param results: Failed results.
    """
    counts: dict[str, int] = {}
    for result in results:
        key = f"{result.status} [{result.error_code}]" if result.error_code else result.status
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def failed_ratio_exceeded(state: BatchState, max_failed_ratio: float) -> bool:
    """
    Whether more items failed than the batch tolerates.

    :param state: A finished batch.
    :param max_failed_ratio: Fraction of items allowed to fail, 0 to 1.
    """
    return bool(state.items) and state.failed_count() / len(state.items) > max_failed_ratio


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
        )
        state.merge(self.store.get(self._key("base")) or {})
        for number in range(int(self.store.get(self._key("parts")) or 0)):
            state.merge(self.store.get(self._key(f"part/{number}")) or {})
        return state

    def start(self, items: list[BatchItem], *, now: float | None = None) -> BatchState:
        """
        Store a new batch's items and return its empty progress.

        :param items: The batch's items.
        :param now: Start time (Unix).
        """
        state = BatchState(items=items, started_at=now or time.time())
        self.store.set(
            self._key("items"),
            {"items": [item.to_json() for item in items], "started_at": state.started_at},
        )
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
