"""
The emulator's latency spread (``--latency-spread``): each prediction takes its own time.

Starts: the emulator over HTTP on loopback, a local file server for the images.
"""

from __future__ import annotations

import time

import httpx
import pytest

from airflow_provider_blip2.emulator import EmulatorConfig
from airflow_provider_blip2.emulator.__main__ import build_parser, config_from_args
from tests.emulator import test_emulator as base
from tests.emulator.test_emulator import HEADERS, TERMINAL, ServerFactory, create

# The fixtures of test_emulator: the image files, their file server and the emulator factory.
image_dir = base.image_dir
files = base.files
make_server = base.make_server

#: Seconds a prediction takes at the test's time scale without the spread (20 s * 0.05).
LATENCY = 1.0


def seconds_to_end(http: httpx.Client, prediction_ids: list[str], started: float) -> dict[str, float]:
    """Poll every prediction until it ends; the seconds from ``started`` at which each was seen ended."""
    ended: dict[str, float] = {}
    while len(ended) < len(prediction_ids) and time.monotonic() - started < 10 * LATENCY:
        for prediction_id in prediction_ids:
            if prediction_id not in ended:
                status = http.get(f"/v1/prediction/{prediction_id}").json()["status"]
                if status in TERMINAL:
                    ended[prediction_id] = time.monotonic() - started
        time.sleep(0.02)
    assert len(ended) == len(prediction_ids), "a prediction never ended"
    return ended


def test_with_a_spread_each_prediction_ends_at_its_own_time_within_the_bounds(
    make_server: ServerFactory, files: str
) -> None:
    server = make_server(latency=20.0, latency_spread=0.5, max_in_flight=10)
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=5) as http:
        started = time.monotonic()
        ids = [create(http, f"{files}/green.png", question=f"What is in picture {n}?") for n in range(8)]
        ended = seconds_to_end(http, ids, started)
        statuses = {http.get(f"/v1/prediction/{prediction_id}").json()["status"] for prediction_id in ids}
    assert min(ended.values()) >= 0.5 * LATENCY  # none before latency * (1 - spread)
    # Eight draws from [0.5 s, 1.5 s]: their ends lie far apart, where without the spread all eight
    # would end within the few milliseconds their creates took.
    assert max(ended.values()) - min(ended.values()) > 0.3 * LATENCY, ended
    assert statuses == {"success"}


def test_a_draw_maps_onto_the_latency_widened_by_the_spread_both_ways() -> None:
    config = EmulatorConfig(latency=2.0, latency_spread=0.25)
    assert config.latency_of(0.0) == pytest.approx(1.5)
    assert config.latency_of(0.5) == pytest.approx(2.0)
    assert config.latency_of(0.999999) == pytest.approx(2.5)
    assert EmulatorConfig(latency=2.0).latency_of(0.9) == pytest.approx(2.0)  # no spread: one latency


def test_the_command_line_sets_the_spread_and_a_spread_out_of_bounds_is_refused() -> None:
    assert config_from_args(build_parser().parse_args([])).latency_spread == 0.0
    parsed = build_parser().parse_args(["--latency-spread", "0.5"])
    assert config_from_args(parsed).latency_spread == 0.5
    with pytest.raises(ValueError, match=r"latency_spread must lie in \[0, 1\], got 1.5"):
        EmulatorConfig(latency_spread=1.5)
