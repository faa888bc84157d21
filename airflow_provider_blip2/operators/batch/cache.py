"""
The batch operator's result cache (``cache_uri``) and spending cap (``max_cost``), on the worker.

When a batch starts, every image's fingerprint is read (its metadata, or its content where the
store reports none) and the cache is read: an item whose image and inputs are unchanged takes its
cached result and is not predicted. When the batch ends (or stops at ``max_cost``), its new
successes are added to the cache, which is read again and rewritten whole, atomically.

Each cached result keeps the cost the API reported for it (synchronous runs get theirs from one
read a chunk, :class:`~airflow_provider_blip2.triggers.batch_run.Blip2BatchRunTrigger`): what a
later run saves, and the estimate of a prediction's cost for ``max_cost``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_blip2.batch.cache import CachedResult, ResultCache, cache_key, new_entry
from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.models import PredictionOutcome
from airflow_provider_blip2.operators.batch.images import CHECK_URL, resolve_items
from airflow_provider_blip2.storage import ObjectNotFoundError, StorageError

if TYPE_CHECKING:
    from airflow_provider_blip2.batch import BatchItem, BatchJournal, BatchState
    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator


class CacheStart:
    """
    What the cache gives a new batch.

    :param cached: Item index -> (recorded cost, result) of the items answered from the cache.
    :param fingerprints: Image key -> fingerprint.
    :param unit_cost: The mean recorded cost of a cached prediction, when any recorded one.
    """

    def __init__(
        self,
        cached: dict[int, tuple[float | None, PredictionOutcome]],
        fingerprints: dict[str, str],
        unit_cost: float | None,
    ) -> None:
        self.cached = cached
        self.fingerprints = fingerprints
        self.unit_cost = unit_cost


def start_batch(op: Blip2BatchPredictionOperator, journal: BatchJournal) -> BatchState:
    """
    Resolve the operator's images to items and start the batch, with the cache's results.

    :param op: The batch operator.
    :param journal: The batch's (empty) journal.
    """
    items = resolve_items(op)
    if not op.cache_uri:
        return journal.start(items)
    start = start_from_cache(op, items)
    return journal.start(
        items, cached=start.cached, fingerprints=start.fingerprints, unit_cost=start.unit_cost
    )


def item_cache_key(op: Blip2BatchPredictionOperator, item: BatchItem) -> str:
    """
    The cache key of an item: its image and every input as sent, with the connection's model.

    :param op: The batch operator.
    :param item: The item.
    """
    inputs = op._prediction_input(item, CHECK_URL).to_api()
    inputs.pop("image", None)
    settings = op.hook.settings
    return cache_key(item.image, inputs, model=settings.model, model_version=settings.model_version)


def read_cache(op: Blip2BatchPredictionOperator) -> ResultCache:
    """
    The cache at ``cache_uri``; a file that does not exist yet is an empty cache.

    :param op: The batch operator.
    :raises AirflowFailException: When the file is corrupt or foreign, or cannot be read.
    """
    uri = str(op.cache_uri)
    try:
        data = op.storage.read_bytes(uri)
    except ObjectNotFoundError:
        return ResultCache()
    except (StorageError, ValueError) as error:
        raise AirflowFailException(f"cache_uri {uri} cannot be read: {error}") from error
    try:
        return ResultCache.parse(data, uri=uri)
    except Blip2InputError as error:
        raise AirflowFailException(str(error)) from error


def start_from_cache(op: Blip2BatchPredictionOperator, items: list[BatchItem]) -> CacheStart:
    """
    Read the images' fingerprints and the cache; say which items it answers.

    :param op: The batch operator (with ``cache_uri``).
    :param items: The batch's items.
    :raises AirflowFailException: When an image is missing, or the cache cannot be used.
    """
    try:
        op.storage.check_writable(str(op.cache_uri))
    except (StorageError, ValueError) as error:
        raise AirflowFailException(f"cache_uri {op.cache_uri}: {error}") from error
    images = list(dict.fromkeys(item.image for item in items))
    try:
        found = op.storage.fingerprints([op._image_url(image) for image in images])
    except StorageError as error:
        raise AirflowFailException(f"Invalid batch for task {op.task_id}: {error}") from error
    fingerprints = {
        image: fingerprint
        for image, fingerprint in zip(images, found.values(), strict=True)
        if fingerprint is not None
    }
    cache = read_cache(op)
    cached: dict[int, tuple[float | None, PredictionOutcome]] = {}
    for index, item in enumerate(items):
        entry = cache.lookup(item_cache_key(op, item), fingerprints.get(item.image))
        if entry is not None:
            cached[index] = (entry.cost, _outcome(entry))
    op.log.info(
        "The result cache %s answers %d of %d predictions (%d images unchanged)",
        op.cache_uri,
        len(cached),
        len(items),
        len(fingerprints),
    )
    op.hook.metrics.cached(len(cached), sum(cost for cost, _result in cached.values() if cost))
    return CacheStart(cached, fingerprints, cache.cost_estimate())


def _outcome(entry: CachedResult) -> PredictionOutcome:
    result = entry.result
    predict_time = result.get("predict_time")
    return PredictionOutcome(
        PredictionOutcome.SUCCESS,
        output=result.get("output"),
        prediction_id=result.get("prediction_id"),
        predict_time=float(predict_time) if isinstance(predict_time, (int, float)) else None,
    )


def save_to_cache(op: Blip2BatchPredictionOperator, state: BatchState) -> None:
    """
    Add the batch's new successes to the cache, read again and rewritten whole (atomically).

    :param op: The batch operator (with ``cache_uri``).
    :param state: The batch's progress.
    """
    new = [
        index
        for index, result in state.finished.items()
        if result.succeeded and index not in state.cached and state.items[index].image in state.fingerprints
    ]
    entries = [
        new_entry(
            item_cache_key(op, state.items[index]),
            state.fingerprints[state.items[index].image],
            state.result_line(index),
        )
        for index in new
    ]
    cache = ResultCache()
    cache.add(entries)
    merged = cache.merged_into(read_cache(op))
    keep = {item_cache_key(op, item) for item in state.items} if op.cache_compact else None
    try:
        op.storage.write_bytes(
            str(op.cache_uri), merged.to_bytes(keep=keep), content_type="application/x-ndjson"
        )
    except (StorageError, ValueError) as error:
        raise AirflowFailException(f"cache_uri {op.cache_uri} cannot be written: {error}") from error
    op.log.info("Added %d results to the result cache %s", len(entries), op.cache_uri)
