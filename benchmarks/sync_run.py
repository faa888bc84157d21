"""
The synchronous run in a production-shaped deployment, offered by the API and refused.

The deployment of ``benchmarks/scale.py`` (PostgreSQL, LocalExecutor with 8 slots, two
triggerers, a Redis budget named by the blip2 connection, every task ``retries=1``) against the
emulator at the API's real limits and speed (60 requests a minute, 10 in flight, 2 s a
prediction, 2 % of the reads answered 5xx). Four scenarios, one after the other in the same
deployment, each starting with an empty ledger and an empty request budget, and with nothing
remembered in Redis (neither whether the model offers the synchronous run, nor the learned timing
of first reads, nor the rate limit's shape):

- ``batch``: one deferrable 200-image batch at its defaults, alone;
- ``mixed``: 100 mapped deferrable predictions beside a deferrable 100-image batch;

each once with the emulator offering ``/v1/prediction/run`` (``offered``) and once answering it
400 (``refused``), and each against the emulator's rate limit counted in a sliding window and in a
token bucket (``--rate-limit``; the connection's ``rate_limit_shape`` stays ``auto``, so every
scenario starts with one probe past a full window). Every line holds the numbers of
``benchmarks/scale.py`` (wall time against the minimum, requests a prediction, 429 share,
failures, duplicates) with the minimum counting one request a batch prediction when offered and
two when refused (mapped predictions always two; the first 60 requests at once), and:

- ``predictions_per_minute``: predictions over the DAG run's wall time;
- ``api_predictions_per_minute``: predictions over the span between the first and the last
  request the API admitted (the sustained rate, without the deployment's start-up and tail);
- ``rate_limit``: the emulator's limiter; ``shape_learnt``: what the deployment noted of it;
- ``runs``, ``refused_runs``, ``runs_429``: synchronous runs that created a prediction, those the
  API refused (400), and those it answered 429;
- ``mapped_requests_per_prediction`` (``mixed``, ``offered``): the creates and reads (429s
  included) per mapped prediction: with the batch running synchronously, every create and read
  is a mapped task's.

``--latency``, ``--latency-spread`` (each prediction's latency drawn from a range around it, so
the first reads cannot count on one duration) and ``--requests-per-minute`` (the emulator's limit,
which the connection's budget follows) vary the API the deployment meets; the minimum follows them.

Takes about 25 minutes for each limiter at the defaults.
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
from benchmarks.scale import run_once
from scripts.production import ProductionSettings, ProductionStack, production_stack

SCENARIOS: dict[str, tuple[int, int]] = {"batch": (0, 200), "mixed": (100, 100)}


def forget_notes(stack: ProductionStack) -> None:
    """Delete what the deployment's processes remember in Redis (the synchronous run, first reads)."""
    import redis

    client = redis.Redis(port=stack.redis.port)
    for key in client.scan_iter("blip2:budget:*:notes:*"):
        client.delete(key)
    client.close()


def empty_request_windows(stack: ProductionStack) -> None:
    """
    Start the deployment's request budget afresh, as the emulator's reset starts its limiter.

    The windows, buckets, send times and probe of the previous scenario's requests would otherwise
    hold the next one back while the emulator, reset, would admit it.
    """
    import redis

    client = redis.Redis(port=stack.redis.port)
    for pattern in ("requests", "bucket", "sent", "probe"):
        for key in client.scan_iter(f"blip2:budget:*:{pattern}"):
            client.delete(key)
    client.close()


def shape_learnt(stack: ProductionStack) -> str | None:
    """What the deployment noted of the rate limit's shape, if anything."""
    return next(iter(stack.rate_limit_lessons()), None)


def run_scenario(
    stack: ProductionStack,
    name: str,
    offered: bool,
    number: int,
    home: Path,
    rate_limit: str = "window",
    settings: ProductionSettings | None = None,
) -> dict[str, Any]:
    """
    One scenario in the running deployment; its numbers.

    :param stack: The deployment.
    :param name: ``batch`` or ``mixed``.
    :param offered: Whether the emulator offers the synchronous run.
    :param number: Names the scenario's images (distinct in the ledger).
    :param home: Where the batch writes its output.
    :param rate_limit: The emulator's limiter: ``window``, ``bucket`` or ``fixed``.
    :param settings: The deployment's settings (the emulator's limits and latency, for the minimum).
    """
    settings = settings or ProductionSettings()
    tasks, batch_images = SCENARIOS[name]
    forget_notes(stack)
    empty_request_windows(stack)
    stack.emulator.config.sync_run = offered
    stack.emulator.config.rate_limit = rate_limit
    args = argparse.Namespace(
        tasks=tasks, batch_images=batch_images, triggerers=2, parallelism=8, redis=True, celery_workers=0
    )
    result = run_once(
        stack,
        args,
        number,
        home,
        batch_requests_per_prediction=1 if offered else 2,
        rpm=settings.requests_per_minute,
        latency=settings.latency,
    )
    ledger = stack.emulator.ledger()
    admitted_runs = sum(1 for _, label in ledger["admitted"] if label == "run")
    predictions = tasks + batch_images
    span = result.get("requests_span_s") or 0.0
    result.update(
        {
            "scenario": name,
            "sync_run": "offered" if offered else "refused",
            "rate_limit": rate_limit,
            "shape_learnt": shape_learnt(stack),
            "api_predictions_per_minute": round(predictions / span * 60, 1) if span else None,
            "runs": ledger.get("runs", 0),
            "refused_runs": admitted_runs - ledger.get("runs", 0),
            "runs_429": ledger["requests"].get("run", 0) - admitted_runs,
        }
    )
    if offered and tasks:
        mapped = ledger["requests"].get("create", 0) + ledger["requests"].get("get", 0)
        result["mapped_requests_per_prediction"] = round(mapped / tasks, 2)
    return result


def main() -> None:
    """Start the deployment, run the four scenarios and print one JSON line each."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="batch,mixed", help="comma-separated: batch, mixed")
    parser.add_argument(
        "--sync-run",
        default="offered,refused",
        help="comma-separated: offered, refused (the emulator's answer)",
    )
    parser.add_argument(
        "--rate-limit",
        default="window,bucket",
        help="comma-separated: window, bucket, fixed (how the emulator counts its requests per minute)",
    )
    parser.add_argument("--latency", type=float, default=2.0, help="seconds per prediction in the emulator")
    parser.add_argument(
        "--latency-spread",
        type=float,
        default=0.0,
        help="each prediction's latency drawn from latency * [1 - S, 1 + S] (default 0: all alike)",
    )
    parser.add_argument(
        "--requests-per-minute", type=int, default=60, help="the emulator's limit, and the connection's"
    )
    add_json_argument(parser)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="blip2-sync-run-bench-"))
    settings = ProductionSettings(
        parallelism=8,
        triggerers=2,
        redis_in_connection=True,
        latency=args.latency,
        latency_spread=args.latency_spread,
        requests_per_minute=args.requests_per_minute,
    )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        with production_stack(home, settings) as stack:
            number = 0
            for rate_limit in args.rate_limit.split(","):
                for name in args.scenarios.split(","):
                    for offered in [answer == "offered" for answer in args.sync_run.split(",")]:
                        results.append(run_scenario(stack, name, offered, number, home, rate_limit, settings))
                        print(json.dumps(results[-1]), flush=True)
                        number += 1
        parameters = {
            "scenarios": args.scenarios,
            "sync_run": args.sync_run,
            "rate_limit": args.rate_limit,
            "latency": args.latency,
            "latency_spread": args.latency_spread,
            "requests_per_minute": args.requests_per_minute,
        }
        write_results(args.json, "sync_run", parameters, {"runs": results})
    finally:
        shutil.rmtree(home, ignore_errors=True)
        print(json.dumps({"total_s": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
