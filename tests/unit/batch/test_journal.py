"""
Unit tests of a batch's journal: created and finished predictions across loads and compaction,
releases for a new try, and journals of earlier versions.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

from airflow_provider_blip2.batch import BatchItem, BatchJournal, BatchState
from airflow_provider_blip2.client.models import PredictionOutcome
from tests.batch_driver import DictStore


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
