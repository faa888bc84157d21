"""
Nightly runs of one batch over an unchanged S3 prefix with a result cache (``cache_uri``).

N images (1,000 by default) are put in a local S3 (moto) and captioned by one deferrable batch task
over their prefix, in a real ``airflow dags test`` per night, with one ``cache_uri`` on S3 for every
night and a new ``output_uri`` per night. The emulator enforces the API's limits (60 requests a
minute, 10 predictions in flight, about 2 s a prediction) with its time scaled so that the first
night takes about a minute; the connection's budget equals those limits. Three nights:

- ``first``: an empty cache: every image is predicted (one synchronous run each);
- ``unchanged``: the same images again: every answer from the cache;
- ``changed``: ``--changed`` of them replaced by new content: only those are predicted.

Prints, per night, the creates and API requests the emulator saw, the task's wall time (the whole
``dags test``: besides the API, a HEAD per image for its ETag, and the cache's read and write) and
the batch's own elapsed time, and the cache's size per item.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from benchmarks.batch import API_KEY, time_scaled_connection
from benchmarks.budget import LATENCY
from benchmarks.results import add_json_argument, write_results
from scripts.sandbox import AirflowSandbox
from scripts.storage_servers import LocalS3, local_s3

IMAGES = Path(__file__).resolve().parent.parent / "example_dags" / "data"
BUCKET = "bench"
DAG_ID = "bench_cache"
CACHE_KEY = "cache/captions.jsonl"
#: The nights, each with its logical date.
NIGHTS = {"first": "2026-12-01", "unchanged": "2026-12-02", "changed": "2026-12-03"}

DAG_FILE = """
import pendulum
from airflow.providers.common.compat.sdk import DAG
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

with DAG(
    dag_id="{dag_id}",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    Blip2BatchPredictionOperator(
        task_id="batch",
        images="s3://{bucket}/images/",
        caption=True,
        output_uri="s3://{bucket}/out/{{{{ run_id }}}}.jsonl",
        cache_uri="s3://{bucket}/{cache_key}",
        deferrable=True,
        timeout=600,
    )
"""


def put_images(s3: LocalS3, count: int, *, salt: str = "") -> None:
    """
    Put ``count`` numbered images under ``images/``; a ``salt`` makes each one's content new.

    :param s3: The local S3.
    :param count: How many (the first ``count`` numbers).
    :param salt: Bytes appended after the image's end, which decoders ignore and the ETag does not.
    """
    names = sorted(p.name for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png", ".webp"})
    for i in range(count):
        name = names[i % len(names)]
        s3.put_object(BUCKET, f"images/{i:05d}-{name}", (IMAGES / name).read_bytes() + salt.encode())


def run_night(
    sandbox: AirflowSandbox, api: EmulatorServer, s3: LocalS3, night: str, images: int
) -> dict[str, Any]:
    """
    One night's ``dags test`` of the batch; its numbers.

    :param sandbox: The Airflow home (one for every night).
    :param api: The emulator (its ledger counts since the previous night).
    :param s3: The local S3, which holds the cache.
    :param night: The night's name.
    :param images: How many images the prefix holds.
    """
    before = api.ledger()
    started = time.monotonic()
    sandbox.dags_test(DAG_ID, logical_date=NIGHTS[night])
    wall = time.monotonic() - started
    after = api.ledger()
    states = sandbox.task_states(DAG_ID)
    (summary,) = sandbox.xcom(DAG_ID, "batch")
    cache = s3.client().get_object(Bucket=BUCKET, Key=CACHE_KEY)["Body"].read()
    entries = len(cache.splitlines()) - 1  # the header line
    requests = {
        name: after["requests"].get(name, 0) - before["requests"].get(name, 0) for name in after["requests"]
    }
    return {
        "night": night,
        "state": sorted(set(states.values())),
        "images": images,
        "creates": after["creates"] - before["creates"],
        "api_requests": sum(requests.values()),
        "api_requests_by_endpoint": {name: count for name, count in requests.items() if count},
        "responses_429": after["responses_429"] - before["responses_429"],
        "cached": summary["cached"],
        "succeeded": summary["succeeded"],
        "cost": summary["cost"],
        "cost_saved": summary["cost_saved"],
        "task_wall_s": round(wall, 2),
        "batch_elapsed_s": round(summary["elapsed"], 2),
        "cache_bytes": len(cache),
        "cache_entries": entries,
        "cache_bytes_per_item": round(len(cache) / max(1, entries), 1),
    }


def main() -> None:
    """Run the three nights and print one JSON line each, then the ratios."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--changed", type=int, default=50)
    parser.add_argument("--time-scale", type=float, default=0.05)
    add_json_argument(parser)
    args = parser.parse_args()
    scale = args.time_scale
    nights: list[dict[str, Any]] = []
    config = EmulatorConfig(api_keys=(API_KEY,), latency=LATENCY, time_scale=scale, seed=7)
    with (
        local_s3() as s3,
        EmulatorServer(config) as api,
        tempfile.TemporaryDirectory(prefix="blip2-bench-") as tmp,
    ):
        s3.create_bucket(BUCKET)
        put_images(s3, args.images)
        dags = Path(tmp) / "dags"
        dags.mkdir()
        (dags / "bench_cache.py").write_text(
            DAG_FILE.format(dag_id=DAG_ID, bucket=BUCKET, cache_key=CACHE_KEY)
        )
        blip2 = time_scaled_connection(api.url, scale)
        sandbox = AirflowSandbox(
            Path(tmp) / "home",
            dags_folder=dags,
            connections={"blip2_default": blip2, "aws_default": s3.connection()},
        )
        sandbox.migrate()
        for night in NIGHTS:
            if night == "changed":
                put_images(s3, args.changed, salt="replaced")
            nights.append(run_night(sandbox, api, s3, night, args.images))
            print(json.dumps(nights[-1]), flush=True)
    first, unchanged, changed = nights
    ratios = {
        "unchanged_wall_vs_first": round(unchanged["task_wall_s"] / first["task_wall_s"], 3),
        "changed_wall_vs_first": round(changed["task_wall_s"] / first["task_wall_s"], 3),
        "unchanged_requests_per_image": round(unchanged["api_requests"] / args.images, 4),
    }
    print(json.dumps(ratios))
    write_results(
        args.json,
        "cache",
        {"images": args.images, "changed": args.changed, "time_scale": scale, "latency_s": LATENCY},
        {"nights": nights, "ratios": ratios},
    )


if __name__ == "__main__":
    main()
