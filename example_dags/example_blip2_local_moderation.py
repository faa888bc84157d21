"""
Moderation of images that no URL reaches: files on the worker's disk, uploaded for the model.

1. ``moderate``: every image in the folder ``params.folder`` (a path on the worker, listed
   recursively) is asked the moderation questions by one deferrable batch task. The files are
   uploaded through the API's upload endpoint (``image_transfer="auto"`` uploads local paths), kept
   by the service only as long as the prediction needs; the answers land as JSON lines in
   ``params.output``.
2. ``flag``: the answers become flags per image, as in ``example_blip2_moderation``.

By default the folder is this project's sample images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

#: Label -> yes/no question. "yes" to any of them flags the image.
QUESTIONS = {
    "nudity": "Does this image contain nudity? Answer yes or no.",
    "violence": "Does this image show violence or blood? Answer yes or no.",
    "weapon": "Is there a weapon in this image? Answer yes or no.",
}
SAMPLES = str(Path(__file__).resolve().parent / "data")

with DAG(
    dag_id="example_blip2_local_moderation",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "blip2", "moderation", "upload"],
    params={
        "folder": Param(SAMPLES, type="string", description="Folder of images on the worker"),
        "output": Param("/tmp/blip2-local-moderation.jsonl", type="string", description="Answers file"),
    },
) as dag:
    # --8<-- [start:batch]
    moderate = Blip2BatchPredictionOperator(
        task_id="moderate",
        images="{{ params.folder }}",
        questions=QUESTIONS,
        output_uri="{{ params.output }}",
        image_transfer="auto",  # local files are uploaded; URLs would be sent as they are
        deferrable=True,
        timeout=600,
    )
    # --8<-- [end:batch]

    @task
    def flag(summary: dict[str, Any]) -> dict[str, Any]:
        """Turn the answers into flags per image: ``{image: [reasons]}`` for every flagged one."""
        lines = Path(summary["output_uri"]).read_text(encoding="utf-8").splitlines()
        flagged: dict[str, list[str]] = {}
        for line in map(json.loads, lines):
            answer = (line["output"] or "").lower()
            if line["status"] != "success" or "yes" in answer:
                flagged.setdefault(Path(line["image"]).name, []).append(line["label"])
        print(f"Checked {summary['images']} local images: {len(flagged)} flagged")
        return {"flagged": flagged, "checked": summary["images"], "predictions": summary["total"]}

    flag(moderate.output)
