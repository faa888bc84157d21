"""
Alt-text for a product catalogue: caption every image under a prefix, write the captions next to them.

``caption_catalogue`` captions every jpeg, png and webp under ``s3://<bucket>/<catalogue>/`` in one
deferrable batch task; ``write_alt_text`` then writes each caption beside its image as
``<image>.alt.txt`` (``products/shoe-12.jpg`` -> ``products/shoe-12.jpg.alt.txt``), where the
storefront's build picks it up. Images the service could not caption get no file and are listed in
the task log; up to 5 % of them may fail before the run fails.
"""

from __future__ import annotations

import json
from typing import Any

import pendulum
from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

with DAG(
    dag_id="example_blip2_alt_text",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "blip2", "catalogue"],
    params={
        "bucket": Param("catalogue", type="string", description="Bucket of the product images"),
        "catalogue": Param("products", type="string", description="Prefix of the product images"),
    },
) as dag:
    # --8<-- [start:batch]
    captions = Blip2BatchPredictionOperator(
        task_id="caption_catalogue",
        images="s3://{{ params.bucket }}/{{ params.catalogue }}/",
        caption=True,
        output_uri="s3://{{ params.bucket }}/alt-text/{{ ds }}/captions.jsonl",
        max_failed_ratio=0.05,
        deferrable=True,
        poll_interval=2.0,
        timeout=600,
    )
    # --8<-- [end:batch]

    # --8<-- [start:write]
    @task
    def write_alt_text(summary: dict[str, Any]) -> int:
        """Write ``<image>.alt.txt`` next to every captioned image; return how many were written."""
        from airflow_provider_blip2.storage import ObjectStorage

        storage = ObjectStorage()
        written = 0
        for line in map(json.loads, storage.read_bytes(summary["output_uri"]).decode().splitlines()):
            if line["status"] != "success":
                print(f"No alt text for {line['image']}: {line['error']}")
                continue
            storage.write_bytes(
                f"{line['image']}.alt.txt", line["output"].encode(), content_type="text/plain"
            )
            written += 1
        print(f"Wrote alt text for {written} of {summary['total']} images")
        return written

    write_alt_text(captions.output)
    # --8<-- [end:write]
