"""
What a killed trigger does: cancel its predictions, unless its task is still deferred.

Airflow 3.3 calls a trigger's ``on_kill`` when a user marks the deferred task failed or success or
clears it, and also when the trigger moves to another triggerer; only the first cancels.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

# Bound on the remote cancel when a user kills the task.
ON_KILL_TIMEOUT = 20.0
DEFERRED = "deferred"


async def task_left_deferral(trigger: BaseTrigger) -> bool:
    """
    Whether the trigger's task instance is no longer deferred, as the Airflow API says.

    Airflow 3.3 calls ``on_kill`` when a user marks a deferred task failed or success or clears it,
    but also when a trigger is handed over to another triggerer (apache/airflow#73454): the task is
    then still deferred and its prediction still awaited. Without a task instance to ask about (an
    inline ``dags test`` trigger) or an answer, the kill counts as a user's.

    :param trigger: The trigger being killed.
    """
    ti = trigger.task_instance
    if ti is None:
        return True
    try:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], map_index=ti.map_index
        )
    except Exception as error:
        trigger.log.warning("Could not read the state of task %s: %s", ti.task_id, error)
        return True
    key = ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
    return (states.get(ti.run_id) or {}).get(key) != DEFERRED


async def cancel_for_kill(trigger: BaseTrigger, hook: Blip2Hook, prediction_ids: list[str]) -> None:
    """
    ``on_kill`` of both triggers: cancel the predictions, unless the task is still deferred.

    The work is shielded: the triggerer cancels a killed trigger's task again on each of its loops,
    which must not cut the cancel short.

    :param trigger: The trigger being killed.
    :param hook: The hook to cancel with; closed afterwards.
    :param prediction_ids: The predictions the trigger waits for.
    """
    await asyncio.shield(asyncio.ensure_future(_cancel_unless_deferred(trigger, hook, prediction_ids)))


async def _cancel_unless_deferred(trigger: BaseTrigger, hook: Blip2Hook, prediction_ids: list[str]) -> None:
    try:
        if not await task_left_deferral(trigger):
            trigger.log.info(
                "The task is still deferred (its trigger moved to another triggerer): "
                "%d prediction(s) left running",
                len(prediction_ids),
            )
            return
        results = await asyncio.wait_for(
            asyncio.gather(*(hook.acancel_prediction(pid) for pid in prediction_ids), return_exceptions=True),
            timeout=ON_KILL_TIMEOUT,
        )
        for prediction_id, result in zip(prediction_ids, results, strict=True):
            if isinstance(result, BaseException):
                trigger.log.warning("Could not cancel prediction %s: %s", prediction_id, result)
            else:
                trigger.log.info("Cancelled prediction %s because the task was killed", prediction_id)
    except asyncio.TimeoutError:
        trigger.log.warning("Cancelling %d prediction(s) timed out", len(prediction_ids))
    finally:
        await hook.aclose()
