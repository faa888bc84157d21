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

from airflow_provider_blip2.batch.items import (
    CAPTION_LABEL,
    QUESTION_LABEL,
    BatchItem,
    build_items,
    image_key,
)
from airflow_provider_blip2.batch.journal import BatchJournal, KeyValueStore
from airflow_provider_blip2.batch.state import (
    BatchState,
    describe_failures,
    failed_ratio_exceeded,
    format_duration,
)

__all__ = [
    "CAPTION_LABEL",
    "QUESTION_LABEL",
    "BatchItem",
    "BatchJournal",
    "BatchState",
    "KeyValueStore",
    "build_items",
    "describe_failures",
    "failed_ratio_exceeded",
    "format_duration",
    "image_key",
]
