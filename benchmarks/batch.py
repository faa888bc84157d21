"""
A batch of images captioned by ``Blip2BatchPredictionOperator`` against the API's default limits.

N images are uploaded to a local S3 (moto) and captioned by one batch task over their prefix, in a
real ``airflow dags test`` (deferrable: the trigger runs inline between worker cycles; and on the
worker). The emulator enforces the API's limits (60 requests per minute counting every request, 10
predictions in flight, about 2 s per prediction) with its time scaled so the run takes seconds; the
connection's budget equals those limits. Prints the batch's own elapsed time against the minimum the
limits allow, with creates, 429s, requests and failures from the emulator's ledger, once on a clean
API and twice with faults injected (5xx, 429, slow answers and dropped connections): without task
retries, and with ``retries=2`` and the default ``max_failed_ratio=0``, where the retries predict
again what the faults made fail (ambiguous creates) and keep every other result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer
from benchmarks.budget import LATENCY, LIMIT_IN_FLIGHT, LIMIT_RPM, minimum_seconds
from benchmarks.results import add_json_argument, write_results
from scripts.sandbox import AirflowSandbox
from scripts.storage_servers import local_s3

IMAGES = Path(__file__).resolve().parent.parent / "example_dags" / "data"
API_KEY = "bench-key"
BUCKET = "bench"
FAULTS = {"fault_5xx": 0.05, "fault_429": 0.05, "fault_slow": 0.05, "fault_drop": 0.01}

DAG_FILE = """
import datetime

import pendulum
from airflow.providers.common.compat.sdk import DAG
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

for name, deferrable, retries, max_failed_ratio in (
    ("deferrable", True, 0, 0.2),
    ("worker", False, 0, 0.2),
    ("retries", True, 2, 0.0),
):
    with DAG(
        dag_id="bench_batch_" + name,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
    ):
        Blip2BatchPredictionOperator(
            task_id="batch",
            images="s3://{bucket}/images/",
            caption=True,
            output_uri="s3://{bucket}/out/{{{{ run_id }}}}.jsonl",
            deferrable=deferrable,
            defer_after=0,  # defer after every round: time-scaled predictions end within any wait
            poll_interval={poll_interval},
            max_failed_ratio=max_failed_ratio,
            retries=retries,
            retry_delay=datetime.timedelta(0),
        )
"""
#: What the batch logs for each create that failed after it was sent.
AMBIGUOUS_CREATE = "create prediction failed after the request was sent"


def time_scaled_connection(url: str, scale: float) -> dict[str, Any]:
    """
    The ``blip2`` connection to a time-scaled emulator: a budget of the API's limits, its minute scaled.

    :param url: The emulator's base URL.
    :param scale: The emulator's time scale.
    """
    extra = {
        "requests_per_minute": LIMIT_RPM,
        "max_concurrency": LIMIT_IN_FLIGHT,
        "rate_window": 60.0 * scale,
    }
    return {"conn_type": "blip2", "host": url, "password": API_KEY, "extra": extra}


def run_scenario(
    home: Path, dags: Path, s3_connection: dict[str, Any], dag_id: str, faults: dict[str, float], scale: float
) -> dict[str, Any]:
    """Run one batch DAG against a fresh emulator; return its summary and the emulator's ledger."""
    config = EmulatorConfig(api_keys=(API_KEY,), latency=LATENCY, time_scale=scale, seed=7)
    for name, probability in faults.items():
        setattr(config, name, probability)
    with EmulatorServer(config) as api:
        blip2 = time_scaled_connection(api.url, scale)
        sandbox = AirflowSandbox(
            home, dags_folder=dags, connections={"blip2_default": blip2, "aws_default": s3_connection}
        )
        sandbox.migrate()
        result = sandbox.dags_test(dag_id)
        (summary,) = sandbox.xcom(dag_id, "batch")
        [(tries,)] = sandbox._query(
            "SELECT try_number FROM task_instance WHERE dag_id = ? AND run_id = ("
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)",
            (dag_id, dag_id),
        )
        return {
            "summary": summary,
            "ledger": api.ledger(),
            "tries": tries,
            "ambiguous": (result.stdout + result.stderr).count(AMBIGUOUS_CREATE),
        }


def main() -> None:
    """Run the scenarios and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--time-scale", type=float, default=0.05)
    add_json_argument(parser)
    args = parser.parse_args()
    scale = args.time_scale
    names = sorted(p.name for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png", ".webp"})
    floor = minimum_seconds(args.images, 60.0 * scale, LATENCY * scale)
    print(
        f"{args.images} images under one S3 prefix, captioned by one batch task in `airflow dags test`; "
        f"limits {LIMIT_RPM} req/min, {LIMIT_IN_FLIGHT} in flight, {LATENCY:g} s each; "
        f"time scale {scale:g} (minute = {60 * scale:g} s)"
    )
    print(f"minimum the limits allow: {floor:.2f} s (a create and a read per prediction)")
    measured: list[dict[str, Any]] = []
    with local_s3() as s3, tempfile.TemporaryDirectory(prefix="blip2-bench-") as tmp:
        s3.create_bucket(BUCKET)
        for i in range(args.images):
            name = names[i % len(names)]
            s3.put_object(BUCKET, f"images/{i:05d}-{name}", (IMAGES / name).read_bytes())
        dags = Path(tmp) / "dags"
        dags.mkdir()
        (dags / "bench_batch.py").write_text(DAG_FILE.format(bucket=BUCKET, poll_interval=LATENCY * scale))
        home = Path(tmp) / "home"
        for dag_id, faults in [
            ("bench_batch_deferrable", {}),
            ("bench_batch_worker", {}),
            ("bench_batch_deferrable", FAULTS),
            ("bench_batch_retries", FAULTS),
        ]:
            result = run_scenario(home, dags, s3.connection(), dag_id, faults, scale)
            summary, ledger = result["summary"], result["ledger"]
            label = f"{dag_id.removeprefix('bench_batch_')}{' + faults' if faults else ''}"
            elapsed = summary["elapsed"]
            print(
                f"{label:<20} elapsed {elapsed:6.2f} s = {elapsed / floor:4.2f}x minimum"
                f" | creates {ledger['creates']} | 429s {ledger['responses_429']}"
                f" | requests {sum(ledger['requests'].values())} | succeeded {summary['succeeded']}"
                f" | failed {summary['failed']} | peak in flight {ledger['peak_in_flight']}"
                + (
                    f" | injected: 5xx {ledger['responses_5xx_injected']}, drops {ledger['drops_injected']}"
                    if faults
                    else ""
                )
            )
            if dag_id == "bench_batch_retries":
                items = summary["total"]
                print(
                    f"{'':<20} retries=2: {summary['succeeded']} of {items} predictions succeeded in "
                    f"{result['tries']} tries | creates {ledger['creates']} against {items} items + "
                    f"{result['ambiguous']} ambiguous = {items + result['ambiguous']} | attempts "
                    f"{summary['attempts']}, {summary['retried']} items retried | elapsed {elapsed:.2f} s "
                    f"against the minimum {floor:.2f} s ({elapsed / floor:.2f}x) | cost {summary['cost']:g}"
                )
            measured.append(
                {
                    "label": label,
                    "deferrable": dag_id.endswith("deferrable"),
                    "faults": faults,
                    "elapsed_s": round(elapsed, 3),
                    "ratio": round(elapsed / floor, 3),
                    "creates": ledger["creates"],
                    "responses_429": ledger["responses_429"],
                    "requests": sum(ledger["requests"].values()),
                    "succeeded": summary["succeeded"],
                    "failed": summary["failed"],
                    "peak_in_flight": ledger["peak_in_flight"],
                    "responses_5xx_injected": ledger["responses_5xx_injected"],
                    "drops_injected": ledger["drops_injected"],
                    "tries": result["tries"],
                    "ambiguous_creates": result["ambiguous"],
                    "attempts": summary.get("attempts"),
                    "cost": summary.get("cost"),
                }
            )
    print(f"faults: {json.dumps(FAULTS)}")
    write_results(
        args.json,
        "batch",
        {
            "images": args.images,
            "time_scale": scale,
            "limit_requests_per_minute": LIMIT_RPM,
            "limit_in_flight": LIMIT_IN_FLIGHT,
            "latency_s": LATENCY,
        },
        {"minimum_s": round(floor, 3), "scenarios": measured},
    )


if __name__ == "__main__":
    main()
