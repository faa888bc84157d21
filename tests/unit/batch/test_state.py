"""
Unit tests of a batch's state: its result lines, summary, failed ratio and progress line.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import json

from airflow_provider_blip2.batch import (
    BatchItem,
    BatchState,
    failed_ratio_exceeded,
    format_duration,
    image_key,
)
from airflow_provider_blip2.client.models import PredictionOutcome


def test_result_lines_summary_and_failed_ratio() -> None:
    state = BatchState(
        items=[
            BatchItem(image_key("https://h/a.jpg?X-Amz-Signature=abc"), "caption", ""),
            BatchItem("s3://b/k.png", "q", "Why?"),
        ],
        started_at=100.0,
    )
    state.finished[0] = PredictionOutcome(
        "success", output="a cat", prediction_id="p0", predict_time=1.5, cost=0.0011
    )
    state.finished[1] = PredictionOutcome(
        "error", error="cannot download", error_code="INPUT_DOWNLOAD_ERROR", prediction_id="p1"
    )
    state.attempts[0] = [1, 2]
    state.spent[0] = 0.0004
    lines = [json.loads(line) for line in state.result_lines().splitlines()]
    assert lines[0] == {
        "image": image_key("https://h/a.jpg?X-Amz-Signature=abc"),
        "label": "caption",
        "question": None,
        "output": "a cat",
        "status": "success",
        "error": None,
        "prediction_id": "p0",
        "predict_time": 1.5,
        "cost": 0.0015,
        "attempts": 2,
        "cached": False,
    }
    assert "Signature" not in state.result_lines()
    assert lines[1]["image"] == "s3://b/k.png" and lines[1]["status"] == "error"
    assert (lines[1]["cost"], lines[1]["attempts"]) == (None, 1)
    summary = state.summary("s3://out/r.jsonl", now=112.5)
    assert summary == {
        "total": 2,
        "succeeded": 1,
        "failed": 1,
        "skipped": 0,
        "statuses": {"error": 1, "success": 1},
        "retried": 1,
        "attempts": 3,
        "ambiguous": 0,
        "cost": 0.0015,
        "cached": 0,
        "cost_saved": 0.0,
        "images": 2,
        "output_uri": "s3://out/r.jsonl",
        "elapsed": 12.5,
    }
    assert failed_ratio_exceeded(state, 0.0)
    assert failed_ratio_exceeded(state, 0.49)
    assert not failed_ratio_exceeded(state, 0.5)


def test_progress_line_and_durations() -> None:
    state = BatchState(items=[BatchItem(str(n), "caption", None) for n in range(100)], started_at=0.0)
    for n in range(25):
        state.finished[n] = PredictionOutcome("success", output="x")
    state.created[25] = ("p25", 1e12)
    assert state.progress_line(now=50.0) == "25/100 done (0 failed, 1 in flight), 30.0/min, ETA 2m 30s"
    assert format_duration(3725) == "1h 02m 05s"
    assert format_duration(4.2) == "5s"
