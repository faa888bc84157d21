"""How a batch ends: its output and cache written, its summary returned, or the task failed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

from airflow_provider_blip2.batch import describe_failures, failed_ratio_exceeded
from airflow_provider_blip2.operators.batch.cache import save_to_cache
from airflow_provider_blip2.operators.batch.spending import max_cost_message, stopped_at_max_cost
from airflow_provider_blip2.operators.batch.tries import forget_progress, retries_left

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_blip2.batch import BatchState
    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator


def finish_batch(op: Blip2BatchPredictionOperator, context: Context, state: BatchState) -> dict[str, Any]:
    """
    Write the results and the cache, return the summary; fail if the batch must.

    A batch that stopped at ``max_cost`` fails (no retry: it would stop again); one with failures
    a new try can fix fails while the task has retries left; one with more failures than
    ``max_failed_ratio`` allows fails. A batch without failures drops its progress, so a cleared
    task predicts again.

    :param op: The batch operator.
    :param context: The task context.
    :param state: The batch's progress, done or stopped at ``max_cost``.
    """
    stopped = None if state.done else stopped_at_max_cost(op)
    op.storage.write_bytes(
        op.output_uri, state.result_lines(stopped).encode(), content_type="application/x-ndjson"
    )
    op._output_rows = len(state.items)
    if op.cache_uri:
        save_to_cache(op, state)
    summary = state.summary(op.output_uri)
    op.log.info("Batch finished: %s", summary)
    if stopped is not None:
        raise AirflowFailException(max_cost_message(op, state, summary))
    again = state.to_predict_again(op.retry_failures)
    if again and retries_left(context):
        raise AirflowException(
            f"{len(again)} of {summary['total']} predictions failed in a way a new try can fix "
            f"({describe_failures([state.finished[index] for index in again])}): the next try "
            f"predicts them again and keeps the other {summary['total'] - len(again)} results; "
            f"results so far in {op.output_uri}"
        )
    if failed_ratio_exceeded(state, op.max_failed_ratio):
        raise AirflowFailException(
            f"{summary['failed']} of {summary['total']} predictions failed, more than "
            f"max_failed_ratio={op.max_failed_ratio:g} allows; results in {op.output_uri}"
        )
    if not summary["failed"]:
        forget_progress(context)
    return summary
