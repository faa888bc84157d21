"""Unit tests of the batch's bookkeeping: items, the journal, result lines and the summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_blip2.batch import (
    BatchItem,
    BatchJournal,
    BatchState,
    build_items,
    failed_ratio_exceeded,
    format_duration,
    image_key,
)
from airflow_provider_blip2.client.errors import Blip2InputError
from airflow_provider_blip2.client.models import PredictionOutcome
from tests.batch_driver import DictStore


def test_build_items_questions_and_captions() -> None:
    items = build_items(
        ["a", "b"],
        questions={"nsfw": "Is it explicit?", "gun": "Is there a gun?"},
        question=None,
        caption=False,
    )
    assert [(i.image, i.label) for i in items] == [("a", "nsfw"), ("a", "gun"), ("b", "nsfw"), ("b", "gun")]
    assert build_items(["a"], questions=None, question=None, caption=True) == [BatchItem("a", "caption", "")]
    assert build_items(["a"], questions=None, question="", caption=False) == [BatchItem("a", "caption", "")]
    assert build_items(["a"], questions=None, question=None, caption=False) == [
        BatchItem("a", "question", None)
    ]
    assert build_items(["a"], questions=None, question="Why?", caption=False) == [
        BatchItem("a", "question", "Why?")
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"questions": {}, "question": None, "caption": False}, "questions is empty"),
        ({"questions": {"x": "q"}, "question": "q", "caption": False}, "not both"),
        ({"questions": {"x": "q"}, "question": None, "caption": True}, "not both"),
        ({"questions": {"x": "  "}, "question": None, "caption": False}, "questions['x']"),
    ],
)
def test_build_items_refuses_ambiguous_inputs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(Blip2InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_items(["a"], **kwargs)


def test_journal_keeps_created_and_finished_across_loads_and_compacts() -> None:
    store = DictStore()
    items = [BatchItem(f"s3://b/{n}.jpg", "caption", None) for n in range(40)]
    journal = BatchJournal(store)
    journal.start(items, now=1000.0)
    for cycle in range(30):
        journal = BatchJournal(store)  # a new worker process every cycle
        loaded_state = journal.load()
        assert loaded_state is not None
        state = loaded_state
        journal.begin_cycle(state)
        if cycle:
            journal.record_finished(
                state,
                {cycle - 1: PredictionOutcome("success", output=f"o{cycle}", prediction_id=f"p{cycle - 1}")},
            )
        journal.record_created(state, cycle, f"p{cycle}", 2000.0 + cycle)
    loaded = BatchJournal(store).load()
    assert loaded is not None
    assert loaded.created == {n: (f"p{n}", 2000.0 + n) for n in range(30)}
    assert sorted(loaded.finished) == list(range(29))
    assert loaded.finished[3] == PredictionOutcome("success", output="o4", prediction_id="p3")
    assert list(loaded.in_flight) == [29]
    assert loaded.pending() == list(range(30, 40))
    # Compaction bounds the number of parts a load reads.
    assert int(store.values["blip2_batch/parts"]) < BatchJournal.COMPACT_EVERY
    assert loaded.started_at == 1000.0


def test_journal_load_of_a_new_batch_is_none() -> None:
    assert BatchJournal(DictStore()).load() is None


def test_result_lines_summary_and_failed_ratio() -> None:
    state = BatchState(
        items=[
            BatchItem(image_key("https://h/a.jpg?X-Amz-Signature=abc"), "caption", ""),
            BatchItem("s3://b/k.png", "q", "Why?"),
        ],
        started_at=100.0,
    )
    state.finished[0] = PredictionOutcome("success", output="a cat", prediction_id="p0", predict_time=1.5)
    state.finished[1] = PredictionOutcome(
        "error", error="cannot download", error_code="INPUT_DOWNLOAD_ERROR", prediction_id="p1"
    )
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
    }
    assert "Signature" not in state.result_lines()
    assert lines[1]["image"] == "s3://b/k.png" and lines[1]["status"] == "error"
    summary = state.summary("s3://out/r.jsonl", now=112.5)
    assert summary == {
        "total": 2,
        "succeeded": 1,
        "failed": 1,
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


def test_image_key_redacts_queries_and_keeps_urls_apart() -> None:
    signed = "https://h/a.jpg?X-Amz-Signature=abc"
    assert image_key(signed).startswith("https://h/a.jpg?<redacted ")
    assert "abc" not in image_key(signed)
    assert image_key(signed) != image_key("https://h/a.jpg?X-Amz-Signature=abd")
    assert image_key("https://h/a.jpg") == "https://h/a.jpg"
    assert image_key("s3://b/k.jpg") == "s3://b/k.jpg"
