"""
DAGs for the system tests: a prediction and a batch, each deferrable and on the worker, with a retry.

The deferrable ones defer at once (``defer_after=0``): the tests are about the triggerer.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.common.compat.sdk import DAG

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator, Blip2PredictionOperator

for dag_id, deferrable in (("system_blip2_deferrable", True), ("system_blip2_on_worker", False)):
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        params={"image": "https://example.invalid/missing.jpg"},
    ):
        Blip2PredictionOperator(
            task_id="ask",
            image="{{ params.image }}",
            question="Is there a cat in this picture?",
            deferrable=deferrable,
            defer_after=0,
            poll_interval=0.5,
            timeout=600,
            retries=1,
            retry_delay=timedelta(seconds=1),
        )

for dag_id, deferrable in (("system_blip2_batch", True), ("system_blip2_batch_on_worker", False)):
    with DAG(
        dag_id=dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        params={"images": [], "output_uri": "/tmp/blip2-batch.jsonl"},
        render_template_as_native_obj=True,
    ):
        Blip2BatchPredictionOperator(
            task_id="batch",
            images="{{ params.images }}",
            caption=True,
            output_uri="{{ params.output_uri }}",
            deferrable=deferrable,
            defer_after=0,
            poll_interval=0.5,
            timeout=600,
            retries=1,
            retry_delay=timedelta(seconds=1),
        )
