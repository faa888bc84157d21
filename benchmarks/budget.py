"""
How close the client's request budget gets to the API's limits, and what it saves.

Runs N predictions through ``Blip2Hook.run`` from a pool of threads against the emulator at the
API's default limits (60 requests per minute counting every request, 10 predictions in flight,
about 2 s per prediction), with the emulator's time scaled so the run takes seconds. Prints wall
time against the minimum those limits allow, creates, 429s and requests, once with the client's
budget set to the API's limits and once with the budget opened wide (the server's 429s then do the
limiting).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow_provider_blip2.client.retry import RetryPolicy
from airflow_provider_blip2.emulator import EmulatorConfig, EmulatorServer, serve_directory
from benchmarks.results import add_json_argument, write_results

IMAGES = Path(__file__).resolve().parent.parent / "example_dags" / "data"
API_KEY = "bench-key"
LIMIT_RPM = 60
LIMIT_IN_FLIGHT = 10
LATENCY = 2.0


def run_batch(conn_id: str, urls: list[str], poll_interval: float) -> float:
    """Run one prediction per URL from 2 x in-flight threads; return the wall time."""
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    policy = RetryPolicy(max_attempts=50, max_elapsed=600.0, initial_wait=0.05, max_wait=5.0)

    def one(url: str) -> str | None:
        return (
            Blip2Hook(conn_id, retry_policy=policy).run(url, caption=True, poll_interval=poll_interval).output
        )

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2 * LIMIT_IN_FLIGHT) as pool:
        outputs = list(pool.map(one, urls))
    assert all(outputs), "every prediction must succeed"
    return time.monotonic() - started


def minimum_seconds(count: int, window: float, latency: float) -> float:
    """The least time the limits allow: a create and at least one read per prediction."""
    by_rate = max(0.0, (2 * count - LIMIT_RPM)) / LIMIT_RPM * window
    by_concurrency = -(-count // LIMIT_IN_FLIGHT) * latency
    return max(by_rate, by_concurrency)


def main() -> None:
    """Run both scenarios and print their numbers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--predictions", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=0.05)
    add_json_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="blip2-bench-"))
    window, latency = 60.0 * args.time_scale, LATENCY * args.time_scale
    names = sorted(p.name for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png", ".webp"})
    floor = minimum_seconds(args.predictions, window, latency)
    print(
        f"{args.predictions} predictions; limits {LIMIT_RPM} req/min, {LIMIT_IN_FLIGHT} in flight, "
        f"{LATENCY:g} s each; time scale {args.time_scale:g} (minute = {window:g} s)"
    )
    print(f"minimum wall time the limits allow: {floor:.2f} s")
    scenarios = {"budget at the API's limits": LIMIT_RPM, "budget opened wide": 100_000}
    measured: list[dict[str, object]] = []
    with serve_directory(IMAGES) as images:
        for label, rpm in scenarios.items():
            config = EmulatorConfig(api_keys=(API_KEY,), latency=LATENCY, time_scale=args.time_scale)
            with EmulatorServer(config) as api:
                conn_id = f"bench_{rpm}"
                os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
                    {
                        "conn_type": "blip2",
                        "host": api.url,
                        "password": API_KEY,
                        "extra": {
                            "requests_per_minute": rpm,
                            "max_concurrency": LIMIT_IN_FLIGHT,
                            "rate_window": window,
                        },
                    }
                )
                urls = [f"{images}/{names[i % len(names)]}" for i in range(args.predictions)]
                with contextlib.redirect_stdout(io.StringIO()):  # the hook logs each create and retry
                    elapsed = run_batch(conn_id, urls, poll_interval=latency)
                ledger = api.ledger()
            print(
                f"{label:<28} wall {elapsed:6.2f} s = {elapsed / floor:4.2f}x minimum | "
                f"creates {ledger['creates']} | 429s {ledger['responses_429']} | "
                f"requests {sum(ledger['requests'].values())} | peak in flight {ledger['peak_in_flight']}"
            )
            measured.append(
                {
                    "label": label,
                    "requests_per_minute": rpm,
                    "wall_s": round(elapsed, 3),
                    "ratio": round(elapsed / floor, 3),
                    "creates": ledger["creates"],
                    "responses_429": ledger["responses_429"],
                    "requests": sum(ledger["requests"].values()),
                    "peak_in_flight": ledger["peak_in_flight"],
                }
            )
    write_results(
        args.json,
        "budget",
        {
            "predictions": args.predictions,
            "time_scale": args.time_scale,
            "limit_requests_per_minute": LIMIT_RPM,
            "limit_in_flight": LIMIT_IN_FLIGHT,
            "latency_s": LATENCY,
        },
        {"minimum_s": round(floor, 3), "scenarios": measured},
    )


if __name__ == "__main__":
    main()
