"""
Many mapped deferrable predictions and, beside them, one batch, in a production-shaped deployment.

PostgreSQL metadata database, LocalExecutor with 8 slots, two triggerers, a Redis server, and the
emulator at the API's real limits and speed: 60 requests a minute and 10 predictions in flight per
key, 2 s per prediction, no time scaling, ``retry_after`` in the 429's body only, 2 % of the reads
answered 5xx. One DAG run captions ``--tasks`` images with one mapped ``Blip2PredictionOperator``
each (deferrable, ``retries=1``) and, in parallel, ``--batch-images`` images with one deferrable
``Blip2BatchPredictionOperator``. All share one API key, as the tasks of one account do.

Prints one JSON line per run:

- ``wall_s``: the DAG run's duration (start to end, as the scheduler recorded them);
- ``minimum_s``: the least time the API's limits allow for ``P = tasks + batch_images``
  predictions, each needing at least ``2`` requests (a create, and a read once it has ended)::

      minimum = max((2 P - RPM) * 60 / RPM,     # the rate: RPM requests at once, then one per 60/RPM s
                    ceil(P / IN_FLIGHT) * LATENCY,  # the predictions in flight
                    LATENCY)                     # one prediction

  with ``RPM = 60``, ``IN_FLIGHT = 10``, ``LATENCY = 2 s``; for P = 200 that is 340 s, set by the rate;
- ``ratio``: ``wall_s / minimum_s``;
- ``window_minimum_s``, ``window_ratio``: the same for the API's sliding window, in which any 60 s
  hold at most ``RPM`` requests, so that requests ``k`` and ``k + RPM`` are 60 s apart: the last of
  ``2 P`` requests comes ``floor((2 P - 1) / RPM) * 60`` s after the first at the earliest (360 s
  for P = 200, 180 s for P = 100), whatever the client does;
- ``lead_s``, ``requests_span_s``, ``tail_s``: from the run's start to the first request the API
  admitted, from that to the last one (at least ``window_minimum_s``), and from that to the run's end:
  the deployment's start-up, the API-bound part, and the last tasks' resumption;
- ``admitted_window_floor_s``: the least ``requests_span_s`` that the sliding window allows for
  the requests the run really made, ``floor((A - 1) / RPM) * 60`` for ``A`` admitted requests:
  the 302 requests of 200 predictions that needed 300 at least take a window more;
- ``admitted_per_10s``: by endpoint, the requests the API admitted in each 10 s from the run's
  start (where the window went unused);
- ``share_429``: the share of the emulator's responses that were 429;
- ``requests_per_prediction``: the requests the emulator received (429s included) per prediction,
  and ``admitted_requests_per_prediction`` without the 429s (at best 2);
- ``failed_tasks``, ``tries_gt_1``: task instances that did not succeed, and that needed a retry;
  ``batch_failed``: predictions the batch recorded as failed;
- ``max_creates_per_image``, ``creates``, ``images``: creates of the most-created image (1 means no
  duplicate), and all creates against all images.

``--redis`` puts ``"redis_conn_id": "redis_default"`` in the blip2 connection's extra, next to a
``redis_default`` connection to the local Redis (for a provider that shares its request budget there).
``--celery-workers N`` runs the tasks on N Celery workers (CeleryExecutor, their broker that Redis)
instead of LocalExecutor, ``--parallelism`` worker processes among them.
Takes the minimum plus start-up (about a minute) and scheduling overhead: ~8 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.results import add_json_argument, write_results
from scripts.production import SCALE_DAG_ID, ProductionSettings, ProductionStack, production_stack

RPM = 60
IN_FLIGHT = 10
LATENCY = 2.0
REQUESTS_PER_PREDICTION = 2


def minimum_seconds(
    predictions: int,
    rpm: int = RPM,
    in_flight: int = IN_FLIGHT,
    latency: float = LATENCY,
    requests: float | None = None,
) -> float:
    """
    The least time the API's limits allow for a number of predictions (see the module docstring).

    :param predictions: How many predictions.
    :param rpm: Requests per minute allowed.
    :param in_flight: Predictions in flight allowed.
    :param latency: Seconds per prediction.
    :param requests: The requests they need at least; default :data:`REQUESTS_PER_PREDICTION` each
        (one each for synchronous runs).
    """
    needed = REQUESTS_PER_PREDICTION * predictions if requests is None else requests
    rate = max(0.0, needed - rpm) * 60.0 / rpm
    concurrency = math.ceil(predictions / in_flight) * latency
    return max(rate, concurrency, latency)


def window_minimum_seconds(
    predictions: int,
    rpm: int = RPM,
    in_flight: int = IN_FLIGHT,
    latency: float = LATENCY,
    requests: float | None = None,
) -> float:
    """
    The least time for a number of predictions when the rate is a sliding window, as the API's is.

    At most ``rpm`` requests in any 60 s: the requests numbered ``k`` and ``k + rpm`` are at
    least 60 s apart, so the last of ``R = 2 P`` requests comes ``floor((R - 1) / rpm) * 60`` s
    after the first at the earliest, however the requests are spread. :func:`minimum_seconds`
    counts one request a second after the first ``rpm``, which such a window never allows.

    :param predictions: How many predictions.
    :param rpm: Requests allowed in any 60 s.
    :param in_flight: Predictions in flight allowed.
    :param latency: Seconds per prediction.
    :param requests: The requests they need at least (see :func:`minimum_seconds`).
    """
    needed = int(REQUESTS_PER_PREDICTION * predictions if requests is None else requests)
    rate = admitted_window_floor(needed, rpm)
    return max(rate, minimum_seconds(predictions, rpm, in_flight, latency, requests))


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=100, help="mapped deferrable prediction tasks")
    parser.add_argument("--batch-images", type=int, default=100, help="images of the one batch task")
    parser.add_argument("--triggerers", type=int, default=2)
    parser.add_argument("--parallelism", type=int, default=8, help="task instances running at once")
    parser.add_argument(
        "--celery-workers", type=int, default=0, help="run the tasks on Celery workers; 0: LocalExecutor"
    )
    parser.add_argument("--read-fault-rate", type=float, default=0.02, help="share of reads answered 5xx")
    parser.add_argument("--redis", action="store_true", help="name the local Redis in the blip2 connection")
    parser.add_argument("--runs", type=int, default=1, help="runs, one after the other, in one deployment")
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home (logs) afterwards")
    add_json_argument(parser)
    return parser.parse_args()


def run_once(
    stack: ProductionStack,
    args: argparse.Namespace,
    number: int,
    home: Path,
    *,
    batch_requests_per_prediction: int = REQUESTS_PER_PREDICTION,
    rpm: int = RPM,
    latency: float = LATENCY,
) -> dict[str, Any]:
    """
    One DAG run; return its numbers.

    :param stack: The running deployment.
    :param args: The command line (``tasks``, ``batch_images``, ``triggerers``, ``parallelism``,
        ``redis``, ``celery_workers``).
    :param number: The run's number, naming its images.
    :param home: Where the batch writes its output.
    :param batch_requests_per_prediction: The least requests a batch prediction needs, for the
        minimum: 2 (create and poll), or 1 when the API offers the synchronous run.
    :param rpm: The API's requests a minute, for the minimum.
    :param latency: The API's seconds a prediction, for the minimum.
    """
    stack.emulator.reset()
    tasks = stack.images(f"task{number}", args.tasks)
    batch = stack.images(f"batch{number}", args.batch_images)
    conf = {"images": tasks, "batch_images": batch, "output_uri": str(home / f"batch-{number}.jsonl")}
    least = REQUESTS_PER_PREDICTION * len(tasks) + batch_requests_per_prediction * len(batch)
    run_id, numbers = measure_run(
        stack, SCALE_DAG_ID, conf, len(tasks) + len(batch), least, rpm=rpm, latency=latency
    )
    summary = stack.deployment.run_summary(SCALE_DAG_ID, run_id)
    ledger = stack.emulator.ledger()
    creates = stack.creates_per_image(tasks + batch)
    return {
        "tasks": len(tasks),
        "batch_images": len(batch),
        "triggerers": args.triggerers,
        "parallelism": args.parallelism,
        "redis": args.redis,
        "executor": "CeleryExecutor" if args.celery_workers else "LocalExecutor",
        **numbers,
        "admitted_requests_per_prediction": round(
            (numbers["requests"] - ledger["responses_429"]) / numbers["images"], 2
        ),
        "responses_5xx_injected": ledger["responses_5xx_injected"],
        # A mapped task over no images is skipped, not failed.
        "failed_tasks": sum(n for name, n in summary.states.items() if name in ("failed", "upstream_failed")),
        "tries_gt_1": len(summary.retried),
        "retried": summary.retried[:10],
        "batch_failed": batch_failures(stack, run_id),
        "max_creates_per_image": max(creates.values(), default=0),
        "creates": ledger["creates"],
    }


def measure_run(
    stack: ProductionStack,
    dag_id: str,
    conf: dict[str, Any],
    predictions: int,
    least_requests: int,
    *,
    rpm: int = RPM,
    latency: float = LATENCY,
) -> tuple[str, dict[str, Any]]:
    """
    Trigger one DAG run, wait for it, and measure it against the minimum its requests allow.

    Returns the run's id and its numbers: ``run`` (its state), ``wall_s``, ``minimum_s``,
    ``ratio``, ``window_minimum_s``, ``window_ratio``, where the time went (:func:`request_span`),
    ``predictions_per_minute``, ``requests``, ``requests_per_prediction``, ``share_429`` and
    ``images`` (the predictions).

    :param stack: The running deployment, its emulator's ledger reset for this run.
    :param dag_id: The DAG.
    :param conf: The run's conf.
    :param predictions: How many predictions the run makes.
    :param least_requests: The fewest requests they need.
    :param rpm: The API's requests a minute.
    :param latency: The API's seconds a prediction.
    """
    minimum = minimum_seconds(predictions, rpm, latency=latency, requests=least_requests)
    window_minimum = window_minimum_seconds(predictions, rpm, latency=latency, requests=least_requests)
    run_id = stack.deployment.trigger(dag_id, conf)
    state = stack.deployment.wait_for_run(dag_id, run_id, timeout=3 * minimum + 900)
    run = stack.deployment.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
    run_start = datetime.fromisoformat(run["start_date"]).timestamp()
    run_end = datetime.fromisoformat(run["end_date"]).timestamp()
    wall = run_end - run_start
    ledger = stack.emulator.ledger()
    responses = sum(ledger["responses_by_status"].values())
    requests = sum(ledger["requests"].values())
    return run_id, {
        "run": state,
        "wall_s": round(wall, 1),
        "minimum_s": round(minimum, 1),
        "ratio": round(wall / minimum, 2),
        "window_minimum_s": round(window_minimum, 1),
        "window_ratio": round(wall / window_minimum, 2),
        **request_span(ledger, run_start, run_end),
        "predictions_per_minute": round(predictions / wall * 60, 1),
        "requests": requests,
        "requests_per_prediction": round(requests / predictions, 2),
        "share_429": round(ledger["responses_429"] / responses, 3) if responses else 0.0,
        "admitted_window_floor_s": admitted_window_floor(requests - ledger["responses_429"], rpm),
        "images": predictions,
    }


def admitted_window_floor(admitted: int, rpm: int = RPM) -> float:
    """
    The shortest span the sliding window allows between the first and the last of the requests the
    API admitted: what ``requests_span_s`` is at best for the requests the run really made (one
    request past a multiple of ``rpm`` costs a whole window).

    :param admitted: The requests the API admitted.
    :param rpm: Requests allowed in any 60 s.
    """
    return (admitted - 1) // rpm * 60.0 if admitted else 0.0


def request_span(ledger: dict[str, Any], run_start: float, run_end: float) -> dict[str, float | None]:
    """
    Where the run's time went: before the first admitted request, between it and the last, after.

    :param ledger: The emulator's ledger after the run.
    :param run_start: The DAG run's start, Unix time.
    :param run_end: The DAG run's end, Unix time.
    """
    first, last = ledger.get("first_admitted_at"), ledger.get("last_admitted_at")
    if first is None or last is None:
        return {"lead_s": None, "requests_span_s": None, "tail_s": None}
    return {
        "lead_s": round(first - run_start, 1),
        "requests_span_s": round(last - first, 1),
        "tail_s": round(run_end - last, 1),
        "admitted_per_10s": admitted_per_bucket(ledger.get("admitted", []), run_start, 10.0),
    }


def admitted_per_bucket(admitted: list[list[Any]], run_start: float, bucket: float) -> dict[str, list[int]]:
    """
    The requests the API admitted in each ``bucket`` seconds from the run's start, by endpoint.

    :param admitted: The ledger's ``[unix_time, endpoint]`` pairs.
    :param run_start: The DAG run's start, Unix time.
    :param bucket: Seconds a count covers.
    """
    placed = [(max(0, int((at - run_start) // bucket)), endpoint) for at, endpoint in admitted]
    size = 1 + max((index for index, _ in placed), default=-1)
    counts: dict[str, list[int]] = {}
    for index, endpoint in placed:
        counts.setdefault(endpoint, [0] * size)[index] += 1
    return counts


def batch_failures(stack: ProductionStack, run_id: str) -> int | None:
    """Predictions the batch recorded as failed (its summary XCom), or None without a summary."""
    path = f"/dags/{SCALE_DAG_ID}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
    try:
        return int(stack.deployment.api("GET", path)["value"]["failed"])
    except (httpx.HTTPStatusError, KeyError, TypeError, ValueError):
        return None


def main() -> None:
    """Start the deployment, run the DAG ``--runs`` times and print one JSON line per run."""
    args = parse_args()
    home = Path(tempfile.mkdtemp(prefix="blip2-scale-bench-"))
    settings = ProductionSettings(
        parallelism=args.parallelism,
        triggerers=args.triggerers,
        read_fault_rate=args.read_fault_rate,
        redis_in_connection=args.redis,
        celery_workers=args.celery_workers,
    )
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    try:
        with production_stack(home, settings) as stack:
            for number in range(args.runs):
                runs.append(run_once(stack, args, number, home))
                print(json.dumps(runs[-1]), flush=True)
        parameters = {name: value for name, value in vars(args).items() if name not in ("keep", "json")}
        write_results(args.json, "scale", parameters, {"runs": runs})
    finally:
        kept = args.keep
        if not kept:
            shutil.rmtree(home, ignore_errors=True)
        print(
            json.dumps({"total_s": round(time.monotonic() - started, 1), "home": str(home) if kept else None})
        )


if __name__ == "__main__":
    main()
