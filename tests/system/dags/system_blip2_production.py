"""
DAGs for the production-shaped runs: many mapped deferrable predictions, and beside them one batch.

``system_blip2_production`` captions every URL of ``dag_run.conf["images"]``, one mapped deferrable
task each. ``system_blip2_production_scale`` does the same and, in parallel, captions
``dag_run.conf["batch_images"]`` in one deferrable batch writing to ``dag_run.conf["output_uri"]``;
``system_blip2_production_scale_shared`` is that DAG on the ``blip2_shared`` connection (its budget
in Redis), and ``system_blip2_production_pool`` the mapped DAG in the pool ``blip2_predictions``.
Every task has one retry. ``system_blip2_production_scale`` keeps the operators' defaults, as users
run them (2 s predictions then end on the worker); the others defer at once (``defer_after=0``), so
that their tests involve the triggerers: deferred tasks, handovers, and workers and triggerers
sharing one budget in Redis.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator

RETRY = {"retries": 1, "retry_delay": timedelta(seconds=2)}


def run_conf_images(dag_run: Any = None) -> list[str]:
    """The image URLs of the run's conf."""
    return [str(url) for url in dag_run.conf.get("images", [])]


def production_dag(
    dag_id: str, *, with_batch: bool, conn_id: str, pool: str, defer_after: float | None, **mapped: Any
) -> DAG:
    """
    One of the DAGs: mapped deferrable captions of the conf's ``images``, and perhaps a batch.

    :param dag_id: The DAG's id.
    :param with_batch: Also caption the conf's ``batch_images`` in one deferrable batch.
    :param conn_id: The blip2 connection of every task.
    :param pool: The mapped tasks' pool.
    :param defer_after: The mapped tasks' ``defer_after``; ``None`` keeps the operator's default.
    :param mapped: More arguments of the mapped tasks.
    """
    waiting = {} if defer_after is None else {"defer_after": defer_after}
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_tasks=64,
        render_template_as_native_obj=True,
    ) as dag:
        images = task(task_id="images")(run_conf_images)()
        Blip2PredictionOperator.partial(
            task_id="caption",
            caption=True,
            deferrable=True,
            timeout=600,
            blip2_conn_id=conn_id,
            pool=pool,
            **waiting,
            **mapped,
            **RETRY,
        ).expand(image=images)
        if with_batch:
            Blip2BatchPredictionOperator(
                task_id="batch",
                images="{{ dag_run.conf['batch_images'] }}",
                caption=True,
                output_uri="{{ dag_run.conf['output_uri'] }}",
                deferrable=True,
                timeout=1800,
                blip2_conn_id=conn_id,
                **RETRY,
            )
    return dag


# The triggerer tests' predictions last 20 to 30 s; a user polls those every 10 s, not every 2 s
# (ten predictions of 20 s polled every 2 s read 100 times: past the API's 60 a minute, so the run
# would wait a window out for nothing the tests check).
production_dag(
    "system_blip2_production",
    with_batch=False,
    conn_id="blip2_default",
    pool="default_pool",
    defer_after=0,
    poll_interval=10.0,
)
production_dag(
    "system_blip2_production_scale",
    with_batch=True,
    conn_id="blip2_default",
    pool="default_pool",
    defer_after=None,
)
production_dag(
    "system_blip2_production_scale_shared",
    with_batch=True,
    conn_id="blip2_shared",
    pool="default_pool",
    defer_after=0,
)
production_dag(
    "system_blip2_production_pool",
    with_batch=False,
    conn_id="blip2_default",
    pool="blip2_predictions",
    defer_after=0,
)
# The images no URL reaches: mapped tasks upload http(s) images only the workers reach, and a batch
# uploads local files (file:// paths), both on the blip2_uploads connection (its budget in Redis, at
# the API's limit).
production_dag(
    "system_blip2_production_uploads",
    with_batch=True,
    conn_id="blip2_uploads",
    pool="default_pool",
    defer_after=None,
    image_transfer="upload",
)
