"""
How one triggerer event loop copes with N ``Blip2PredictionTrigger``s: loop stalls, memory, reads.

The emulator runs in another process (``blip2-emulator``) on a free 127.0.0.1 port, with limits
far above the load and predictions that stay running for the whole run, so every read is a "still
running" read. N predictions are created with the sync hook; then N triggers (each building its own
hook) are started in one asyncio event loop the way Airflow's triggerer starts them (one task per
trigger, yielding to the loop between two), polling every ``--poll-interval`` seconds, with the
connection's client budget opened wide so it never paces the reads.

A heartbeat coroutine sleeps 10 ms in a loop; how late each wake-up comes is the loop stall (Airflow's
triggerer warns past 0.2 s). Printed as one JSON object:

* the worst and 99th-percentile stall during start-up (the first ``--startup-seconds``, which take
  in the creation of the triggers and their first reads) and during the steady window after it;
* memory per trigger: the growth of the process's resident set (RSS) from before the triggers were
  started to the end of start-up, divided by N (``memory_per_trigger_rss_kb``), and, from a second
  short pass under ``tracemalloc`` (which slows the loop, so no stall or rate is taken from it), the
  Python heap it allocated and still holds once every trigger has read once (``memory_per_trigger_kb``);
* reads per second asked for (N / poll interval) against those the emulator's ledger counted over the
  steady window, and the CPU share of the emulator's process and of this one over that window (a
  single-threaded emulator near 100 % is the bottleneck, not the triggers), with the CPU the other
  processes of the machine used and the hypervisor stole meanwhile: a run they disturbed is no measure.
  The full garbage collections of the steady window are counted with their longest pass: each walks
  the heap of the process not frozen (``heap_frozen_objects``: what the first trigger froze, mostly
  Airflow's own imported objects; ``AIRFLOW__BLIP2__FREEZE_TRIGGERER_HEAP=False`` keeps it whole)
  and stalls the loop meanwhile.
  The CPU this process spent per read (``benchmark_cpu_ms_per_read``) depends least on them: a core of
  its own sends at most 1,000 / that many reads a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil

from benchmarks.results import add_json_argument, write_results
from scripts.processes import stop_process

API_KEY = "bench-key"
CONN_ID = "blip2_default"
#: Seconds the heartbeat sleeps; its lateness on waking is the stall.
HEARTBEAT = 0.01
#: Seconds per prediction: far longer than the run, so every read finds it running.
LATENCY = 1_000_000.0
#: The emulator downloads the image only 10 % of LATENCY after the create: it is never fetched.
IMAGE_URL = "http://127.0.0.1:9/chelsea.jpg"
#: The emulator's and the client's requests per minute: far above any load of this benchmark.
WIDE_OPEN_RPM = 100_000_000
#: Goals of the issue: worst stall after start-up, worst stall while starting, KB per trigger.
GOAL_STEADY_STALL = 0.05
GOAL_STARTUP_STALL = 0.2
GOAL_KB_PER_TRIGGER = 60.0
#: Reads counted as "all sent" at this share of those asked for (the window's edges blur a little).
GOAL_READ_RATIO = 0.98


# --------------------------------------------------------------------------------------------------
# The emulator, in its own process
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def emulator_process(max_in_flight: int) -> Iterator[tuple[str, psutil.Process]]:
    """Run ``blip2-emulator`` in a child process until the block ends; yield its URL and process."""
    port = free_port()
    executable = Path(sys.executable).with_name("blip2-emulator")
    command = (
        [str(executable)]
        if executable.exists()
        else [sys.executable, "-m", "airflow_provider_blip2.emulator"]
    )
    command += [
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, "--latency", str(LATENCY),
        "--time-scale", "1", "--requests-per-minute", str(WIDE_OPEN_RPM),
        "--max-in-flight", str(max_in_flight), "--log-level", "warning",
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"the emulator exited with status {child.returncode}")
            try:
                ledger(url)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the emulator did not answer within 30 s") from None
                time.sleep(0.1)
        yield url, psutil.Process(child.pid)
    finally:
        stop_process(child)


@functools.cache
def _ledger_client() -> httpx.Client:
    """One client for the ledger: each new one loads the CA bundle, a stall of its own."""
    return httpx.Client(timeout=10.0, trust_env=False)


def ledger(url: str) -> dict[str, Any]:
    """The emulator's counters (``GET /_emulator/ledger``)."""
    answer = _ledger_client().get(f"{url}/_emulator/ledger")
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def use_connection(url: str, triggers: int) -> None:
    """Point ``blip2_default`` at the emulator, with the client budget opened wide."""
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = json.dumps(
        {
            "conn_type": "blip2",
            "host": url,
            "password": API_KEY,
            "extra": {
                "requests_per_minute": WIDE_OPEN_RPM,
                "max_concurrency": 2 * triggers + 10,
                "rate_window": 60.0,
            },
        }
    )


def create_predictions(count: int) -> list[str]:
    """Create ``count`` predictions with the sync hook, from a few threads (not what is measured)."""
    from airflow_provider_blip2.hooks.blip2 import Blip2Hook

    def create(_: int) -> str:
        hook = Blip2Hook(CONN_ID)
        try:
            return hook.create_prediction(IMAGE_URL, caption=True)
        finally:
            hook.close()

    # The hook logs one line per create: not shown.
    with contextlib.redirect_stdout(io.StringIO()), ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(create, range(count)))


# --------------------------------------------------------------------------------------------------
# The triggers, in one event loop
# --------------------------------------------------------------------------------------------------
@dataclass
class FullCollections:
    """The full (generation 2) garbage collections of this process: ``(loop time at end, seconds)``."""

    passes: list[tuple[float, float]] = field(default_factory=list)
    _started: float = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` entry."""
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.monotonic()
        else:
            self.passes.append((time.monotonic(), time.monotonic() - self._started))

    def between(self, start: float, end: float) -> list[float]:
        """The durations of the passes that ended between two monotonic times."""
        return [seconds for moment, seconds in self.passes if start <= moment < end]


@dataclass
class Heartbeat:
    """Sleeps :data:`HEARTBEAT` in a loop and records how late each wake-up is: ``(loop time, lateness)``."""

    samples: list[tuple[float, float]] = field(default_factory=list)

    async def run(self) -> None:
        """Beat until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + HEARTBEAT
            await asyncio.sleep(HEARTBEAT)
            now = loop.time()
            self.samples.append((now, max(0.0, now - due)))

    def stalls(self, start: float, end: float) -> dict[str, float]:
        """The worst and 99th-percentile stall of the wake-ups between two loop times."""
        late = sorted(lateness for moment, lateness in self.samples if start <= moment < end)
        if not late:
            return {"max": math.nan, "p99": math.nan}
        return {"max": late[-1], "p99": late[min(len(late) - 1, math.ceil(0.99 * len(late)) - 1)]}


async def start_triggers(prediction_ids: list[str], poll_interval: float) -> list[asyncio.Task[None]]:
    """Start one trigger task per prediction, yielding to the loop between two as the triggerer does."""
    from airflow_provider_blip2.triggers.blip2 import Blip2PredictionTrigger

    async def run(trigger: Blip2PredictionTrigger) -> None:
        async for event in trigger.run():
            raise RuntimeError(f"trigger for {trigger.prediction_id} fired early: {event.payload}")

    end_time = time.time() + 24 * 3600.0
    tasks: list[asyncio.Task[None]] = []
    for prediction_id in prediction_ids:
        await asyncio.sleep(0)
        trigger = Blip2PredictionTrigger(prediction_id, CONN_ID, poll_interval, end_time)
        # The triggerer gives each trigger its task instance: the trigger then runs as in a triggerer
        # (the first one freezes the heap, as [blip2] freeze_triggerer_heap allows).
        trigger.task_instance = SimpleNamespace(  # type: ignore[assignment]
            dag_id="bench", run_id="bench", task_id="wait", map_index=len(tasks)
        )
        tasks.append(asyncio.create_task(run(trigger), name=f"trigger {prediction_id}"))
    return tasks


async def stop_triggers(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the trigger tasks (as the triggerer does when their tasks leave their deferral)."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [
        r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
    ]
    if failures:
        raise RuntimeError(f"{len(failures)} trigger(s) failed, first: {failures[0]!r}")


async def gets(url: str) -> int:
    """Reads the emulator has counted so far (asked from a thread: the loop is not blocked)."""
    return int((await asyncio.to_thread(ledger, url))["requests"].get("get", 0))


def cpu_seconds(process: psutil.Process | None = None) -> float:
    """CPU seconds a process has used (user and system), or without one, the machine's busy seconds."""
    if process is None:
        busy = psutil.cpu_times()
        return float(
            busy.user + busy.nice + busy.system + getattr(busy, "irq", 0) + getattr(busy, "softirq", 0)
        )
    times = process.cpu_times()
    return float(times.user + times.system)


def rss() -> int:
    """This process's resident set in bytes, after a garbage collection."""
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def measure(
    url: str, emulator: psutil.Process, ids: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Run the triggers through start-up and the steady window; return stalls, RSS growth and reads."""
    loop = asyncio.get_running_loop()
    heartbeat = Heartbeat()
    collections = FullCollections()
    gc.callbacks.append(collections)
    beating = asyncio.create_task(heartbeat.run())
    await asyncio.sleep(1.0)  # the heartbeat's baseline, and the loop's default executor warmed up
    gets_before = await gets(url)
    rss_before = rss()
    started = loop.time()
    tasks = await start_triggers(ids, args.poll_interval)
    created_after = loop.time() - started
    first_reads_after = math.nan
    while loop.time() < started + args.startup_seconds:
        await asyncio.sleep(0.25)
        if math.isnan(first_reads_after) and await gets(url) - gets_before >= len(ids):
            first_reads_after = loop.time() - started
    rss_after = rss()
    await asyncio.sleep(1.0)  # the collection's own stall stays out of the steady window
    steady_from = loop.time()
    gets_from = await gets(url)
    own_cpu, emulator_cpu, all_cpu = cpu_seconds(psutil.Process()), cpu_seconds(emulator), cpu_seconds()
    steal = getattr(psutil.cpu_times(), "steal", 0.0)
    await asyncio.sleep(max(0.0, steady_from + args.steady_seconds - loop.time()))
    steady_to = loop.time()
    gets_to = await gets(url)
    own_cpu, emulator_cpu = cpu_seconds(psutil.Process()) - own_cpu, cpu_seconds(emulator) - emulator_cpu
    other_cpu = cpu_seconds() - all_cpu - own_cpu - emulator_cpu
    steal = getattr(psutil.cpu_times(), "steal", 0.0) - steal
    await stop_triggers(tasks)
    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating
    gc.callbacks.remove(collections)
    # The event loop's clock is time.monotonic.
    full_passes = collections.between(steady_from, steady_to)
    steady_elapsed = steady_to - steady_from
    startup, steady = heartbeat.stalls(started, steady_from), heartbeat.stalls(steady_from, steady_to)
    return {
        "startup_stall_max_s": round(startup["max"], 4),
        "startup_stall_p99_s": round(startup["p99"], 4),
        "steady_stall_max_s": round(steady["max"], 4),
        "steady_stall_p99_s": round(steady["p99"], 4),
        "memory_per_trigger_rss_kb": round((rss_after - rss_before) / len(ids) / 1024, 1),
        "reads_sent_per_s": round((gets_to - gets_from) / steady_elapsed, 1),
        "steady_full_gc_passes": len(full_passes),
        "steady_full_gc_max_s": round(max(full_passes, default=0.0), 4),
        "heap_frozen_objects": gc.get_freeze_count(),
        "triggers_created_in_s": round(created_after, 3),
        "first_reads_done_after_s": round(first_reads_after, 2),
        "benchmark_cpu_percent": round(100 * own_cpu / steady_elapsed, 1),
        "benchmark_cpu_ms_per_read": round(1000 * own_cpu / max(1, gets_to - gets_from), 2),
        "emulator_cpu_percent": round(100 * emulator_cpu / steady_elapsed, 1),
        "other_processes_cpu_percent": round(100 * max(0.0, other_cpu) / steady_elapsed, 1),
        "cpu_steal_percent": round(100 * steal / steady_elapsed, 1),
    }


async def measure_heap(url: str, ids: list[str], poll_interval: float) -> float:
    """Python heap per trigger (KB) held once every trigger has read once, under ``tracemalloc``."""
    loop = asyncio.get_running_loop()
    gets_before = await gets(url)
    gc.collect()
    tracemalloc.start()
    try:
        heap_before = tracemalloc.get_traced_memory()[0]
        tasks = await start_triggers(ids, poll_interval)
        deadline = loop.time() + poll_interval + 60.0
        while await gets(url) - gets_before < len(ids):
            if loop.time() > deadline:
                raise RuntimeError("the triggers did not all read within a minute under tracemalloc")
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)  # the last answers parsed
        gc.collect()
        heap_after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    await stop_triggers(tasks)
    return (heap_after - heap_before) / len(ids) / 1024


def main() -> None:
    """Run the measurement and print its numbers as one JSON object."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--triggers", type=int, default=1000, help="triggers in the loop (default: %(default)s)"
    )
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds (default: %(default)s)")
    parser.add_argument(
        "--startup-seconds", type=float, default=10.0, help="start-up window (default: %(default)s)"
    )
    parser.add_argument(
        "--steady-seconds", type=float, default=60.0, help="steady window (default: %(default)s)"
    )
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc pass")
    add_json_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="blip2-bench-"))
    import airflow_provider_blip2.triggers.blip2  # noqa: F401  (imported before anything is measured)

    with emulator_process(max_in_flight=4 * args.triggers + 10) as (url, emulator):
        use_connection(url, args.triggers)
        # Logs go to stderr: stdout carries the JSON only.
        with contextlib.redirect_stdout(sys.stderr):
            ids = create_predictions(args.triggers)
            result = asyncio.run(measure(url, emulator, ids, args))
            heap_kb = None
            if not args.no_tracemalloc:
                heap_ids = create_predictions(args.triggers)
                heap_kb = round(asyncio.run(measure_heap(url, heap_ids, args.poll_interval)), 1)
            counts = ledger(url)
    asked = args.triggers / args.poll_interval
    report: dict[str, Any] = {
        "triggers": args.triggers,
        "poll_interval": args.poll_interval,
        "startup_seconds": args.startup_seconds,
        "steady_seconds": args.steady_seconds,
        **{k: v for k, v in result.items() if k.endswith("_s") and "stall" in k},
        "memory_per_trigger_kb": heap_kb if heap_kb is not None else result["memory_per_trigger_rss_kb"],
        "memory_measured_by": "tracemalloc: Python heap held per trigger after its first read"
        if heap_kb is not None
        else "RSS growth over start-up / triggers",
        "memory_per_trigger_rss_kb": result["memory_per_trigger_rss_kb"],
        "reads_asked_per_s": round(asked, 1),
        "reads_sent_per_s": result["reads_sent_per_s"],
        "reads_sent_ratio": round(result["reads_sent_per_s"] / asked, 3),
        "steady_full_gc_passes": result["steady_full_gc_passes"],
        "steady_full_gc_max_s": result["steady_full_gc_max_s"],
        "heap_frozen_objects": result["heap_frozen_objects"],
        "triggers_created_in_s": result["triggers_created_in_s"],
        "first_reads_done_after_s": result["first_reads_done_after_s"],
        "benchmark_cpu_percent": result["benchmark_cpu_percent"],
        "benchmark_cpu_ms_per_read": result["benchmark_cpu_ms_per_read"],
        "emulator_cpu_percent": result["emulator_cpu_percent"],
        "other_processes_cpu_percent": result["other_processes_cpu_percent"],
        "cpu_steal_percent": result["cpu_steal_percent"],
        "cpus": psutil.cpu_count(),
        "responses_by_status": counts["responses_by_status"],
    }
    report["goals_met"] = {
        "steady_stall_max": report["steady_stall_max_s"] < GOAL_STEADY_STALL,
        "startup_stall_max": report["startup_stall_max_s"] < GOAL_STARTUP_STALL,
        "memory_per_trigger": report["memory_per_trigger_kb"] < GOAL_KB_PER_TRIGGER,
        "reads_sent": report["reads_sent_ratio"] >= GOAL_READ_RATIO,
    }
    print(json.dumps(report, indent=2))
    parameters = {
        "triggers": args.triggers,
        "poll_interval": args.poll_interval,
        "startup_seconds": args.startup_seconds,
        "steady_seconds": args.steady_seconds,
        "tracemalloc": not args.no_tracemalloc,
    }
    write_results(args.json, "triggerer_load", parameters, report)


if __name__ == "__main__":
    main()
