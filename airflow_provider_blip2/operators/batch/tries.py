"""
The batch operator across tries: where its journal lives, and what a new try predicts again.

The journal lives in Airflow's task state store (Airflow 3.3+), which a new try of the task finds;
before 3.3, in the task instance's XCom, which lasts one try. A new try ends the synchronous runs
an earlier try left unanswered (each ambiguous), releases predictions cancelled in flight, and
predicts again what ``retry_failures`` selects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_blip2.batch import BatchJournal, BatchState, describe_failures
from airflow_provider_blip2.client.errors import Blip2Error
from airflow_provider_blip2.client.models import PredictionOutcome, PredictionStatus, predict_again_on_new_try
from airflow_provider_blip2.operators.batch.run import fail_interrupted_runs

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_blip2.operators.batch import Blip2BatchPredictionOperator


def open_journal(op: Blip2BatchPredictionOperator, context: Context) -> BatchJournal:
    """
    The batch's journal: in the task state store, or in XCom before Airflow 3.3.

    :param op: The batch operator.
    :param context: The task context.
    """
    store: Any = context.get("task_state_store")  # type: ignore[call-overload]
    if store is None:
        op.log.warning("No task state store (Airflow < 3.3): progress lasts one try, not retries")
        store = XComStore(context)
    journal = BatchJournal(store)
    journal.on_finished = op.hook.metrics.ended
    return journal


def predict_again(op: Blip2BatchPredictionOperator, journal: BatchJournal, state: BatchState) -> None:
    """
    On a new try, release the items it predicts again (``retry_failures``); keep the others.

    Predictions still in flight are kept and waited for, except those cancelled in flight (a user
    cleared or failed the deferred task, and its trigger cancelled them). Finished items are
    predicted again when the retry rule says a new try can change how they ended.

    :param op: The batch operator.
    :param journal: The batch's journal.
    :param state: The batch's progress, as the earlier try left it.
    """
    journal.begin_cycle(state)
    fail_interrupted_runs(journal, state)
    cancelled = []
    for index, (prediction_id, _deadline) in state.in_flight.items():
        try:
            status = op.hook.get_prediction(prediction_id).status
        except Blip2Error as error:
            op.log.warning("Could not read prediction %s: %s", prediction_id, error)
            continue
        outcome = PredictionOutcome(PredictionOutcome.CANCELLED, prediction_id=prediction_id)
        if status is PredictionStatus.CANCELLED and predict_again_on_new_try(outcome, op.retry_failures):
            op.log.info("Prediction %s was cancelled in flight; its image is predicted again", prediction_id)
            cancelled.append(index)
    again = state.to_predict_again(op.retry_failures)
    if again:
        op.log.info(
            "This try predicts again %d items that failed in an earlier try (%s); "
            "it keeps the other %d results",
            len(again),
            describe_failures([state.finished[index] for index in again]),
            len(state.finished) - len(again),
        )
    journal.release(state, cancelled + again)


def try_number(context: Context) -> int | None:
    """This try's number, when the task instance tells it."""
    number = getattr(context.get("ti"), "try_number", None)
    return number if isinstance(number, int) else None


def retries_left(context: Context) -> bool:
    """
    Whether a failure of this try leads to another try that keeps the batch's progress.

    Only with a task state store (Airflow 3.3+): before, a new try starts the batch over. Airflow
    retries while ``try_number <= max_tries``.
    """
    if context.get("task_state_store") is None:  # type: ignore[call-overload]
        return False
    max_tries = getattr(context.get("ti"), "max_tries", None)
    number = try_number(context)
    return isinstance(max_tries, int) and number is not None and max_tries > 0 and number <= max_tries


def forget_progress(context: Context) -> None:
    """Drop the finished batch's progress, so a cleared task predicts again."""
    store = context.get("task_state_store")  # type: ignore[call-overload]
    if store is not None:
        store.clear()


class XComStore:
    """
    The journal's store before Airflow 3.3: this task instance's XCom (kept across deferrals).

    :param context: The task context.
    """

    def __init__(self, context: Context) -> None:
        self.ti = context["ti"]

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        value = self.ti.xcom_pull(task_ids=self.ti.task_id, key=key, map_indexes=self.ti.map_index)
        return default if value is None else value

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``."""
        self.ti.xcom_push(key=key, value=value)
