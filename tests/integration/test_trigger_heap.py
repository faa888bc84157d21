"""
The triggerer's heap is frozen once, when the first BLIP-2 trigger runs in it, and only there.

Each case runs in a Python process of its own: a freeze lasts as long as its process, and these test
processes keep theirs unfrozen (``tests/conftest.py``).

Starts: a Python process of its own for each case; no server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import REPO_ROOT

# Runs one prediction trigger per entry of argv[2] (true: as in a triggerer, which sets the task
# instance; false: inline), each against its own prediction; prints each one's status and the
# number of frozen objects after it.
TRIGGERS = """
import asyncio, gc, json, sys, time
from types import SimpleNamespace
from airflow_provider_blip2.hooks.blip2 import Blip2Hook
from airflow_provider_blip2.triggers.blip2 import Blip2PredictionTrigger

async def run(in_triggerer):
    prediction_id = await asyncio.to_thread(Blip2Hook().create_prediction, sys.argv[1], caption=True)
    trigger = Blip2PredictionTrigger(prediction_id, "blip2_default", 0.05, time.time() + 30)
    if in_triggerer:
        trigger.task_instance = SimpleNamespace(dag_id="d", run_id="r", task_id="t", map_index=-1)
    events = [event async for event in trigger.run()]
    return [events[0].payload["status"], gc.get_freeze_count()]

print(json.dumps([asyncio.run(run(flag)) for flag in json.loads(sys.argv[2])]))
"""


def run_triggers(
    connection: str, image: str, in_triggerer: list[bool], **env: str
) -> tuple[list[list[object]], str]:
    """Run the triggers in a new process; return their statuses and freeze counts, and its output."""
    process = subprocess.run(
        [sys.executable, "-c", TRIGGERS, image, json.dumps(in_triggerer)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={**os.environ, "AIRFLOW_CONN_BLIP2_DEFAULT": connection, "PYTHONPATH": str(REPO_ROOT), **env},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1]), process.stdout + process.stderr


def test_the_first_trigger_in_a_triggerer_freezes_the_heap_once(
    blip2_connection: str, image_url: Callable[[str], str]
) -> None:
    connection = os.environ["AIRFLOW_CONN_BLIP2_DEFAULT"]
    results, output = run_triggers(connection, image_url("chelsea.jpg"), [False, True, True])

    (inline, inline_frozen), (first, first_frozen), (second, second_frozen) = results
    assert [inline, first, second] == ["success"] * 3
    assert inline_frozen == 0  # run inline (airflow dags test, a worker): nothing frozen
    assert isinstance(first_frozen, int) and first_frozen > 10_000  # Airflow's imported heap, at least
    # Not frozen again, which would add what the first run allocated; frozen objects freed by their
    # reference counts leave the count.
    assert isinstance(second_frozen, int) and 0 < second_frozen <= first_frozen
    reported = re.findall(r"Froze (\d+) objects of this triggerer's heap", output)
    assert len(reported) == 1 and int(reported[0]) > 10_000, output[-3000:]


@pytest.mark.parametrize("value", ["False", "false"])
def test_the_configuration_turns_the_freeze_off(
    blip2_connection: str, image_url: Callable[[str], str], value: str
) -> None:
    connection = os.environ["AIRFLOW_CONN_BLIP2_DEFAULT"]
    results, output = run_triggers(
        connection, image_url("chelsea.jpg"), [True], AIRFLOW__BLIP2__FREEZE_TRIGGERER_HEAP=value
    )

    assert results == [["success", 0]]
    assert "Froze " not in output
