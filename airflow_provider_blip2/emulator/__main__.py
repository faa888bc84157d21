"""Command line entry point: ``blip2-emulator`` or ``python -m airflow_provider_blip2.emulator``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from airflow_provider_blip2.emulator.config import (
    DEFAULT_API_KEY,
    ENDPOINTS,
    RATE_LIMITS,
    RETRY_AFTER_PLACES,
    EmulatorConfig,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command."""
    defaults = EmulatorConfig()
    parser = argparse.ArgumentParser(
        prog="blip2-emulator",
        description="Serve a local emulator of the Eachlabs prediction API for the blip-2 model.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help=f"accepted API key, repeatable (default: {DEFAULT_API_KEY})",
    )
    parser.add_argument("--latency", type=float, default=defaults.latency, help="seconds per prediction")
    parser.add_argument(
        "--latency-spread",
        type=float,
        default=defaults.latency_spread,
        help="each prediction's latency is drawn from latency * [1 - S, 1 + S] (default: 0)",
    )
    parser.add_argument(
        "--time-scale", type=float, default=defaults.time_scale, help="multiplier of every duration"
    )
    parser.add_argument("--requests-per-minute", type=int, default=defaults.requests_per_minute)
    parser.add_argument(
        "--rate-limit",
        choices=RATE_LIMITS,
        default=defaults.rate_limit,
        help="how --requests-per-minute is counted: sliding window (default), token bucket, fixed window",
    )
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight)
    parser.add_argument("--answers", default=None, metavar="FILE", help="JSON answers file")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the fault injection")
    parser.add_argument("--fault-5xx", type=float, default=0.0, help="probability of a 5xx answer")
    parser.add_argument("--fault-429", type=float, default=0.0, help="probability of a 429 answer")
    parser.add_argument("--fault-slow", type=float, default=0.0, help="probability of a slow answer")
    parser.add_argument("--fault-drop", type=float, default=0.0, help="probability of a dropped connection")
    parser.add_argument(
        "--fault-provider-failed",
        type=float,
        default=0.0,
        help="probability that a prediction ends with a retryable PROVIDER_FAILED error",
    )
    parser.add_argument(
        "--fault-created-5xx",
        type=float,
        default=0.0,
        help="probability that a create is answered 500 after the prediction was created",
    )
    parser.add_argument("--slow-seconds", type=float, default=defaults.slow_seconds)
    parser.add_argument(
        "--fault-endpoint",
        action="append",
        dest="fault_endpoints",
        choices=ENDPOINTS,
        help="endpoint the faults hit, repeatable (default: all); e.g. --fault-endpoint get fails reads only",
    )
    parser.add_argument(
        "--retry-after-in",
        choices=RETRY_AFTER_PLACES,
        default=defaults.retry_after_in,
        help="where a 429 carries its wait: Retry-After header, body retry_after, or both (default)",
    )
    parser.add_argument(
        "--spelling",
        choices=("current", "legacy"),
        default="current",
        help="legacy: 201 on create, completed/failed/canceled, empty error bodies, body-only retry_after",
    )
    parser.add_argument(
        "--no-sync-run",
        dest="sync_run",
        action="store_false",
        help="answer POST /v1/prediction/run 400, as for a model without synchronous execution",
    )
    parser.add_argument(
        "--sync-run-max-wait",
        type=float,
        default=defaults.sync_run_max_wait,
        help="seconds a synchronous run waits before answering 'processing' (default: %(default)s)",
    )
    parser.add_argument(
        "--fetch-only-uploads",
        action="store_true",
        help="download no image URL but the emulator's own uploads (a service on a private network)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the emulator config from parsed arguments.

    :param args: the parsed arguments.
    """
    return EmulatorConfig(
        api_keys=tuple(args.api_keys or (DEFAULT_API_KEY,)),
        latency=args.latency,
        latency_spread=args.latency_spread,
        time_scale=args.time_scale,
        requests_per_minute=args.requests_per_minute,
        rate_limit=args.rate_limit,
        max_in_flight=args.max_in_flight,
        answers_file=args.answers,
        seed=args.seed,
        fault_5xx=args.fault_5xx,
        fault_429=args.fault_429,
        fault_slow=args.fault_slow,
        fault_drop=args.fault_drop,
        fault_provider_failed=args.fault_provider_failed,
        fault_created_5xx=args.fault_created_5xx,
        slow_seconds=args.slow_seconds,
        spelling=args.spelling,
        retry_after_in=args.retry_after_in,
        fault_endpoints=tuple(args.fault_endpoints or ()),
        sync_run=args.sync_run,
        sync_run_max_wait=args.sync_run_max_wait,
        fetch_only_uploads=args.fetch_only_uploads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until interrupted.

    :param argv: command line arguments (default: ``sys.argv[1:]``).
    :return: the exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    import uvicorn

    from airflow_provider_blip2.emulator.app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(
        f"blip2-emulator: serving http://{args.host}:{args.port} "
        f"(keys: {', '.join(config.api_keys)}; time scale {config.time_scale})",
        flush=True,
    )
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,
        proxy_headers=False,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
