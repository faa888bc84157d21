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


def test_image_key_redacts_queries_and_keeps_urls_apart() -> None:
    signed = "https://h/a.jpg?X-Amz-Signature=abc"
    assert image_key(signed).startswith("https://h/a.jpg?<redacted ")
    assert "abc" not in image_key(signed)
    assert image_key(signed) != image_key("https://h/a.jpg?X-Amz-Signature=abd")
    assert image_key("https://h/a.jpg") == "https://h/a.jpg"
    assert image_key("s3://b/k.jpg") == "s3://b/k.jpg"


def _finished_batch(store: DictStore) -> tuple[BatchJournal, BatchState]:
    """A batch of six items, each ended one way, recorded by try 1."""
    journal = BatchJournal(store)
    state = journal.start([BatchItem(f"s3://b/{n}.jpg", "caption", "") for n in range(6)], now=0.0)
    journal.begin_cycle(state)
    outcomes = {
        0: PredictionOutcome("success", output="a cat", prediction_id="p0", cost=0.001),
        1: PredictionOutcome("error", error_code="INPUT_DOWNLOAD_ERROR", prediction_id="p1"),
        2: PredictionOutcome(
            "error", error_code="PROVIDER_FAILED", retryable=True, prediction_id="p2", cost=0.0002
        ),
        3: PredictionOutcome("timeout", prediction_id="p3"),
        4: PredictionOutcome("cancelled", prediction_id="p4"),
    }
    for index in range(6):
        journal.record_attempt(state, index, 1)
        if index == 5:
            journal.record_finished(state, {5: PredictionOutcome("ambiguous", error="sent, no answer")})
        else:
            journal.record_created(state, index, f"p{index}", 1e12)
    journal.record_finished(state, outcomes)
    journal.flush()
    return journal, state


def test_a_new_try_releases_what_the_rule_selects_and_keeps_the_rest() -> None:
    store = DictStore()
    _, state = _finished_batch(store)
    assert state.to_predict_again("transient") == [2, 3, 4, 5]
    assert state.to_predict_again("all") == [1, 2, 3, 4, 5]
    assert state.to_predict_again("none") == []

    journal = BatchJournal(store)  # the next try, in a new process
    loaded = journal.load()
    assert loaded is not None
    journal.begin_cycle(loaded)
    journal.release(loaded, loaded.to_predict_again("transient"))
    assert loaded.pending() == [2, 3, 4, 5]
    for index in loaded.pending():
        journal.record_attempt(loaded, index, 2)
        journal.record_created(loaded, index, f"q{index}", 1e12)
    journal.record_finished(
        loaded,
        {
            i: PredictionOutcome("success", output="ok", prediction_id=f"q{i}", cost=0.001)
            for i in (2, 3, 4, 5)
        },
    )
    journal.flush()

    final = BatchJournal(store).load()
    assert final is not None and final.done
    assert final.finished[0].prediction_id == "p0"  # the success of try 1 is kept
    assert final.finished[1].error_code == "INPUT_DOWNLOAD_ERROR"  # the permanent failure too
    assert [final.finished[i].prediction_id for i in (2, 3, 4, 5)] == ["q2", "q3", "q4", "q5"]
    assert [final.attempts_of(i) for i in range(6)] == [1, 1, 2, 2, 2, 2]
    assert final.attempts_in_try(2, 2) == 1 and final.attempts_in_try(2, 1) == 1
    assert final.cost_of(2) == 0.0012  # the failed prediction's cost counts too
    summary = final.summary("out", now=1.0)
    assert (summary["succeeded"], summary["failed"], summary["retried"], summary["attempts"]) == (5, 1, 4, 10)
    assert summary["statuses"] == {"error": 1, "success": 5}
    assert summary["cost"] == 0.0052


def test_release_survives_compaction_and_a_replay_of_the_parts() -> None:
    store = DictStore()
    _, _state = _finished_batch(store)
    journal = BatchJournal(store)
    loaded = journal.load()
    assert loaded is not None
    journal.begin_cycle(loaded)
    journal.release(loaded, [2])
    journal.record_attempt(loaded, 2, 1)
    journal.record_created(loaded, 2, "q2", 1e12)
    before = BatchJournal(store).load()
    # A compaction whose worker died before it reset the part count: every part is merged again
    # over the snapshot that already holds them.
    assert before is not None
    store.set("blip2_batch/base", before.to_part())
    replayed = BatchJournal(store).load()
    assert replayed is not None
    assert replayed.created == before.created and replayed.finished == before.finished
    assert replayed.attempts == before.attempts == {**before.attempts, 2: [1, 1]}
    assert replayed.spent == before.spent == {2: 0.0002}
    assert 2 in replayed.in_flight and 2 not in replayed.finished


def test_a_journal_of_an_earlier_version_loads_and_counts_one_attempt_per_item() -> None:
    store = DictStore()
    store.set(
        "blip2_batch/items",
        {"items": [["s3://b/a.jpg", "caption", ""], ["s3://b/b.jpg", "caption", ""]], "started_at": 5.0},
    )
    store.set("blip2_batch/parts", 1)
    store.set(
        "blip2_batch/part/0",
        {
            "created": {"0": ["p0", 1e12], "1": ["p1", 1e12]},
            "finished": {
                "0": {
                    "status": "success",
                    "output": "x",
                    "error": None,
                    "error_code": None,
                    "prediction_id": "p0",
                    "predict_time": 1.0,
                },
                "1": {
                    "status": "error",
                    "output": None,
                    "error": "boom",
                    "error_code": "EXECUTION_TIMEOUT",
                    "prediction_id": "p1",
                    "predict_time": None,
                },
            },
        },
    )
    journal = BatchJournal(store)
    state = journal.load()
    assert state is not None and state.done
    assert [state.attempts_of(i) for i in range(2)] == [1, 1]
    assert state.to_predict_again("transient") == [1]
    journal.begin_cycle(state)
    journal.release(state, [1])
    journal.record_attempt(state, 1, 3)
    assert state.attempts[1] == [None, 3] and state.attempts_in_try(1, 3) == 2
