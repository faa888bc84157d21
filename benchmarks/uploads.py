"""
Images no URL reaches, uploaded, in the production-shaped deployment of ``benchmarks/scale.py``.

PostgreSQL, LocalExecutor with 8 slots, two triggerers, the Redis budget (the ``blip2_shared``
connection), every task ``retries=1``, and the emulator at the API's real limits and speed
(60 requests a minute, 10 in flight, 2 s a prediction, 2 % of the reads answered 5xx) running as a
service that reaches no image URL but its own uploaded copies. Two runs, one after the other:

- ``mapped``: ``--images`` mapped deferrable predictions with ``image_transfer="upload"`` over
  http(s) URLs only the workers reach: each needs at least a presign, a create and a read (3);
- ``batch``: one deferrable batch at its defaults over the same number of images as ``file://``
  paths: each needs at least a presign and a synchronous run (2).

Each prints the numbers of ``benchmarks/scale.py`` against the minimum for those requests (the first
60 at once, then one a second; and the sliding window's least time), with
``predictions_per_minute``, ``requests_per_prediction`` and the emulator's upload counts.
Takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.results import add_json_argument, write_results
from benchmarks.scale import minimum_seconds, request_span, window_minimum_seconds
from benchmarks.sync_run import forget_notes
from scripts.production import ProductionSettings, ProductionStack, production_stack

DAG_ID = "system_blip2_production_uploads"
#: The least requests a prediction needs: presign + create + read, or presign + run.
LEAST_REQUESTS = {"mapped": 3, "batch": 2}


def run_scenario(stack: ProductionStack, name: str, count: int, home: Path) -> dict[str, Any]:
    """
    One run of the uploads DAG: ``count`` mapped uploads, or a ``count``-image batch of files.

    :param stack: The deployment.
    :param name: ``mapped`` or ``batch``.
    :param count: How many images.
    :param home: Where the batch writes its output.
    """
    stack.emulator.reset()
    forget_notes(stack)
    urls = stack.images(f"upload-{name}", count)
    files = [f"file://{stack.images_dir / url.rsplit('/', 1)[1]}" for url in urls]
    conf = {
        "images": urls if name == "mapped" else [],
        "batch_images": files if name == "batch" else [],
        "output_uri": str(home / f"{name}.jsonl"),
    }
    least = LEAST_REQUESTS[name] * count
    minimum, window_minimum = (
        minimum_seconds(count, requests=least),
        window_minimum_seconds(count, requests=least),
    )
    run_id = stack.deployment.trigger(DAG_ID, conf)
    state = stack.deployment.wait_for_run(DAG_ID, run_id, timeout=3 * minimum + 900)
    run = stack.deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
    start = datetime.fromisoformat(run["start_date"]).timestamp()
    end = datetime.fromisoformat(run["end_date"]).timestamp()
    wall = end - start
    ledger = stack.emulator.ledger()
    requests = sum(ledger["requests"].values())
    responses = sum(ledger["responses_by_status"].values())
    return {
        "scenario": name,
        "images": count,
        "run": state,
        "wall_s": round(wall, 1),
        "minimum_s": round(minimum, 1),
        "ratio": round(wall / minimum, 2),
        "window_minimum_s": round(window_minimum, 1),
        "window_ratio": round(wall / window_minimum, 2),
        **request_span(ledger, start, end),
        "predictions_per_minute": round(count / wall * 60, 1),
        "requests": requests,
        "requests_per_prediction": round(requests / count, 2),
        "least_requests_per_prediction": LEAST_REQUESTS[name],
        "share_429": round(ledger["responses_429"] / responses, 3) if responses else 0.0,
        "creates": ledger["creates"],
        "uploads": ledger["uploads"],
        "requests_by_endpoint": ledger["requests"],
    }


def main() -> None:
    """Start the deployment, run both scenarios and print one JSON line each."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=40)
    add_json_argument(parser)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="blip2-uploads-bench-"))
    started = time.monotonic()
    results = []
    try:
        with production_stack(home, ProductionSettings(parallelism=8, triggerers=2)) as stack:
            stack.emulator.config.fetch_only_uploads = True
            for name in ("mapped", "batch"):
                results.append(run_scenario(stack, name, args.images, home))
                print(json.dumps(results[-1]), flush=True)
        write_results(args.json, "uploads", {"images": args.images}, {"runs": results})
    finally:
        shutil.rmtree(home, ignore_errors=True)
        print(json.dumps({"total_s": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
