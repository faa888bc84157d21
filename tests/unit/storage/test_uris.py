"""
Parsing of URIs and paths.

Starts: nothing: no server, no Airflow process.
"""

from __future__ import annotations

import pytest

from airflow_provider_blip2.storage.uris import is_remote_object, split_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/photos/cat.jpg", ("s3", "bucket", "photos/cat.jpg")),
        ("gs://bucket/a b/c.png", ("gs", "bucket", "a b/c.png")),
        ("gs://bucket", ("gs", "bucket", "")),
        ("s3://bucket/", ("s3", "bucket", "")),
        ("S3://bucket/k", ("s3", "bucket", "k")),
    ],
)
def test_split_uri(uri: str, expected: tuple[str, str, str]) -> None:
    assert split_uri(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "gs:///key.jpg", "https://host/x.jpg", "/tmp/x.jpg", "s3:/b/k"])
def test_split_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match=r"s3://|gs://|bucket"):
        split_uri(uri)


def test_is_remote_object() -> None:
    assert is_remote_object("s3://b/k") and is_remote_object("gs://b/k")
    assert not any(map(is_remote_object, ["https://h/k", "/tmp/k", "file:///tmp/k", "ftp://h/k"]))
