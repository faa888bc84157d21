"""
Unit tests of the result cache's file: keys, lookups by fingerprint, merging and compaction,
and the errors of corrupt or foreign files. Starts nothing (no server, no Airflow).
"""

from __future__ import annotations

import json

import pytest

from airflow_provider_blip2.batch.cache import (
    CACHE_FORMAT,
    ResultCache,
    ResultCacheError,
    cache_key,
    new_entry,
)

INPUTS = {"caption": False, "question": "Is it safe?", "use_nucleus_sampling": False, "temperature": 1.0}


def _key(image: str = "s3://b/a.jpg", **changes: object) -> str:
    return cache_key(image, {**INPUTS, **changes}, model="blip-2", model_version="0.0.1")


def test_the_key_changes_with_the_image_every_input_and_the_model() -> None:
    base = _key()
    assert base == _key()
    assert base != _key("s3://b/other.jpg")
    assert base != _key(question="Is it a cat?")
    assert base != _key(context="Question: a Answer: b.")
    assert base != _key(temperature=0.7)
    assert base != _key(use_nucleus_sampling=True)
    assert base != cache_key("s3://b/a.jpg", INPUTS, model="blip-2", model_version="0.0.2")


def test_a_result_is_found_only_while_the_fingerprint_is_the_same() -> None:
    cache = ResultCache()
    cache.add([new_entry(_key(), "s3:etag1:10", {"output": "no", "cost": 0.0011, "cached": False})])
    data = cache.to_bytes()
    loaded = ResultCache.parse(data, uri="/tmp/c.jsonl")
    entry = loaded.lookup(_key(), "s3:etag1:10")
    assert entry is not None and entry.result["output"] == "no" and entry.cost == 0.0011
    assert "cached" not in entry.result  # the line's own flags are not kept
    assert loaded.lookup(_key(), "s3:etag2:10") is None
    assert loaded.lookup(_key(), None) is None
    assert loaded.lookup(_key("s3://b/new.jpg"), "s3:etag1:10") is None
    assert loaded.cost_estimate() == pytest.approx(0.0011)


def test_the_file_has_a_header_and_one_line_per_key_a_new_result_replacing_the_old() -> None:
    first = ResultCache()
    first.add([new_entry(_key(f"s3://b/{n}.jpg"), f"fp{n}", {"output": str(n)}) for n in range(3)])
    current = ResultCache.parse(first.to_bytes(), uri="c")
    second = ResultCache()
    second.add([new_entry(_key("s3://b/1.jpg"), "fp1-new", {"output": "changed"})])
    second.add([new_entry(_key("s3://b/9.jpg"), "fp9", {"output": "9"})])
    merged = second.merged_into(current)
    rows = merged.to_bytes().decode().splitlines()
    assert json.loads(rows[0]) == {"format": CACHE_FORMAT, "version": 1}
    assert len(rows) == 1 + 4  # grows by the new image only
    again = ResultCache.parse(merged.to_bytes(), uri="c")
    assert again.lookup(_key("s3://b/1.jpg"), "fp1-new").result["output"] == "changed"  # type: ignore[union-attr]
    assert again.lookup(_key("s3://b/1.jpg"), "fp1") is None
    compacted = ResultCache.parse(merged.to_bytes(keep={_key("s3://b/9.jpg")}), uri="c")
    assert list(compacted.entries) == [_key("s3://b/9.jpg")]


def test_an_empty_file_is_an_empty_cache() -> None:
    assert ResultCache.parse(b"", uri="c").entries == {}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"image": "a.jpg", "output": "x"}\n', "is not a BLIP-2 result cache"),
        (b"\x89PNG\r\n", "is corrupt or not a result cache: line 1"),
        (b'{"format": "blip2-result-cache", "version": 7}\n', "version 7"),
        (b'{"format": "blip2-result-cache", "version": 1}\n{"key": "k"}\n', "is corrupt: line 2"),
        (b'{"format": "blip2-result-cache", "version": 1}\n{"key": "k", "fin', "line 2 is not JSON"),
    ],
)
def test_a_corrupt_or_foreign_file_is_an_error_naming_cache_uri(data: bytes, words: str) -> None:
    with pytest.raises(ResultCacheError) as error:
        ResultCache.parse(data, uri="s3://bucket/cache.jsonl")
    assert "cache_uri s3://bucket/cache.jsonl" in str(error.value) and words in str(error.value)
