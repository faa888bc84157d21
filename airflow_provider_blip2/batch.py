"""
The bookkeeping of a batch of BLIP-2 predictions, independent of Airflow.

A batch is a fixed list of :class:`BatchItem` (one image and one question each). Its progress is a
:class:`BatchState`: which items have a prediction (and its deadline), and which are finished with
an outcome (:class:`~airflow_provider_blip2.client.models.PredictionOutcome`). :class:`BatchJournal`
keeps that state in a key-value store that survives deferrals and task retries (Airflow's task
state store), append-only, so no created prediction is forgotten and no finished result is lost.
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
from airflow_provider_blip2.client.models import PredictionOutcome

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
    """

    items: list[BatchItem]
    started_at: float
    created: dict[int, tuple[str, float]] = field(default_factory=dict)
    finished: dict[int, PredictionOutcome] = field(default_factory=dict)

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

    def merge(self, part: Mapping[str, Any]) -> None:
        """Apply one journal part (``{"released": [...], "created": {...}, "finished": {...}}``)."""
        for index in part.get("released", []):
            self.created.pop(int(index), None)
        for index, (prediction_id, deadline) in part.get("created", {}).items():
            self.created[int(index)] = (str(prediction_id), float(deadline))
        for index, result in part.get("finished", {}).items():
            self.finished[int(index)] = PredictionOutcome.from_json(result)

    def to_part(self) -> dict[str, Any]:
        """The whole progress as one journal part."""
        return {
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
            }
            lines.append(json.dumps(line, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)

    def summary(self, output_uri: str, *, now: float | None = None) -> dict[str, Any]:
        """The batch's summary: ``total``, ``succeeded``, ``failed``, ``output_uri``, ``elapsed``."""
        failed = self.failed_count()
        return {
            "total": len(self.items),
            "succeeded": len(self.finished) - failed,
            "failed": failed,
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

    def release(self, state: BatchState, index: int) -> None:
        """
        Forget an item's prediction (cancelled before it ended), so the item is predicted again.

        :param state: The progress, updated in place.
        :param index: The item.
        """
        state.created.pop(index, None)
        self._part.setdefault("released", []).append(index)
        self._part["created"].pop(str(index), None)
        self._write_part()

    def flush(self) -> None:
        """Write results recorded since the last write (before deferring or finishing)."""
        if self._dirty:
            self._write_part()
