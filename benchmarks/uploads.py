"""
Images no URL reaches, uploaded, in the production-shaped deployment of ``benchmarks/scale.py``.

PostgreSQL, LocalExecutor with 8 slots, two triggerers, the Redis budget (the ``blip2_uploads``
connection, at 60 requests a minute), every task ``retries=1``, and the emulator at the API's real
limits and speed (60 requests a minute, 10 in flight, 2 s a prediction, 2 % of the reads answered
5xx) running as a service that reaches no image URL but its own uploaded copies. Two runs, one
after the other:

- ``mapped``: ``--images`` mapped deferrable predictions with ``image_transfer="upload"`` over
  http(s) URLs only the workers reach: each needs at least a presign, a create and a read (3);
- ``batch``: one deferrable batch at its defaults over the same number of images as ``file://``
  paths: each needs at least a presign and a synchronous run (2).

Each prints the numbers of ``benchmarks/scale.py`` against the minimum for those requests (the first
60 at once, then one a second; and the sliding window's least time; the second run starts when the
first one's requests have left the window), with
``predictions_per_minute``, ``requests_per_prediction`` and the emulator's upload counts.
Takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import add_json_argument, write_results
from benchmarks.scale import measure_run
from benchmarks.sync_run import forget_notes
from scripts.production import ProductionSettings, ProductionStack, production_stack

DAG_ID = "system_blip2_production_uploads"
#: The API's rate window: a run starts once the previous one's requests have left it.
RATE_WINDOW_SECONDS = 60.0
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
    _run_id, numbers = measure_run(stack, DAG_ID, conf, count, LEAST_REQUESTS[name] * count)
    ledger = stack.emulator.ledger()
    return {
        "scenario": name,
        **numbers,
        "least_requests_per_prediction": LEAST_REQUESTS[name],
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
    results: list[dict[str, Any]] = []
    try:
        with production_stack(home, ProductionSettings(parallelism=8, triggerers=2)) as stack:
            stack.emulator.config.fetch_only_uploads = True
            for name in ("mapped", "batch"):
                if results:  # the shared budget's window still holds the last run's requests
                    time.sleep(RATE_WINDOW_SECONDS + 1)
                results.append(run_scenario(stack, name, args.images, home))
                print(json.dumps(results[-1]), flush=True)
        write_results(args.json, "uploads", {"images": args.images}, {"runs": results})
    finally:
        shutil.rmtree(home, ignore_errors=True)
        print(json.dumps({"total_s": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
