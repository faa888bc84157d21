"""
Nightly content moderation of the images users uploaded to S3, paying only for what is new.

1. ``moderate``: every image under ``s3://<bucket>/uploads/`` is asked a set of yes/no moderation
   questions by one deferrable batch task (within the API's limits; waiting costs no worker slot).
   The answers land as JSON lines in ``s3://<bucket>/moderation/<ds>/answers.jsonl``. A result
   cache (``s3://<bucket>/moderation/cache.jsonl``, the same every night) keeps every answer: an
   image unchanged since an earlier night (by its S3 ETag) is not predicted again, its cached
   answer is written with ``"cached": true``, so a night pays only for the new and replaced
   uploads. ``max_cost`` stops a misconfigured prefix from spending without limit: the run writes
   what it has, fails naming the cap, and the next run goes on from the cache.
   With ``retries=2``, a try that ends with transient failures (a create the API answered 5xx, a
   timeout, a provider failure) is followed by one that predicts only those again.
2. ``flag``: the answers become flags per image. An answer that is neither yes nor no, or a
   prediction that failed, flags the image for review: nothing unchecked gets published.
3. ``write_report``: the flags are written to ``s3://<bucket>/moderation/<ds>/report.json``, with
   the night's numbers for the dashboards: predictions, answers from the cache, failures by status,
   retried predictions, the cost the API reported and the cost the cache saved.
4. ``quarantine``: flagged images are copied to ``s3://<bucket>/quarantine/`` (keeping their key).
5. ``publish``: only then are the clean images published (here: a manifest of them is written to
   ``s3://<bucket>/published/<ds>/manifest.json``, the hand-off point to the publishing system).

The bucket, the prefix and the cap are run parameters; the AWS connection is ``aws_default``.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import pendulum
from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

# --8<-- [start:questions]
#: Label -> yes/no question. "yes" to any of them flags the image.
MODERATION_QUESTIONS = {
    "nudity": "Does this image contain nudity? Answer yes or no.",
    "violence": "Does this image show violence or blood? Answer yes or no.",
    "weapon": "Is there a weapon in this image? Answer yes or no.",
}
# --8<-- [end:questions]
BASE = "s3://{{ params.bucket }}"

with DAG(
    dag_id="example_blip2_moderation",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "blip2", "moderation"],
    params={
        "bucket": Param("user-uploads", type="string", description="Bucket of the uploads"),
        "uploads": Param("uploads", type="string", description="Prefix of the uploads"),
        "max_cost": Param(5.0, type="number", description="The most one night may spend, in API cost"),
    },
) as dag:
    # --8<-- [start:batch]
    moderate = Blip2BatchPredictionOperator(
        task_id="moderate",
        images=BASE + "/{{ params.uploads }}/",
        questions=MODERATION_QUESTIONS,
        output_uri=BASE + "/moderation/{{ ds }}/answers.jsonl",
        # Every night's answers, kept: an unchanged image with the same question is not paid again.
        cache_uri=BASE + "/moderation/cache.jsonl",
        max_cost="{{ params.max_cost }}",
        # A few images the service cannot read are flagged for review, not a reason to stop.
        max_failed_ratio=0.1,
        # Transient failures (ambiguous creates, timeouts, provider failures) are predicted again
        # by the next try, which keeps every other answer.
        retries=2,
        retry_delay=datetime.timedelta(minutes=5),
        deferrable=True,
        poll_interval=2.0,
        timeout=600,
    )
    # --8<-- [end:batch]

    # --8<-- [start:flag]
    @task
    def flag(summary: dict[str, Any]) -> dict[str, Any]:
        """Turn the answers into flags per image: ``{image: [reasons]}`` for every flagged image."""
        from airflow_provider_blip2.storage import ObjectStorage

        answers = ObjectStorage().read_bytes(summary["output_uri"]).decode().splitlines()
        images: dict[str, list[str]] = {}
        for line in map(json.loads, answers):
            reasons = images.setdefault(line["image"], [])
            verdict = yes_or_no(line["output"]) if line["status"] == "success" else None
            if verdict is None:
                reasons.append(f"{line['label']}: needs review ({line['error'] or line['output']!r})")
            elif verdict:
                reasons.append(line["label"])
        flagged = {image: reasons for image, reasons in images.items() if reasons}
        clean = sorted(image for image, reasons in images.items() if not reasons)
        night = {
            "predictions": summary["total"],
            "statuses": summary.get("statuses", {}),
            "retried": summary.get("retried", 0),
            "cost": summary.get("cost", 0.0),
            "cached": summary.get("cached", 0),
            "cost_saved": summary.get("cost_saved", 0.0),
        }
        print(
            f"Checked {len(images)} images: {len(flagged)} flagged, {len(clean)} clean; "
            f"{night['predictions']} answers ({night['cached']} from the cache, {night['retried']} "
            f"retried) cost {night['cost']:g}, the cache saved {night['cost_saved']:g}"
        )
        return {"flagged": flagged, "clean": clean, "checked": len(images), **night}

    # --8<-- [end:flag]

    @task
    def write_report(
        flags: dict[str, Any], params: dict[str, Any] | None = None, ds: str | None = None
    ) -> str:
        """Write the day's report next to the answers; return its URI."""
        from airflow_provider_blip2.storage import ObjectStorage

        uri = f"s3://{(params or {})['bucket']}/moderation/{ds}/report.json"
        body = json.dumps({"date": ds, **flags}, indent=2).encode()
        ObjectStorage().write_bytes(uri, body, content_type="application/json")
        return uri

    @task
    def quarantine(flags: dict[str, Any], params: dict[str, Any] | None = None) -> list[str]:
        """Copy every flagged image to the quarantine prefix, keeping its key."""
        from airflow_provider_blip2.storage import ObjectStorage

        storage = ObjectStorage()
        bucket = f"s3://{(params or {})['bucket']}/"
        copies = []
        for image in sorted(flags["flagged"]):
            target = f"{bucket}quarantine/{image.removeprefix(bucket)}"
            storage.copy(image, target)
            copies.append(target)
        return copies

    @task
    def publish(
        flags: dict[str, Any],
        quarantined: list[str],
        params: dict[str, Any] | None = None,
        ds: str | None = None,
    ) -> str:
        """Publish the clean images: write the manifest the publishing system picks up."""
        from airflow_provider_blip2.storage import ObjectStorage

        uri = f"s3://{(params or {})['bucket']}/published/{ds}/manifest.json"
        manifest = {"date": ds, "images": flags["clean"], "held_back": len(quarantined)}
        ObjectStorage().write_bytes(
            uri, json.dumps(manifest, indent=2).encode(), content_type="application/json"
        )
        return uri

    # --8<-- [start:wiring]
    flags = flag(moderate.output)
    report = write_report(flags)
    quarantined = quarantine(flags)
    manifest = publish(flags, quarantined)
    report >> manifest
    # --8<-- [end:wiring]


def yes_or_no(answer: str | None) -> bool | None:
    """``True`` for a yes, ``False`` for a no, ``None`` when the answer is neither (or both)."""
    words = set(re.findall(r"[a-z]+", (answer or "").lower()))
    if ("yes" in words) == ("no" in words):
        return None
    return "yes" in words
