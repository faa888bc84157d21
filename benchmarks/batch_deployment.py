"""
A deferrable batch in a real Airflow deployment, at the API's real limits and speed.

Starts an API server, a scheduler (LocalExecutor), a DAG processor and a triggerer on loopback, and
the emulator at its defaults with no time scaling (60 requests per minute, 10 in flight, 2 s per
prediction). One deferrable batch task at the operator's defaults (the production scale DAG with no
mapped images) captions N images; every return from the triggerer to a worker goes through the real
scheduler. Prints the batch's elapsed time against the minimum the rate allows (the first 60
requests at once, then one a second), against the least time the API's sliding window allows (no
more than 60 requests in any 60 s: 180 s for 100 images), and the emulator's counts.
Takes a few minutes: the rate is the real one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from benchmarks.results import add_json_argument, write_results
from benchmarks.scale import minimum_seconds, window_minimum_seconds
from scripts.deployment import AirflowDeployment
from scripts.sandbox import AirflowSandbox

REPO = Path(__file__).resolve().parent.parent
API_KEY = "bench-key"
DAG_ID = "system_blip2_production_scale"
RPM = 60


def main() -> None:
    """Run the batch and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100)
    add_json_argument(parser)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="blip2-deploy-bench-"))
    config = EmulatorConfig(api_keys=(API_KEY,), latency=2.0)
    with EmulatorServer(config) as api, serve_directory(REPO / "example_dags" / "data") as images:
        sandbox = AirflowSandbox(
            home / "airflow",
            dags_folder=REPO / "tests" / "system" / "dags",
            connections={"blip2_default": {"conn_type": "blip2", "host": api.url, "password": API_KEY}},
        )
        sandbox.migrate()
        with AirflowDeployment(sandbox) as deployment:
            urls = [f"{images}/chelsea.jpg?n={n}" for n in range(args.images)]
            conf = {"images": [], "batch_images": urls, "output_uri": str(home / "out.jsonl")}
            run_id = deployment.trigger(DAG_ID, conf)
            state = deployment.wait_for_run(DAG_ID, run_id, timeout=3600)
            path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/batch/xcomEntries/return_value"
            summary = deployment.api("GET", path)["value"]
        ledger = api.ledger()
    minimum = minimum_seconds(args.images)
    window_minimum = window_minimum_seconds(args.images)
    result = {
        "images": args.images,
        "run": state,
        "elapsed_s": summary["elapsed"],
        "minimum_s": minimum,
        "ratio": round(summary["elapsed"] / minimum, 2),
        "window_minimum_s": window_minimum,
        "window_ratio": round(summary["elapsed"] / window_minimum, 2),
        "creates": ledger["creates"],
        "responses_429": ledger["responses_429"],
        "requests": sum(ledger["requests"].values()),
    }
    print(json.dumps(result))
    write_results(args.json, "batch_deployment", {"images": args.images, "requests_per_minute": RPM}, result)


if __name__ == "__main__":
    main()
