"""
Caption a handful of images and ask a question about each, with deferrable BLIP-2 tasks.

Trigger it with ``{"image_urls": ["https://.../a.jpg", ...]}`` as the run's conf, or edit the
default list. Each image gets two predictions (a caption and an answer); waiting happens in the
triggerer, so it costs no worker slot. The ``report`` task joins everything into one row per image.
"""

from __future__ import annotations

import pendulum
from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_blip2.operators.blip2 import Blip2PredictionOperator

QUESTION = "Is there an animal in this picture?"

with DAG(
    dag_id="example_blip2_caption",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "blip2"],
    params={
        "image_urls": Param(
            ["https://upload.wikimedia.org/wikipedia/commons/3/3a/Cat03.jpg"],
            type="array",
            items={"type": "string"},
            description="http(s) URLs of the images to describe",
        )
    },
) as dag:

    @task
    def image_urls(params: dict | None = None) -> list[str]:
        """The images of this run."""
        return list((params or {})["image_urls"])

    urls = image_urls()

    # --8<-- [start:mapped]
    captions = Blip2PredictionOperator.partial(
        task_id="caption", caption=True, deferrable=True, poll_interval=1.0, timeout=300
    ).expand(image=urls)

    answers = Blip2PredictionOperator.partial(
        task_id="ask", question=QUESTION, deferrable=True, poll_interval=1.0, timeout=300
    ).expand(image=urls)
    # --8<-- [end:mapped]

    # --8<-- [start:report]
    @task
    def report(urls: list[str], captions: list[str], answers: list[str]) -> list[dict[str, str]]:
        """One row per image: its file name, caption and answer."""
        rows = [
            {"image": url.rsplit("/", 1)[-1].split("?", 1)[0], "caption": caption, "answer": answer}
            for url, caption, answer in zip(list(urls), list(captions), list(answers), strict=True)
        ]
        for row in rows:
            print(f"{row['image']:<20} | {row['caption']:<50} | {QUESTION} {row['answer']}")
        return rows

    report(urls, captions.output, answers.output)
    # --8<-- [end:report]
