"""A batch's progress: what was created, what ended, attempts, costs and uploads; its output and summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_blip2.batch.items import BatchItem
from airflow_provider_blip2.client.models import PredictionOutcome, predict_again_on_new_try


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
    :param cached: Item index -> the cost recorded for its cached result (``None`` when none was),
        for the items whose result came from the result cache (their results are in ``finished``).
    :param fingerprints: Image -> its fingerprint when the batch started (with a result cache).
    :param unit_cost: What one prediction is taken to cost before this run reported one (the
        mean recorded in the result cache), for ``max_cost``.
    """

    items: list[BatchItem]
    started_at: float
    created: dict[int, tuple[str, float]] = field(default_factory=dict)
    finished: dict[int, PredictionOutcome] = field(default_factory=dict)
    attempts: dict[int, list[int | None]] = field(default_factory=dict)
    spent: dict[int, float] = field(default_factory=dict)
    ambiguous: dict[int, int] = field(default_factory=dict)
    uploads: dict[str, list[Any]] = field(default_factory=dict)
    cached: dict[int, float | None] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    unit_cost: float | None = None

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
        """How many times an item was predicted, over all tries (a cached result: never)."""
        if index in self.cached:
            return 0
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
        if index in self.cached:
            return 0.0
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

    def result_lines(self, unfinished: PredictionOutcome | None = None) -> str:
        """
        One JSON line per item, in item order (the batch's output file).

        :param unfinished: What an item without a result reads as (``error``, "no result", by default).
        """
        lines = []
        for index in range(len(self.items)):
            lines.append(json.dumps(self.result_line(index, unfinished), ensure_ascii=False))
        return "".join(line + "\n" for line in lines)

    def result_line(self, index: int, unfinished: PredictionOutcome | None = None) -> dict[str, Any]:
        """
        An item's output line.

        :param index: The item.
        :param unfinished: What it reads as without a result.
        """
        item = self.items[index]
        result = self.finished.get(index) or unfinished or PredictionOutcome("error", error="no result")
        return {
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
            "cached": index in self.cached,
        }

    def summary(self, output_uri: str, *, now: float | None = None) -> dict[str, Any]:
        """
        The batch's summary.

        ``total``, ``succeeded``, ``failed``, ``skipped`` (items not predicted: the batch stopped
        at ``max_cost``), ``statuses`` (items by status), ``retried`` (items predicted more than
        once), ``attempts`` (predictions in all), ``ambiguous`` (predictions that may have been
        created and paid without an answer), ``cost`` (the sum of what the API reported),
        ``cached`` (items whose result came from the result cache, at no cost), ``cost_saved``
        (what their results cost when they were predicted), ``images``, ``output_uri`` and
        ``elapsed``.
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
            "skipped": len(self.items) - len(self.finished),
            "statuses": dict(sorted(statuses.items())),
            "retried": sum(count > 1 for count in attempts),
            "attempts": sum(attempts),
            "ambiguous": sum(self.ambiguous.values()),
            "cost": round(sum(costs), 6),
            "cached": len(self.cached),
            "cost_saved": round(sum(cost for cost in self.cached.values() if cost), 6),
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
