"""
Nightly runs of a batch with a result cache and a spending cap, through ``airflow dags test``, with
Airflow's StatsD metrics pointed at a listener: the provider's own metrics must arrive.

Starts the emulator over real HTTP on loopback, a file server for the images, a UDP StatsD listener
on loopback, and Airflow (``dags test``, SQLite) in a throwaway home.

Starts: the emulator over HTTP on loopback, a local file server for the images, a UDP StatsD
listener, and `airflow dags test` processes (SQLite).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_blip2.emulator import EmulatorServer, serve_directory
from scripts.sandbox import AirflowSandbox
from tests.conftest import connection_json

COST = 0.0011  # the emulator's cost of a prediction
#: Images come from the run's conf; one cache for every run, a new output per run.
NIGHTLY_DAG = """
import pendulum
from airflow.providers.common.compat.sdk import DAG
from airflow_provider_blip2.operators.blip2 import Blip2BatchPredictionOperator

with DAG(
    dag_id="blip2_nightly",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    render_template_as_native_obj=True,
):
    Blip2BatchPredictionOperator(
        task_id="moderate",
        images="{{ dag_run.conf['images'] }}",
        output_uri="{{ dag_run.conf['output'] }}",
        cache_uri="{{ dag_run.conf['cache'] }}",
        max_cost="{{ dag_run.conf.get('max_cost') }}",
        question="Is there a weapon in this image? Answer yes or no.",
        deferrable=True,
        poll_interval=0.5,
    )
"""


class StatsdListener:
    """A UDP StatsD listener on loopback that keeps every metric line it receives."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                continue
            self.lines += data.decode(errors="replace").splitlines()

    def counts(self, prefix: str = "airflow.blip2.") -> dict[str, float]:
        """Metric name -> the sum of its counter values (timers: the number received)."""
        totals: dict[str, float] = {}
        for line in self.lines:
            name, _, rest = line.partition(":")
            if not name.startswith(prefix):
                continue
            value, _, kind = rest.partition("|")
            totals[name] = totals.get(name, 0) + (float(value) if kind.startswith("c") else 1)
        return totals

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close()


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


def _image(folder: Path, name: str, sample: Path, salt: bytes) -> None:
    path = folder / name
    path.write_bytes(sample.read_bytes() + salt)
    stat = path.stat()  # a later rewrite must change Last-Modified, which has a one-second grain
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + len(salt) * 10**9))


def test_nightly_runs_pay_only_for_what_changed_stop_at_max_cost_and_send_metrics(
    start_emulator: Callable[..., EmulatorServer], image_dir: Path, tmp_path: Path, statsd: StatsdListener
) -> None:
    emulator = start_emulator()
    folder = tmp_path / "images"
    folder.mkdir()
    samples = sorted(p for p in image_dir.iterdir() if p.suffix == ".jpg" and "not-" not in p.name)
    for n in range(52):
        _image(folder, f"i{n:02d}.jpg", samples[n % len(samples)], b"1")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "nightly.py").write_text(NIGHTLY_DAG)
    with serve_directory(folder) as base:
        sandbox = AirflowSandbox(
            tmp_path / "home",
            dags_folder=dags,
            connections={"blip2_default": json.loads(connection_json(emulator.url))},
            extra_env={
                "AIRFLOW__METRICS__STATSD_ON": "True",
                "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
                "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            },
        )
        sandbox.migrate()
        cache = tmp_path / "cache" / "results.jsonl"

        def night(number: int, names: list[str], **conf: Any) -> tuple[int, list[dict[str, Any]]]:
            before = emulator.ledger()["creates"]
            output = tmp_path / f"night-{number}.jsonl"
            run_conf = {"images": [f"{base}/{name}" for name in names], "output": str(output)}
            with contextlib.suppress(RuntimeError):  # a failed run: the task states say how
                sandbox.dags_test("blip2_nightly", {**run_conf, "cache": str(cache), **conf})
            lines = [json.loads(line) for line in output.read_text().splitlines()]
            return emulator.ledger()["creates"] - before, lines

        first = [f"i{n:02d}.jpg" for n in range(30)]
        creates, lines = night(1, first)
        assert creates == 30 and sum(line["status"] == "success" for line in lines) == 30
        creates, lines = night(2, first)
        assert creates == 0 and sum(line["status"] == "success" for line in lines) == 30
        assert all(line["cached"] and line["cost"] == 0 for line in lines)
        (summary,) = sandbox.xcom("blip2_nightly", "moderate")
        assert summary["cached"] == 30 and summary["cost_saved"] == pytest.approx(30 * COST)

        for name in first[:3]:
            _image(folder, name, samples[0], b"new content")
        third = [*first, "i30.jpg", "i31.jpg"]
        creates, lines = night(3, third)
        assert creates == 5 and sum(line["status"] == "success" for line in lines) == 32

        fourth = [f"i{n:02d}.jpg" for n in range(32, 52)]
        creates, lines = night(4, fourth, max_cost=5 * COST)
        assert sandbox.task_states("blip2_nightly") == {"moderate": "failed"}
        assert 4 <= creates <= 15
        assert sum(line["status"] == "skipped" for line in lines) == 20 - creates
        shutil.rmtree(folder)

    counts = statsd.counts()
    assert counts["airflow.blip2.predictions.created"] == 30 + 5 + creates
    assert counts["airflow.blip2.predictions.succeeded"] == 30 + 5 + creates
    assert counts["airflow.blip2.predictions.cached"] == 30 + 30 - 3
    assert counts["airflow.blip2.cost_micros"] == pytest.approx((35 + creates) * COST * 1_000_000)
    # Named by DAG and task too (what the worker sends; an inline trigger has no task instance).
    assert counts["airflow.blip2.predictions.succeeded.blip2_nightly.moderate"] == 35 + creates
    assert counts["airflow.blip2.predictions.cached.blip2_nightly.moderate"] == 57
    assert counts["airflow.blip2.prediction.predict_time"] >= 1  # where the API reported it
    assert "airflow.blip2.api.rate_limited" not in counts  # the budget kept to the limits
