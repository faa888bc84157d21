"""What every step of the batch operator's try works on: the batch's journal, its progress and the try."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_blip2.batch import BatchJournal, BatchState


@dataclass(frozen=True)
class BatchTry:
    """
    One try of the batch operator: where it records the batch, the batch's progress, the try.

    :param journal: The batch's journal.
    :param state: The batch's progress.
    :param number: This try's number (each create counts an attempt), when the task instance tells it.
    """

    journal: BatchJournal
    state: BatchState
    number: int | None
